"""A real Ray Tune study on the debug config, each trial its own trainer: ASHA stopping one
trial on its validation during training, a failed trial resumed, one report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from gensr_ray.cli import main
from gensr_ray.config import ConfigError, apply_overrides, load_config
from gensr_ray.eval.paired import per_example
from gensr_ray.study import load_sweep, report_study, run_study
from gensr_ray.sweep import select

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


def test_a_study_stops_a_trial_early_resumes_a_failed_one_and_is_diagnosed(ray_cluster,
                                                                          tmp_path):
    """One study for Tune's whole life cycle (each trial costs a Ray Train start-up):

    - `uninformed` sees no view and one title token, the same for every candidate: all its
      candidates tie, every target ranks last, its validation NDCG is 0. Trials run one at a
      time on 2 CPUs, sorted by name, so at its first rung ASHA compares it with `lambda_0`'s
      and stops it.
    - `later` fails at first (its data is not there yet); resumed, it runs, and the finished
      trials keep their one result. It is `lambda_0` on a copy of the data, so ASHA keeps it.
    - the finished runs are then diagnosed one by one and compared per trial."""
    import shutil

    later = tmp_path / "later"
    sweep_file = tmp_path / "asha.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "metric": "mean/sampled/NDCG@10", "mode": "max",
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
        "trials": {"lambda_0": {"loss.contrastive_weight": 0.0},
                   "later": {"loss.contrastive_weight": 0.0, "data.path": str(later)},
                   "uninformed": {"model.use_cf": False, "model.use_sem": False,
                                  "data.prompt_title_tokens": 1,
                                  "data.target_title_tokens": 1}}}))
    data = _titles_all_starting_with_item(tmp_path / "data")
    cfg = apply_overrides(load_config(ROOT / "configs" / "debug.yaml"), {
        "data.path": str(data), "train.max_steps": 6, "train.log_every": 3,
        "train.eval_every": 2, "train.eval_examples": 40, "eval.max_examples": 20,
        "train.conflict_every": 6, "train.conflict_examples": 4})
    asha = load_sweep(sweep_file)
    first = run_study(cfg, asha, tmp_path / "study")
    rows = {r["trial"]: r for r in first["rows"]}
    assert "error" not in rows["lambda_0"] and "later" in rows["later"]["error"]
    experiment = Path(first["experiment"])
    finished_results = next(experiment.glob("*lambda_0*/result.json")).read_text()

    shutil.copytree(data, later)
    study = run_study(cfg, load_sweep(sweep_file), tmp_path / "study", resume=True)
    assert next(experiment.glob("*lambda_0*/result.json")).read_text() == finished_results

    rows = {r["trial"]: r for r in csv.DictReader((tmp_path / "study" / "report.csv").open())}
    assert sorted(rows) == ["lambda_0", "later", "uninformed"]
    stopped = rows["uninformed"]
    for name in ("lambda_0", "later"):
        finished = rows[name]
        assert not finished["error"] and not finished["stopped_at_step"]
        for task in ("search", "rec"):
            for metric in ("sampled/HR@10", "sampled/NDCG@10", "full/Recall@10"):
                assert math.isfinite(float(finished[f"{task}/{metric}"]))
        # the gradient conflict measured at the finished trial's last step reaches the report
        assert -1.0 <= float(finished["conflict/overall"]) <= 1.0
    # the same trial on the same data and seed: the same run
    assert rows["later"]["val/mean/NDCG@10"] == rows["lambda_0"]["val/mean/NDCG@10"]
    assert stopped["stopped_at_step"] == "2" and float(stopped["val/mean/NDCG@10"]) == 0.0
    assert not stopped["search/sampled/NDCG@10"]  # never evaluated at the end
    report = (tmp_path / "study" / "report.md").read_text()
    assert study["best"] in ("lambda_0", "later")
    assert f"Winner: `{study['best']}`" in report and "| later |" in report
    assert "- `uninformed` (seed 42) at step 2" in report and "conflict/overall" in report
    assert (tmp_path / "study" / "report.png").stat().st_size > 1000
    # Tune's own results stay browsable; `later` holds the result of its second attempt
    assert len(list(experiment.glob("*/result.json"))) == 3
    assert len(list(experiment.glob("*/events.out.tfevents.*"))) >= 2  # TensorBoard
    # the report again from the Tune directory alone (gensr tune --report-only)
    before = sorted((tmp_path / "study" / "report.csv").read_text().splitlines())
    (tmp_path / "study" / "report.csv").unlink()
    again = report_study(cfg, load_sweep(sweep_file), tmp_path / "study")
    assert again["best"] == study["best"]
    assert sorted((tmp_path / "study" / "report.csv").read_text().splitlines()) == before
    with pytest.raises(ConfigError, match="no Tune experiment of sweep 'asha' there"):
        report_study(cfg, load_sweep(sweep_file), tmp_path / "elsewhere")

    # the finished runs diagnosed one by one and compared per trial (the stopped one has no
    # finished run)
    assert main(["diagnose", "--study", str(tmp_path / "study"), "--out",
                 str(tmp_path / "conflict"), "--batches", "1", "--examples", "2"]) == 0
    compared = json.loads((tmp_path / "conflict" / "conflict_study.json").read_text())
    assert list(compared["trials"]) == ["lambda_0", "later"]  # the sweep's order
    for name, trial in compared["trials"].items():
        run = json.loads((tmp_path / "conflict" / name / "conflict.json").read_text())
        assert trial["overall"]["mean"] == pytest.approx(run["overall"]["mean"])
        assert trial["quality"]["rec/sampled/NDCG@10"]["mean"] == pytest.approx(
            float(rows[name]["rec/sampled/NDCG@10"]), abs=1e-4)
    table = (tmp_path / "conflict" / "conflict_study.md").read_text()
    assert table.startswith("| trial | runs | search NDCG@10 | rec NDCG@10 | cosine, all shared")
    assert (tmp_path / "conflict" / "conflict_study.png").stat().st_size > 0

    sweep_file.write_text(yaml.safe_dump({"metric": "mean/sampled/NDCG@10", "mode": "max",
                                          "trials": {"lambda_0": {}, "other": {}}}))
    with pytest.raises(ConfigError, match="ran other trials than sweep 'asha' lists now"):
        run_study(cfg, load_sweep(sweep_file), tmp_path / "study", resume=True)
    with pytest.raises(ConfigError, match=r"started with seeds none, not \[1, 2\]"):
        run_study(cfg, select(asha, seeds=[1, 2]), tmp_path / "study", resume=True)


def test_a_resumed_study_continues_a_trial_s_training_from_its_last_checkpoint(
        restart_ray, tmp_path):
    """A trial trains to its last checkpoint, then its validation fails (the full protocol's
    SASRec first stage has no model yet). Resumed, the trial's training finds that checkpoint
    in the trial's own directory of the study and trains nothing again: an interrupted trial
    continues from its last checkpoint the same way, instead of starting over."""
    from gensr_ray.eval.sasrec import SASRecConfig, pretrain_sasrec

    data = _titles_all_starting_with_item(tmp_path / "data")
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(yaml.safe_dump({"metric": "mean/sampled/NDCG@10", "mode": "max",
                                          "trials": {"sasrec_first": {
                                              "eval.first_stage": "sasrec"}}}))
    cfg = apply_overrides(load_config(ROOT / "configs" / "debug.yaml"), {
        "data.path": str(data), "train.max_steps": 4, "train.log_every": 2,
        "train.checkpoint_every": 2, "eval.max_examples": 10})
    first = run_study(cfg, load_sweep(sweep_file), tmp_path / "study")
    assert "pretrain-sasrec" in first["rows"][0]["error"]

    pretrain_sasrec(data, SASRecConfig(dim=8, epochs=1))
    # a study resumes after its Ray cluster is gone: a new session, new staging directories
    restart_ray()
    study = run_study(cfg, load_sweep(sweep_file), tmp_path / "study", resume=True)
    assert not study["rows"][0].get("error")
    trial = next(Path(study["experiment"]).glob("*sasrec_first*"))
    runs = [d for d in (trial / "run" / "ray").iterdir() if d.is_dir()]
    assert len(runs) == 1  # both attempts wrote one run, under the study's directory
    reports = [json.loads(line) for line in (runs[0] / "metrics.jsonl").open()]
    steps = [(r["step"], r["resumed_from"]) for r in reports if "resumed_from" in r]
    # the first attempt trained steps 1-4; the second restored step 4's checkpoint and only
    # reported its metrics again (starting over would report step 2 again, and resuming from
    # step 2's checkpoint step 4 with resumed_from 2)
    assert steps == [(2, 0), (4, 0), (4, 0)]
    assert reports[2]["loss"] == reports[1]["loss"]


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


def test_a_trial_in_local_mode_is_refused_before_any_trial_starts(tmp_path, capsys):
    sweep_file = tmp_path / "local.yaml"
    sweep_file.write_text(yaml.safe_dump({"trials": {"workers": {},
                                                     "local": {"scale.num_workers": 0}}}))
    assert main(["tune", "--config", str(ROOT / "configs" / "debug.yaml"),
                 "--sweep", str(sweep_file), "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert "trial 'local': scale.num_workers=0 (local mode) cannot run inside a Tune trial" in err
    assert not (tmp_path / "study").exists()


def test_tune_out_on_object_storage_points_to_the_storage_setting(capsys):
    from gensr_ray.cli import main

    assert main(["tune", "--config", str(ROOT / "configs" / "debug.yaml"),
                 "--sweep", str(ROOT / "configs" / "sweeps" / "prompts.yaml"),
                 "--out", "s3://bucket/study"]) == 2
    assert "scale.storage_path=s3://" in capsys.readouterr().err


def test_a_multi_seed_report_gives_mean_std_and_a_paired_interval(tmp_path):
    # three trials x three seeds, evaluated on the same 300 examples per task: `better` ranks
    # every target 2 places higher than `base` does, `same` ranks them as `base` does
    import json

    from gensr_ray.study_report import write_report
    from gensr_ray.sweep import Sweep

    rng = np.random.default_rng(0)
    base_ranks = {t: rng.integers(0, 30, 300) for t in ("search", "rec")}
    shift = {"base": 0, "better": 2, "same": 0}
    rows = []
    for trial in shift:
        for seed in (1, 2, 3):
            noise = {t: rng.integers(0, 2, 300) for t in base_ranks}  # seed-to-seed spread
            ranks = {t: np.maximum(0, r - shift[trial] + noise[t]) for t, r in base_ranks.items()}
            path = tmp_path / f"{trial}-{seed}.json"
            path.write_text(json.dumps({"sampled_ranks": {"gensr": {
                t: r.tolist() for t, r in ranks.items()}}}))
            rows.append({"trial": trial, "seed": seed, "results": str(path), **{
                f"{t}/sampled/NDCG@10": float(per_example(r, "NDCG@10").mean())
                for t, r in ranks.items()}})
    for row in rows:
        row["mean/sampled/NDCG@10"] = (row["search/sampled/NDCG@10"]
                                       + row["rec/sampled/NDCG@10"]) / 2
    sweep = Sweep("seeds", "mean/sampled/NDCG@10", "max", {t: {} for t in shift},
                  seeds=[1, 2, 3], reference="base")
    assert write_report(tmp_path, sweep, rows, 1) == "better"

    summary = {r["trial"]: r for r in csv.DictReader((tmp_path / "report_summary.csv").open())}
    values = [r["mean/sampled/NDCG@10"] for r in rows if r["trial"] == "better"]
    assert float(summary["better"]["mean/sampled/NDCG@10 mean"]) == pytest.approx(
        np.mean(values), abs=1e-6)
    assert float(summary["better"]["mean/sampled/NDCG@10 std"]) == pytest.approx(
        np.std(values, ddof=1), abs=1e-6)
    better, same = summary["better"], summary["same"]
    assert float(better["p"]) < 0.01 and float(better["ci_low"]) > 0
    assert float(same["ci_low"]) < 0 < float(same["ci_high"]) and float(same["p"]) > 0.05
    for task in ("search", "rec"):  # each task paired on its own too
        assert float(better[f"{task} ci_low"]) > 0 and float(better[f"{task} p"]) < 0.01
        # `same` differs from `base` by the seeds' noise only: a small difference either way
        assert abs(float(same[f"{task}/sampled/NDCG@10 minus base"])) < 0.01
        assert float(same[f"{task} ci_high"]) - float(same[f"{task} ci_low"]) < 0.02
    assert summary["base"]["p"] == ""  # the reference is not compared with itself
    report = (tmp_path / "report.md").read_text()
    assert "seeds [1, 2, 3]" in report and " ± " in report
    assert "Paired comparison with `base`" in report and "| better | +" in report
    assert "| trial | search | rec | mean | examples |" in report
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert len(list(csv.DictReader((tmp_path / "report.csv").open()))) == 9


def test_a_sweep_names_seeds_and_a_reference_that_exists(tmp_path):
    from gensr_ray.config import ConfigError

    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"seeds": [1, 2], "trials": {"a": {}, "b": {}}}))
    sweep = load_sweep(sweep_file)
    assert sweep.seeds == [1, 2] and sweep.reference == "a"
    for bad, message in (({"seeds": [1, 1]}, "distinct integers"),
                         ({"seeds": "1,2"}, "distinct integers"),
                         ({"reference": "c"}, "reference 'c' is not a trial")):
        sweep_file.write_text(yaml.safe_dump({**bad, "trials": {"a": {}, "b": {}}}))
        with pytest.raises(ConfigError, match=message):
            load_sweep(sweep_file)


def test_part_of_a_study_is_chosen_by_trials_and_seeds(tmp_path):
    from gensr_ray.config import ConfigError

    sweep = load_sweep(ROOT / "configs" / "sweeps" / "ml100k-backbones.yaml")
    part = select(sweep, ["smollm2_L4_lora", "tiny_random"], [1, 2])
    # the sweep file's order and overrides are kept; only the seeds are replaced
    assert list(part.trials) == ["tiny_random", "smollm2_L4_lora"]
    assert part.trials["smollm2_L4_lora"] == sweep.trials["smollm2_L4_lora"]
    assert part.seeds == [1, 2] and part.reference == "tiny_random"
    assert sweep.seeds == [1, 2, 3] and len(sweep.trials) == 3  # the loaded sweep is untouched
    assert select(sweep, None, None) == sweep
    with pytest.raises(ConfigError, match="--trials must include the reference trial "
                                          "'tiny_random'"):
        select(sweep, ["smollm2_L4_lora"], None)
    with pytest.raises(ConfigError, match="--trials smollm2: not in sweep 'ml100k-backbones'"):
        select(sweep, ["tiny_random", "smollm2"], None)
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        select(sweep, None, [1, 1])
