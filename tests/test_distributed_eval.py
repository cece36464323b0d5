"""GenSR scored on a pool of Ray workers gives what the single-process scorer gives."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gensr_ray.assemble import build_model, load_for_eval, resolve_config_backbone
from gensr_ray.checkpoint import write_model_export
from gensr_ray.config import GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.validate import fingerprint
from gensr_ray.data.writer import WriteOptions, write_dataset
from gensr_ray.eval import distributed
from gensr_ray.eval.distributed import DistributedGenSRScorer, _ScoringActor, examples_per_call
from gensr_ray.eval.gensr_scorer import GenSRScorer
from gensr_ray.eval.harness import load_eval_examples
from gensr_ray.eval.run import evaluate_run


def _with_cf(tmp: Path) -> None:
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn

    save_cf(train_lightgcn(tmp, LightGCNConfig(epochs=5)), contract.cf_path(tmp))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, GenSRConfig]:
    """A model export of a seeded, untrained GenSR (no training needed to compare scorers)."""
    root = tmp_path_factory.mktemp("distributed-eval")
    data = root / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=2, n_users=40, n_items=150,
                                                      events_per_user=10)),
                  data, WriteOptions(rows_per_shard=100), after_build=_with_cf)
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(data), "model.backbone": "preset:tiny-llama", "model.prompt": "minimal",
        "model.lora_targets": ["q_proj", "v_proj"], "eval.max_examples": 12,
        "eval.num_workers": 2, "eval.cpus_per_worker": 0.5, "eval.rerank_depth": 20})
    model, _ = build_model(cfg, resolve_config_backbone(cfg))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    write_model_export(root / "ckpt" / "model", weights, cfg,
                       {"step": 0, "data": fingerprint(data)})
    return root / "ckpt", cfg


def test_two_scoring_workers_give_the_single_process_scores(ray_cluster, checkpoint):
    path, cfg = checkpoint
    batch = load_eval_examples(Path(cfg.data.path), "test", max_examples=9)["rec"]
    candidates = np.concatenate([batch["target"][:, None], batch["negatives"]], axis=1)
    model, backbone, local_cfg = load_for_eval(path, cfg)
    single = GenSRScorer(model, backbone, local_cfg, {}, depth=0, batch_size=64)
    distributed = DistributedGenSRScorer(str(path), cfg, {})
    np.testing.assert_allclose(distributed.score(batch, candidates),
                               single.score(batch, candidates), rtol=0, atol=1e-5)


def test_a_pass_over_requests_of_different_widths_keeps_each_in_place(ray_cluster, checkpoint):
    """Ray Data cuts one pass into calls of MIN_PER_CALL (16) examples: 11 + 9 examples
    make a call that spans both requests, whose candidate lists are 7 and 3 wide."""
    path, cfg = checkpoint
    assert examples_per_call(20, cfg.eval.num_workers) == 16
    pooled, single = _pooled_and_single(path, cfg, widths=(7, 3))
    assert [p.shape for p in pooled] == [(11, 7), (9, 3)]
    for scores, reference in zip(pooled, single):
        np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-5)


def _pooled_and_single(path: Path, cfg: GenSRConfig, widths: tuple[int, int]):
    """11 search and 9 rec test examples as two requests whose candidate lists are `widths`
    wide: their scores from one pass over the pool, and from the single-process scorer."""
    examples = load_eval_examples(Path(cfg.data.path), "test", max_examples=20)
    requests = []
    for task, n, width in (("search", 11, widths[0]), ("rec", 9, widths[1])):
        batch = {k: v[:n] for k, v in examples[task].items()}
        requests.append((batch, np.concatenate([batch["target"][:, None],
                                                batch["negatives"][:, :width - 1]], axis=1)))
    model, backbone, local_cfg = load_for_eval(path, cfg)
    single = GenSRScorer(model, backbone, local_cfg, {}, depth=0, batch_size=64)
    pooled = DistributedGenSRScorer(str(path), cfg, {}).score_many(requests)
    return pooled, [single.score(batch, candidates) for batch, candidates in requests]


def test_calls_grow_with_the_pass_within_their_bounds():
    """About CALLS_PER_WORKER calls per worker, never under 16 or over 128 examples."""
    assert examples_per_call(1, 2) == 16
    assert examples_per_call(3752, 2) == 59  # the demo's pass: 64 calls, 32 per worker
    assert examples_per_call(3752, 1) == 118
    assert examples_per_call(188_000, 8) == 128
    assert examples_per_call(500, 0) == 16  # no workers named: as one


def test_a_pass_cut_into_calls_that_end_mid_request_keeps_every_score(ray_cluster, checkpoint,
                                                                      monkeypatch):
    """Calls of 5 examples (the bounds lowered): blocks of 11 + 9 examples end inside either
    request; however Ray Data bundles them, every score lands in its place."""
    path, cfg = checkpoint
    monkeypatch.setattr(distributed, "MIN_PER_CALL", 1)
    monkeypatch.setattr(distributed, "CALLS_PER_WORKER", 2)
    assert examples_per_call(20, cfg.eval.num_workers) == 5
    pooled, single = _pooled_and_single(path, cfg, widths=(5, 3))
    assert [p.shape for p in pooled] == [(11, 5), (9, 3)]
    for scores, reference in zip(pooled, single):
        np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-5)


class _DiesOnce(_ScoringActor):
    """A scoring worker whose first call, in whichever worker makes it first, ends the
    worker's process as an out-of-memory kill would; the marker file makes it happen once."""

    def __call__(self, batch: dict) -> dict:
        marker = Path(self.checkpoint).with_name("a-scorer-died")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().__call__(batch)
        os._exit(1)

    def __init__(self, checkpoint: str, cfg: GenSRConfig):
        super().__init__(checkpoint, cfg)
        self.checkpoint = checkpoint


def test_a_pass_that_loses_a_worker_resumes_on_a_fresh_pool(ray_cluster, checkpoint, caplog):
    """No actor restarts (their error line, ray-project/ray#53727): the driver rescores what
    a dead worker left, and the scores are those of the single process."""
    from ray import cloudpickle  # Ray's own copy pickles the actor class

    path, cfg = checkpoint
    marker = path.with_name("a-scorer-died")
    marker.unlink(missing_ok=True)
    batch = load_eval_examples(Path(cfg.data.path), "test", max_examples=40)["rec"]
    candidates = np.concatenate([batch["target"][:, None], batch["negatives"]], axis=1)
    scorer = DistributedGenSRScorer(str(path), cfg, {})
    scorer.actor_class = _DiesOnce
    # the workers cannot import this test module: the class travels by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with caplog.at_level(logging.WARNING, logger="gensr_ray.eval.distributed"):
            pooled = scorer.score(batch, candidates)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists()
    assert "a scoring worker was lost (" in caplog.text
    model, backbone, local_cfg = load_for_eval(path, cfg)
    single = GenSRScorer(model, backbone, local_cfg, {}, depth=0, batch_size=64)
    np.testing.assert_allclose(pooled, single.score(batch, candidates), rtol=0, atol=1e-5)
    # with no retry allowed, the lost worker fails the evaluation
    marker.unlink()
    scorer.cfg = apply_overrides(cfg, {"eval.scorer_retries": 0})
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with pytest.raises(ray_cluster.exceptions.RayActorError):
            scorer.score(batch, candidates)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_evaluation_results_match_between_the_paths(ray_cluster, checkpoint):
    path, cfg = checkpoint
    pooled = evaluate_run(path, cfg=cfg)
    local = evaluate_run(path, cfg=apply_overrides(cfg, {"eval.num_workers": 0}))
    assert pooled["models"]["gensr"] == local["models"]["gensr"]
    assert set(pooled["models"]["gensr"]) == {"search", "rec"}


def test_eval_set_overrides_the_checkpoint_config(checkpoint, tmp_path, capsys):
    from gensr_ray.cli import main

    path, _ = checkpoint
    out = tmp_path / "results.json"
    assert main(["eval", "--checkpoint", str(path), "--set", "eval.num_workers=0",
                 "--set", "eval.max_examples=3", "--out", str(out)]) == 0
    assert "seeded subset of at most 3 per task" in capsys.readouterr().out
    # beside the JSON, the same figures as a Markdown table and a CSV
    results = json.loads(out.read_text())
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["model"] for r in rows] == ["gensr"]
    assert float(rows[0]["rec/sampled/NDCG@10"]) == results["models"]["gensr"]["rec"]["sampled"][
        "NDCG@10"]
    assert "| gensr | " in out.with_suffix(".md").read_text()
    assert main(["eval", "--checkpoint", str(path), "--set", "eval.num_workers=-1"]) == 2
    assert "eval.num_workers=-1 is out of range" in capsys.readouterr().err
