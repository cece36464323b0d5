"""Ray Tune ablation studies: named trials of config overrides, each a full training run.

A sweep file (gensr_ray.sweep) names the objective, the trials and optionally seeds and a
scheduler. Each trial (once per seed) is a Tune function trial that applies its overrides with
the same function as the CLI (`apply_overrides`), builds and fits its own Ray Train TorchTrainer (Train metrics reach
Tune through TuneReportCallback), then evaluates its best checkpoint on the validation split.
With a scheduler, Tune compares the trials' validation during training (the metric's `val/`
counterpart, reported every train.eval_every steps) and stops the poor ones early (ASHA:
asynchronous successive halving).
At the end the study writes its report (gensr_ray.study_report) into the output directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides
from gensr_ray.study_report import write_report
from gensr_ray.sweep import Sweep, load_sweep

__all__ = ["Sweep", "build_scheduler", "load_sweep", "max_concurrent_trials", "run_study"]

TRIAL_DRIVER_CPU = 0.1  # the Tune trial itself only drives its trainer (0 is refused)


def max_concurrent_trials(cfg: GenSRConfig, resources: dict) -> int:
    """How many trials fit the cluster at once, from what one trial's trainer reserves."""
    workers = max(1, cfg.scale.num_workers)
    per_trial_cpu = workers * cfg.scale.cpus_per_worker + cfg.scale.data_cpus + TRIAL_DRIVER_CPU
    fits = math.floor(resources.get("CPU", 0) / per_trial_cpu)
    if cfg.scale.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / workers))
    return max(1, fits)


def flatten(results: dict, model: str = "gensr") -> dict[str, float]:
    """Harness JSON -> {"rec/sampled/NDCG@10": v, ..., "mean/sampled/NDCG@10": v}."""
    flat: dict[str, float] = {}
    per_task = results["models"][model]
    for task, protocols in per_task.items():
        for protocol, metrics in protocols.items():
            for metric, value in metrics.items():
                flat[f"{task}/{protocol}/{metric}"] = value
    for key in {k.split("/", 1)[1] for k in flat}:
        values = [flat[f"{t}/{key}"] for t in per_task if f"{t}/{key}" in flat]
        flat[f"mean/{key}"] = round(sum(values) / len(values), 4)
    return flat


def trial_run_dir() -> Path:
    """Where the current trial's training run writes: `run` in the trial's directory of the
    study's storage (<out>/tune/<sweep>/<trial>), not in this session's staging copy of it
    (`get_trial_dir()`, under /tmp/ray/session_*). The run's name, and so its checkpoints'
    place, derives from this path: a resumed study's trial finds the checkpoints its
    interrupted attempt saved (train.checkpoint_every) and continues from the last one."""
    import ray.tune

    return Path(ray.tune.get_context().get_storage().trial_fs_path) / "run"


def run_trial(config: dict, base: GenSRConfig) -> None:
    """One Tune trial: fit its own trainer, evaluate on validation, report to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from gensr_ray.eval.harness import write_results
    from gensr_ray.eval.run import evaluate_run
    from gensr_ray.train.launch import run_training

    cfg = apply_overrides(base, config["overrides"][config["trial"]])
    seed = config.get("seed")
    if seed is not None:  # one run of a multi-seed trial
        cfg = apply_overrides(cfg, {"train.seed": seed})
    out = trial_run_dir()
    summary = run_training(cfg, out, callbacks=[TuneReportCallback()], progress=False)
    # the best checkpoint when the trial validated during training; scored in the trial's
    # own process: scoring workers would need resources outside the trial's reservation
    results = evaluate_run(summary.get("best_checkpoint") or summary["checkpoint"],
                           split="valid", cfg=apply_overrides(cfg, {"eval.num_workers": 0}))
    write_results(results, out / "valid_results.json")
    # the gradient conflict of the run's last measurement (train.conflict_every), if any
    conflict = {k: v for k, v in summary["metrics"].items() if k.startswith("conflict/")}
    ray.tune.report({**flatten(results), **conflict, "trial": config["trial"],
                     "seed": cfg.train.seed,
                     "step": summary["metrics"]["step"],
                     "checkpoint": summary["checkpoint"],
                     "results": str(out / "valid_results.json")})


def run_study(cfg: GenSRConfig, sweep: Sweep, out: str | Path, resume: bool = False) -> dict:
    """Run every trial of `sweep` on top of `cfg`; write the report; return the best trial.

    `resume`: continue the study already in `out` (interrupted, or with failed trials): Tune
    restores it from `out`/tune/<sweep> and runs only the trials that did not finish, on
    top of `cfg` as given now (give the study's own config and sweep); a trial's training
    continues from its last checkpoint (train.checkpoint_every), if it saved one."""
    import ray
    import ray.tune

    from gensr_ray.ray_init import object_store_bytes
    from gensr_ray.train.launch import ensure_ray

    _check_trials_use_workers(cfg, sweep)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(object_store_memory=object_store_bytes(cfg.scale.object_store_gb))
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources())
    # The trial reserves a bundle for its Ray Data tasks beside its driver's; the trainer's
    # dataset runs inside the trial's group (train.launch.fit), and its workers get their own
    # group from Ray Train.
    trial_resources = ray.tune.PlacementGroupFactory(
        [{"CPU": TRIAL_DRIVER_CPU}, {"CPU": cfg.scale.data_cpus}])
    # the base config reaches trials as an object (with_parameters), never re-parsed
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, base=cfg),
                                        trial_resources)
    experiment = out / "tune" / sweep.name
    if resume:
        if not ray.tune.Tuner.can_restore(str(experiment)):
            raise ConfigError(f"{experiment}: no Tune experiment of sweep {sweep.name!r} to "
                              "resume there; run the study without --resume")
        _check_same_sweep(experiment, sweep)
        # finished trials keep their results; interrupted and failed ones run again, and
        # their training resumes from the last checkpoint it saved (trial_run_dir)
        tuner = ray.tune.Tuner.restore(str(experiment), trainable=trainable,
                                       resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(cfg, sweep, trainable, concurrency, out)
    with _lenient_metric_check(bool(sweep.scheduler)):
        grid = tuner.fit()
    rows = _rows(grid, cfg)
    best = write_report(out, sweep, rows, concurrency)
    return {"best": best, "rows": rows, "experiment": str(experiment)}


def _check_trials_use_workers(cfg: GenSRConfig, sweep: Sweep) -> None:
    """Local mode (scale.num_workers=0) trains in the calling process through Ray Train's
    own context, which Ray refuses inside a Tune trial: say so before any trial starts."""
    for name, overrides in sweep.trials.items():
        if apply_overrides(cfg, dict(overrides or {})).scale.num_workers == 0:
            raise ConfigError(f"sweep {sweep.name!r}, trial {name!r}: scale.num_workers=0 "
                              "(local mode) cannot run inside a Tune trial; give it at least "
                              "one worker (scale.num_workers=1)")


def _check_same_sweep(experiment: Path, sweep: Sweep) -> None:
    """A resumed study's trials run the overrides it started with: refuse another sweep file."""
    import ray.tune

    trials = ray.tune.ExperimentAnalysis(str(experiment)).trials
    ran = {json.dumps(t.config.get("overrides"), sort_keys=True) for t in trials}
    if ran != {json.dumps(sweep.trials, sort_keys=True)}:
        raise ConfigError(f"{experiment}: the study ran other trials than sweep "
                          f"{sweep.name!r} lists now; resume it with the sweep file (and "
                          "--trials) it started with, or start a new study in another --out")
    # Tune restores the seeds it started with: other seeds now would be silently ignored
    seeds = {t.config.get("seed") for t in trials}
    if seeds != (set(sweep.seeds) or {None}):
        started = sorted(s for s in seeds if s is not None)
        raise ConfigError(f"{experiment}: the study started with seeds {started or 'none'}, "
                          f"not {sweep.seeds or 'none'}; resume it with the seeds (--seeds) it "
                          "started with, or start a new study in another --out")


def _new_tuner(cfg: GenSRConfig, sweep: Sweep, trainable, concurrency: int, out: Path):
    import ray.tune

    return ray.tune.Tuner(
        trainable,
        param_space={"overrides": sweep.trials,
                     "trial": ray.tune.grid_search(list(sweep.trials)),
                     **({"seed": ray.tune.grid_search(sweep.seeds)} if sweep.seeds else {})},
        # No metric/mode here: Tune would demand the objective in every result, and the
        # training curves (forwarded by TuneReportCallback) come before the evaluation.
        # The winner is picked from the final results by `write_report`.
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency,
                                        scheduler=build_scheduler(cfg, sweep)),
        run_config=ray.tune.RunConfig(name=sweep.name, storage_path=str(out / "tune")),
    )


def report_study(cfg: GenSRConfig, sweep: Sweep, out: str | Path) -> dict:
    """Write the report of a study from its Tune directory (`out`/tune/<sweep>) without
    running a trial: after its driver stopped before the report, to redo it, or while it
    runs. Runs that have not finished (running, pending, interrupted) are left out and
    counted in "unfinished"."""
    import ray.tune

    out = Path(out).resolve()
    experiment = out / "tune" / sweep.name
    if not (experiment / "tuner.pkl").exists():
        raise ConfigError(f"{experiment}: no Tune experiment of sweep {sweep.name!r} there; "
                          "run the study first (gensr tune without --report-only)")
    analysis = ray.tune.ExperimentAnalysis(str(experiment))
    # a ResultGrid lists the analysis' trials in order
    finished = [result for trial, result in zip(analysis.trials, ray.tune.ResultGrid(analysis))
                if trial.status in ("TERMINATED", "ERROR")]
    rows = _rows(finished, cfg)
    best = write_report(out, sweep, rows, concurrency=None)  # unknown after the fact
    return {"best": best, "rows": rows, "experiment": str(experiment),
            "unfinished": len(analysis.trials) - len(finished)}


def _rows(grid, cfg: GenSRConfig) -> list[dict]:
    """One row per trial run: its trial, seed and final metrics, or its error."""
    rows = []
    for result in grid:
        name = result.config["trial"]
        if result.error is not None:
            rows.append({"trial": name, "seed": result.config.get("seed", cfg.train.seed),
                         "error": str(result.error)})
            continue
        row = {"trial": name, "seed": result.config.get("seed", cfg.train.seed),
               **{k: v for k, v in result.metrics.items()
                  if "/" in k and isinstance(v, (int, float))}}
        if "results" in result.metrics:
            row["results"] = result.metrics["results"]
        if "trial" not in result.metrics:  # no final evaluation: the scheduler stopped it
            row["stopped_at_step"] = result.metrics.get("step")
        rows.append(row)
    return rows


def build_scheduler(cfg: GenSRConfig, sweep: Sweep):
    """The sweep's Tune scheduler (None without one), after checking that every trial
    validates during training and has a step budget for it to divide."""
    if not sweep.scheduler:
        return None
    from ray.tune.schedulers import ASHAScheduler

    budgets = []
    for name, overrides in sweep.trials.items():
        trial = apply_overrides(cfg, overrides)
        if not trial.train.eval_every or trial.train.max_steps < 1:
            raise ConfigError(
                f"sweep {sweep.name}: trial {name!r}: the {sweep.scheduler['name']} scheduler "
                "compares trials by validation during training; set train.eval_every > 0 and "
                f"train.max_steps (now {trial.train.eval_every} and {trial.train.max_steps})")
        budgets.append(trial.train.max_steps)
    settings = {k: v for k, v in sweep.scheduler.items() if k != "name"}
    # trials report "step" with every result, validation every train.eval_every steps;
    # results without the metric (training losses between validations) are skipped. Trials
    # end on their own budget (stop_last_trials=False): each then evaluates its best checkpoint
    return ASHAScheduler(time_attr="step", metric=sweep.validation_metric, mode=sweep.mode,
                         max_t=max(budgets), stop_last_trials=False, **settings)


@contextlib.contextmanager
def _lenient_metric_check(on: bool):
    """Tune refuses a result without the scheduler's metric unless told otherwise; training
    reports losses between validations, which carry none."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    before = os.environ.get(key)
    if on:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
