"""Ray Data: stream the prepared example shards to training workers as pointwise rows.

The parquet shards are read in parallel, each example is expanded into its target and stored
negatives and tokenized in Ray Data tasks (CPU side); workers receive their share through
`get_dataset_shard` and only pad rows into tensors. No process ever holds the whole split.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gensr_ray.config import GenSRConfig
from gensr_ray.data import contract
from gensr_ray.inputs.build import build_features

EXAMPLE_COLUMNS = ["example_id", "user_id", "task", "query", "history", "target", "negatives"]
# CPUs each read / tokenize task asks for. Ray Data only schedules its tasks on CPUs that
# the trainer's workers leave free (or on a Tune trial's data bundle), and tokenizing is
# light; asking for less than a whole CPU leaves room on small machines.
DATA_TASK_CPUS = 0.25
_ENCODERS: dict = {}  # per task process: item title tokens are read and tokenized once


def _encoder(cfg: GenSRConfig, tokenizer, kind: str):
    key = (cfg.data.path, cfg.model.prompt, cfg.model.query_in_prompt,
           cfg.data.prompt_title_tokens, tokenizer.name_or_path, len(tokenizer), kind)
    if key not in _ENCODERS:
        # the items table from this node's copy of the dataset (a mirror when it is a URI)
        _ENCODERS[key], _ = build_features(cfg, tokenizer, kind)
    return _ENCODERS[key]


def encode_examples(batch: dict[str, np.ndarray], cfg: GenSRConfig, tokenizer, kind: str
                    ) -> pa.Table:
    """A batch of examples -> a table of pointwise rows (map_batches function).

    Each row keeps its example's user and query: `train.negatives=fresh` rebuilds negative
    rows in the worker (gensr_ray.train.negatives)."""
    rows = _encoder(cfg, tokenizer, kind).encode(
        batch, negatives_per_example=cfg.train.negatives_per_example)
    position = {int(e): i for i, e in enumerate(batch["example_id"])}
    source = [position[e] for e in rows["example_id"]]
    return pa.table({
        "example_id": pa.array(rows["example_id"], pa.int64()),
        "user_id": pa.array(np.asarray(batch["user_id"])[source], pa.int32()),
        "query": pa.array([batch["query"][i] for i in source], pa.string()),
        "task": pa.array(rows["task"], pa.int8()),
        "history": pa.array(rows["history"], pa.list_(pa.int32())),
        "target": pa.array(rows["target"], pa.int32()),
        "label": pa.array(rows["label"], pa.float32()),
        "prompt_ids": pa.array(rows["prompt_ids"], pa.list_(pa.int32())),
        "prompt_slots": pa.array(rows["prompt_slots"], pa.list_(pa.int8())),
    })


def read_shards(batch: dict[str, np.ndarray], columns: list[str], seed: int) -> pa.Table:
    """Shard paths -> their example rows (map_batches function, one shard per call).

    Shards hold examples in (user, time) order; with seed >= 0 each shard's rows are
    permuted (seeded by the shard's position), so a batch mixes users."""
    tables = []
    for path, position in zip(batch["path"], batch["position"]):
        table = pq.read_table(path, columns=columns)
        if seed >= 0:
            rng = np.random.default_rng([seed, int(position)])
            table = table.take(rng.permutation(table.num_rows))
        tables.append(table)
    return pa.concat_tables(tables)


def training_dataset(cfg: GenSRConfig, tokenizer, kind: str):
    """The training split as a lazily executed Ray Dataset of pointwise rows.

    `tokenizer` (the backbone's, loaded by the driver) travels with the tasks, so no task
    reads the backbone's directory; shards are read where they lie (a path or a URI).

    The shard list is known from the contract, so reading is a map over paths rather than
    `read_parquet`: its file-listing task always asks for a whole CPU, which a Tune trial's
    data bundle on a small node cannot give. Every task here asks for DATA_TASK_CPUS.
    """
    import ray.data

    files = contract.example_shards(cfg.data.path, "train")
    if not files:
        raise contract.DataError(f"{cfg.data.path}: no training example shards")
    seed = cfg.data.shuffle_seed
    if seed >= 0:  # shard order and rows within shards; workers also mix a local buffer
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    ds = ray.data.from_items([{"path": f, "position": i} for i, f in enumerate(files)],
                             override_num_blocks=len(files))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="numpy", num_cpus=DATA_TASK_CPUS,
                        fn_kwargs={"columns": EXAMPLE_COLUMNS, "seed": seed})
    return ds.map_batches(encode_examples, batch_size=256, batch_format="numpy",
                          num_cpus=DATA_TASK_CPUS,
                          fn_kwargs={"cfg": cfg, "tokenizer": tokenizer, "kind": kind})


def epoch_batches(rows, cfg: GenSRConfig, epoch: int):
    """One epoch of a worker's micro-batches of pointwise rows (numpy) from `rows`, its
    dataset shard (or any Ray Dataset).

    Rows are mixed in a local buffer, seeded per epoch, unless `loss.listwise_weight` needs
    an example's rows side by side as `encode_examples` writes them; examples stay shuffled
    within and across shards either way.
    """
    mix = cfg.data.shuffle_seed >= 0 and cfg.loss.listwise_weight == 0
    return rows.iter_batches(
        batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True,
        local_shuffle_buffer_size=4 * cfg.train.batch_size if mix else None,
        local_shuffle_seed=cfg.data.shuffle_seed + epoch if mix else None)
