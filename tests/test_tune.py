"""A real Ray Tune study: two trials on the debug config, each its own trainer, one report."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from gensr_ray.config import apply_overrides, load_config
from gensr_ray.study import load_sweep, run_study

ROOT = Path(__file__).parent.parent


def test_two_trial_sweep_on_the_debug_config_writes_a_report(ray_cluster, tmp_path):
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "metric": "mean/sampled/NDCG@10", "mode": "max",
        "trials": {"lambda_0": {"loss.contrastive_weight": 0.0},
                   "minimal_query_blind": {"model.query_in_prompt": False}}}))
    data = tmp_path / "data"
    from gensr_ray.data.synthetic import SyntheticOptions
    from gensr_ray.prepare import prepare_dataset

    prepare_dataset(SyntheticOptions(seed=42), data)
    cfg = apply_overrides(load_config(ROOT / "configs" / "debug.yaml"), {
        "data.path": str(data), "train.max_steps": 6, "train.log_every": 3,
        "eval.max_examples": 20})
    study = run_study(cfg, load_sweep(sweep_file), tmp_path / "study")

    rows = list(csv.DictReader((tmp_path / "study" / "report.csv").open()))
    assert sorted(r["trial"] for r in rows) == ["lambda_0", "minimal_query_blind"]
    for row in rows:
        assert not row["error"]
        for task in ("search", "rec"):
            for metric in ("sampled/HR@10", "sampled/NDCG@10", "full/Recall@10"):
                assert math.isfinite(float(row[f"{task}/{metric}"]))
    report = (tmp_path / "study" / "report.md").read_text()
    assert "lambda_0" in report and "minimal_query_blind" in report
    assert f"Winner: `{study['best']}`" in report
    assert (tmp_path / "study" / "report.png").stat().st_size > 1000
    experiment = Path(study["experiment"])  # Tune's own results stay browsable
    assert len(list(experiment.glob("*/result.json"))) == 2
    assert len(list(experiment.glob("*/events.out.tfevents.*"))) == 2  # TensorBoard




def test_tune_out_on_object_storage_points_to_the_storage_setting(capsys):
    from gensr_ray.cli import main

    assert main(["tune", "--config", str(ROOT / "configs" / "debug.yaml"),
                 "--sweep", str(ROOT / "configs" / "sweeps" / "prompts.yaml"),
                 "--out", "s3://bucket/study"]) == 2
    assert "scale.storage_path=s3://" in capsys.readouterr().err
