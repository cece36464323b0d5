"""Validation during training: metrics equal to the harness's, the best checkpoint kept and
evaluated by default, patience that stops a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gensr_ray.checkpoint import checkpoints, resolve_checkpoint, saved_metrics
from gensr_ray.config import GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.writer import WriteOptions, write_dataset
from gensr_ray.eval.run import evaluate_run
from gensr_ray.train.launch import run_location, run_training
from gensr_ray.train.validation import BestTracker, rank_share

EXAMPLES = 12  # validation examples per task


def _with_cf(tmp: Path) -> None:
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn

    save_cf(train_lightgcn(tmp, LightGCNConfig(epochs=5)), contract.cf_path(tmp))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validation") / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=3, n_users=40, n_items=150,
                                                      events_per_user=12)),
                  out, WriteOptions(rows_per_shard=200), after_build=_with_cf)
    return out


def _config(data: Path, **overrides) -> GenSRConfig:
    base = {
        "data.path": str(data), "model.prompt": "minimal", "model.lora_r": 4,
        "train.batch_size": 20, "train.lr": 3e-3, "train.warmup_steps": 2,
        "train.log_every": 2, "train.eval_examples": EXAMPLES, "scale.num_workers": 2,
        "scale.cpus_per_worker": 0.5, "eval.num_workers": 0,
    }
    return apply_overrides(GenSRConfig(), {**base, **overrides})


def _scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar the run logged under <out>/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _rows(out: Path, cfg: GenSRConfig) -> list[dict]:
    return [json.loads(line) for line in Path(run_location(cfg, out).metrics).read_text()
            .splitlines()]


def test_rank_shares_cover_every_example_once_with_equal_lengths():
    for n, world in ((12, 2), (13, 4), (1, 3), (5, 5)):
        shares = [rank_share(n, r, world) for r in range(world)]
        assert len({len(rows) for rows, _ in shares}) == 1  # every rank runs as many forwards
        counted = np.concatenate([rows[weight > 0] for rows, weight in shares])
        assert sorted(counted.tolist()) == list(range(n))


def test_best_tracker_counts_validations_without_a_new_best():
    tracker = BestTracker("val/mean/NDCG@10", patience=2)
    assert not tracker.update({"val/mean/NDCG@10": 0.2}, 10)
    assert not tracker.update({"val/mean/NDCG@10": 0.2}, 20)  # a tie is no improvement
    assert not tracker.update({"val/mean/NDCG@10": 0.3}, 30)
    assert not tracker.update({"val/mean/NDCG@10": 0.1}, 40)
    assert tracker.update({"val/mean/NDCG@10": 0.25}, 50)
    resumed = BestTracker("val/mean/NDCG@10", 2, tracker.state())
    assert (resumed.best, resumed.best_step, resumed.since) == (0.3, 30, 2)


def test_two_workers_validate_as_the_harness_scores_and_the_best_checkpoint_is_kept(
        ray_cluster, data, tmp_path):
    cfg = _config(data, **{"train.max_steps": 9, "train.eval_every": 3, "scale.num_to_keep": 1})
    out = tmp_path / "run"
    summary = run_training(cfg, out)

    assert (out / "training_curves.png").stat().st_size > 1000  # losses and validation
    validated = [r for r in _rows(out, cfg) if "val/mean/NDCG@10" in r]
    assert [r["step"] for r in validated] == [3, 6, 9]
    for row in validated:  # every validation wrote a checkpoint carrying its metrics
        assert row["checkpoint"] and row["val/mean/NDCG@10"] == pytest.approx(
            (row["val/search/NDCG@10"] + row["val/rec/NDCG@10"]) / 2)
    values = [r["val/mean/NDCG@10"] for r in validated]
    # TensorBoard holds every reported metric at its step, validation included
    assert _scalars(out, "val/mean/NDCG@10") == [(3, pytest.approx(values[0])),
                                                 (6, pytest.approx(values[1])),
                                                 (9, pytest.approx(values[2]))]
    assert [s for s, _ in _scalars(out, "loss")] == [2, 3, 4, 6, 8, 9]
    best_row = validated[max(range(3), key=lambda i: (values[i], i))]

    # one kept by score, and the latest, which resuming needs
    kept = checkpoints(run_location(cfg, out).run_dir)
    assert len(kept) == (1 if best_row is validated[-1] else 2), kept
    assert summary["best_value"] == pytest.approx(max(values))
    best = resolve_checkpoint(out)
    assert saved_metrics(best)["step"] == best_row["step"]
    last = resolve_checkpoint(out, "last")
    assert saved_metrics(last)["step"] == 9

    # the harness, in one process on the last checkpoint, ranks the same seeded subset alike
    results = evaluate_run(out, split="valid", max_examples=EXAMPLES, which="last",
                           cfg=apply_overrides(cfg, {"eval.num_workers": 0}))
    assert results["checkpoint"] == last
    for task in ("search", "rec"):
        for metric in ("HR@10", "NDCG@10"):
            assert results["models"]["gensr"][task]["sampled"][metric] == pytest.approx(
                validated[-1][f"val/{task}/{metric}"], abs=1e-4), (task, metric)


def test_patience_stops_a_run_whose_metric_does_not_improve(ray_cluster, data, tmp_path):
    # an update too small to move any score: every validation ties the first one
    cfg = _config(data, **{"train.max_steps": 40, "train.eval_every": 2, "train.patience": 2,
                           "train.lr": 1e-12, "scale.num_workers": 0})
    out = tmp_path / "run"
    summary = run_training(cfg, out)
    assert summary["metrics"]["step"] == 6 and summary["metrics"]["stopped_early"] is True
    assert summary["metrics"]["best_step"] == 2
    assert saved_metrics(resolve_checkpoint(out))["step"] == 2  # the best: the first
    # local mode runs no Ray Train callbacks; its reports reach metrics.jsonl all the same
    assert [r["step"] for r in _rows(out, cfg) if "val/mean/NDCG@10" in r] == [2, 4, 6]
    assert [s for s, _ in _scalars(out, "val/mean/NDCG@10")] == [2, 4, 6]  # and TensorBoard
    # the same --out again does not train on: the run has ended
    again = run_training(apply_overrides(cfg, {"train.max_steps": 60}), out)
    assert again["metrics"]["step"] == 6
