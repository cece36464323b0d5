"""Amazon reviews (McAuley et al. 2014 and Ni et al. 2018 JSON-lines releases) with HEM queries.

    gensr prepare --dataset amazon --reviews reviews_Kindle_Store_5.json.gz \
        --meta meta_Kindle_Store.json.gz --out data/kindle

Input (gzipped or not, one record a line):
- reviews: `reviewerID, asin, overall, unixReviewTime` are required (text fields are ignored);
- metadata: `asin` is required. 2014 lines are Python dict literals (read with
  ast.literal_eval, never eval) carrying `categories` (a list of category paths) and `title`;
  2018 lines are JSON carrying `category` (one path), `title` and `description` (a list).

Items: title = the metadata title with markup stripped; titles that are empty, code or HTML
debris after stripping fall back to the description's first words, then to the category path.
Text = title | category path | description (clipped).

Queries (HEM, Ai et al. SIGIR'17; gensr_ray.data.queries): every category path of two levels
or more gives one query, its words concatenated with stop words and repeats removed. Search
events follow UniSAR's Amazon setting: a user's review of an item is an event of that user;
per user, a seeded `search_fraction` (rounded) of the reviews of items that have a query
become search events whose query is one of the item's queries, chosen per event; the other
reviews are recommendation events. With HEM query files (`query_files`), a (reviewer, asin)
pair listed in the qrels takes its query from them instead. These queries are synthetic.

Drops, each counted in meta.json's loader.dropped and printed: reviews of items without
metadata, exact duplicate reviews and repeated reviews of the same item (the earliest is
kept), events outside the k-core (default 5), users left with a single event; duplicate
metadata lines keep the first. Anything else malformed is a DataError naming file and line.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gensr_ray.data import filters
from gensr_ray.data.contract import DataError
from gensr_ray.data.queries import query_from_path, tokenize
from gensr_ray.data.textio import iter_lines, iter_records
from gensr_ray.data.writer import RawDataset

SEARCH_FRACTION = 0.5
K_CORE = 5
REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")
MAX_TITLE_CHARS = 200
MAX_TEXT_CHARS = 400

_TAG = re.compile(r"</?[A-Za-z!][^>]*>|</?[A-Za-z][^>]*$")
_SPACE = re.compile(r"\s+")
_CODE = re.compile(r"[{}]|\bvar\s|function\s*\(|getTime\(|\bhref=|\.css\b|;\s*\w+\s*=")


def clean_markup(value: str) -> str:
    """Plain text from an HTML fragment: tags (also cut-off ones) removed, entities decoded."""
    text = _TAG.sub(" ", value)
    text = _TAG.sub(" ", html.unescape(text))  # escaped markup, e.g. &lt;b&gt;
    return _SPACE.sub(" ", text).strip()


def _usable_title(title: str) -> bool:
    return bool(title) and len(title) <= MAX_TITLE_CHARS and not _CODE.search(title) \
        and any(ch.isalnum() for ch in title)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0]


def _strings(value, where: str, field: str) -> list[str]:
    """An optional text field: a string, a list of strings, or absent (missing or null)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise DataError(f"{where}: field {field!r} must be a string or a list of strings, got "
                    f"{type(value).__name__}")


def _category_paths(record: dict, where: str) -> list[list[str]]:
    """2014: `categories` = list of paths; 2018: `category` = one path. Levels cleaned."""
    paths = []
    if "categories" in record:
        value = record["categories"] or []
        if not isinstance(value, list) or not all(isinstance(p, list) for p in value):
            raise DataError(f"{where}: field 'categories' must be a list of category paths "
                            f"(lists of strings), got {type(value).__name__}")
        paths = [_strings(p, where, "categories") for p in value]
    elif record.get("category") is not None:
        paths = [_strings(record["category"], where, "category")]
    cleaned = []
    for path in paths:
        levels = [c for c in (clean_markup(level) for level in path) if c]
        if levels:
            cleaned.append(levels)
    return cleaned


def read_metadata(path: Path) -> tuple[dict[str, tuple[str, str, list[str]]], dict]:
    """asin -> (title, text, queries); and counts (lines, duplicates, format seen)."""
    items: dict[str, tuple[str, str, list[str]]] = {}
    stats = {"lines": 0, "duplicate_metadata": 0, "untitled_items": 0, "formats": set()}
    for lineno, record in iter_records(path):
        where = f"{path}: line {lineno}"
        stats["lines"] += 1
        asin = record.get("asin")
        if not isinstance(asin, str) or not asin:
            raise DataError(f"{where}: no 'asin' string (fields: {sorted(record)[:12]})")
        if asin in items:
            stats["duplicate_metadata"] += 1  # the 2018 release repeats some items
            continue
        stats["formats"].add("2014" if "categories" in record else
                             "2018" if "category" in record else "no categories")
        paths = _category_paths(record, where)
        title = clean_markup(" ".join(_strings(record.get("title"), where, "title")))
        description = clean_markup(" ".join(_strings(record.get("description"), where,
                                                     "description")))
        path_text = " > ".join(max(paths, key=len)) if paths else ""
        if not _usable_title(title):
            stats["untitled_items"] += 1
            title = (_clip(description, 80) if description and not _CODE.search(description)
                     else path_text) or f"item {asin}"
        title = _clip(title, MAX_TITLE_CHARS)
        text = " | ".join(p for p in (title, path_text, _clip(description, MAX_TEXT_CHARS)) if p)
        queries = []
        for levels in paths:
            query = query_from_path(levels)
            if query and query not in queries:
                queries.append(query)
        items[asin] = (title, text, queries)
    return items, stats


def read_reviews(path: Path) -> tuple[list[str], list[str], list[int], list[int]]:
    """(reviewer ids, asins, unix times, line numbers) of every review line."""
    users, asins, times, lines = [], [], [], []
    for lineno, record in iter_records(path):
        where = f"{path}: line {lineno}"
        missing = [f for f in REVIEW_FIELDS if f not in record]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing} (fields: {sorted(record)})")
        user, asin, rating, stamp = (record[f] for f in REVIEW_FIELDS)
        for name, value in (("reviewerID", user), ("asin", asin)):
            if not isinstance(value, str) or not value:
                raise DataError(f"{where}: {name} must be a non-empty string, got {value!r}")
        if isinstance(rating, bool) or not isinstance(rating, (int, float)):
            raise DataError(f"{where}: overall must be a number, got {rating!r}")
        if isinstance(stamp, bool) or not isinstance(stamp, int) or stamp < 0:
            raise DataError(f"{where}: unixReviewTime must be a non-negative integer, "
                            f"got {stamp!r}")
        users.append(user)
        asins.append(asin)
        times.append(stamp)
        lines.append(lineno)
    return users, asins, times, lines


def read_hem_queries(directory: Path) -> dict[tuple[str, str], list[str]]:
    """(reviewerID, asin) -> queries, from HEM's query file and qrels.

    The query file (`query_text.txt[.gz]` or `query.txt[.gz]`) holds one query a line; lines
    of word ids are decoded with `vocab.txt[.gz]`. Qrels lines (`*.qrels[.gz]`) read
    `<reviewerID>_<query line> 0 <asin> <label>`; a label > 0 makes the pair relevant."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: HEM query directory not found")
    names = ("query_text.txt.gz", "query_text.txt", "query.txt.gz", "query.txt")
    query_file = next((directory / n for n in names if (directory / n).is_file()), None)
    if query_file is None:
        raise DataError(f"{directory}: no query file (one of {', '.join(names)})")
    vocab_file = next((directory / n for n in ("vocab.txt.gz", "vocab.txt")
                       if (directory / n).is_file()), None)
    vocab = [text for _, text in iter_lines(vocab_file)] if vocab_file else None
    queries: list[str] = []
    for lineno, text in iter_lines(query_file):
        words = text.split()
        if all(w.isdigit() for w in words):
            if vocab is None:
                raise DataError(f"{query_file}: line {lineno}: a query of word ids, but no "
                                f"vocab.txt.gz in {directory} to decode it")
            bad = [w for w in words if int(w) >= len(vocab)]
            if bad:
                raise DataError(f"{query_file}: line {lineno}: word id {bad[0]} is not in "
                                f"{vocab_file} ({len(vocab)} words)")
            words = [vocab[int(w)] for w in words]
        queries.append(" ".join(tokenize(" ".join(words))))
    qrels_files = sorted(p for p in directory.iterdir()
                         if p.name.endswith((".qrels", ".qrels.gz")))
    if not qrels_files:
        raise DataError(f"{directory}: no *.qrels or *.qrels.gz file")
    pairs: dict[tuple[str, str], list[str]] = {}
    for qrels in qrels_files:
        for lineno, text in iter_lines(qrels):
            fields = text.split()
            user, _, index = fields[0].rpartition("_")
            if len(fields) != 4 or not user or not index.isdigit() \
                    or not fields[3].lstrip("-").isdigit():
                raise DataError(f"{qrels}: line {lineno}: expected '<reviewerID>_<query line> "
                                f"0 <asin> <label>', got {text[:80]!r}")
            if int(index) >= len(queries):
                raise DataError(f"{qrels}: line {lineno}: query line {index} is not in "
                                f"{query_file} ({len(queries)} queries)")
            query = queries[int(index)]
            if int(fields[3]) > 0 and query:
                options = pairs.setdefault((user, fields[2]), [])
                if query not in options:
                    options.append(query)
    return pairs


def assign_search(users: np.ndarray, candidates: list[list[str]], seed: int, fraction: float
                  ) -> tuple[list[str], list[str | None]]:
    """Per user, a seeded `fraction` (rounded) of the events become search events, drawn among
    those with a candidate query; each takes one of its candidates."""
    rng = np.random.default_rng(seed)
    tasks = ["rec"] * len(users)
    queries: list[str | None] = [None] * len(users)
    order = np.argsort(users, kind="stable")
    boundaries = np.flatnonzero(np.diff(users[order])) + 1
    for events in np.split(order, boundaries):
        eligible = [int(i) for i in events if candidates[i]]
        n_search = min(len(eligible), round(fraction * len(events)))
        if n_search:
            for idx in rng.choice(eligible, size=n_search, replace=False).tolist():
                options = candidates[idx]
                tasks[idx] = "search"
                queries[idx] = options[int(rng.integers(len(options)))]
    return tasks, queries


@dataclass
class AmazonOptions:
    reviews: Path  # reviews JSON-lines file (2014 or 2018 release, .gz or not)
    meta: Path  # metadata file of the same category (JSON or dict literals)
    query_files: Path | None = None  # directory of HEM query files, if any
    seed: int = 42  # which events become search events
    search_fraction: float = SEARCH_FRACTION
    k_core: int = K_CORE  # keep the k-core of users and items


def load_amazon(opts: AmazonOptions) -> RawDataset:
    """Read an Amazon reviews file and its metadata file into a RawDataset with HEM queries."""
    reviews, meta, seed, query_files = opts.reviews, opts.meta, opts.seed, opts.query_files
    search_fraction, k_core = opts.search_fraction, opts.k_core
    if not 0.0 <= search_fraction <= 1.0:
        raise ValueError(f"search_fraction must lie in [0, 1], got {search_fraction}")
    if k_core < 1:
        raise ValueError(f"k_core must be >= 1, got {k_core}")
    reviews, meta = Path(reviews), Path(meta)
    items, meta_stats = read_metadata(meta)
    users, asins, times, lines = read_reviews(reviews)
    hem = read_hem_queries(query_files) if query_files else {}

    dropped: dict[str, int] = {}
    known = np.fromiter((a in items for a in asins), dtype=bool, count=len(asins))
    dropped["items_without_metadata"] = int((~known).sum())
    user_codes, user_values = filters.encode(users)
    item_codes, item_values = filters.encode(asins)
    stamps = np.asarray(times, dtype=np.int64)
    mask = filters.filter_events(user_codes, item_codes, stamps, known, k_core, dropped)
    dropped["duplicate_metadata"] = meta_stats["duplicate_metadata"]
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        raise DataError(f"{reviews}: no events left after filtering (dropped: {dropped}); "
                        f"try a smaller --k-core")

    kept_users = [user_values[user_codes[r]] for r in rows]
    kept_asins = [item_values[item_codes[r]] for r in rows]
    from_qrels = 0
    candidates = []
    for user, asin in zip(kept_users, kept_asins):
        options = hem.get((user, asin))
        from_qrels += bool(options)
        candidates.append(options or items[asin][2])
    tasks, queries = assign_search(user_codes[rows], candidates, seed, search_fraction)

    used = set(kept_asins)
    item_ids = [a for a in items if a in used]  # metadata file order
    n_search = tasks.count("search")
    return RawDataset(
        source=f"Amazon reviews {reviews.name} with metadata {meta.name}",
        items_file=str(meta), interactions_file=str(reviews),
        item_ids=item_ids, titles=[items[a][0] for a in item_ids],
        texts=[items[a][1] for a in item_ids],
        user_ids=kept_users, inter_item_ids=kept_asins, tasks=tasks, queries=queries,
        timestamps=stamps[rows].tolist(), lines=[lines[r] for r in rows],
        notes={
            "dataset": "amazon", "format": sorted(meta_stats["formats"]), "k_core": k_core,
            "search_fraction": search_fraction,
            "query_rule": "HEM: words of a >= 2-level category path, stop words and repeats "
                          "removed; per user a seeded search_fraction of reviews of items "
                          "with a query become search events with one of the item's queries",
            "query_source": "HEM query files + categories" if hem else "categories",
            "events_with_qrels_queries": from_qrels,
            "read": {"review_lines": len(asins), "metadata_lines": meta_stats["lines"]},
            "items_with_fallback_title": meta_stats["untitled_items"],
            "dropped": dropped,
        },
        readme=(f"Amazon reviews ({reviews.name}, {meta.name}), {k_core}-core. Search queries "
                f"are SYNTHETIC (HEM's category-path rule): {n_search} of {len(tasks)} events "
                "are search events. Amazon's terms apply to the data; it is not redistributed."),
    )
