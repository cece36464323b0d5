"""Turn a raw interaction log into the on-disk contract of `contract.py`.

Every dataset loader (MovieLens, synthetic, ...) produces a `RawDataset` and hands it to
`write_dataset`, so splits, histories and negatives are built one way for all of them.

Rules (docs/datasets.md, "The data contract"):
- ids are remapped to contiguous integers; items keep the loader's order, users are sorted;
- per user and per task, in time order: with n >= 3 events of a task the last is test, the
  one before is validation, the rest training; with n == 2 the last is test; with n == 1 the
  event is training;
- an example's history holds the previous <= MAX_HISTORY events of both tasks, restricted
  to events of its own split or an earlier one, so that no validation or test interaction
  ever appears in a training example (nor in CF pretraining, which reads split == train);
- negatives are drawn once, seeded per user, among items the user never touched, and stored.

Writing streams: the interactions are held as numpy columns, examples are generated user by
user, and every table goes to parquet a shard at a time (`ShardWriter`), so the writer's memory
grows by under 100 bytes an event (the columns and their sort), not by the size of the rows
(bench/prepare_memory.py measures it).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from gensr_ray.atomic import atomic_directory
from gensr_ray.data import contract
from gensr_ray.data.contract import DataError
from gensr_ray.data.sampling import sample_untouched
from gensr_ray.data.validate import shard_counts

log = logging.getLogger(__name__)

_SPLIT_RANK = {name: rank for rank, name in enumerate(contract.SPLITS)}
_CHUNK = 1 << 16  # events (or items) turned into one Arrow table at a time
_ONE_SHARD = 1 << 30  # items and users are one shard each (their ids are row indexes)


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


@dataclass
class Interactions:
    """The interaction log as compact columns, one entry per event in the loader's order."""

    users: np.ndarray  # int32 user id (index into the sorted raw user ids)
    items: np.ndarray  # int32 item id
    tasks: np.ndarray  # int8 index into contract.TASKS
    queries: np.ndarray  # object: the RawDataset's query strings (None for rec)
    timestamps: np.ndarray  # int64
    order: np.ndarray  # int64 permutation sorting events by (user, timestamp), ties by row
    split: np.ndarray  # int8 index into contract.SPLITS


def encode_interactions(raw: RawDataset, user_raw: list[str]) -> Interactions:
    n = len(raw.user_ids)
    item_index = {raw_id: i for i, raw_id in enumerate(raw.item_ids)}
    user_index = {raw_id: i for i, raw_id in enumerate(user_raw)}
    users = np.fromiter((user_index[u] for u in raw.user_ids), dtype=np.int32, count=n)
    items = np.fromiter((item_index[i] for i in raw.inter_item_ids), dtype=np.int32, count=n)
    tasks = np.fromiter((contract.TASK_IDS[t] for t in raw.tasks), dtype=np.int8, count=n)
    queries = np.empty(n, dtype=object)
    queries[:] = raw.queries
    timestamps = np.asarray(raw.timestamps, dtype=np.int64)
    # stable sort: events with equal timestamps keep the loader's order
    order = np.lexsort((np.arange(n), timestamps, users))
    return Interactions(users, items, tasks, queries, timestamps, order,
                        assign_splits(users, tasks, order))


def assign_splits(users: np.ndarray, tasks: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Split code per interaction (an index into contract.SPLITS); `order` sorts interactions
    by (user, timestamp)."""
    n = len(users)
    split = np.zeros(n, dtype=np.int8)
    if n == 0:
        return split
    # each (user, task)'s events together, in time order (a stable sort of `order`)
    grouped = order[np.lexsort((np.arange(n), tasks[order], users[order]))]
    user, task = users[grouped], tasks[grouped]
    is_last = np.ones(n, dtype=bool)
    is_last[:-1] = (user[1:] != user[:-1]) | (task[1:] != task[:-1])
    ends = np.flatnonzero(is_last) + 1
    sizes = np.diff(ends, prepend=0)
    from_end = np.repeat(ends, sizes) - 1 - np.arange(n)  # 0 for a group's last event
    size = np.repeat(sizes, sizes)
    split[grouped[(from_end == 0) & (size >= 2)]] = _SPLIT_RANK["test"]
    split[grouped[(from_end == 1) & (size >= 3)]] = _SPLIT_RANK["valid"]
    return split


def build_examples(data: Interactions, n_items: int, opts: WriteOptions
                   ) -> Iterator[tuple[int, dict]]:
    """(split code, example row) of every example, user by user, in (user, time) order.

    Only one user's events are held at a time, so examples can be written as they come."""
    next_id = 0
    sorted_users = data.users[data.order]
    ends = np.append(np.flatnonzero(np.diff(sorted_users)) + 1, len(sorted_users))
    start = 0
    for end in ends.tolist():
        user_events = data.order[start:end]
        start = end
        user = int(sorted_users[end - 1])
        items = data.items[user_events].tolist()
        touched = set(items)
        rng = np.random.default_rng([opts.seed, user])
        # visible[r]: items of earlier events (time order) that an example of split r may see
        visible: list[list[int]] = [[] for _ in contract.SPLITS]
        for item, rank, task, query, stamp in zip(
                items, data.split[user_events].tolist(), data.tasks[user_events].tolist(),
                data.queries[user_events].tolist(), data.timestamps[user_events].tolist()):
            history = visible[rank][-opts.max_history:]
            for r in range(rank, len(contract.SPLITS)):
                visible[r].append(item)
            if not history:
                continue
            count = opts.train_negatives if rank == 0 else opts.eval_negatives
            yield rank, {
                "example_id": next_id,
                "user_id": user,
                "task": contract.TASKS[task],
                "query": query,
                "timestamp": stamp,
                "history": history,
                "target": item,
                "negatives": sample_untouched(rng, n_items, touched, count),
            }
            next_id += 1


class ShardWriter:
    """One table written as it comes: part-00000.parquet, part-00001.parquet, ... of
    `rows_per_shard` rows each, flushed as soon as a shard is full, so only one shard is held.
    `close()` writes the rest, and an empty shard if the table has no rows."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_shard: int):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.shards = 0
        self._pieces: list[pa.Table] = []  # tables given to extend(), and appended rows
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._buffered = 0

    def append(self, row: dict) -> None:
        for name, values in self._columns.items():
            values.append(row[name])
        self._buffered += 1
        if self._buffered == self.rows_per_shard:
            self._flush()

    def extend(self, table: pa.Table) -> None:
        self._stage_rows()
        start = 0
        while start < table.num_rows:
            take = min(self.rows_per_shard - self._buffered, table.num_rows - start)
            self._pieces.append(table.slice(start, take))
            self._buffered += take
            start += take
            if self._buffered == self.rows_per_shard:
                self._flush()

    def close(self) -> int:
        if self._buffered or not self.shards:
            self._flush()
        return self.shards

    def _stage_rows(self) -> None:
        if self._columns[self.schema.names[0]]:
            self._pieces.append(pa.Table.from_pydict(self._columns, schema=self.schema))
            self._columns = {name: [] for name in self.schema.names}

    def _flush(self) -> None:
        self._stage_rows()
        table = (pa.concat_tables(self._pieces).combine_chunks() if self._pieces
                 else self.schema.empty_table())
        pq.write_table(table, self.directory / f"part-{self.shards:05d}.parquet")
        self.shards += 1
        self._pieces = []
        self._buffered = 0


def write_dataset(raw: RawDataset, out: Path, opts: WriteOptions | None = None,
                  after_build=None) -> dict:
    """Validate, split, build examples and write the contract to `out` atomically.

    Everything is written to a temporary sibling directory first and moved into place at the
    end, so a failure (bad input, a crash, Ctrl-C) never leaves a half-written `out`.
    `after_build(tmp_dir)` runs inside the temporary directory before the move (used to
    pretrain the CF tables as part of the dataset). Returns meta.json's content.

    Memory: beyond the RawDataset, the interactions are held as numpy columns (about 40 bytes
    an event) and one shard of each table (the items and users tables are one shard each, as
    Arrow, a fraction of the RawDataset's strings); examples are generated and written user by
    user.
    """
    opts = opts or WriteOptions()
    if opts.rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {opts.rows_per_shard}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        if not opts.overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not (out / "meta.json").is_file():  # --overwrite replaces a dataset, nothing else
            raise FileExistsError(f"{out} holds no prepared dataset (no meta.json); "
                                  "--overwrite only replaces one, so remove it yourself")
    validate(raw)
    user_raw = sorted(set(raw.user_ids))
    data = encode_interactions(raw, user_raw)

    with atomic_directory(out, replace=True) as tmp:
        items = ShardWriter(contract.items_dir(tmp), contract.ITEMS_SCHEMA, _ONE_SHARD)
        for lo in range(0, len(raw.item_ids), _CHUNK):
            hi = lo + _CHUNK
            items.extend(pa.Table.from_pydict(
                {"item_id": np.arange(lo, min(hi, len(raw.item_ids)), dtype=np.int32),
                 "raw_id": raw.item_ids[lo:hi], "title": raw.titles[lo:hi],
                 "text": raw.texts[lo:hi]}, schema=contract.ITEMS_SCHEMA))
        items.close()
        users = ShardWriter(contract.users_dir(tmp), contract.USERS_SCHEMA, _ONE_SHARD)
        users.extend(pa.Table.from_pydict(
            {"user_id": np.arange(len(user_raw), dtype=np.int32), "raw_id": user_raw},
            schema=contract.USERS_SCHEMA))
        users.close()
        _write_interactions(data, contract.interactions_dir(tmp), opts.rows_per_shard)
        example_counts, short = _write_examples(data, len(raw.item_ids), tmp, opts)
        meta = _meta(raw, opts, len(user_raw), data, example_counts, short)
        meta["shards"] = shard_counts(tmp)  # checked before training and evaluation
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(raw, meta))
        if after_build is not None:
            after_build(tmp)
    return meta


def _write_interactions(data: Interactions, directory: Path, rows_per_shard: int) -> None:
    """In (user, time) order, a chunk of events at a time."""
    writer = ShardWriter(directory, contract.INTERACTIONS_SCHEMA, rows_per_shard)
    task_names = np.array(contract.TASKS, dtype=object)
    split_names = np.array(contract.SPLITS, dtype=object)
    for lo in range(0, len(data.order), _CHUNK):
        rows = data.order[lo:lo + _CHUNK]
        writer.extend(pa.Table.from_pydict(
            {"user_id": data.users[rows], "item_id": data.items[rows],
             "task": task_names[data.tasks[rows]], "query": data.queries[rows],
             "timestamp": data.timestamps[rows], "split": split_names[data.split[rows]]},
            schema=contract.INTERACTIONS_SCHEMA))
    writer.close()


def _write_examples(data: Interactions, n_items: int, root: Path, opts: WriteOptions
                    ) -> tuple[list[list[int]], list[list[int]]]:
    """Write every split's examples as they are built; returns counts[split][task] and
    [examples short of negatives, negatives lacking] per split."""
    writers = [ShardWriter(contract.examples_dir(root, name), contract.EXAMPLES_SCHEMA,
                           opts.rows_per_shard) for name in contract.SPLITS]
    counts = [[0] * len(contract.TASKS) for _ in contract.SPLITS]
    # examples whose user left fewer untouched items than the negatives asked for, and the
    # negatives they lack in all, per split
    short = [[0, 0] for _ in contract.SPLITS]
    # on a terminal, the one display of the longest stage of prepare (examples of every
    # event with a history, written as they are built)
    for rank, row in tqdm(build_examples(data, n_items, opts), desc="writing examples",
                          unit="example", disable=None, leave=False, mininterval=1,
                          file=sys.stderr):
        writers[rank].append(row)
        counts[rank][contract.TASK_IDS[row["task"]]] += 1
        lacking = (opts.train_negatives if rank == 0 else opts.eval_negatives) - len(
            row["negatives"])
        if lacking > 0:
            short[rank][0] += 1
            short[rank][1] += lacking
    for writer in writers:
        writer.close()
    return counts, short


def _meta(raw: RawDataset, opts: WriteOptions, n_users: int, data: Interactions,
          example_counts: list[list[int]], short: list[list[int]]) -> dict:
    n_tasks = len(contract.TASKS)
    by_split = np.bincount(data.split.astype(np.int64) * n_tasks + data.tasks,
                           minlength=len(contract.SPLITS) * n_tasks).reshape(-1, n_tasks)
    return {
        "schema_version": contract.SCHEMA_VERSION,
        "source": raw.source,
        "seed": opts.seed,
        "max_history": opts.max_history,
        "negatives": {
            "train": opts.train_negatives, "eval": opts.eval_negatives,
            # users who touched all but fewer items keep every untouched one: per split, the
            # examples stored with fewer negatives and the negatives they lack in all
            "short": {s: {"examples": short[r][0], "missing": short[r][1]}
                      for r, s in enumerate(contract.SPLITS)},
        },
        "counts": {
            "users": n_users,
            "items": len(raw.item_ids),
            "interactions": {t: int(by_split[:, k].sum()) for k, t in enumerate(contract.TASKS)},
            "distinct_queries": len({q for q in raw.queries if q}),
            "interactions_by_split": {
                s: {t: int(by_split[r, k]) for k, t in enumerate(contract.TASKS)}
                for r, s in enumerate(contract.SPLITS)
            },
            "examples": {
                s: {t: example_counts[r][k] for k, t in enumerate(contract.TASKS)}
                for r, s in enumerate(contract.SPLITS)
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
        "gensr_ray/data/writer.py.\n"
    )
