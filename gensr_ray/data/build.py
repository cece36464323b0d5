"""Turn a raw interaction log into the on-disk contract of `contract.py`.

Every dataset loader (MovieLens, synthetic, ...) produces a `RawDataset` and hands it to
`write_dataset`, so splits, histories and negatives are built one way for all of them.

Rules (see DESIGN.md):
- ids are remapped to contiguous integers; items keep the loader's order, users are sorted;
- per user and per task, in time order: with n >= 3 events of a task the last is test, the
  one before is validation, the rest training; with n == 2 the last is test; with n == 1 the
  event is training;
- an example's history holds the previous <= MAX_HISTORY events of both tasks, restricted
  to events of its own split or an earlier one, so that no validation or test interaction
  ever appears in a training example (nor in CF pretraining, which reads split == train);
- negatives are drawn once, seeded per user, among items the user never touched, and stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gensr_ray.data import contract
from gensr_ray.data.contract import DataError

log = logging.getLogger(__name__)

_SPLIT_RANK = {"train": 0, "valid": 1, "test": 2}


@dataclass
class RawDataset:
    """What a loader hands to the writer. Ids are the dataset's own (strings)."""

    source: str  # human-readable provenance, e.g. "MovieLens-100K from recbole==1.2.1"
    items_file: str  # the file items came from (named in errors)
    interactions_file: str
    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    user_ids: list[str]  # one per interaction
    inter_item_ids: list[str]
    tasks: list[str]
    queries: list[str | None]
    timestamps: list[int]
    # line number of each interaction in interactions_file, for error messages (None: row order)
    lines: list[int] | None = None
    notes: dict = field(default_factory=dict)  # loader settings recorded in meta.json
    readme: str = ""  # provenance text for DIR/README.md


@dataclass
class WriteOptions:
    seed: int = 42
    max_history: int = contract.MAX_HISTORY
    train_negatives: int = contract.TRAIN_NEGATIVES
    eval_negatives: int = contract.EVAL_NEGATIVES
    rows_per_shard: int = 8192
    overwrite: bool = False


def validate(raw: RawDataset) -> None:
    """Reject input that would silently produce a wrong dataset."""
    if not raw.item_ids:
        raise DataError(f"{raw.items_file}: no items")
    if not raw.user_ids:
        raise DataError(f"{raw.interactions_file}: no interactions")
    lengths = {len(raw.user_ids), len(raw.inter_item_ids), len(raw.tasks), len(raw.queries),
               len(raw.timestamps)}
    if len(lengths) != 1:
        raise ValueError("RawDataset interaction columns differ in length")
    if len(set(raw.item_ids)) != len(raw.item_ids):
        dup = _first_duplicate(raw.item_ids)
        raise DataError(f"{raw.items_file}: item id {dup!r} appears more than once")
    def where(row: int) -> str:
        line = raw.lines[row] if raw.lines is not None else row + 1
        kind = "line" if raw.lines is not None else "row"
        return f"{raw.interactions_file}: {kind} {line}"

    known = set(raw.item_ids)
    for row, item in enumerate(raw.inter_item_ids):
        if item not in known:
            raise DataError(f"{where(row)}: unknown item id {item!r} (not in {raw.items_file})")
    for row, (task, query) in enumerate(zip(raw.tasks, raw.queries)):
        if task not in contract.TASKS:
            raise DataError(f"{where(row)}: unknown task {task!r}")
        if task == "search" and not query:
            raise DataError(f"{where(row)}: search event without a query")


def _first_duplicate(values: list[str]) -> str:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    raise AssertionError("no duplicate")


def assign_splits(users: np.ndarray, tasks: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Split label per interaction; `order` sorts interactions by (user, timestamp)."""
    split = np.full(len(users), "train", dtype=object)
    last_seen: dict[tuple[int, str], list[int]] = {}
    for idx in order:
        last_seen.setdefault((int(users[idx]), tasks[idx]), []).append(int(idx))
    for events in last_seen.values():
        if len(events) >= 2:
            split[events[-1]] = "test"
        if len(events) >= 3:
            split[events[-2]] = "valid"
    return split


def sample_negatives(rng: np.random.Generator, n_items: int, touched: set[int], count: int,
                     user_label: str) -> np.ndarray:
    """`count` distinct items outside `touched`, by rejection (catalogues dwarf histories)."""
    available = n_items - len(touched)
    if available < count:
        raise DataError(
            f"user {user_label}: only {available} untouched items, {count} negatives needed"
        )
    chosen: list[int] = []
    picked: set[int] = set()
    while len(chosen) < count:
        for item in rng.integers(0, n_items, size=2 * count).tolist():
            if item not in touched and item not in picked:
                picked.add(item)
                chosen.append(item)
                if len(chosen) == count:
                    break
    return np.asarray(chosen, dtype=np.int32)


def build_examples(users, items, tasks, queries, timestamps, split, order, n_items, opts):
    """Yield example rows (dicts of columns) split by split, in (user, time) order."""
    rows = {s: [] for s in contract.SPLITS}
    next_id = 0
    boundaries = np.flatnonzero(np.diff(users[order])) + 1
    for user_events in np.split(order, boundaries):
        user = int(users[user_events[0]])
        touched = set(int(i) for i in items[user_events])
        rng = np.random.default_rng([opts.seed, user])
        seen: list[tuple[int, int]] = []  # (item, split rank) of earlier events, time order
        for idx in user_events:
            rank = _SPLIT_RANK[split[idx]]
            history = [item for item, r in seen if r <= rank][-opts.max_history:]
            seen.append((int(items[idx]), rank))
            if not history:
                continue
            count = opts.train_negatives if rank == 0 else opts.eval_negatives
            rows[split[idx]].append(
                {
                    "example_id": next_id,
                    "user_id": user,
                    "task": tasks[idx],
                    "query": queries[idx],
                    "timestamp": int(timestamps[idx]),
                    "history": history,
                    "target": int(items[idx]),
                    "negatives": sample_negatives(rng, n_items, touched, count, str(user)),
                }
            )
            next_id += 1
    return rows


def _write_shards(rows: list[dict], schema: pa.Schema, directory: Path, rows_per_shard: int) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    shards = max(1, -(-len(rows) // rows_per_shard))
    for s in range(shards):
        chunk = rows[s * rows_per_shard:(s + 1) * rows_per_shard]
        table = pa.Table.from_pylist(chunk, schema=schema)
        pq.write_table(table, directory / f"part-{s:05d}.parquet")
    return shards


def write_dataset(raw: RawDataset, out: Path, opts: WriteOptions | None = None,
                  after_build=None) -> dict:
    """Validate, split, build examples and write the contract to `out` atomically.

    Everything is written to a temporary sibling directory first and moved into place at the
    end, so a failure (bad input, a crash, Ctrl-C) never leaves a half-written `out`.
    `after_build(tmp_dir)` runs inside the temporary directory before the move (used to
    pretrain the CF tables as part of the dataset). Returns meta.json's content.
    """
    opts = opts or WriteOptions()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    validate(raw)

    item_index = {raw_id: i for i, raw_id in enumerate(raw.item_ids)}
    user_raw = sorted(set(raw.user_ids))
    user_index = {raw_id: i for i, raw_id in enumerate(user_raw)}
    users = np.array([user_index[u] for u in raw.user_ids], dtype=np.int32)
    items = np.array([item_index[i] for i in raw.inter_item_ids], dtype=np.int32)
    tasks = np.array(raw.tasks, dtype=object)
    queries = np.array(raw.queries, dtype=object)
    timestamps = np.array(raw.timestamps, dtype=np.int64)
    # stable sort: events with equal timestamps keep the loader's order
    order = np.lexsort((np.arange(len(users)), timestamps, users))
    split = assign_splits(users, tasks, order)
    examples = build_examples(users, items, tasks, queries, timestamps, split, order,
                              len(raw.item_ids), opts)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_shards(
            [{"item_id": i, "raw_id": r, "title": t, "text": x}
             for i, (r, t, x) in enumerate(zip(raw.item_ids, raw.titles, raw.texts))],
            contract.ITEMS_SCHEMA, contract.items_dir(tmp), 1 << 30)
        _write_shards([{"user_id": i, "raw_id": r} for i, r in enumerate(user_raw)],
                      contract.USERS_SCHEMA, contract.users_dir(tmp), 1 << 30)
        _write_shards(
            [{"user_id": int(users[i]), "item_id": int(items[i]), "task": tasks[i],
              "query": queries[i], "timestamp": int(timestamps[i]), "split": split[i]}
             for i in order],
            contract.INTERACTIONS_SCHEMA, contract.interactions_dir(tmp), opts.rows_per_shard)
        for name in contract.SPLITS:
            _write_shards(examples[name], contract.EXAMPLES_SCHEMA,
                          contract.examples_dir(tmp, name), opts.rows_per_shard)
        meta = _meta(raw, opts, users, tasks, split, examples)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(raw, meta))
        if after_build is not None:
            after_build(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _meta(raw, opts, users, tasks, split, examples) -> dict:
    def count(task: str, name: str | None = None) -> int:
        mask = tasks == task
        if name is not None:
            mask &= split == name
        return int(mask.sum())

    return {
        "schema_version": contract.SCHEMA_VERSION,
        "source": raw.source,
        "seed": opts.seed,
        "max_history": opts.max_history,
        "negatives": {"train": opts.train_negatives, "eval": opts.eval_negatives},
        "counts": {
            "users": int(len(set(users.tolist()))),
            "items": len(raw.item_ids),
            "interactions": {t: count(t) for t in contract.TASKS},
            "distinct_queries": len({q for q in raw.queries if q}),
            "interactions_by_split": {
                s: {t: count(t, s) for t in contract.TASKS} for s in contract.SPLITS
            },
            "examples": {
                s: {t: sum(1 for r in examples[s] if r["task"] == t) for t in contract.TASKS}
                for s in contract.SPLITS
            },
        },
        "loader": raw.notes,
    }


def _readme(raw: RawDataset, meta: dict) -> str:
    c = meta["counts"]
    return (
        f"# Prepared dataset\n\nSource: {raw.source}\n\n{raw.readme}\n\n"
        f"Users {c['users']}, items {c['items']}, search events {c['interactions']['search']}, "
        f"recommendation events {c['interactions']['rec']}. Seed {meta['seed']}.\n"
        "Layout and schemas: gensr_ray/data/contract.py. Split, history and negative rules: "
        "gensr_ray/data/build.py.\n"
    )
