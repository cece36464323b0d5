"""Ray Tune ablation studies: named trials of config overrides, each a full training run.

A sweep file (configs/sweeps/*.yaml) names the objective and the trials:

    metric: mean/sampled/NDCG@10     # task/protocol/metric on the validation split, or mean/...
    mode: max
    scheduler:                       # optional: stop poor trials early (needs train.eval_every)
      name: asha
      grace_period: 200              # optimizer steps every trial runs before it may be stopped
      reduction_factor: 2
    trials:
      authors: {model.prompt: authors}
      minimal: {model.prompt: minimal}

Each trial is a Tune function trial that applies its overrides with the same function as the
CLI (`apply_overrides`), builds and fits its own Ray Train TorchTrainer (Train metrics reach
Tune through TuneReportCallback), then evaluates its best checkpoint on the validation split.
With a scheduler, Tune compares the trials' validation during training (the metric's `val/`
counterpart, reported every train.eval_every steps) and stops the poor ones early (ASHA:
asynchronous successive halving).
At the end the study writes report.md, report.csv and report.png into the output directory.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gensr_ray.config import (
    VALIDATION_METRICS,
    ConfigError,
    GenSRConfig,
    apply_overrides,
    read_yaml,
)

TRIAL_DRIVER_CPU = 0.1  # the Tune trial itself only drives its trainer (0 is refused)


@dataclass
class Sweep:
    name: str
    metric: str
    mode: str
    trials: dict[str, dict]
    scheduler: dict = field(default_factory=dict)  # {} or {"name": "asha", ...}

    @property
    def validation_metric(self) -> str:
        """What validation during training reports for `metric` (sampled protocol)."""
        task, protocol, name = self.metric.split("/")
        return f"val/{task}/{name}" if protocol == "sampled" else ""


SCHEDULERS = {"asha": {"grace_period": 1, "reduction_factor": 2}}  # settings: their minimum


def _scheduler(path: Path, data) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict) or data.get("name") not in SCHEDULERS:
        raise ConfigError(f"{path}: scheduler must be a mapping with name: one of "
                          f"{sorted(SCHEDULERS)}")
    limits = SCHEDULERS[data["name"]]
    unknown = set(data) - {"name", *limits}
    if unknown:
        raise ConfigError(f"{path}: scheduler: unknown key(s) {sorted(unknown)}; known: name, "
                          + ", ".join(limits))
    for key, least in limits.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < least):
            raise ConfigError(f"{path}: scheduler.{key}={value!r}: expected an integer >= "
                              f"{least}")
    return dict(data)


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(data) - {"metric", "mode", "trials", "scheduler"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: metric, mode, "
                          "scheduler, trials")
    trials = data.get("trials") or {}
    if not isinstance(trials, dict) or not trials:
        raise ConfigError(f"{path}: `trials` must map trial names to override mappings")
    if data.get("mode", "max") not in ("max", "min"):
        raise ConfigError(f"{path}: mode must be max or min")
    metric = data.get("metric", "mean/sampled/NDCG@10")
    if not isinstance(metric, str) or len(metric.split("/")) != 3:
        raise ConfigError(f"{path}: metric {metric!r} must look like task/protocol/metric")
    for name, overrides in trials.items():
        if not isinstance(overrides or {}, dict):
            raise ConfigError(f"{path}: trial {name!r}: expected a mapping of overrides, got "
                              f"{overrides!r}")
        try:
            apply_overrides(GenSRConfig(), dict(overrides or {}))
        except ConfigError as exc:
            raise ConfigError(f"{path}: trial {name!r}: {exc}") from None
    sweep = Sweep(path.stem, metric, data.get("mode", "max"),
                  {str(k): dict(v or {}) for k, v in trials.items()},
                  _scheduler(path, data.get("scheduler")))
    if sweep.scheduler and sweep.validation_metric not in VALIDATION_METRICS:
        raise ConfigError(f"{path}: a scheduler compares trials by validation during training, "
                          f"which reports {', '.join(VALIDATION_METRICS)}; metric "
                          f"{metric!r} has no such counterpart")
    return sweep


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


def run_trial(config: dict, base: GenSRConfig) -> None:
    """One Tune trial: fit its own trainer, evaluate on validation, report to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from gensr_ray.eval.harness import write_results
    from gensr_ray.eval.run import evaluate_run
    from gensr_ray.train.launch import run_training

    cfg = apply_overrides(base, config["overrides"][config["trial"]])
    out = Path(ray.tune.get_context().get_trial_dir()) / "run"
    summary = run_training(cfg, out, callbacks=[TuneReportCallback()])
    # the best checkpoint when the trial validated during training; scored in the trial's
    # own process: scoring workers would need resources outside the trial's reservation
    results = evaluate_run(summary.get("best_checkpoint") or summary["checkpoint"],
                           split="valid", cfg=apply_overrides(cfg, {"eval.num_workers": 0}))
    write_results(results, out / "valid_results.json")
    ray.tune.report({**flatten(results), "trial": config["trial"],
                     "step": summary["metrics"]["step"],
                     "checkpoint": summary["checkpoint"]})


def run_study(cfg: GenSRConfig, sweep: Sweep, out: str | Path) -> dict:
    """Run every trial of `sweep` on top of `cfg`; write the report; return the best trial."""
    import ray
    import ray.tune

    from gensr_ray.train.launch import ensure_ray

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources())
    # The trial reserves a bundle for its Ray Data tasks beside its driver's; the trainer's
    # dataset runs inside the trial's group (train.launch.fit), and its workers get their own
    # group from Ray Train.
    trial_resources = ray.tune.PlacementGroupFactory(
        [{"CPU": TRIAL_DRIVER_CPU}, {"CPU": cfg.scale.data_cpus}])
    # the base config reaches trials as an object (with_parameters), never re-parsed
    trainable = ray.tune.with_parameters(run_trial, base=cfg)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, trial_resources),
        param_space={"overrides": sweep.trials,
                     "trial": ray.tune.grid_search(list(sweep.trials))},
        # No metric/mode here: Tune would demand the objective in every result, and the
        # training curves (forwarded by TuneReportCallback) come before the evaluation.
        # The winner is picked from the final results by `write_report`.
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency,
                                        scheduler=build_scheduler(cfg, sweep)),
        run_config=ray.tune.RunConfig(name=sweep.name, storage_path=str(out / "tune")),
    )
    with _lenient_metric_check(bool(sweep.scheduler)):
        grid = tuner.fit()
    rows = []
    for result in grid:
        name = result.config["trial"]
        if result.error is not None:
            rows.append({"trial": name, "error": str(result.error)})
            continue
        row = {"trial": name, **{k: v for k, v in result.metrics.items()
                                 if "/" in k and isinstance(v, (int, float))}}
        if "trial" not in result.metrics:  # no final evaluation: the scheduler stopped it
            row["stopped_at_step"] = result.metrics.get("step")
        rows.append(row)
    best = write_report(out, sweep, rows, concurrency)
    return {"best": best, "rows": rows, "experiment": str(out / "tune" / sweep.name)}


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


def write_report(out: Path, sweep: Sweep, rows: list[dict], concurrency: int) -> str | None:
    """report.csv (every trial, every metric), report.md (table, winner), report.png (plot)."""
    ok = [r for r in rows if "error" not in r and "stopped_at_step" not in r]
    stopped = [r for r in rows if "stopped_at_step" in r]
    best = None
    if ok:
        pick = max if sweep.mode == "max" else min
        best = pick(ok, key=lambda r: r.get(sweep.metric, float("nan")))["trial"]
    metrics = sorted({k for r in ok + stopped for k in r if k not in ("trial", "stopped_at_step")})
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["trial", "overrides", *metrics, "stopped_at_step", "error"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "overrides": json.dumps(sweep.trials[r["trial"]])})
    shown = [m for m in metrics if m.split("/")[2] in ("HR@10", "NDCG@10", "Recall@10")
             and m.split("/")[0] in ("search", "rec")]
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Objective: `{sweep.metric}` ({sweep.mode}) on the validation split; "
             f"{len(rows)} trials, {concurrency} at a time.", "",
             "| trial | overrides | " + " | ".join(shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for r in rows:
        missing = "stopped" if "stopped_at_step" in r else "error"
        cells = [f"{r[m]:.4f}" if m in r else missing for m in shown]
        lines.append(f"| {r['trial']} | `{json.dumps(sweep.trials[r['trial']])}` | "
                     + " | ".join(cells) + " |")
    lines += ["", f"**Winner: `{best}`** ({sweep.metric} = "
                  f"{next(r for r in ok if r['trial'] == best)[sweep.metric]:.4f})." if best
              else "**No trial finished.**", ""]
    if stopped:
        metric = sweep.validation_metric
        lines += [f"Stopped early by the {sweep.scheduler['name']} scheduler (no final "
                  "evaluation):", ""]
        lines += [f"- `{r['trial']}` at step {r['stopped_at_step']}, {metric} = "
                  f"{r.get(metric, float('nan')):.4f}" for r in stopped]
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    _plot(out / "report.png", sweep, ok)
    return best


def _plot(path: Path, sweep: Sweep, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = sweep.metric.split("/", 1)[1]  # protocol/metric, shown for both tasks
    names = [r["trial"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.5))
    width = 0.38
    for offset, task in ((-width / 2, "search"), (width / 2, "rec")):
        values = [r.get(f"{task}/{key}", 0.0) for r in rows]
        ax.bar([i + offset for i in range(len(rows))], values, width, label=task)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylabel(key)
    ax.set_title(f"sweep {sweep.name}: {key} on validation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
