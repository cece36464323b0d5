"""Amazon reviews loader: both McAuley releases, HEM queries and query files, drops counted in
meta.json and the printed summary, and bad input named by file and line with nothing written."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from loader_fixtures import (
    N_USERS,
    PER_USER,
    asin,
    review_line,
    reviewer,
    write_amazon_2014,
    write_amazon_2018,
)

from gensr_ray.cli import main as gensr
from gensr_ray.data import contract
from gensr_ray.data.amazon import AmazonOptions, clean_markup, load_amazon, read_metadata
from gensr_ray.data.contract import DataError

HEM_QUERIES = {"books science fiction fantasy", "books mystery thriller suspense thrillers",
               "kindle store ebooks romance", "books romance"}


def _prepare(tmp_path: Path, reviews: Path, meta: Path, *flags: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    code = gensr(["prepare", "--dataset", "amazon", "--reviews", str(reviews), "--meta",
                  str(meta), "--out", str(out), "--no-cf", *flags])
    return code, out


def test_2014_release_end_to_end(tmp_path, capsys):
    reviews, meta = write_amazon_2014(tmp_path / "raw")
    code, out = _prepare(tmp_path, reviews, meta)
    printed = capsys.readouterr().out
    assert code == 0
    assert "| amazon | 80 | 120 | 400 | 400 | 50.0% | 4 |" in printed
    meta_json = contract.read_meta(out)
    assert meta_json["loader"]["format"] == ["2014"]
    assert meta_json["counts"]["distinct_queries"] == 4
    rows = contract.read_table(contract.interactions_dir(out)).to_pylist()
    items = contract.read_table(contract.items_dir(out)).to_pylist()
    assert {r["query"] for r in rows if r["task"] == "search"} == HEM_QUERIES
    # items with a single-level path ("Books") have no query: never search events
    one_level = {i["item_id"] for i in items if i["text"].endswith("| Books")}
    assert one_level and not any(r["item_id"] in one_level for r in rows if r["task"] == "search")
    per_user = {}
    for r in rows:
        per_user.setdefault(r["user_id"], []).append(r["task"])
    assert all(tasks.count("search") == PER_USER // 2 for tasks in per_user.values())
    assert items[0]["title"] == "Novel number 0"
    assert "Science Fiction & Fantasy" in items[0]["text"]
    # the file lists reviews newest first; events are in time order per user
    stamps = [r["timestamp"] for r in rows if r["user_id"] == 0]
    assert stamps == sorted(stamps)


def test_2018_release_html_titles_and_repeated_metadata(tmp_path):
    reviews, meta = write_amazon_2018(tmp_path / "raw")
    raw = load_amazon(AmazonOptions(reviews, meta, seed=0))
    titles = dict(zip(raw.item_ids, raw.titles))
    texts = dict(zip(raw.item_ids, raw.texts))
    assert titles[asin(0)] == "Trail Shoe 0"  # <span> stripped
    assert titles[asin(1)] == "A light shoe for trails, model 1."  # JS debris: description
    assert titles[asin(2)] == "Rain Jacket & Hood 2"  # entities decoded
    assert titles[asin(3)] == "A light shoe for trails, model 3."  # empty title
    assert texts[asin(0)] == ("Trail Shoe 0 | Clothing, Shoes & Jewelry > Women > Shoes | "
                              "A light shoe for trails, model 0.")
    assert not any("<" in t or "&amp;" in t for t in raw.texts)
    assert {q for q in raw.queries if q} == {"clothing shoes jewelry women"}
    assert raw.notes["dropped"]["duplicate_metadata"] == 1
    assert raw.notes["items_with_fallback_title"] == 60
    assert raw.notes["format"] == ["2018"]


def test_markup_cleaning():
    assert clean_markup('<div class="a">Good &amp; <b>cheap</b></div>') == "Good & cheap"
    assert clean_markup("Size < 5 inches > 3 cm") == "Size < 5 inches > 3 cm"
    assert clean_markup('Kids shoe <span class="a-size') == "Kids shoe"
    assert clean_markup("&lt;br&gt;Tea") == "Tea"


def test_drops_are_counted_printed_and_recorded(tmp_path, capsys):
    first = review_line(reviewer(0), asin(0), 1_400_000_000)  # user 0's first review
    extra = [
        first,  # exact duplicate line
        review_line(reviewer(0), asin(0), 1_500_000_000),  # repeated review, later
        review_line(reviewer(1), "B999999999", 1_400_000_500),  # no metadata
        review_line("ALONE", asin(5), 1_400_000_600),  # below the 5-core
        review_line("FEW", asin(6), 1), review_line("FEW", asin(7), 2),
    ]
    reviews, meta = write_amazon_2014(tmp_path / "raw", extra_reviews=extra)
    code, out = _prepare(tmp_path, reviews, meta)
    printed = capsys.readouterr().out
    assert code == 0
    dropped = contract.read_meta(out)["loader"]["dropped"]
    assert dropped == {"items_without_metadata": 1, "duplicate_events": 1, "repeat_events": 1,
                       "below_k_core": 3, "users_with_single_event": 0,
                       "duplicate_metadata": 0}
    assert ("dropped: items_without_metadata 1, duplicate_events 1, repeat_events 1, "
            "below_k_core 3") in printed
    assert contract.read_meta(out)["counts"]["users"] == N_USERS


def test_k_core_setting_and_single_event_users(tmp_path):
    extra = [review_line("ALONE", asin(5), 1_400_000_600),
             review_line("PAIR", asin(6), 1), review_line("PAIR", asin(7), 2)]
    reviews, meta = write_amazon_2014(tmp_path / "raw", extra_reviews=extra)
    raw = load_amazon(AmazonOptions(reviews, meta, k_core=1))
    assert raw.notes["dropped"]["users_with_single_event"] == 1
    assert "PAIR" in raw.user_ids and "ALONE" not in raw.user_ids
    assert "PAIR" not in load_amazon(AmazonOptions(reviews, meta, k_core=3)).user_ids


def test_hem_query_files(tmp_path):
    reviews, meta = write_amazon_2014(tmp_path / "raw")
    hem = tmp_path / "hem"
    hem.mkdir()
    (hem / "vocab.txt.gz").write_bytes(gzip.compress(b"kindle\nsci\nfi\nnovels\n"))
    # line 0 is text, line 1 word ids decoded through vocab.txt.gz
    (hem / "query_text.txt.gz").write_bytes(gzip.compress(b"space opera\n0 1 2\n"))
    qrels = [f"{reviewer(u)}_{u % 2} 0 {asin((u * PER_USER) % 120)} 1" for u in range(N_USERS)]
    qrels.append(f"{reviewer(0)}_0 0 {asin(1)} 0")  # label 0: not relevant
    (hem / "train.qrels.gz").write_bytes(gzip.compress(("\n".join(qrels) + "\n").encode()))
    raw = load_amazon(AmazonOptions(reviews, meta, query_files=hem, search_fraction=1.0))
    by_pair = {(u, a): q for u, a, q in zip(raw.user_ids, raw.inter_item_ids, raw.queries)}
    assert by_pair[(reviewer(0), asin(0))] == "space opera"
    assert by_pair[(reviewer(1), asin(10))] == "kindle sci fi"
    assert by_pair[(reviewer(0), asin(1))] in HEM_QUERIES  # from the categories
    assert raw.notes["events_with_qrels_queries"] == N_USERS


@pytest.mark.parametrize(
    "lines, message",
    [
        (["garbage"], "neither JSON nor a Python dict literal"),
        (["[1, 2]"], "expected an object, got list"),
        ([json.dumps({"reviewerID": "A", "asin": "B000000001", "overall": 5})],
         "missing field(s) ['unixReviewTime']"),
        ([json.dumps({"reviewer_id": "A", "asin": "B000000001", "overall": 5,
                      "unixReviewTime": 1})], "missing field(s) ['reviewerID']"),
        ([review_line("A", asin(1), 1, overall="five")], "overall must be a number"),
        ([review_line("A", asin(1), "2014-05-13")], "unixReviewTime must be a non-negative"),
        ([review_line("A", 17, 1)], "asin must be a non-empty string"),
    ],
)
def test_bad_review_lines(tmp_path, capsys, lines, message):
    reviews, meta = write_amazon_2014(tmp_path / "raw", extra_reviews=lines)
    code, out = _prepare(tmp_path, reviews, meta)
    err = capsys.readouterr().err
    assert code == 2
    line = N_USERS * PER_USER + 1
    assert f"{reviews}: line {line}: {message}" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{'title': 'no asin', 'categories': [['Books']]}", "no 'asin' string"),
        ("{'asin': 'B1', 'categories': 'Books'}", "field 'categories' must be a list of category"),
        (json.dumps({"asin": "B1", "category": [1, 2]}), "field 'category' must be a string or"),
        ("{'asin': 'B1', 'title': __import__('os').getcwd()}", "neither JSON nor a Python"),
    ],
)
def test_bad_metadata_lines(tmp_path, line, message):
    reviews, meta = write_amazon_2014(tmp_path / "raw", extra_meta=[line])
    with pytest.raises(DataError, match=re.escape(f"{meta}: line 121: {message}")):
        load_amazon(AmazonOptions(reviews, meta))


def test_unreadable_files(tmp_path):
    reviews, meta = write_amazon_2014(tmp_path / "raw")
    data = reviews.read_bytes()
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.json.gz: line \d+: cannot read past this point"):
        load_amazon(AmazonOptions(cut, meta))
    bad_utf8 = tmp_path / "latin1.json"
    bad_utf8.write_bytes(gzip.decompress(data) + b'{"reviewerID": "Ren\xe9"}\n')
    with pytest.raises(DataError, match=f"latin1.json: line {N_USERS * PER_USER + 1}: not UTF-8"):
        load_amazon(AmazonOptions(bad_utf8, meta))
    empty = tmp_path / "empty.json.gz"
    empty.write_bytes(gzip.compress(b"\n\n"))
    with pytest.raises(DataError, match="empty.json.gz: empty file"):
        load_amazon(AmazonOptions(empty, meta))
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_amazon(AmazonOptions(tmp_path / "nope.json", meta))
    (tmp_path / "not_gzip.gz").write_bytes(b"\x1f\x8bthis is not a gzip stream")
    with pytest.raises(DataError, match="not_gzip.gz: line 1: cannot read past this point"):
        load_amazon(AmazonOptions(tmp_path / "not_gzip.gz", meta))


def test_nothing_left_after_filtering_is_an_error(tmp_path):
    reviews, meta = write_amazon_2014(tmp_path / "raw")
    with pytest.raises(DataError, match="no events left after filtering"):
        load_amazon(AmazonOptions(reviews, meta, k_core=50))


def test_missing_flags(tmp_path, capsys):
    code = gensr(["prepare", "--dataset", "amazon", "--reviews", "r.json", "--out",
                  str(tmp_path / "o")])
    assert code == 2 and "needs --reviews FILE and --meta FILE" in capsys.readouterr().err
    code = gensr(["prepare", "--dataset", "kuaisar", "--out", str(tmp_path / "o")])
    assert code == 2 and "needs --data-dir" in capsys.readouterr().err


def test_optional_metadata_fields_may_be_null_or_absent(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"asin": "B1", "title": None, "description": None,
                                "category": None}) + "\n" + repr({"asin": "B2"}) + "\n")
    items, _ = read_metadata(path)
    assert items == {"B1": ("item B1", "item B1", []), "B2": ("item B2", "item B2", [])}
