"""Property-based tests: malformed input fed to every parser ends in a DataError naming the
file (never another exception from deep inside json, ast, gzip or pyarrow), and `gensr
prepare` leaves no output behind when it fails."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loader_fixtures import (
    ITEM_HEADER,
    REC_HEADER,
    SRC_HEADER,
    asin,
    review_line,
    write_amazon_2014,
    write_kuaisar,
)

from gensr_ray.data.amazon import AmazonOptions, load_amazon
from gensr_ray.data.contract import DataError
from gensr_ray.data.kuaisar import KuaiSAROptions, id_words, load_kuaisar
from gensr_ray.data.textio import iter_records, parse_record
from gensr_ray.prepare import prepare_dataset

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

# values a malformed record may carry in any field
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)
LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                    max_size=80)


@SETTINGS
@given(LINE_TEXT)
def test_parse_record_accepts_or_names_the_line(text):
    try:
        assert isinstance(parse_record(text, "f.json: line 3"), dict)
    except DataError as exc:
        assert str(exc).startswith("f.json: line 3: ")


@SETTINGS
@given(st.binary(max_size=200), st.booleans(), st.integers(0, 200))
def test_any_bytes_read_or_fail_cleanly(data, compress, cut):
    """Random bytes, gzipped or not, possibly truncated anywhere."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reviews.json.gz"
        payload = gzip.compress(data) if compress else data
        path.write_bytes(payload[: max(1, len(payload) - cut)] if compress else payload)
        try:
            for _ in iter_records(path):
                pass
        except DataError as exc:
            assert str(exc).startswith(str(path))


BASE_AMAZON: dict[str, bytes] = {}


def _amazon_files(tmp: Path) -> tuple[Path, Path]:
    if not BASE_AMAZON:
        reviews, meta = write_amazon_2014(Path(tempfile.mkdtemp()) / "base")
        BASE_AMAZON.update(reviews=gzip.decompress(reviews.read_bytes()),
                           meta=gzip.decompress(meta.read_bytes()))
    return tmp / "reviews.json", tmp / "meta.json"


def _prepare_fails_cleanly(tmp: Path, options) -> None:
    """prepare_dataset succeeds, or raises a DataError naming a file and writes nothing."""
    out = tmp / "out"
    try:
        prepare_dataset(options, out, with_cf=False)
    except DataError as exc:
        assert str(tmp) in str(exc)
        assert not out.exists() and not list(tmp.glob(".out.tmp-*"))


@SETTINGS
@given(st.sampled_from(["reviews", "meta"]), st.integers(0, 900),
       st.one_of(LINE_TEXT, st.dictionaries(
           st.sampled_from(["reviewerID", "asin", "overall", "unixReviewTime", "categories",
                            "category", "title", "description"]), ANY_VALUE, max_size=6)
           .map(json.dumps)))
def test_amazon_malformed_line_anywhere(which, position, line):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reviews, meta = _amazon_files(tmp)
        for name, path in (("reviews", reviews), ("meta", meta)):
            lines = BASE_AMAZON[name].decode().splitlines()
            if name == which:
                lines.insert(position % (len(lines) + 1), line)
            path.write_text("\n".join(lines) + "\n")
        _prepare_fails_cleanly(tmp, AmazonOptions(reviews, meta))


@SETTINGS
@given(st.fixed_dictionaries({}, optional={
    "reviewerID": ANY_VALUE, "asin": ANY_VALUE, "overall": ANY_VALUE,
    "unixReviewTime": ANY_VALUE}))
def test_amazon_review_fields_of_any_type(fields):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reviews, meta = _amazon_files(tmp)
        record = json.loads(review_line("A1", asin(1), 1))
        record.update(fields)
        reviews.write_bytes(BASE_AMAZON["reviews"] + json.dumps(record).encode() + b"\n")
        meta.write_bytes(BASE_AMAZON["meta"])
        try:
            load_amazon(AmazonOptions(reviews, meta))
        except DataError as exc:
            assert str(exc).startswith(f"{reviews}: line 801: ")


CSV_FIELD = st.one_of(st.integers(-5, 10**12).map(str), st.floats().map(str),
                      st.text(max_size=10), st.sampled_from(["", "[]", "[1, 2]", "[1,", "nan"]))


@SETTINGS
@given(st.sampled_from(["rec", "src", "item"]), st.lists(CSV_FIELD, min_size=0, max_size=20))
def test_kuaisar_malformed_row(which, row):
    header = {"rec": [""] + REC_HEADER, "src": SRC_HEADER, "item": ITEM_HEADER}[which]
    extra = {f"{which}_extra": [row[: len(header) - (which == "rec")]]} if row else {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = write_kuaisar(tmp / "raw", **extra)
        _prepare_fails_cleanly(tmp, KuaiSAROptions(data_dir))


@SETTINGS
@given(LINE_TEXT)
def test_word_id_lists_parse_or_fail_cleanly(text):
    try:
        words = id_words(text, "f.csv: line 2", "keyword")
        assert all(w.startswith("w") and w[1:].isdigit() for w in words.split())
    except DataError as exc:
        assert str(exc).startswith("f.csv: line 2: column 'keyword'")


@SETTINGS
@given(st.binary(min_size=1, max_size=120))
def test_kuaisar_raw_bytes_in_a_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = write_kuaisar(tmp / "raw")
        with open(data_dir / "src_inter.csv", "ab") as fh:
            fh.write(data)
        try:
            load_kuaisar(KuaiSAROptions(data_dir))
        except DataError as exc:
            assert str(data_dir / "src_inter.csv") in str(exc)
