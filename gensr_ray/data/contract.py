"""The on-disk data contract that every stage after `gensr prepare` reads.

A prepared dataset is a directory::

    DIR/
      meta.json                      counts, seed, source, schema version, drop counts
      README.md                      provenance of the data (written by the builder)
      items/part-00000.parquet       ITEMS_SCHEMA, one row per item, item_id = row index
      users/part-00000.parquet       USERS_SCHEMA, user_id = row index
      interactions/part-*.parquet    INTERACTIONS_SCHEMA, sorted by (user_id, timestamp)
      examples/{train,valid,test}/part-*.parquet   EXAMPLES_SCHEMA, both tasks mixed
      cf/lightgcn.npz                frozen LightGCN tables (see gensr_ray.cf)
      cf/sasrec.pt                   the SASRec baseline, trained on first evaluation

Item and user ids are contiguous integers (0..n-1) so they index embedding tables and faiss
indexes directly; the dataset's own ids are kept in `raw_id`. Example splits are written as
several parquet files of at most `rows_per_shard` rows so that Ray Data can read them in
parallel, shard by shard, on many workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from gensr_ray import storage

SCHEMA_VERSION = 1
MAX_HISTORY = 20
TRAIN_NEGATIVES = 4
EVAL_NEGATIVES = 99
SPLITS = ("train", "valid", "test")
TASKS = ("search", "rec")  # a task's id in batches and tables is its index here
TASK_IDS = {name: code for code, name in enumerate(TASKS)}

ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.int32()),
        ("raw_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
    ]
)
USERS_SCHEMA = pa.schema([("user_id", pa.int32()), ("raw_id", pa.string())])
INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int32()),
        ("item_id", pa.int32()),
        ("task", pa.string()),  # 'search' | 'rec'
        ("query", pa.string()),  # null for rec
        ("timestamp", pa.int64()),
        ("split", pa.string()),  # 'train' | 'valid' | 'test'
    ]
)
EXAMPLES_SCHEMA = pa.schema(
    [
        ("example_id", pa.int64()),
        ("user_id", pa.int32()),
        ("task", pa.string()),
        ("query", pa.string()),
        ("timestamp", pa.int64()),
        # previous <= MAX_HISTORY items of both tasks, oldest first; only interactions from
        # this example's split or an earlier one, so validation/test never reach training.
        ("history", pa.list_(pa.int32())),
        ("target", pa.int32()),
        # TRAIN_NEGATIVES (train) or EVAL_NEGATIVES (valid/test) items the user never touched
        ("negatives", pa.list_(pa.int32())),
    ]
)


class DataError(ValueError):
    """Bad input data. The message names the file (and row) and says what is wrong."""


def items_dir(root: Path) -> Path:
    return Path(root) / "items"


def users_dir(root: Path) -> Path:
    return Path(root) / "users"


def interactions_dir(root: Path) -> Path:
    return Path(root) / "interactions"


def examples_dir(root: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(root) / "examples" / split


def cf_path(root: Path) -> Path:
    return Path(root) / "cf" / "lightgcn.npz"


def shard_files(directory: Path) -> list[Path]:
    """The parquet shards of one table, in order."""
    return sorted(Path(directory).glob("part-*.parquet"))


def local_root(root: str | Path) -> Path:
    """The dataset at `root` as a local directory: itself, or this node's mirror of a URI
    (s3://, gs://), made once per version of the dataset (meta.json and the CF tables)."""
    if not storage.is_uri(root):
        return Path(root)
    import pyarrow.fs

    meta = storage.join(root, "meta.json")
    if not storage.exists(meta):
        raise DataError(f"{root}: not a prepared dataset (no meta.json); run `gensr prepare` "
                        "first")
    fs, cf = storage.filesystem(storage.join(root, "cf", "lightgcn.npz"))
    info = fs.get_file_info(cf)
    cf_version = f"{info.size}:{info.mtime_ns}" if info.type == pyarrow.fs.FileType.File else ""
    return storage.mirror(str(root), version=storage.read_text(meta) + cf_version)


def example_shards(root: str | Path, split: str) -> list[str]:
    """The example shards of a split as paths or URIs, without copying them (Ray Data tasks
    read each one where it lies)."""
    if not storage.is_uri(root):
        return [str(p) for p in shard_files(examples_dir(root, split))]
    import pyarrow.fs

    examples_dir(".", split)  # checks the split name
    fs, inner = storage.filesystem(storage.join(root, "examples", split))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    names = sorted(i.base_name for i in infos
                   if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    return [storage.join(root, "examples", split, name) for name in names]


def read_meta(root: str | Path) -> dict:
    """meta.json of a dataset (a directory or a URI), checked for the schema this code reads."""
    path = storage.join(root, "meta.json")
    if not storage.exists(path):
        raise DataError(f"{root}: not a prepared dataset (no meta.json); run `gensr prepare` first")
    try:
        meta = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # a truncated file (a copy or upload cut short) lands here
        raise DataError(f"{path}: not readable JSON ({exc}); prepare the dataset again") from None
    except OSError as exc:  # a directory, no permission
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); prepare the dataset "
                        "again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}; prepare "
                        "the dataset again")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {meta.get('schema_version')} but this gensr_ray reads "
            f"{SCHEMA_VERSION}; prepare the dataset again"
        )
    return meta


def read_table(directory: Path, columns: list[str] | None = None) -> pa.Table:
    """Read every shard of one table into memory (small tables and tests; training streams)."""
    import pyarrow.parquet as pq

    files = shard_files(directory)
    if not files:
        raise DataError(f"{directory}: no part-*.parquet shards")
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)


def train_item_counts(data_dir: Path, n_items: int) -> np.ndarray:
    """Each item's number of training interactions (its popularity), [n_items]."""
    table = read_table(interactions_dir(data_dir), columns=["item_id", "split"])
    train = table.column("split").to_numpy(zero_copy_only=False) == "train"
    item_ids = table.column("item_id").to_numpy()[train].astype(np.int64)
    if item_ids.size and (item_ids.min() < 0 or item_ids.max() >= n_items):
        raise DataError(f"{interactions_dir(data_dir)}: item ids outside 0..{n_items - 1}")
    return np.bincount(item_ids, minlength=n_items)
