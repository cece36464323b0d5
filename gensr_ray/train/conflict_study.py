"""`gensr diagnose --study DIR`: the gradient conflict of every run of a `gensr tune` study,
side by side with the study's quality figures.

Each run (a trial, once per seed) is diagnosed as `gensr diagnose --checkpoint` would, on the
same seeded batches, into <out>/<trial>-s<seed>/ (<out>/<trial>/ without seeds); a run whose
folder already holds a diagnosis with the same settings is not measured again, so an
interrupted comparison picks up where it stopped. The per-run means are then summarised per
trial over its seeds (mean and sample standard deviation): the cosine over all shared parameters,
per module kind and per backbone layer, written to <out>/conflict_study.json, a markdown table
(conflict_study.md, with the study's validation NDCG@10 per task when its report is there)
and a plot of the cosine per layer, one line per trial (conflict_study.png). Each trial's
cosine over all shared parameters is compared with a reference trial's (the first, or
--reference) on the same seeded batches, runs paired by seed: the mean difference, a
bootstrap interval over seeds and batches, and a p-value (gensr_ray.eval.paired).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from gensr_ray.config import ConfigError
from gensr_ray.eval.paired import paired_bootstrap
from gensr_ray.train.diagnose import run_diagnosis

QUALITY = ("search/sampled/NDCG@10", "rec/sampled/NDCG@10")
log = logging.getLogger(__name__)


def study_runs(study: Path) -> list[dict]:
    """The study's finished runs: {"trial", "seed", "run"}, in the order of its report (the
    sweep's order), else by trial name; seeds ascending."""
    sweeps = sorted(p.name for p in Path(study).glob("tune/*") if p.is_dir())
    if len(sweeps) > 1:
        raise ConfigError(f"{study}: holds the runs of several sweeps ({', '.join(sweeps)}); "
                          "its report describes only the last, so compare one study per "
                          "--out directory")
    runs = []
    for params in sorted(Path(study).glob("tune/*/*/params.json")):
        config = json.loads(params.read_text())
        run = params.parent / "run"
        if "trial" in config and (run / "train_summary.json").is_file():
            runs.append({"trial": config["trial"], "seed": config.get("seed"), "run": run})
    if not runs:
        raise ConfigError(f"{study}: no finished runs of a `gensr tune` study there (looked for "
                          "tune/<sweep>/<trial>/params.json beside a run/ with "
                          "train_summary.json)")
    order = _report_order(Path(study))
    runs.sort(key=lambda r: (order.get(r["trial"], len(order)), r["trial"], r["seed"] or 0))
    return runs


def diagnose_study(study: Path, out: Path, batches: int, per_task: int, seed: int = 0,
                   workers: int | None = None, which: str = "best",
                   reference: str | None = None) -> dict:
    """Diagnose every run of `study` into `out`; returns the per-trial summary."""
    runs = study_runs(study)
    names = list(dict.fromkeys(r["trial"] for r in runs))
    if reference is not None and reference not in names:
        raise ConfigError(f"--reference {reference!r}: no finished runs of that trial in "
                          f"{study} (trials: {', '.join(names)})")
    out = Path(out)
    per_run = []
    for run in runs:
        name = run["trial"] + ("" if run["seed"] is None else f"-s{run['seed']}")
        summary = _earlier(out / name / "conflict.json", batches, per_task, seed)
        if summary is None:
            summary = run_diagnosis(str(run["run"]), out / name, batches, per_task, seed,
                                    workers, which)
        else:
            log.info("%s: diagnosed before with the same settings, kept", out / name)
        per_run.append({**run, "run": str(run["run"]), "summary": summary})
    trials = summarize_runs(per_run, _quality(Path(study)))
    compare_with(trials, per_run, reference or names[0])
    result = {"study": str(study), "batches": batches,
              "examples_per_task": sorted({r["summary"]["examples_per_task"] for r in per_run}),
              "seed": seed, "trials": trials}
    (out / "conflict_study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "conflict_study.md").write_text(format_study_table(trials) + "\n")
    plot_study(trials, out / "conflict_study.png")
    return result


def summarize_runs(per_run: list[dict], quality: dict | None = None) -> dict:
    """{trial: {"seeds", "overall", "by_kind", "by_layer", "task_only_tensors", quality}}: each
    figure the mean and standard deviation over the trial's runs of the runs' batch means."""
    def stats(values: list) -> dict:  # the sample std, as the study's report gives it
        kept = [v for v in values if v is not None]
        return {"mean": float(np.mean(kept)) if kept else None,
                "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else None,
                "runs": len(kept)}

    trials: dict[str, dict] = {}
    for trial in dict.fromkeys(r["trial"] for r in per_run):
        summaries = [r["summary"] for r in per_run if r["trial"] == trial]
        kinds = list(dict.fromkeys(k for s in summaries for k in s["by_kind"]))
        layers = sorted({int(k) for s in summaries for k in s["by_layer"]})
        trials[trial] = {
            "seeds": [r["seed"] for r in per_run if r["trial"] == trial],
            "overall": stats([s["overall"]["mean"] for s in summaries]),
            "by_kind": {k: stats([s["by_kind"].get(k, {}).get("mean") for s in summaries])
                        for k in kinds},
            "by_layer": {str(layer): stats([s["by_layer"].get(str(layer), {}).get("mean")
                                            for s in summaries]) for layer in layers},
            "task_only_tensors": sum(e["params"] for e in summaries[0]["task_only"].values()),
            **({"quality": quality[trial]} if quality and trial in quality else {}),
        }
    return trials


def compare_with(trials: dict, per_run: list[dict], reference: str) -> None:
    """Add to every other trial "vs_reference": its overall cosine minus the reference's on
    the same batches, runs paired by seed (the seeds both have; batches where either side
    has no cosine left out)."""
    def batches(trial: str) -> dict:
        return {r["seed"]: r["summary"]["overall"]["per_batch"] for r in per_run
                if r["trial"] == trial}

    ref = batches(reference)
    for name, trial in trials.items():
        if name == reference:
            continue
        mine = batches(name)
        seeds = sorted(set(ref) & set(mine), key=lambda s: (s is None, s or 0))
        if not seeds:
            continue
        a = np.array([[np.nan if v is None else v for v in mine[s]] for s in seeds])
        b = np.array([[np.nan if v is None else v for v in ref[s]] for s in seeds])
        if a.shape != b.shape:
            continue  # diagnosed on other batches: nothing to pair
        keep = ~(np.isnan(a) | np.isnan(b)).any(axis=0)
        if keep.any():
            test = paired_bootstrap([(a - b)[:, keep]])
            trial["vs_reference"] = {"reference": reference, **test}


def format_study_table(trials: dict) -> str:
    """Markdown: per trial, quality (when known) and the cosine overall and per module kind."""
    kinds = list(dict.fromkeys(k for t in trials.values() for k in t["by_kind"]))
    with_quality = any("quality" in t for t in trials.values())
    reference = next((t["vs_reference"]["reference"] for t in trials.values()
                      if "vs_reference" in t), None)

    def cell(s: dict | None, sign: str = "+") -> str:
        if not s or s["mean"] is None:
            return "-"
        return f"{s['mean']:{sign}.3f}" + ("" if s["std"] is None else f" ± {s['std']:.3f}")

    def versus(name: str, t: dict) -> str:
        if name == reference:
            return "reference"
        v = t.get("vs_reference")
        return "-" if v is None else (f"{v['difference']:+.3f} [{v['low']:+.3f}, "
                                      f"{v['high']:+.3f}] p={v['p']:.2f}")

    head = ["trial", "runs"] + (["search NDCG@10", "rec NDCG@10"] if with_quality else []) \
        + ["cosine, all shared"] + ([f"vs {reference}"] if reference else []) + kinds \
        + ["one-task tensors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in trials.items():
        row = [name, str(len(t["seeds"]))]
        if with_quality:
            q = t.get("quality", {})
            row += [cell(q.get(metric), sign="") for metric in QUALITY]
        row += [cell(t["overall"])] + ([versus(name, t)] if reference else []) \
            + [cell(t["by_kind"].get(k)) for k in kinds]
        row.append(f"{t['task_only_tensors']:,d}" if t["task_only_tensors"] else "0")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_study(trials: dict, path: Path) -> None:
    """Cosine per backbone layer, one line per trial (mean ± std over its seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for offset, (name, t) in enumerate(trials.items()):
        layers = [(int(k), s) for k, s in t["by_layer"].items() if s["mean"] is not None]
        if not layers or t["overall"]["mean"] is None:
            continue
        shift = 0.06 * (offset - (len(trials) - 1) / 2)  # error bars side by side
        ax.errorbar([k + shift for k, _ in layers], [s["mean"] for _, s in layers],
                    yerr=[s["std"] or 0.0 for _, s in layers], marker="o", capsize=3,
                    label=f"{name} (all shared {t['overall']['mean']:+.3f})")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xticks(sorted({int(k) for t in trials.values() for k in t["by_layer"]}))
    ax.set_xlabel("backbone layer")
    ax.set_ylabel("cos(grad search, grad rec)")
    ax.set_title("gradient conflict per layer, mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report_order(study: Path) -> dict[str, int]:
    rows = _summary_rows(study)
    return {row["trial"]: i for i, row in enumerate(rows)}


def _quality(study: Path) -> dict:
    """{trial: {metric: {"mean", "std"}}} from the study's report_summary.csv, if any; a
    metric the report lacks for a trial (empty or nan) is left out, a std of one seed is None."""
    out = {}
    for row in _summary_rows(study):
        one_seed = _number(row.get("seeds")) in (None, 0.0, 1.0)
        out[row["trial"]] = {
            m: {"mean": _number(row.get(f"{m} mean")),
                "std": None if one_seed else _number(row.get(f"{m} std"))}
            for m in QUALITY if _number(row.get(f"{m} mean")) is not None}
    return out


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _earlier(path: Path, batches: int, per_task: int, seed: int) -> dict | None:
    """A run's diagnosis already written with these settings, else None."""
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    same = (summary.get("batches") == batches and summary.get("seed") == seed
            and summary.get("examples_per_task") == per_task - per_task % summary["workers"])
    return summary if same else None


def _summary_rows(study: Path) -> list[dict]:
    path = study / "report_summary.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
