"""Reading training shards for Ray Data: every example once, mixed across users when seeded;
an example's rows side by side in a batch when the listwise loss needs them; fresh negatives
drawn per epoch in the worker."""

from __future__ import annotations

import numpy as np

from gensr_ray.assemble import resolve_config_backbone
from gensr_ray.config import GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.data.contract import train_item_counts
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.writer import WriteOptions, write_dataset
from gensr_ray.model.backbone import backbone_kind, load_tokenizer
from gensr_ray.inputs.build import build_features
from gensr_ray.train.dataset import EXAMPLE_COLUMNS, epoch_batches, read_shards, training_dataset
from gensr_ray.train.negatives import FreshNegatives


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


def _runs(example_ids: np.ndarray) -> int:
    """How many runs of equal consecutive ids a batch has."""
    return int(1 + np.count_nonzero(example_ids[1:] != example_ids[:-1]))


def test_listwise_loss_keeps_each_examples_rows_side_by_side_in_a_batch(tmp_path, ray_cluster):
    data = tmp_path / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=0)), data, WriteOptions(rows_per_shard=400))
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(data), "model.backbone": "preset:tiny-llama", "model.prompt": "minimal",
        "train.batch_size": 50, "train.negatives_per_example": 4})
    backbone = resolve_config_backbone(cfg)
    rows = training_dataset(cfg, load_tokenizer(backbone), backbone_kind(backbone)).materialize()

    def batches(listwise: float) -> list[dict]:
        run = apply_overrides(cfg, {"loss.listwise_weight": listwise})
        return list(epoch_batches(rows, run, epoch=0))

    grouped, mixed = batches(1.0), batches(0.0)
    assert len(grouped) == len(mixed) > 10
    for batch in grouped:  # 10 whole examples of 5 rows each, each target first
        ids = batch["example_id"]
        assert _runs(ids) == len(set(ids.tolist())) == 10
        assert batch["label"].reshape(10, 5).tolist() == [[1.0, 0, 0, 0, 0]] * 10
    # the default mixes rows across examples: a batch holds parts of many more examples
    assert np.mean([len(set(b["example_id"].tolist())) for b in mixed]) > 20
    assert any(_runs(b["example_id"]) > len(set(b["example_id"].tolist())) for b in mixed)
    seen = np.concatenate([b["example_id"] for b in grouped])
    assert len(set(seen.tolist())) * 5 == seen.size  # every row of an example, once


def test_fresh_negatives_are_untouched_items_with_their_own_prompts_drawn_per_epoch(
        tmp_path, ray_cluster):
    data = tmp_path / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=0)), data, WriteOptions(rows_per_shard=400))
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(data), "model.backbone": "preset:tiny-llama", "model.prompt": "minimal",
        "train.batch_size": 200, "train.negatives": "fresh"})
    backbone = resolve_config_backbone(cfg)
    tokenizer, kind = load_tokenizer(backbone), backbone_kind(backbone)
    batch = next(iter(epoch_batches(training_dataset(cfg, tokenizer, kind), cfg, epoch=0)))
    stored = batch["target"].copy()
    encoder, _ = build_features(cfg, tokenizer, kind)
    fresh = FreshNegatives(data, encoder, seed=7, rank=0)
    drawn = fresh.redraw(batch, epoch=0, micro=1)

    assert (batch["target"] == stored).all()  # the worker's batch is not written into
    positive, negative = batch["label"] == 1, batch["label"] == 0
    assert positive.sum() > 10 and negative.sum() > 100
    assert (drawn["target"][positive] == stored[positive]).all()
    assert np.mean(drawn["target"][negative] != stored[negative]) > 0.9
    interactions = contract.read_table(contract.interactions_dir(data))
    touched = set(zip(interactions.column("user_id").to_pylist(),
                      interactions.column("item_id").to_pylist()))
    for user, item in zip(batch["user_id"][negative].tolist(), drawn["target"][negative].tolist()):
        assert (user, item) not in touched
    # each rebuilt row is what the encoder writes for its example with that candidate
    examples = contract.read_table(contract.examples_dir(data, "train")).to_pandas()
    examples = examples.set_index("example_id", drop=False)
    tasks = set()
    for r in np.flatnonzero(negative)[:40].tolist():
        example = examples.loc[[int(batch["example_id"][r])]]
        assert int(example["user_id"].iloc[0]) == int(batch["user_id"][r])
        expected = encoder.encode({k: example[k].to_numpy() for k in example.columns},
                                  candidates=np.array([[drawn["target"][r]]]))
        assert list(drawn["prompt_ids"][r]) == expected["prompt_ids"][0]
        assert list(drawn["prompt_slots"][r]) == expected["prompt_slots"][0]
        tasks.add(example["task"].iloc[0])
    assert tasks == {"search", "rec"}  # search rows carry their query into the new prompt
    # seeded by the epoch and the micro-batch: the same again, another epoch another draw
    again = fresh.redraw(batch, epoch=0, micro=1)
    assert (again["target"] == drawn["target"]).all()
    later = fresh.redraw(batch, epoch=1, micro=1)
    assert np.mean(later["target"][negative] != drawn["target"][negative]) > 0.9
    assert fresh.kept == 0

    # weighted by training popularity: more popular negatives, still never a touched item
    # (the synthetic items' counts lie close together, 10-17 for 80 % of them: a steep
    # weighting shows the shift)
    counts = train_item_counts(data, fresh.n_items)
    popular = FreshNegatives(data, encoder, seed=7, rank=0, popularity=8.0).redraw(
        batch, epoch=0, micro=1)
    assert counts[popular["target"][negative]].mean() > \
        counts[drawn["target"][negative]].mean() + 2
    for user, item in zip(batch["user_id"][negative].tolist(),
                          popular["target"][negative].tolist()):
        assert (user, item) not in touched
