"""One check of a prepared dataset against its contract, run before any work starts, and the
dataset's fingerprint, which checkpoints record.

`validate_dataset` is what training, evaluation and Tune call: schema version, every table's
shard count as meta.json recorded it, nulls and id ranges in the example shards, the LightGCN
tables' shapes and finiteness. A failure names the file, the row and the column. A dataset
that passed once is not scanned again while its fingerprint stays the same (the result is
kept in this node's cache).

The fingerprint has two parts, so a message can say which changed: `dataset` (meta.json and
every shard's name and size) and `cf` (the LightGCN tables' bytes).
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

from gensr_ray import storage
from gensr_ray.data import contract

# tables whose shard count meta.json records, relative to the dataset's root
TABLES = ("items", "users", "interactions", *(f"examples/{s}" for s in contract.SPLITS))
CF_FILE = "cf/lightgcn.npz"
_FINGERPRINTS: dict[tuple, dict[str, str]] = {}  # this process's: (files' stamps) -> fingerprint


def shard_counts(root) -> dict[str, int]:
    """{table: number of part-*.parquet shards}, as the writer records them in meta.json."""
    return {table: len(shards) for table, shards in _listing(root).items()}


def fingerprint(root, listing: dict | None = None) -> dict[str, str]:
    """{"dataset": ..., "cf": ...}: hex digests of what a model trained on this data saw."""
    digest = hashlib.sha256(storage.read_text(storage.join(root, "meta.json")).encode())
    for table, shards in (listing or _listing(root)).items():
        for name, size, _ in shards:
            digest.update(f"{table}/{name}:{size}\n".encode())
    cf = hashlib.sha256()
    path = storage.join(root, CF_FILE)
    if storage.exists(path):
        fs, inner = storage.filesystem(path)
        with fs.open_input_stream(inner) as f:
            while chunk := f.read(16 << 20):
                cf.update(chunk)
    return {"dataset": digest.hexdigest()[:16], "cf": cf.hexdigest()[:16]}


def validate_dataset(root) -> dict[str, str]:
    """Check the dataset at `root` (a directory or a URI); its fingerprint. Raises DataError."""
    meta = contract.read_meta(root)
    listing = _listing(root)
    # the CLI checks before `run_training` checks again: hash the CF tables once per version
    key = (storage.absolute(root), json.dumps(meta, sort_keys=True), repr(sorted(listing.items())),
           _stamp(storage.join(root, CF_FILE)))
    found = _FINGERPRINTS.get(key) or _FINGERPRINTS.setdefault(key, fingerprint(root, listing))
    # a shard rewritten in place at the same size keeps the fingerprint; not its mtime
    done = storage.cache_root() / "validated" / (hashlib.sha256(
        f"{storage.absolute(root)}|{found}|{sorted(listing.items())}".encode()).hexdigest()[:24])
    if done.exists():
        return found
    expected = meta.get("shards")
    if expected is not None:  # datasets written before shard counts were recorded: no check
        for table, shards in listing.items():
            if len(shards) != expected.get(table, len(shards)):
                raise contract.DataError(
                    f"{storage.join(root, table)}: {len(shards)} shards, but meta.json records "
                    f"{expected[table]}; a shard was added or lost, prepare the dataset again")
    n_users, n_items = meta["counts"]["users"], meta["counts"]["items"]
    for split in contract.SPLITS:
        for name, _, _ in listing[f"examples/{split}"]:
            _check_examples(storage.join(root, "examples", split, name), n_users, n_items)
    _check_cf(storage.join(root, CF_FILE), n_users, n_items)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"root": storage.absolute(root), **found}) + "\n")
    return found


def check_cf_tables(path: str, user_emb: np.ndarray, item_emb: np.ndarray) -> None:
    """Both tables finite: training on a NaN gives loss NaN and never changes a weight."""
    for name, table in (("user_emb", user_emb), ("item_emb", item_emb)):
        bad = ~np.isfinite(table)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise contract.DataError(f"{path}: {name} holds {int(bad.sum())} non-finite values "
                                     f"(first in row {row}); run `gensr pretrain-cf` again")


def _check_cf(path: str, n_users: int, n_items: int) -> None:
    if not storage.exists(path):
        return  # the trainer's own loader says how to make them, when it needs them
    fs, inner = storage.filesystem(path)
    with fs.open_input_stream(inner) as f, np.load(io.BytesIO(f.read()),
                                                   allow_pickle=False) as tables:
        user_emb, item_emb = tables["user_emb"], tables["item_emb"]
    for name, table, rows in (("user_emb", user_emb, n_users), ("item_emb", item_emb, n_items)):
        if table.ndim != 2 or table.shape[0] != rows:
            raise contract.DataError(f"{path}: {name} has shape {table.shape} but the dataset has "
                                     f"{rows} rows of it; run `gensr pretrain-cf` again")
    check_cf_tables(path, user_emb, item_emb)


def _check_examples(path: str, n_users: int, n_items: int) -> None:
    fs, inner = storage.filesystem(path)
    with fs.open_input_file(inner) as f:
        read = pq.read_table(f, columns=["user_id", "task", "history", "target", "negatives"])
    table = {column: read[column].combine_chunks() for column in read.column_names}
    for column, values in table.items():
        if values.null_count:
            _fail(path, column, pc.is_null(values), "is null")
        if pa.types.is_list(values.type):
            inner_values = pc.list_flatten(values)
            if inner_values.null_count:
                parents = pc.list_parent_indices(values)
                row = parents[int(np.flatnonzero(pc.is_null(inner_values).to_numpy(
                    zero_copy_only=False))[0])].as_py()
                raise contract.DataError(f"{path}: row {row}, column {column}: a null item id")
    tasks = pc.is_in(table["task"], value_set=pa.array(contract.TASKS))
    _fail(path, "task", pc.invert(tasks), f"is not one of {list(contract.TASKS)}")
    _range(path, "user_id", table["user_id"], n_users, "user")
    _range(path, "target", table["target"], n_items, "item")
    for column in ("history", "negatives"):
        flat = pc.list_flatten(table[column])
        bad = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, n_items))
        if pc.any(bad).as_py():
            at = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            row = pc.list_parent_indices(table[column])[at].as_py()
            raise contract.DataError(f"{path}: row {row}, column {column}: item id "
                                     f"{flat[at].as_py()} outside 0..{n_items - 1}")


def _range(path: str, column: str, values, n: int, what: str) -> None:
    bad = pc.or_(pc.less(values, 0), pc.greater_equal(values, n))
    if pc.any(bad).as_py():
        row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise contract.DataError(f"{path}: row {row}, column {column}: {what} id "
                                 f"{values[row].as_py()} outside 0..{n - 1}")


def _fail(path: str, column: str, mask, what: str) -> None:
    if pc.any(mask).as_py():
        row = int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])
        raise contract.DataError(f"{path}: row {row}, column {column} {what}")


def _stamp(path: str) -> tuple:
    fs, inner = storage.filesystem(path)
    info = fs.get_file_info(inner)
    return (info.size, info.mtime_ns)


def _listing(root) -> dict[str, list[tuple[str, int, int]]]:
    return {table: _shards(root, table) for table in TABLES}


def _shards(root, table: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of each part-*.parquet shard of a table, in order."""
    fs, inner = storage.filesystem(storage.join(root, *table.split("/")))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return sorted((i.base_name, i.size, i.mtime_ns or 0) for i in infos
                  if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
