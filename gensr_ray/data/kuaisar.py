"""KuaiSAR (Sun et al., CIKM'23; kuaisar.github.io) from the raw CSVs of its official release.

    gensr prepare --dataset kuaisar --data-dir KuaiSAR_final --out data/kuaisar

Files read (other columns are ignored, so an extra index column does no harm):
- `rec_inter.csv`: user_id, item_id, timestamp (Unix ms, float), click. Clicks (click > 0)
  are recommendation events.
- `src_inter.csv`: user_id, search_session_id, search_session_timestamp (Unix ms), keyword (a
  list of anonymised word ids, e.g. "[20, 34, 3]"), item_id, click_cnt. Items clicked in a
  session (click_cnt > 0) are search events at the session's time, with its keyword as query.
- `item_features.csv`: item_id, caption (a list of word ids), first..fourth_level_category_name
  and ..._name_en.

Text is anonymised word ids, so a word id N becomes the token "wN": a keyword [20, 34, 3] is
the query "w20 w34 w3", and a caption [1, 213] the words "w1 w213" (one namespace for
keywords and captions: the same id is the same token). Item title = the English category
path ("Funny / Funny joke", levels named "empty" skipped) followed by "| w1 w213 ...";
item text = the title and the Chinese category path. The word-level tokenizer of the random
presets (gensr_ray.model.backbone) learns every such token from the prepared data.

The files are hundreds of MB to over 1 GB: they are streamed with pyarrow.csv in blocks, and
only compact numpy arrays of positive events are kept (item_features.csv is read twice: once
for its ids, once for the text of the items that survive filtering). Timestamps stay in ms.

Drops, counted in meta.json's loader.dropped and printed: events of items without a row in
item_features.csv, search events with an empty keyword, exact duplicate events and repeated
events of the same (user, item) (the earliest is kept), events outside the k-core (default
5), users left with a single event; duplicate item rows keep the first. Anything else
malformed is a DataError naming file and line (line numbers assume no newline inside a
quoted field, which the release does not have).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gensr_ray.data import filters
from gensr_ray.data.contract import DataError
from gensr_ray.data.writer import RawDataset

K_CORE = 5
BLOCK_SIZE = 16 << 20  # bytes of CSV per record batch
REC_FILE, SRC_FILE, ITEM_FILE = "rec_inter.csv", "src_inter.csv", "item_features.csv"
REC_COLUMNS = ["user_id", "item_id", "timestamp", "click"]
SRC_COLUMNS = ["user_id", "search_session_id", "search_session_timestamp", "keyword", "item_id",
               "click_cnt"]
LEVELS = ["first", "second", "third", "fourth"]
ITEM_COLUMNS = ["item_id", "caption", "first_level_category_name_en"]
ITEM_OPTIONAL = [f"{lv}_level_category_name{suffix}" for lv in LEVELS for suffix in ("_en", "")
                 if f"{lv}_level_category_name{suffix}" not in ITEM_COLUMNS]
EMPTY_CATEGORY = {"", "empty", "空", "unknown", "null", "nan", "none"}

_INT = r"^\s*[+-]?\d+\s*$"
_FLOAT = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_ID_LIST = re.compile(r"\[\s*(?:\d+\s*(?:,\s*\d+\s*)*)?,?\s*\]")
_ID_LIST_OR_EMPTY = r"^\s*(\[\s*(\d+\s*(,\s*\d+\s*)*)?,?\s*\])?\s*$"
_ID = re.compile(r"\d+")


def _header(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as fh:
        first = fh.readline()
    if not first.strip():
        raise DataError(f"{path}: empty file")
    try:
        return next(csv.reader([first.decode("utf-8-sig")]))
    except UnicodeDecodeError:
        raise DataError(f"{path}: line 1: header is not UTF-8 text") from None


def _check_columns(path: Path, header: list[str], required: list[str]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; header is {header}")


def stream_csv(path: Path, columns: list[str], block_size: int | None = None
               ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(line number of the batch's first row, batch of string columns), in file order.

    The file is cut in Python into blocks of whole lines, each parsed by pyarrow on its own:
    pyarrow's streaming reader reads ahead as fast as it can (measured: 270 MB held for a
    290 MB file), while this holds one block at a time."""
    import pyarrow.csv as pacsv

    block_size = block_size or BLOCK_SIZE
    header = _header(path)
    _check_columns(path, header, columns)
    convert = pacsv.ConvertOptions(include_columns=columns,
                                   column_types={c: pa.string() for c in columns},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    line = 2
    for header_bytes, block in _line_blocks(path, block_size):
        try:
            table = pacsv.read_csv(
                pa.py_buffer(header_bytes + block), convert_options=convert,
                read_options=pacsv.ReadOptions(use_threads=False,
                                               block_size=len(header_bytes) + len(block) + 1))
        except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:
            message = str(exc)
            if "utf8" in message.lower():
                raise DataError(f"{path}: line {_first_undecodable_line(path)}: not UTF-8 "
                                "text") from None
            if "columns, got" in message:
                lineno, fields = _first_ragged_row(path, len(header))
                raise DataError(f"{path}: line {lineno}: {fields} fields, expected "
                                f"{len(header)}") from None
            raise DataError(f"{path}: unreadable CSV after line {line} ({message[:200]})"
                            ) from None
        if table.num_rows:
            yield line, table.combine_chunks().to_batches()[0]
        line += table.num_rows
    if line == 2:
        raise DataError(f"{path}: no data rows")


def _line_blocks(path: Path, block_size: int) -> Iterator[tuple[bytes, bytes]]:
    """(header line, block of whole lines of about block_size bytes)."""
    with open(path, "rb") as fh:
        header = fh.readline()
        rest = b""
        while True:
            data = fh.read(block_size)
            if not data:
                if rest.strip():
                    yield header, rest
                return
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a block: read on
                rest = data
                continue
            yield header, data[:cut]
            rest = data[cut:]


def _first_ragged_row(path: Path, expected: int) -> tuple[int | str, int]:
    """(line, fields) of the first row without `expected` fields (a slow scan, on error only)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        start = 2
        for row in reader:
            if row and len(row) != expected:
                return start, len(row)
            start = reader.line_num + 1
    return "?", -1


def _first_undecodable_line(path: Path) -> int:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return -1


def _fail(path: Path, column: str, values: pa.Array, ok: pa.Array, first_line: int,
          what: str) -> DataError:
    bad = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
    value = values[bad].as_py()
    problem = "missing value" if not value.strip() else f"{value!r} is not {what}"
    return DataError(f"{path}: line {first_line + bad}: column {column!r}: {problem}")


def int_column(path: Path, batch: pa.RecordBatch, column: str, first_line: int) -> np.ndarray:
    values = batch.column(column)
    ok = pc.match_substring_regex(values, _INT)
    if not pc.all(ok).as_py():
        # integral floats ("12.0") are accepted, as pandas writes ints of a column with gaps
        floats = pc.match_substring_regex(values, _FLOAT)
        if not pc.all(floats).as_py():
            raise _fail(path, column, values, floats, first_line, "an integer")
        as_float = pc.cast(values, pa.float64()).to_numpy()
        integral = np.isfinite(as_float) & (as_float == np.round(as_float))
        if not integral.all():
            raise _fail(path, column, values, pa.array(integral), first_line, "an integer")
        return as_float.astype(np.int64)
    return pc.cast(pc.utf8_trim_whitespace(values), pa.int64()).to_numpy()


def float_column(path: Path, batch: pa.RecordBatch, column: str, first_line: int) -> np.ndarray:
    values = batch.column(column)
    ok = pc.match_substring_regex(values, _FLOAT)
    if not pc.all(ok).as_py():
        raise _fail(path, column, values, ok, first_line, "a number")
    numbers = pc.cast(pc.utf8_trim_whitespace(values), pa.float64()).to_numpy()
    finite = np.isfinite(numbers)
    if not finite.all():
        raise _fail(path, column, values, pa.array(finite), first_line, "a finite number")
    return numbers


def check_id_lists(path: Path, batch: pa.RecordBatch, column: str, first_line: int) -> None:
    """Every value of `column` is a list of word ids (or empty), checked for the whole batch."""
    values = batch.column(column)
    ok = pc.match_substring_regex(values, _ID_LIST_OR_EMPTY)
    if not pc.all(ok).as_py():
        bad = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: line {first_line + bad}: column {column!r}: "
                        f"{values[bad].as_py()[:60]!r} is not a list of word ids like [20, 34, 3]")


def id_words(text: str, where: str, column: str) -> str:
    """'[20, 34, 3]' -> 'w20 w34 w3'; an empty field is no words."""
    text = text.strip()
    if not text:
        return ""
    if not _ID_LIST.fullmatch(text):
        raise DataError(f"{where}: column {column!r}: {text[:60]!r} is not a list of word ids "
                        "like [20, 34, 3]")
    return " ".join(f"w{w}" for w in _ID.findall(text))


def _read_rec(path: Path) -> dict[str, np.ndarray]:
    parts = []
    for first, batch in stream_csv(path, REC_COLUMNS):
        click = int_column(path, batch, "click", first)
        pos = np.flatnonzero(click > 0)
        parts.append({
            "user": int_column(path, batch, "user_id", first)[pos],
            "item": int_column(path, batch, "item_id", first)[pos],
            "time": float_column(path, batch, "timestamp", first)[pos],
            "rows": np.int64(batch.num_rows),
        })
    return _concat(parts)


def _read_src(path: Path, queries: dict[str, int]) -> dict[str, np.ndarray]:
    parts = []
    for first, batch in stream_csv(path, SRC_COLUMNS):
        clicks = int_column(path, batch, "click_cnt", first)
        check_id_lists(path, batch, "keyword", first)
        int_column(path, batch, "search_session_id", first)  # checked, not used
        pos = np.flatnonzero(clicks > 0)
        keywords = batch.column("keyword").take(pa.array(pos)).to_pylist()
        qid = np.empty(len(pos), dtype=np.int64)
        for k, (row, keyword) in enumerate(zip(pos.tolist(), keywords)):
            words = id_words(keyword, f"{path}: line {first + row}", "keyword")
            qid[k] = queries.setdefault(words, len(queries)) if words else -1
        parts.append({
            "user": int_column(path, batch, "user_id", first)[pos],
            "item": int_column(path, batch, "item_id", first)[pos],
            "time": float_column(path, batch, "search_session_timestamp", first)[pos],
            "query": qid, "rows": np.int64(batch.num_rows),
        })
    return _concat(parts)


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if key != "rows"}
    out["rows"] = int(sum(p["rows"] for p in parts))
    out["time"] = out["time"].astype(np.int64)
    return out


def _item_columns(path: Path) -> list[str]:
    header = _header(path)
    _check_columns(path, header, ITEM_COLUMNS)
    return ITEM_COLUMNS + [c for c in ITEM_OPTIONAL if c in header]


def _item_ids(path: Path) -> np.ndarray:
    """Every item id, in file order; captions are checked on the way."""
    columns = _item_columns(path)
    ids = []
    for first, batch in stream_csv(path, columns):
        ids.append(int_column(path, batch, "item_id", first))
        check_id_lists(path, batch, "caption", first)
    return np.concatenate(ids)


def _item_texts(path: Path, wanted: np.ndarray) -> dict[int, tuple[str, str]]:
    """item id -> (title, text) for the `wanted` ids (sorted), first row of each."""
    columns = _item_columns(path)
    texts: dict[int, tuple[str, str]] = {}
    for first, batch in stream_csv(path, columns):
        ids = int_column(path, batch, "item_id", first)
        rows = np.flatnonzero(np.isin(ids, wanted))
        if not len(rows):
            continue
        picked = batch.take(pa.array(rows)).to_pydict()
        for k, row in enumerate(rows.tolist()):
            item = int(ids[row])
            if item in texts:
                continue
            where = f"{path}: line {first + row}"
            english = _levels(picked, k, "_en")
            chinese = _levels(picked, k, "")
            caption = id_words(picked["caption"][k], where, "caption")
            path_en = " / ".join(english) or "uncategorised"
            title = f"{path_en} | {caption}" if caption else path_en
            text = f"{title} | {' / '.join(chinese)}" if chinese else title
            texts[item] = (title, text)
    return texts


def _levels(columns: dict, k: int, suffix: str) -> list[str]:
    names = []
    for lv in LEVELS:
        column = columns.get(f"{lv}_level_category_name{suffix}")  # optional columns
        value = column[k] if column is not None else None
        if value and value.strip().lower() not in EMPTY_CATEGORY:
            names.append(value.strip())
    return names


@dataclass
class KuaiSAROptions:
    data_dir: Path  # directory with rec_inter.csv, src_inter.csv and item_features.csv
    k_core: int = K_CORE  # keep the k-core of users and items


def load_kuaisar(opts: KuaiSAROptions) -> RawDataset:
    """Stream KuaiSAR's CSVs into a RawDataset (search events with their real keywords)."""
    data_dir, k_core = opts.data_dir, opts.k_core
    if k_core < 1:
        raise ValueError(f"k_core must be >= 1, got {k_core}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: KuaiSAR directory not found")
    rec_path, src_path, item_path = (data_dir / n for n in (REC_FILE, SRC_FILE, ITEM_FILE))
    for path in (rec_path, src_path, item_path):  # fail on a missing file before reading
        _header(path)
    queries: dict[str, int] = {}
    rec = _read_rec(rec_path)
    src = _read_src(src_path, queries)
    meta_ids = _item_ids(item_path)

    users = np.concatenate([rec["user"], src["user"]])
    items = np.concatenate([rec["item"], src["item"]])
    times = np.concatenate([rec["time"], src["time"]])
    qids = np.concatenate([np.full(len(rec["user"]), -1, dtype=np.int64), src["query"]])
    is_search = np.concatenate([np.zeros(len(rec["user"]), bool), np.ones(len(src["user"]), bool)])

    dropped: dict[str, int] = {}
    unique_meta = np.unique(meta_ids)
    dropped["duplicate_item_rows"] = int(len(meta_ids) - len(unique_meta))
    keep = np.isin(items, unique_meta)
    dropped["items_without_metadata"] = int((~keep).sum())
    no_keyword = keep & is_search & (qids < 0)
    dropped["search_without_keyword"] = int(no_keyword.sum())
    keep &= ~no_keyword
    _, user_codes = np.unique(users, return_inverse=True)
    _, item_codes = np.unique(items, return_inverse=True)
    keep = filters.filter_events(user_codes, item_codes, times, keep, k_core, dropped)
    rows = np.flatnonzero(keep)
    if not len(rows):
        raise DataError(f"{data_dir}: no events left after filtering (dropped: {dropped}); "
                        "try a smaller --k-core")

    wanted = np.unique(items[rows])
    texts = _item_texts(item_path, wanted)
    query_text = [""] * len(queries)
    for words, qid in queries.items():
        query_text[qid] = words
    item_ids = [str(i) for i in wanted.tolist()]
    n_search = int(is_search[rows].sum())
    return RawDataset(
        source=f"KuaiSAR from {data_dir}",
        items_file=str(item_path), interactions_file=f"{rec_path} + {src_path}",
        item_ids=item_ids, titles=[texts[int(i)][0] for i in item_ids],
        texts=[texts[int(i)][1] for i in item_ids],
        user_ids=[str(u) for u in users[rows].tolist()],
        inter_item_ids=[str(i) for i in items[rows].tolist()],
        tasks=["search" if s else "rec" for s in is_search[rows].tolist()],
        queries=[query_text[q] if q >= 0 else None for q in qids[rows].tolist()],
        timestamps=times[rows].tolist(),
        notes={
            "dataset": "kuaisar", "k_core": k_core, "timestamp_unit": "ms",
            "query_rule": "the search session's keyword; word id N -> token 'wN'",
            "positives": "rec: click > 0; search: click_cnt > 0",
            "read": {"rec_rows": rec["rows"], "src_rows": src["rows"],
                     "item_rows": len(meta_ids),
                     "rec_clicks": len(rec["user"]), "src_clicks": len(src["user"])},
            "dropped": dropped,
        },
        readme=(f"KuaiSAR ({data_dir}), {k_core}-core: clicks in the recommendation feed and "
                f"clicked results of search sessions with their real (anonymised) keywords; "
                f"{n_search} of {len(rows)} events are search events. Word ids are tokens 'wN'."),
    )
