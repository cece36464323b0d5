"""A real Ray Tune study: two trials on the debug config, each its own trainer, ASHA stopping
one of them on its validation during training, one report."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from gensr_ray.config import apply_overrides, load_config
from gensr_ray.study import load_sweep, run_study

ROOT = Path(__file__).parent.parent


def _titles_all_starting_with_item(out: Path) -> Path:
    """Synthetic data whose titles are "item <n>": cut to one token, every title is the same."""
    import dataclasses

    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
    from gensr_ray.data import contract
    from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
    from gensr_ray.data.writer import write_dataset

    raw = generate_synthetic(SyntheticOptions(seed=42))
    raw = dataclasses.replace(raw, titles=[f"item {i}" for i in range(len(raw.titles))])
    write_dataset(raw, out, after_build=lambda tmp: save_cf(
        train_lightgcn(tmp, LightGCNConfig(epochs=5)), contract.cf_path(tmp)))
    return out


def test_asha_stops_a_trial_early_on_validation_and_the_report_says_so(ray_cluster, tmp_path):
    # `uninformed` sees no view and one title token, the same for every candidate: all its
    # candidates tie, every target ranks last, its validation NDCG is 0. It runs second (one
    # trial at a time on 2 CPUs), so at its first rung ASHA compares it with `lambda_0`'s.
    sweep_file = tmp_path / "asha.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "metric": "mean/sampled/NDCG@10", "mode": "max",
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
        "trials": {"lambda_0": {"loss.contrastive_weight": 0.0},
                   "uninformed": {"model.use_cf": False, "model.use_sem": False,
                                  "data.prompt_title_tokens": 1,
                                  "data.target_title_tokens": 1}}}))
    data = _titles_all_starting_with_item(tmp_path / "data")
    cfg = apply_overrides(load_config(ROOT / "configs" / "debug.yaml"), {
        "data.path": str(data), "train.max_steps": 6, "train.log_every": 3,
        "train.eval_every": 2, "train.eval_examples": 40, "eval.max_examples": 20})
    study = run_study(cfg, load_sweep(sweep_file), tmp_path / "study")

    rows = {r["trial"]: r for r in csv.DictReader((tmp_path / "study" / "report.csv").open())}
    assert sorted(rows) == ["lambda_0", "uninformed"]
    finished, stopped = rows["lambda_0"], rows["uninformed"]
    assert not finished["error"] and not finished["stopped_at_step"]
    for task in ("search", "rec"):
        for metric in ("sampled/HR@10", "sampled/NDCG@10", "full/Recall@10"):
            assert math.isfinite(float(finished[f"{task}/{metric}"]))
    assert stopped["stopped_at_step"] == "2" and float(stopped["val/mean/NDCG@10"]) == 0.0
    assert not stopped["search/sampled/NDCG@10"]  # never evaluated at the end
    report = (tmp_path / "study" / "report.md").read_text()
    assert study["best"] == "lambda_0" and "Winner: `lambda_0`" in report
    assert "- `uninformed` at step 2" in report
    assert (tmp_path / "study" / "report.png").stat().st_size > 1000
    experiment = Path(study["experiment"])  # Tune's own results stay browsable
    assert len(list(experiment.glob("*/result.json"))) == 2
    assert len(list(experiment.glob("*/events.out.tfevents.*"))) == 2  # TensorBoard


def test_a_scheduler_needs_validation_during_training(tmp_path):
    from gensr_ray.config import ConfigError
    from gensr_ray.study import build_scheduler

    sweep_file = tmp_path / "asha.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "scheduler": {"name": "asha", "grace_period": 2}, "trials": {"a": {}}}))
    sweep = load_sweep(sweep_file)
    with pytest.raises(ConfigError, match="set train.eval_every > 0"):
        build_scheduler(load_config(ROOT / "configs" / "debug.yaml"), sweep)
    sweep_file.write_text(yaml.safe_dump({
        "metric": "mean/full/Recall@10", "scheduler": {"name": "asha"}, "trials": {"a": {}}}))
    with pytest.raises(ConfigError, match="no such counterpart"):
        load_sweep(sweep_file)
    sweep_file.write_text(yaml.safe_dump({
        "scheduler": {"name": "asha", "grace": 2}, "trials": {"a": {}}}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['grace'\]"):
        load_sweep(sweep_file)


def test_tune_out_on_object_storage_points_to_the_storage_setting(capsys):
    from gensr_ray.cli import main

    assert main(["tune", "--config", str(ROOT / "configs" / "debug.yaml"),
                 "--sweep", str(ROOT / "configs" / "sweeps" / "prompts.yaml"),
                 "--out", "s3://bucket/study"]) == 2
    assert "scale.storage_path=s3://" in capsys.readouterr().err
