"""The UniSAR authors' processed pickles: read into the contract without running their code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gensr_ray.cli import main as gensr
from gensr_ray.data import contract
from gensr_ray.data.contract import DataError
from gensr_ray.data.unisar import load_pickle


def _write_unisar(root: Path, n_users: int = 12, n_items: int = 150) -> Path:
    """Files as UniSAR's Sampler reads them: user_id, item_id, neg_items, rec_his,
    src_session_his (+ keyword for search, as a list's text or a list), leave-one-out."""
    rng = np.random.default_rng(0)
    (root / "dataset").mkdir(parents=True)
    (root / "vocab").mkdir()
    for prefix in ("rec", "src"):
        for split, per_user in (("train", 6), ("val", 1), ("test", 1)):
            rows = []
            for u in range(1, n_users + 1):
                for k in range(per_user):
                    row = {"user_id": u, "item_id": int(rng.integers(1, n_items)),
                           "neg_items": rng.integers(1, n_items, size=4).tolist(),
                           "rec_his": k, "src_session_his": k}
                    if prefix == "src":
                        words = rng.integers(1, 40, size=3).tolist()
                        row["keyword"] = str(words) if k % 2 else words
                    rows.append(row)
            pd.DataFrame(rows).to_pickle(root / "dataset" / f"{prefix}_{split}.pkl")
    with open(root / "vocab" / "user_vocab.pkl", "wb") as f:
        pickle.dump({1: {"rec_his": [1, 2], "rec_his_ts": [1.0, 2.0]}}, f)
    return root


def test_unisar_files_become_a_dataset(tmp_path, capsys):
    source = _write_unisar(tmp_path / "KuaiSAR")
    out = tmp_path / "out"
    assert gensr(["prepare", "--dataset", "unisar", "--data-dir", str(source), "--out",
                  str(out), "--no-cf"]) == 0
    meta = contract.read_meta(out)
    assert meta["counts"]["users"] == 12
    assert meta["counts"]["interactions"] == {"search": 12 * 8, "rec": 12 * 8}
    # leave-one-out kept: each user's test file row is its test example, per task
    test = contract.read_table(contract.examples_dir(out, "test")).to_pylist()
    assert len(test) == 2 * 12
    frame = pd.read_pickle(source / "dataset" / "src_test.pkl")  # the test's own reader
    items = contract.read_table(contract.items_dir(out)).to_pylist()
    raw_of = {row["item_id"]: row["raw_id"] for row in items}
    users = {row["user_id"]: row["raw_id"]
             for row in contract.read_table(contract.users_dir(out)).to_pylist()}
    expected = {(str(u), str(i)) for u, i in zip(frame["user_id"], frame["item_id"])}
    got = {(users[r["user_id"]], raw_of[r["target"]]) for r in test if r["task"] == "search"}
    assert got == expected
    queries = [r["query"] for r in test if r["task"] == "search"]
    assert all(q and all(w.startswith("w") for w in q.split()) for q in queries)


class _Boom:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


class _Eval:
    def __reduce__(self):
        return pd.eval, ("1 + 1",)


@pytest.mark.parametrize("payload, name", [(_Boom(), "system"), (_Eval(), "eval")])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys, payload, name):
    source = _write_unisar(tmp_path / "KuaiSAR")
    target = source / "dataset" / "rec_val.pkl"
    target.write_bytes(pickle.dumps({"frame": payload}))
    with pytest.raises(DataError, match=rf"rec_val.pkl: refused to load [\w.]+\.{name}"):
        load_pickle(target)
    out = tmp_path / "out"
    assert gensr(["prepare", "--dataset", "unisar", "--data-dir", str(source), "--out",
                  str(out), "--no-cf"]) == 2
    assert "refused to load" in capsys.readouterr().err and not out.exists()


def test_malformed_unisar_files_are_named(tmp_path, capsys):
    source = _write_unisar(tmp_path / "KuaiSAR")
    pd.DataFrame({"user_id": [1], "item": [2]}).to_pickle(source / "dataset" / "rec_test.pkl")
    assert gensr(["prepare", "--dataset", "unisar", "--data-dir", str(source), "--out",
                  str(tmp_path / "a"), "--no-cf"]) == 2
    assert "rec_test.pkl: missing column(s) ['item_id']" in capsys.readouterr().err
    (source / "dataset" / "rec_test.pkl").write_bytes(b"\x80\x04truncated")
    assert gensr(["prepare", "--dataset", "unisar", "--data-dir", str(source), "--out",
                  str(tmp_path / "b"), "--no-cf"]) == 2
    assert "rec_test.pkl: not a readable pickle" in capsys.readouterr().err
    assert gensr(["prepare", "--dataset", "unisar", "--out", str(tmp_path / "c")]) == 2
    assert "--dataset unisar needs --data-dir DIR" in capsys.readouterr().err
