"""Reading training shards for Ray Data: every example once, mixed across users when seeded."""

from __future__ import annotations

import numpy as np

from gensr_ray.data import contract
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.writer import WriteOptions, write_dataset
from gensr_ray.train.dataset import EXAMPLE_COLUMNS, read_shards


def test_read_shards_permutes_rows_within_a_shard_by_seed_and_keeps_every_example(tmp_path):
    out = tmp_path / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=0)), out, WriteOptions(rows_per_shard=400))
    files = [str(f) for f in contract.shard_files(contract.examples_dir(out, "train"))]
    assert len(files) > 1
    batch = {"path": np.array(files[:1]), "position": np.array([0])}

    in_order = read_shards(batch, EXAMPLE_COLUMNS, seed=-1)
    train = contract.read_table(contract.examples_dir(out, "train"))
    first_rows = train.slice(0, in_order.num_rows)
    assert in_order.column("example_id").equals(first_rows.column("example_id"))  # file order

    shuffled = read_shards(batch, EXAMPLE_COLUMNS, seed=3)
    ids = shuffled.column("example_id").to_pylist()
    assert sorted(ids) == in_order.column("example_id").to_pylist()  # each example once
    assert ids != sorted(ids)
    assert read_shards(batch, EXAMPLE_COLUMNS, seed=3).equals(shuffled)  # deterministic
    other = read_shards({"path": batch["path"], "position": np.array([1])}, EXAMPLE_COLUMNS, 3)
    assert other.column("example_id").to_pylist() != ids  # each shard its own permutation
