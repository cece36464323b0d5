"""A study's report: report.csv (every run), report_summary.csv and report.md (per trial: mean
and standard deviation over seeds, and a paired comparison with the reference trial), and
report.png (the objective per task, with error bars over seeds).

The paired comparison: every trial is evaluated on the same validation examples with the same
stored negatives, and a trial's run with seed s starts from the same initialisation and data
order as the reference's run with seed s, so per seed and example the trial's metric minus the
reference's is a paired difference. The bootstrap resamples the seeds and the examples
(gensr_ray.eval.paired): its interval holds the spread between seeds, which decides most
comparisons of short runs, as well as the choice of examples.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from gensr_ray.eval.paired import paired_bootstrap, per_example
from gensr_ray.sweep import Sweep

TASKS = ("search", "rec")


def write_report(out: Path, sweep: Sweep, rows: list[dict],
                 concurrency: int | None) -> str | None:
    """Write the report files; the winning trial by the mean of the objective (None when no
    trial finished)."""
    ok = [r for r in rows if "error" not in r and "stopped_at_step" not in r]
    stopped = [r for r in rows if "stopped_at_step" in r]
    metrics = sorted({k for r in ok + stopped for k in r if "/" in k})
    _runs_csv(out / "report.csv", sweep, rows, metrics)
    runs = {name: [r for r in ok if r["trial"] == name] for name in sweep.trials}
    summary = {name: _mean_std(group, metrics) for name, group in runs.items() if group}
    comparisons = _compare(sweep, runs)
    best = None
    if summary:
        pick = max if sweep.mode == "max" else min
        best = pick(summary, key=lambda n: summary[n].get(sweep.metric, (math.nan,))[0])
    _summary_csv(out / "report_summary.csv", sweep, summary, comparisons, metrics)
    lines = _markdown(sweep, rows, summary, comparisons, metrics, concurrency, best, stopped)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(out / "report.png", sweep, summary)
    return best


def _mean_std(group: list[dict], metrics: list[str]) -> dict[str, tuple[float, float, int]]:
    out = {}
    for m in metrics:
        values = [r[m] for r in group if m in r]
        if values:
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[m] = (float(np.mean(values)), std, len(values))
    return out


def _compare(sweep: Sweep, runs: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """Each trial against the reference on the objective's metric, paired per example: per
    task, and over both when the objective is their mean ("mean")."""
    task, protocol, metric = sweep.metric.split("/")
    if protocol != "sampled" or not runs.get(sweep.reference):
        return {}
    tasks = TASKS if task == "mean" else (task,)
    reference = _per_example(runs[sweep.reference], tasks, metric)
    out = {}
    for name, group in runs.items():
        if name == sweep.reference or not group or not reference:
            continue
        mine = _per_example(group, tasks, metric)
        seeds = sorted(set(mine) & set(reference))  # runs paired by seed
        if not seeds:
            continue
        shared = [t for t in tasks if all(t in mine[s] and t in reference[s] for s in seeds)]
        if any(len(mine[s][t]) != len(reference[s][t]) for s in seeds for t in shared):
            raise ValueError(f"trial {name!r} was evaluated on other examples than "
                             f"{sweep.reference!r}; a paired comparison needs the same ones")
        differences = {t: np.stack([mine[s][t] - reference[s][t] for s in seeds])
                       for t in shared}
        out[name] = {t: paired_bootstrap([d]) for t, d in differences.items()}
        if task == "mean":
            out[name]["mean"] = paired_bootstrap(list(differences.values()))
    return out


def _per_example(group: list[dict], tasks: tuple, metric: str) -> dict[int, dict[str, np.ndarray]]:
    """Per run of a trial (by its seed), per task, each example's metric."""
    runs = {}
    for r in group:
        if "results" not in r:
            return {}
        ranks = json.loads(Path(r["results"]).read_text()).get("sampled_ranks", {}).get("gensr")
        if not ranks:
            return {}
        runs[r["seed"]] = {t: per_example(ranks[t], metric) for t in tasks if t in ranks}
    return runs


def _runs_csv(path: Path, sweep: Sweep, rows: list[dict], metrics: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["trial", "seed", "overrides", *metrics, "stopped_at_step",
                                    "error"], extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "overrides": json.dumps(sweep.trials[r["trial"]])})


def _summary_csv(path: Path, sweep: Sweep, summary: dict, comparisons: dict,
                 metrics: list[str]) -> None:
    objective, protocol, metric = sweep.metric.split("/")
    scopes = [objective] + [t for t in TASKS if objective == "mean"]
    head = ["trial", "seeds"] + [f"{m} {s}" for m in metrics for s in ("mean", "std")]
    head += [f"{sweep.metric} minus {sweep.reference}", "ci_low", "ci_high", "p"]
    for task in scopes[1:]:  # the tasks the objective averages, each paired on its own
        head += [f"{task}/{protocol}/{metric} minus {sweep.reference}", f"{task} ci_low",
                 f"{task} ci_high", f"{task} p"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        for name, stats in summary.items():
            seeds = max(n for _, _, n in stats.values())
            row = [name, seeds] + [f"{v:.6f}" for m in metrics
                                   for v in (stats[m][:2] if m in stats else (math.nan,) * 2)]
            for scope in scopes:
                c = comparisons.get(name, {}).get(scope)
                row += ([f"{c[k]:.6f}" for k in ("difference", "low", "high", "p")] if c
                        else [""] * 4)
            writer.writerow(row)


def _markdown(sweep: Sweep, rows: list[dict], summary: dict, comparisons: dict,
              metrics: list[str], concurrency: int | None, best: str | None,
              stopped: list[dict]) -> list[str]:
    shown = [m for m in metrics if m.count("/") == 2 and m.split("/")[0] in TASKS
             and m.split("/")[2] in ("HR@10", "NDCG@10", "Recall@10")]
    shown += [m for m in metrics if m == "conflict/overall"]  # train.conflict_every
    seeds = f"seeds {sweep.seeds}" if sweep.seeds else "one run each"
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Objective: `{sweep.metric}` ({sweep.mode}) on the validation split; "
             f"{len(sweep.trials)} trials, {seeds}; {len(rows)} runs"
             + (f", {concurrency} at a time" if concurrency else "")
             + ". Cells: mean ± standard deviation over seeds.", "",
             "| trial | overrides | " + " | ".join(shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for name, overrides in sweep.trials.items():
        stats = summary.get(name)
        missing = ("stopped" if any(r["trial"] == name for r in stopped)
                   else "error" if any(r["trial"] == name for r in rows) else "not run")
        cells = [(f"{stats[m][0]:.4f} ± {stats[m][1]:.4f}" if stats[m][2] > 1
                  else f"{stats[m][0]:.4f}") if stats and m in stats else missing
                 for m in shown]
        lines.append(f"| {name} | `{json.dumps(overrides)}` | " + " | ".join(cells) + " |")
    lines.append("")
    if comparisons:
        _, protocol, metric = sweep.metric.split("/")
        scopes = list(next(iter(comparisons.values())))
        lines += [(f"Paired comparison with `{sweep.reference}` on `{protocol}/{metric}`: per "
                   "seed and example, the trial's metric minus the reference's (same seed, "
                   "same examples and stored negatives); mean, 95 % interval of a bootstrap "
                   "that resamples seeds and examples (10,000 resamples) and two-sided "
                   "p-value. An interval that holds 0 is within noise."), "",
                  "| trial | " + " | ".join(scopes) + " | examples |",
                  "|---|" + "---|" * len(scopes) + "---|"]
        for name, by_scope in comparisons.items():
            cells = [f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] "
                     f"p={c['p']:.3f}" for c in by_scope.values()]
            examples = by_scope[scopes[-1]]["examples"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {examples} |")
        lines.append("")
    if best:
        mean = summary[best][sweep.metric][0]
        lines += [f"**Winner: `{best}`** ({sweep.metric} = {mean:.4f}).", ""]
    else:
        lines += ["**No trial finished.**", ""]
    if stopped:
        metric = sweep.validation_metric
        lines += [(f"Stopped early by the {sweep.scheduler['name']} scheduler (no final "
                   "evaluation):"), ""]
        lines += [f"- `{r['trial']}` (seed {r.get('seed')}) at step {r['stopped_at_step']}, "
                  f"{metric} = {r.get(metric, float('nan')):.4f}" for r in stopped]
        lines.append("")
    return lines


def _plot(path: Path, sweep: Sweep, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = sweep.metric.split("/", 1)[1]  # protocol/metric, shown for both tasks
    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names)), 3.5))
    width = 0.38
    for offset, task in ((-width / 2, "search"), (width / 2, "rec")):
        stats = [summary[n].get(f"{task}/{key}", (0.0, 0.0, 0)) for n in names]
        ax.bar([i + offset for i in range(len(names))], [s[0] for s in stats], width,
               yerr=[s[1] for s in stats], capsize=3, label=task)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(key)
    title = f"sweep {sweep.name}: {key} on validation"
    ax.set_title(title + (f" (error bars: std over {len(sweep.seeds)} seeds)"
                          if len(sweep.seeds) > 1 else ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
