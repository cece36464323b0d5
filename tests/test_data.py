"""The data contract: splits, histories, negatives, leakage, determinism and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gensr_ray.cli import main as gensr
from gensr_ray.data import contract
from gensr_ray.data.contract import DataError
from gensr_ray.data.movielens import MovieLensOptions, load_ml100k
from gensr_ray.data.queries import query_from_path
from gensr_ray.data.sampling import draw_outside, sample_unseen
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.writer import RawDataset, WriteOptions, write_dataset


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    write_dataset(generate_synthetic(SyntheticOptions(seed=3)), out, WriteOptions(seed=7, rows_per_shard=500))
    return out


def _examples(root: Path, split: str) -> list[dict]:
    return contract.read_table(contract.examples_dir(root, split)).to_pylist()


def _interactions(root: Path) -> list[dict]:
    return contract.read_table(contract.interactions_dir(root)).to_pylist()


def test_layout_and_meta(synthetic_dir):
    meta = contract.read_meta(synthetic_dir)
    assert meta["schema_version"] == contract.SCHEMA_VERSION
    assert meta["seed"] == 7
    # rows_per_shard=500 shards the training split into several files for Ray Data
    assert len(contract.shard_files(contract.examples_dir(synthetic_dir, "train"))) > 1
    for split in contract.SPLITS:
        table = contract.read_table(contract.examples_dir(synthetic_dir, split))
        assert table.schema.equals(contract.EXAMPLES_SCHEMA)
        for task in contract.TASKS:
            n = sum(1 for t in table.column("task").to_pylist() if t == task)
            assert n == meta["counts"]["examples"][split][task] and n > 0
    items = contract.read_table(contract.items_dir(synthetic_dir))
    assert items.column("item_id").to_pylist() == list(range(meta["counts"]["items"]))
    assert not list(synthetic_dir.parent.glob(".synthetic.tmp-*"))


def test_split_rule_per_user_and_task(synthetic_dir):
    events: dict[tuple[int, str], list[dict]] = {}
    for row in _interactions(synthetic_dir):
        events.setdefault((row["user_id"], row["task"]), []).append(row)
    for rows in events.values():
        splits = [r["split"] for r in sorted(rows, key=lambda r: r["timestamp"])]
        n = len(splits)
        expected = (["train"] * (n - 2) + ["valid", "test"] if n >= 3
                    else ["train", "test"] if n == 2 else ["train"])
        assert splits == expected


def test_no_validation_or_test_interaction_reaches_training(synthetic_dir):
    held_out = {(r["user_id"], r["item_id"]) for r in _interactions(synthetic_dir)
                if r["split"] != "train"}
    assert held_out
    for ex in _examples(synthetic_dir, "train"):
        assert (ex["user_id"], ex["target"]) not in held_out
        for item in ex["history"]:
            assert (ex["user_id"], item) not in held_out
    # valid examples may see training and validation events, never test events
    test_pairs = {(r["user_id"], r["item_id"]) for r in _interactions(synthetic_dir)
                  if r["split"] == "test"}
    for ex in _examples(synthetic_dir, "valid"):
        assert not any((ex["user_id"], item) in test_pairs for item in ex["history"])


def test_cf_pretraining_reads_training_interactions_only(synthetic_dir):
    from gensr_ray.cf.lightgcn import train_edges

    users, items = train_edges(synthetic_dir)
    edges = set(zip(users.tolist(), items.tolist()))
    rows = _interactions(synthetic_dir)
    assert edges == {(r["user_id"], r["item_id"]) for r in rows if r["split"] == "train"}


def test_histories_and_negatives(synthetic_dir):
    rows = _interactions(synthetic_dir)
    touched: dict[int, set[int]] = {}
    when: dict[tuple[int, int], int] = {}
    for r in rows:
        touched.setdefault(r["user_id"], set()).add(r["item_id"])
        when[(r["user_id"], r["item_id"])] = r["timestamp"]
    for split, n_neg in (("train", 4), ("valid", 99), ("test", 99)):
        for ex in _examples(synthetic_dir, split):
            user = ex["user_id"]
            assert 1 <= len(ex["history"]) <= contract.MAX_HISTORY
            stamps = [when[(user, i)] for i in ex["history"]]
            assert stamps == sorted(stamps) and stamps[-1] <= ex["timestamp"]
            negatives = ex["negatives"]
            assert len(negatives) == n_neg == len(set(negatives))
            assert not set(negatives) & touched[user]
            assert (ex["query"] is not None) == (ex["task"] == "search")


def test_same_seed_same_dataset_other_seed_other_negatives(tmp_path):
    metas = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_dataset(generate_synthetic(SyntheticOptions(seed=1)), tmp_path / name, WriteOptions(seed=seed))
        metas.append(_examples(tmp_path / name, "test"))
    assert metas[0] == metas[1]
    assert [e["negatives"] for e in metas[0]] != [e["negatives"] for e in metas[2]]


def _reference_tables(raw: RawDataset, opts: WriteOptions) -> dict[str, list[dict]]:
    """Every table of the contract computed from its rules by plain loops over the raw rows."""
    user_raw = sorted(set(raw.user_ids))
    user_id = {u: i for i, u in enumerate(user_raw)}
    item_id = {x: i for i, x in enumerate(raw.item_ids)}
    rows = sorted(range(len(raw.user_ids)),
                  key=lambda r: (user_id[raw.user_ids[r]], raw.timestamps[r], r))
    by_user_task: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        by_user_task.setdefault((raw.user_ids[r], raw.tasks[r]), []).append(r)
    split = {}
    for group in by_user_task.values():
        for k, r in enumerate(group):
            from_end = len(group) - 1 - k
            split[r] = ("test" if from_end == 0 and len(group) >= 2
                        else "valid" if from_end == 1 and len(group) >= 3 else "train")
    tables = {
        "items": [{"item_id": i, "raw_id": r, "title": t, "text": x}
                  for i, (r, t, x) in enumerate(zip(raw.item_ids, raw.titles, raw.texts))],
        "users": [{"user_id": i, "raw_id": u} for i, u in enumerate(user_raw)],
        "interactions": [
            {"user_id": user_id[raw.user_ids[r]], "item_id": item_id[raw.inter_item_ids[r]],
             "task": raw.tasks[r], "query": raw.queries[r], "timestamp": raw.timestamps[r],
             "split": split[r]} for r in rows],
    }
    examples: dict[str, list[dict]] = {s: [] for s in contract.SPLITS}
    next_id = 0
    n_items = len(raw.item_ids)
    for user in range(len(user_raw)):
        mine = [r for r in rows if user_id[raw.user_ids[r]] == user]
        touched = {item_id[raw.inter_item_ids[r]] for r in mine}
        rng = np.random.default_rng([opts.seed, user])
        earlier: list[tuple[int, int]] = []  # (item, split rank)
        for r in mine:
            rank = contract.SPLITS.index(split[r])
            item = item_id[raw.inter_item_ids[r]]
            history = [i for i, seen_rank in earlier if seen_rank <= rank][-opts.max_history:]
            earlier.append((item, rank))
            if not history:
                continue
            count = opts.train_negatives if rank == 0 else opts.eval_negatives
            negatives: list[int] = []
            if n_items - len(touched) <= count:  # all untouched items, in a seeded order
                untouched = [i for i in range(n_items) if i not in touched]
                negatives = rng.permutation(untouched).tolist()
            while len(negatives) < count:  # seeded draws of 2 * count, first fits kept
                for candidate in rng.integers(0, n_items, size=2 * count).tolist():
                    if candidate not in touched and candidate not in negatives:
                        negatives.append(candidate)
                        if len(negatives) == count:
                            break
            examples[split[r]].append(
                {"example_id": next_id, "user_id": user, "task": raw.tasks[r],
                 "query": raw.queries[r], "timestamp": raw.timestamps[r], "history": history,
                 "target": item, "negatives": negatives})
            next_id += 1
    for name in contract.SPLITS:
        tables[f"examples/{name}"] = examples[name]
    return tables


def _tricky_raw() -> RawDataset:
    """Synthetic events shuffled, plus users with equal timestamps and one or two events a task."""
    raw = generate_synthetic(SyntheticOptions(seed=4, n_users=40, n_items=150, events_per_user=14))
    extra = [("tie", "i00001", "rec", None, 50), ("tie", "i00002", "rec", None, 50),
             ("tie", "i00003", "search", "q tie", 50), ("tie", "i00004", "rec", None, 49),
             ("two", "i00005", "rec", None, 7), ("two", "i00006", "search", "q two", 8),
             ("two", "i00007", "rec", None, 9)]
    for user, item, task, query, stamp in extra:
        raw.user_ids.append(user)
        raw.inter_item_ids.append(item)
        raw.tasks.append(task)
        raw.queries.append(query)
        raw.timestamps.append(stamp)
    permutation = np.random.default_rng(0).permutation(len(raw.user_ids)).tolist()
    for column in ("user_ids", "inter_item_ids", "tasks", "queries", "timestamps"):
        values = getattr(raw, column)
        setattr(raw, column, [values[r] for r in permutation])
    return raw


@pytest.mark.parametrize("case", ["mixed", "no_validation_events"])
def test_written_tables_match_the_rules_row_for_row_and_shard_for_shard(tmp_path, case):
    import pyarrow.parquet as pq

    if case == "mixed":
        raw = _tricky_raw()
    else:  # at most two events per user and task: the valid split is empty
        raw = _tiny_raw(user_ids=["u2", "u1", "u1", "u2", "u1"],
                        inter_item_ids=["i1", "i2", "i3", "i4", "i5"],
                        tasks=["rec", "rec", "search", "rec", "rec"],
                        queries=[None, None, "q", None, None], timestamps=[5, 5, 5, 1, 5])
    opts = WriteOptions(seed=11, max_history=5, rows_per_shard=50)
    meta = write_dataset(raw, tmp_path / "out", opts)
    expected = _reference_tables(raw, opts)
    if case == "no_validation_events":
        assert expected["examples/valid"] == [] and expected["examples/test"]
    schemas = {"items": contract.ITEMS_SCHEMA, "users": contract.USERS_SCHEMA,
               "interactions": contract.INTERACTIONS_SCHEMA}
    for name, rows in expected.items():
        files = contract.shard_files(tmp_path / "out" / name)
        tables = [pq.read_table(f) for f in files]
        per_shard = 1 << 30 if name in ("items", "users") else opts.rows_per_shard
        full, rest = divmod(len(rows), per_shard)
        shard_rows = [per_shard] * full + ([rest] if rest or not full else [])
        assert [t.num_rows for t in tables] == shard_rows
        assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(len(files))]
        for table in tables:
            assert table.schema.equals(schemas.get(name, contract.EXAMPLES_SCHEMA))
        assert [r for t in tables for r in t.to_pylist()] == rows, name

    counts = meta["counts"]
    assert counts["users"] == len(expected["users"])
    assert counts["distinct_queries"] == len({q for q in raw.queries if q})
    for task in contract.TASKS:
        assert counts["interactions"][task] == raw.tasks.count(task)
        for split in contract.SPLITS:
            assert counts["interactions_by_split"][split][task] == sum(
                1 for r in expected["interactions"] if (r["split"], r["task"]) == (split, task))
            assert counts["examples"][split][task] == sum(
                1 for r in expected[f"examples/{split}"] if r["task"] == task)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta


def test_hem_queries():
    assert query_from_path(["Books", "Science Fiction & Fantasy", "Science Fiction"]) == \
        "books science fiction fantasy"
    assert query_from_path(["Kindle Store"]) is None  # one-level paths are skipped
    assert query_from_path(["Children's", "1990s"]) == "childrens 1990s"


def _tiny_raw(**changes) -> RawDataset:
    raw = RawDataset(
        source="test", items_file="items.tsv", interactions_file="inter.tsv",
        item_ids=[f"i{i}" for i in range(120)], titles=["t"] * 120, texts=["x"] * 120,
        user_ids=["u1"] * 4, inter_item_ids=["i1", "i2", "i3", "i4"],
        tasks=["rec", "rec", "search", "rec"], queries=[None, None, "q", None],
        timestamps=[1, 2, 3, 4],
    )
    for key, value in changes.items():
        setattr(raw, key, value)
    return raw


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"inter_item_ids": ["i1", "i2", "nope", "i4"]}, "inter.tsv: row 3: unknown item id 'nope'"),
        ({"item_ids": [], "titles": [], "texts": []}, "items.tsv: no items"),
        ({"user_ids": [], "inter_item_ids": [], "tasks": [], "queries": [], "timestamps": []},
         "inter.tsv: no interactions"),
        ({"queries": [None, None, None, None]}, "inter.tsv: row 3: search event without a query"),
        ({"item_ids": ["i1"] * 120}, "items.tsv: item id 'i1' appears more than once"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(tmp_path, changes, message):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        write_dataset(_tiny_raw(**changes), out)
    assert list(tmp_path.iterdir()) == []


def test_failure_after_writing_leaves_nothing(tmp_path):
    def crash(tmp_dir: Path) -> None:
        assert (tmp_dir / "meta.json").is_file()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_dataset(_tiny_raw(), tmp_path / "out", after_build=crash)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    write_dataset(_tiny_raw(), tmp_path / "out")
    with pytest.raises(FileExistsError):
        write_dataset(_tiny_raw(), tmp_path / "out")
    write_dataset(_tiny_raw(), tmp_path / "out", WriteOptions(overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _write_ml100k(root: Path, inter_header: str | None = None, inter_rows=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{i}\tMovie {i}\t199{i % 10}\tComedy Drama" for i in range(1, 121)]
    (root / "ml-100k.item").write_text("\n".join(items) + "\n")
    header = inter_header or "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    rows = inter_rows if inter_rows is not None else [
        f"{u}\t{i}\t{4 + (i % 2)}\t{1000 * u + i}" for u in range(1, 6) for i in range(1, 13)
    ] + ["1\t50\t2\t5"]
    (root / "ml-100k.inter").write_text("\n".join([header] + rows) + "\n")
    return root


def test_ml100k_loader_on_files_in_the_recbole_format(tmp_path):
    raw = load_ml100k(MovieLensOptions(_write_ml100k(tmp_path / "ml"), seed=1, search_fraction=0.25))
    assert len(raw.user_ids) == 60  # the rating-2 row is dropped
    assert raw.titles[0] == "Movie 1 (1991)"
    assert raw.texts[0] == "Movie 1 (1991) | Comedy, Drama"
    searches = [q for t, q in zip(raw.tasks, raw.queries) if t == "search"]
    assert len(searches) == 5 * 3  # 25% of each user's 12 positives
    assert set(searches) <= {"comedy 1990s", "drama 1990s"}


@pytest.mark.parametrize(
    "header, rows, message",
    [
        ("user_id:token\titem_id:token\ttimestamp:float", None, "missing column"),
        (None, [], "empty file"),
        (None, ["1\t1\tfour\t100"], "line 2: rating 'four'"),
        (None, ["1\t1\t5"], "line 2: 3 fields, expected 4"),
        (None, ["1\t1\t2\t5", "1\t999\t5\t6"], "line 3: unknown item id '999'"),
    ],
)
def test_ml100k_bad_files(tmp_path, capsys, header, rows, message):
    source = _write_ml100k(tmp_path / "ml", header, rows)
    out = tmp_path / "out"
    code = gensr(["prepare", "--dataset", "ml100k", "--source", str(source), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "ml-100k.inter" in err and message in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ml"]


def test_real_ml100k_from_the_recbole_wheel(tmp_path):
    """The embedded default: downloads the 2 MB wheel from PyPI once into $GENSR_CACHE."""
    raw = load_ml100k(MovieLensOptions(seed=42))
    out = tmp_path / "ml100k"
    meta = write_dataset(raw, out)
    counts = meta["counts"]
    assert counts["users"] == 942 and counts["items"] == 1682
    assert counts["interactions"]["search"] + counts["interactions"]["rec"] == 55375
    assert counts["examples"]["test"]["rec"] > 900 and counts["examples"]["test"]["search"] > 800
    assert json.loads((out / "meta.json").read_text()) == meta


def test_overwrite_only_replaces_a_dataset_and_never_a_file(tmp_path):
    """`prepare --overwrite` replaced any directory: now only one that holds a dataset."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("months of work")
    with pytest.raises(FileExistsError, match="holds no prepared dataset"):
        write_dataset(_tiny_raw(), other, WriteOptions(overwrite=True))
    assert (other / "thesis.tex").read_text() == "months of work"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        write_dataset(_tiny_raw(), a_file, WriteOptions(overwrite=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written


def test_training_refuses_a_dataset_of_another_schema_before_starting(tmp_path, capsys):
    """Training ignored meta.json's schema version; now `gensr train` stops at once."""
    from gensr_ray.cli import main

    out = tmp_path / "data"
    write_dataset(_tiny_raw(), out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "schema_version": 99}))
    code = main(["train", "--config", str(Path(__file__).parent.parent / "configs" / "debug.yaml"),
                 "--out", str(tmp_path / "run"), "--set", f"data.path={out}"])
    assert code == 2 and "schema_version 99" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (out / "meta.json").write_text('{"schema_version": 1, "coun')  # truncated
    code = main(["train", "--config", str(Path(__file__).parent.parent / "configs" / "debug.yaml"),
                 "--out", str(tmp_path / "run"), "--set", f"data.path={out}"])
    assert code == 2 and "meta.json: not readable JSON" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b'{"schema_version": 1, "coun', "not readable JSON"),  # cut short by a copy or upload
    (b"", "not readable JSON"),
    (b"schema_version: 1\n", "not readable JSON"),  # YAML, not JSON
    (b"\xff\xfe\x00garbage", "not readable JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
])
def test_a_broken_meta_json_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    out = tmp_path / "data"
    write_dataset(_tiny_raw(), out)
    (out / "meta.json").write_bytes(content)
    with pytest.raises(DataError, match=f"{out / 'meta.json'}: {message}"):
        contract.read_meta(out)
    assert gensr(["pretrain-cf", "--data", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"gensr pretrain-cf: error: {out / 'meta.json'}: {message}" in err
    assert not contract.cf_path(out).exists()


def test_users_who_touched_most_of_a_small_catalogue_keep_every_untouched_item(tmp_path, capsys):
    """ML-100K's release format, 120 movies: five users of 12 ratings and two who rated 105
    and 118 (more than 120 - 99): their examples store every movie they never rated (fewer
    than 99), meta.json counts them, and the sampled protocol ranks each target among the
    negatives its example has."""
    from gensr_ray.eval.harness import evaluate, load_eval_examples
    from gensr_ray.eval.metrics import NO_ITEM

    heavy = {6: 105, 7: 118}
    rows = [f"{u}\t{i}\t5\t{1000 * u + i}" for u in range(1, 6) for i in range(1, 13)]
    rows += [f"{u}\t{i}\t4\t{1000 * u + i}" for u, n in heavy.items() for i in range(1, n + 1)]
    source = _write_ml100k(tmp_path / "ml", inter_rows=rows)
    out = tmp_path / "out"
    assert gensr(["prepare", "--dataset", "ml100k", "--source", str(source), "--out", str(out),
                  "--no-cf"]) == 0
    printed = capsys.readouterr().out
    meta = contract.read_meta(out)
    touched: dict[int, set[int]] = {}
    for row in _interactions(out):
        touched.setdefault(row["user_id"], set()).add(row["item_id"])
    short = {split: 0 for split in contract.SPLITS}
    for split in contract.SPLITS:
        wanted = 4 if split == "train" else 99
        for ex in _examples(out, split):
            negatives = ex["negatives"]
            untouched = set(range(120)) - touched[ex["user_id"]]
            assert not set(negatives) & touched[ex["user_id"]]
            assert len(set(negatives)) == len(negatives) == min(wanted, len(untouched))
            if len(untouched) < wanted:
                assert set(negatives) == untouched
                short[split] += 1
    assert short["test"] == 4 and short["valid"] == 4  # the heavy users' two tasks
    assert {s: v["examples"] for s, v in meta["negatives"]["short"].items()} == short
    assert meta["negatives"]["short"]["test"]["missing"] == 2 * (99 - 15) + 2 * (99 - 2)
    assert "4 with fewer negatives" in printed

    batches = load_eval_examples(out, "test")
    scorer = _IdScorer()
    results = evaluate(out, "test", {"id": scorer})
    for task, batch in batches.items():
        assert batch["negatives"].shape[1] == 99
        stored = [[n for n in row if n != NO_ITEM] for row in batch["negatives"]]
        assert sum(len(s) < 99 for s in stored) == 2
        # the id scorer ranks a target below every larger id among the example's negatives
        expected = [sum(n >= t for n in s) for s, t in zip(stored, batch["target"])]
        assert results["sampled_ranks"]["id"][task] == expected
    assert gensr(["prepare", "--dataset", "ml100k", "--source", str(source), "--out",
                  str(tmp_path / "none"), "--eval-negatives", "0"]) == 2
    assert "--eval-negatives=0: every example needs at least one negative" in \
        capsys.readouterr().err


class _IdScorer:
    """Scores an item by its id: ranks are countable by hand."""

    name = "id"
    tasks = ("search", "rec")

    def score(self, batch, candidates):
        return np.asarray(candidates, dtype=np.float64)

    def retrieve(self, batch, k, exclude_per_example):
        return np.tile(np.arange(119, 119 - k, -1), (len(batch["target"]), 1))


def test_negatives_drawn_outside_a_users_items_and_the_users_who_leave_none():
    n_items = 50
    # user 0 touched the even items, user 1 every item, user 2 none
    keys = np.sort(np.concatenate([np.arange(0, n_items, 2), n_items + np.arange(n_items)]))
    users = np.array([0] * 500 + [1] * 3 + [2] * 500)
    drawn, clashing = draw_outside(np.random.default_rng(0), users, keys, n_items)
    assert clashing.tolist() == [500, 501, 502]  # no item left for user 1
    assert (drawn[:500] % 2 == 1).all() and len(set(drawn[:500].tolist())) == 25
    assert len(set(drawn[503:].tolist())) > 40 and 0 <= drawn.min() and drawn.max() < n_items
    with pytest.raises(DataError, match="some user has interacted with almost every item"):
        sample_unseen(np.random.default_rng(0), users, keys, n_items)
    ok = np.r_[0:500, 503:1003]
    assert (sample_unseen(np.random.default_rng(1), users[ok], keys, n_items)[:500] % 2 == 1).all()


def test_weighted_negatives_come_up_in_proportion_to_their_weights_outside_the_users_items():
    n_items = 50
    keys = np.arange(0, n_items, 2)  # user 0 touched the even items; user 1 none
    weights = np.arange(n_items, dtype=np.float64)  # item 0 never, item 49 most often
    cumulative = np.cumsum(weights)
    users = np.array([0] * 20_000 + [1] * 20_000)
    drawn, clashing = draw_outside(np.random.default_rng(0), users, keys, n_items,
                                   cumulative=cumulative)
    assert clashing.size == 0
    for user, allowed in ((0, np.arange(n_items) % 2 == 1), (1, np.ones(n_items, bool))):
        share = np.bincount(drawn[users == user], minlength=n_items) / 20_000
        expected = np.where(allowed, weights, 0) / np.where(allowed, weights, 0).sum()
        assert np.abs(share - expected).max() < 0.01, user
        assert share[~allowed | (weights == 0)].sum() == 0  # touched or weightless: never
