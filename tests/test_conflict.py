"""Gradient conflict: the computation on cases with a known answer, and `gensr diagnose` on
ZeRO-3 worker groups of different sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gensr_ray.assemble import build_model, resolve_config_backbone
from gensr_ray.checkpoint import write_model_export
from gensr_ray.cli import main
from gensr_ray.config import GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.validate import fingerprint
from gensr_ray.data.writer import WriteOptions, write_dataset
from gensr_ray.train.conflict import group_cosines, parameter_group, parameter_sums, summarize
from gensr_ray.train.diagnose import run_diagnosis


def _at_angle(theta: float, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors of different lengths whose angle is `theta`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    u, v = u / u.norm(), v - (v @ u) * u / (u @ u)
    v = v / v.norm()
    return 2.0 * u, 0.5 * (math.cos(theta) * u + math.sin(theta) * v)


def test_two_losses_at_a_chosen_angle_give_its_cosine():
    a, b = _at_angle(1.1)
    w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    (grad_search,) = torch.autograd.grad((a * w).sum(), w)
    (grad_rec,) = torch.autograd.grad((b * w).sum(), w)
    name = "lm.model.layers.3.self_attn.q_proj.lora_A.shared.weight"
    sums = parameter_sums({name: grad_search}, {name: grad_rec})
    result = group_cosines({n: v.numpy() for n, v in sums.items()}, "shared_lora")
    assert result["overall"] == pytest.approx(math.cos(1.1), abs=1e-12)
    assert result["by_kind"] == {"lora_A": pytest.approx(math.cos(1.1), abs=1e-12)}
    assert result["by_layer"] == {3: pytest.approx(math.cos(1.1), abs=1e-12)}


def test_partition_sums_add_up_to_the_whole_and_task_adapters_stay_apart():
    s1, r1 = _at_angle(0.3, seed=1)
    s2, r2 = _at_angle(2.5, seed=2)
    names = ["lm.model.layers.0.mlp.up_proj.weight", "cf_proj.weight"]
    whole = parameter_sums(dict(zip(names, (s1, s2))), dict(zip(names, (r1, r2))))
    # two workers, each holding half of every gradient (ZeRO-3 partitions)
    halves = [parameter_sums({n: g[i * 3:(i + 1) * 3] for n, g in zip(names, (s1, s2))},
                             {n: g[i * 3:(i + 1) * 3] for n, g in zip(names, (r1, r2))})
              for i in range(2)]
    for name in names:
        torch.testing.assert_close(halves[0][name] + halves[1][name], whole[name])
    expected = (s1 @ r1 + s2 @ r2) / math.sqrt((s1 @ s1 + s2 @ s2) * (r1 @ r1 + r2 @ r2))
    # a search-only adapter: no rec gradient, cosine 0 by construction, never in the figures
    own = "lm.model.layers.0.self_attn.v_proj.lora_B.search.weight"
    sums = {**{n: v.numpy() for n, v in whole.items()},
            own: parameter_sums({own: s1}, {})[own].numpy()}
    result = group_cosines(sums, "task_and_shared_lora")
    assert result["overall"] == pytest.approx(float(expected), abs=1e-12)
    assert result["by_kind"]["projection"] == pytest.approx(math.cos(2.5), abs=1e-12)
    assert result["by_layer"] == {0: pytest.approx(math.cos(0.3), abs=1e-12)}
    assert result["task_only"] == {"search": {"params": 1, "norm": pytest.approx(2.0)}}
    summary = summarize([result, result])
    assert summary["overall"]["mean"] == pytest.approx(float(expected)) and \
        summary["overall"]["std"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name, group", [
    ("lm.model.layers.2.self_attn.q_proj.base_layer.weight", (2, "attention")),
    ("lm.model.layers.1.mlp.down_proj.weight", (1, "mlp")),
    ("lm.model.embed_tokens.weight", (None, "embeddings")),
    ("lm.model.layers.0.input_layernorm.weight", (0, "other")),
    ("sem_encoder.attn.in_proj_weight", (None, "view encoders")),
    ("lm.encoder.block.4.layer.1.DenseReluDense.wi.weight", (4, "mlp")),
])
def test_parameter_groups(name, group):
    assert parameter_group(name) == group


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A seeded GenSR with random adapters (task + shared LoRA) on a small synthetic set."""
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn

    root = tmp_path_factory.mktemp("conflict")
    data = root / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=3, n_users=40, n_items=120,
                                                      events_per_user=10)),
                  data, WriteOptions(rows_per_shard=200),
                  after_build=lambda tmp: save_cf(train_lightgcn(tmp, LightGCNConfig(epochs=3)),
                                                  contract.cf_path(tmp)))
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(data), "model.backbone": "preset:tiny-llama", "model.prompt": "minimal",
        "model.subspace": "task_and_shared_lora", "model.lora_targets": ["q_proj", "v_proj"],
        "scale.num_workers": 2, "scale.cpus_per_worker": 0.5,
        # InfoNCE's negatives are the other rows of a worker's batch: with it, 2 workers'
        # halves are not 1 worker's whole batch (in training alike); without, they are
        "loss.contrastive_weight": 0.0})
    model, _ = build_model(cfg, resolve_config_backbone(cfg))
    g = torch.Generator().manual_seed(1)
    weights = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g)
               for n, p in model.named_parameters() if p.requires_grad}
    write_model_export(root / "ckpt" / "model", weights, cfg,
                       {"step": 0, "data": fingerprint(data)})
    return root / "ckpt"


def test_two_zero3_workers_measure_what_one_does(ray_cluster, checkpoint, tmp_path, capsys,
                                                 monkeypatch):
    monkeypatch.chdir(checkpoint.parent)  # a relative --checkpoint, as users type it
    assert main(["diagnose", "--checkpoint", checkpoint.name, "--out", str(tmp_path / "two"),
                 "--batches", "2", "--examples", "4"]) == 0
    printed = capsys.readouterr().out
    assert "overall (shared)" in printed and "search-only adapters" in printed
    two = json.loads((tmp_path / "two" / "conflict.json").read_text())
    assert (tmp_path / "two" / "conflict.png").stat().st_size > 0
    one = run_diagnosis(str(checkpoint), tmp_path / "one", batches=2, per_task=4, workers=1)
    assert (two["workers"], one["workers"]) == (2, 1)
    assert two["overall"]["per_batch"] == pytest.approx(one["overall"]["per_batch"], abs=1e-6)
    assert set(two["by_layer"]) == {"0", "1"}  # the tiny Llama's two layers
    for layer, stats in two["by_layer"].items():
        assert stats["mean"] == pytest.approx(one["by_layer"][layer]["mean"], abs=1e-6)
    assert set(two["task_only"]) == {"search", "rec"}
    assert not np.isclose(two["overall"]["mean"], 0.0)  # shared adapters see both tasks


def test_the_discriminative_twin_is_evaluated_and_diagnosed_like_gensr(ray_cluster, checkpoint,
                                                                      tmp_path):
    from gensr_ray.checkpoint import read_checkpoint_config
    from gensr_ray.eval.run import evaluate_run

    data = read_checkpoint_config(checkpoint).data.path
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": data, "model.backbone": "preset:tiny-llama", "model.prompt": "task_free",
        "model.kind": "discriminative", "model.lora_targets": ["q_proj", "v_proj"],
        "scale.num_workers": 1, "scale.cpus_per_worker": 1.0, "eval.num_workers": 0,
        "eval.max_examples": 5, "eval.rerank_depth": 10})
    model, _ = build_model(cfg, resolve_config_backbone(cfg))
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    write_model_export(tmp_path / "twin" / "model", weights, cfg,
                       {"step": 0, "data": fingerprint(Path(data))})
    results = evaluate_run(tmp_path / "twin", cfg=cfg)
    for task in ("search", "rec"):
        assert set(results["models"]["gensr"][task]) == {"sampled", "full"}
    summary = run_diagnosis(str(tmp_path / "twin"), tmp_path / "diagnosis", batches=1,
                            per_task=4)
    assert summary["task_only"]["heads"]["params"] == 2  # weight and bias, one row per task
    assert summary["overall"]["mean"] is not None


def _run_summary(overall: float, layers: dict[str, float], search_only: int = 0) -> dict:
    """A run's conflict.json as run_diagnosis writes it (the fields the comparison reads):
    two batches whose cosines average to `overall`."""
    def s(v):
        return {"mean": v, "std": 0.1, "batches": 2}

    return {"overall": {**s(overall), "per_batch": [overall - 0.05, overall + 0.05]},
            "by_kind": {"attention": s(overall / 2)},
            "by_layer": {k: s(v) for k, v in layers.items()}, "examples_per_task": 16,
            "workers": 2, "batches": 8, "seed": 0,
            "task_only": {"search": {"params": search_only, "norm": 1.0}} if search_only else {}}


def test_a_study_s_runs_are_compared_per_trial_over_seeds(tmp_path):
    """study_runs finds a study's finished runs in its report's (the sweep's) order, not by
    name; summarize_runs gives each trial the mean and sample std over its seeds; a metric
    the report lacks (nan) is left out; runs of two sweeps in one directory are refused."""
    from gensr_ray.config import ConfigError
    from gensr_ray.train.conflict_study import (_quality, compare_with, format_study_table,
                                                study_runs, summarize_runs)

    study = tmp_path / "study"
    for trial, seed in [("alpha", 1), ("zeta", 2), ("zeta", 1), ("alpha", 2), ("broken", 1)]:
        trial_dir = study / "tune" / "sweep" / f"run_trial_{trial}_{seed}"
        (trial_dir / "run").mkdir(parents=True)
        (trial_dir / "params.json").write_text(json.dumps({"trial": trial, "seed": seed}))
        if trial != "broken":  # an errored run leaves no summary
            (trial_dir / "run" / "train_summary.json").write_text("{}")
    (study / "report_summary.csv").write_text(
        "trial,seeds,search/sampled/NDCG@10 mean,search/sampled/NDCG@10 std,"
        "rec/sampled/NDCG@10 mean,rec/sampled/NDCG@10 std\n"
        "zeta,2,0.40,0.02,nan,nan\nalpha,2,0.35,0.01,0.30,0.03\n")
    runs = study_runs(study)
    assert [(r["trial"], r["seed"]) for r in runs] == [("zeta", 1), ("zeta", 2), ("alpha", 1),
                                                       ("alpha", 2)]
    figures = {("zeta", 1): (0.2, {"0": 0.1, "1": 0.3}), ("zeta", 2): (0.4, {"0": 0.3}),
               ("alpha", 1): (-0.1, {"0": 0.0, "1": 0.0}), ("alpha", 2): (0.1, {"0": 0.2})}
    per_run = [{**r, "summary": _run_summary(*figures[(r["trial"], r["seed"])],
                                             search_only=5 if r["trial"] == "alpha" else 0)}
               for r in runs]
    trials = summarize_runs(per_run, _quality(study))
    assert list(trials) == ["zeta", "alpha"]
    assert trials["zeta"]["overall"]["mean"] == pytest.approx(0.3)
    assert trials["zeta"]["overall"]["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert trials["zeta"]["by_layer"]["1"] == {"mean": pytest.approx(0.3), "std": None,
                                               "runs": 1}  # layer 1 measured in one run
    assert trials["alpha"]["by_kind"]["attention"]["mean"] == pytest.approx(0.0)
    assert trials["alpha"]["task_only_tensors"] == 5
    assert set(trials["zeta"]["quality"]) == {"search/sampled/NDCG@10"}  # rec was nan
    # alpha against zeta, paired by seed and batch: seed 1 -0.3, seed 2 -0.3
    compare_with(trials, per_run, "zeta")
    versus = trials["alpha"]["vs_reference"]
    assert versus["difference"] == pytest.approx(-0.3) and versus["seeds"] == 2
    assert versus["high"] == pytest.approx(-0.3) and versus["p"] < 0.01
    table = format_study_table(trials).splitlines()
    assert table[0].startswith("| trial | runs | search NDCG@10 | rec NDCG@10 | cosine, all "
                               "shared | vs zeta | attention |")
    assert table[2].startswith("| zeta | 2 | 0.400 ± 0.020 | - | +0.300 ± 0.141 | reference |")
    assert "| -0.300 [-0.300, -0.300] p=0.00 |" in table[3] and table[3].endswith("| 5 |")

    (study / "tune" / "other").mkdir()
    with pytest.raises(ConfigError, match="several sweeps"):
        study_runs(study)
