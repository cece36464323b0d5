"""KuaiSAR loader on CSVs shaped like the official release: real search events with their
keywords, streamed reading in blocks, counted drops, and bad input named by file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from loader_fixtures import (
    ITEM_HEADER,
    N_ITEMS,
    REC_HEADER,
    SRC_HEADER,
    kuaisar_item_id,
    write_csv,
    write_kuaisar,
)

from gensr_ray.cli import main as gensr
from gensr_ray.data import contract, kuaisar
from gensr_ray.data.contract import DataError
from gensr_ray.data.kuaisar import KuaiSAROptions, id_words, load_kuaisar

REC_END, SRC_END, ITEM_END = 962, 642, 122  # line of the first extra row in each file


def _rec(user, item, stamp, click=1):
    return [user, item, 1.0, 2.0, "2023-05-22 15:53:20", stamp, click, 0, 0, 0, 0, 0]


def _src(user, item, stamp, keyword="[1, 2]", click=1):
    return [user, 9999, "2023-05-22 21:58:52", stamp, keyword, "USER_INPUT", item, click,
            "VIDEO"]


def _prepare(tmp_path: Path, data_dir: Path) -> tuple[int, Path]:
    out = tmp_path / "out"
    return gensr(["prepare", "--dataset", "kuaisar", "--data-dir", str(data_dir), "--out",
                  str(out), "--no-cf"]), out


def test_release_shaped_csvs_end_to_end(tmp_path, capsys):
    code, out = _prepare(tmp_path, write_kuaisar(tmp_path / "raw"))
    printed = capsys.readouterr().out
    assert code == 0
    assert "| kuaisar | 80 | 120 | 320 | 480 | 40.0% | 20 |" in printed
    meta = contract.read_meta(out)
    assert meta["loader"]["read"] == {"rec_rows": 960, "src_rows": 640, "item_rows": 120,
                                      "rec_clicks": 480, "src_clicks": 320}
    rows = contract.read_table(contract.interactions_dir(out)).to_pylist()
    first = [r for r in rows if r["user_id"] == 0][:2]
    assert first[0]["task"] == "search" and first[0]["query"] == "w20 w34 w0"
    assert first[0]["timestamp"] == 1_684_742_000_000  # ms, as released
    assert first[1]["task"] == "rec" and first[1]["query"] is None
    items = contract.read_table(contract.items_dir(out)).to_pylist()
    assert items[0]["raw_id"] == str(kuaisar_item_id(0))
    assert items[0]["title"] == "Funny / Funny joke | w0 w500 w7"
    assert items[0]["text"] == "Funny / Funny joke | w0 w500 w7 | 搞笑 / 搞笑段子"
    assert items[2]["title"] == "Games | w2 w502 w7"  # "empty" levels are skipped


def test_streaming_in_small_blocks_gives_the_same_dataset(tmp_path, monkeypatch):
    data_dir = write_kuaisar(tmp_path / "raw")
    whole = load_kuaisar(KuaiSAROptions(data_dir))
    monkeypatch.setattr(kuaisar, "BLOCK_SIZE", 4096)  # many record batches per file
    blocks = load_kuaisar(KuaiSAROptions(data_dir))
    for field in ("item_ids", "titles", "texts", "user_ids", "inter_item_ids", "tasks",
                  "queries", "timestamps"):
        assert getattr(blocks, field) == getattr(whole, field)
    # line numbers stay right across batches
    write_kuaisar(data_dir, rec_extra=[_rec(1, "x12", 1.0)])
    with pytest.raises(DataError, match=f"rec_inter.csv: line {REC_END}: column 'item_id'"):
        load_kuaisar(KuaiSAROptions(data_dir))


def test_drops_are_counted_and_recorded(tmp_path, capsys):
    data_dir = write_kuaisar(
        tmp_path / "raw",
        rec_extra=[
            _rec(0, kuaisar_item_id(1), 1_684_742_180_000.0),  # exact duplicate of a click
            _rec(0, kuaisar_item_id(1), 1_700_000_000_000.0),  # the same item again, later
            _rec(0, 5, 1_684_742_000_001.0),  # item 5 has no row in item_features.csv
            _rec(500, kuaisar_item_id(3), 1.0), _rec(500, kuaisar_item_id(4), 2.0),
        ],
        src_extra=[_src(1, kuaisar_item_id(9), 3.0, keyword="[]")],  # clicked, no keyword
        item_extra=[[kuaisar_item_id(0), "[1]"] + [""] * (len(ITEM_HEADER) - 2)],
    )
    code, out = _prepare(tmp_path, data_dir)
    printed = capsys.readouterr().out
    assert code == 0
    dropped = contract.read_meta(out)["loader"]["dropped"]
    assert dropped == {"duplicate_item_rows": 1, "items_without_metadata": 1,
                       "search_without_keyword": 1, "duplicate_events": 1, "repeat_events": 1,
                       "below_k_core": 2, "users_with_single_event": 0}
    assert "dropped: duplicate_item_rows 1, items_without_metadata 1" in printed
    items = contract.read_table(contract.items_dir(out)).to_pylist()
    assert items[0]["title"] == "Funny / Funny joke | w0 w500 w7"  # the first row is kept


@pytest.mark.parametrize(
    "file, extra, message",
    [
        ("rec", {"rec_extra": [_rec(1, "abc", 1.0)]},
         f"rec_inter.csv: line {REC_END}: column 'item_id': 'abc' is not an integer"),
        ("rec", {"rec_extra": [_rec(1, 2, "yesterday")]},
         f"rec_inter.csv: line {REC_END}: column 'timestamp': 'yesterday' is not a number"),
        ("rec", {"rec_extra": [_rec(1, 2, 1.0, click="")]},
         f"rec_inter.csv: line {REC_END}: column 'click': missing value"),
        ("rec", {"rec_extra": [[1, 2, 3]]}, f"rec_inter.csv: line {REC_END}: 4 fields, expected 13"),
        ("src", {"src_extra": [_src(1, 2, 3.0, keyword="hello world")]},
         f"src_inter.csv: line {SRC_END}: column 'keyword': 'hello world' is not a list of word"),
        ("src", {"src_extra": [_src(1, 2, 3.0, click=1.5)]},
         f"src_inter.csv: line {SRC_END}: column 'click_cnt': '1.5' is not an integer"),
        ("item", {"item_extra": [["oops", "[1]"] + [""] * (len(ITEM_HEADER) - 2)]},
         f"item_features.csv: line {ITEM_END}: column 'item_id': 'oops' is not an integer"),
        ("item", {"item_extra": [[kuaisar_item_id(1), "[1, x]"] + [""] * (len(ITEM_HEADER) - 2)]},
         f"item_features.csv: line {ITEM_END}: column 'caption': '[1, x]' is not a list of"),
    ],
)
def test_bad_rows_are_named_and_nothing_is_written(tmp_path, capsys, file, extra, message):
    code, out = _prepare(tmp_path, write_kuaisar(tmp_path / "raw", **extra))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_bad_files(tmp_path):
    data_dir = write_kuaisar(tmp_path / "raw")
    items = data_dir / "item_features.csv"
    items.write_bytes(items.read_bytes() + f"{kuaisar_item_id(500)},[1],10,NORMAL,2023-04-22,"
                      "x,9,,F\xe9,1,,,0,,,0,,\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"item_features.csv: line {ITEM_END}: not UTF-8"):
        load_kuaisar(KuaiSAROptions(data_dir))
    rec = data_dir / "rec_inter.csv"
    good = rec.read_bytes()
    rec.write_bytes(b"")
    with pytest.raises(DataError, match="rec_inter.csv: empty file"):
        load_kuaisar(KuaiSAROptions(data_dir))
    rec.write_bytes(good.splitlines(keepends=True)[0])
    with pytest.raises(DataError, match="rec_inter.csv: no data rows"):
        load_kuaisar(KuaiSAROptions(data_dir))
    write_csv(rec, [h if h != "click" else "clicked" for h in [""] + REC_HEADER], [])
    with pytest.raises(DataError, match=r"rec_inter.csv: missing column\(s\) \['click'\]"):
        load_kuaisar(KuaiSAROptions(data_dir))
    rec.write_bytes(good)
    write_csv(data_dir / "src_inter.csv", [h for h in SRC_HEADER if h != "keyword"], [])
    with pytest.raises(DataError, match=r"src_inter.csv: missing column\(s\) \['keyword'\]"):
        load_kuaisar(KuaiSAROptions(data_dir))
    (data_dir / "item_features.csv").unlink()
    with pytest.raises(DataError, match="item_features.csv: file not found"):
        load_kuaisar(KuaiSAROptions(data_dir))
    with pytest.raises(DataError, match="nowhere: KuaiSAR directory not found"):
        load_kuaisar(KuaiSAROptions(tmp_path / "nowhere"))


def test_word_id_lists():
    assert id_words("[20, 34, 3]", "f", "keyword") == "w20 w34 w3"
    assert id_words("[]", "f", "keyword") == ""
    assert id_words("", "f", "caption") == ""
    with pytest.raises(DataError, match="f: column 'keyword'"):
        id_words("[20, -3]", "f", "keyword")


def test_k_core_removes_sparse_items(tmp_path):
    data_dir = write_kuaisar(tmp_path / "raw")
    assert len(load_kuaisar(KuaiSAROptions(data_dir, k_core=7)).item_ids) < N_ITEMS
