"""One model evaluated several times (one run per seed) against every model beside it.

Each input is a `gensr eval --out` results file holding each model's per-example sampled
ranks. The runs must have ranked the same examples on the same stored candidates; the
baselines are deterministic, so their ranks, identical in every file, confirm it. Per model,
task and metric: the mean and standard deviation over the runs; per baseline and task: the
paired bootstrap of the model's per-example metric minus the baseline's, resampling runs
and examples (gensr_ray.eval.paired), so the interval holds the spread over seeds too.
Pure numpy and json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gensr_ray.config import ConfigError
from gensr_ray.eval.paired import paired_bootstrap, per_example

METRICS = ("HR@10", "NDCG@10")


class CompareError(ConfigError):
    """Results files that cannot be compared: the message names the file and why."""


def load_results(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CompareError(f"{path}: not a readable results file ({err})") from err
        if not isinstance(results, dict) or not isinstance(results.get("sampled_ranks"), dict):
            raise CompareError(f"{path}: no per-example sampled ranks (write it with "
                               "`gensr eval --out FILE.json`)")
        runs.append(results)
    return runs


AGAINST = "against runs"  # the model name the --against runs' ranks take in the comparison


def add_against(runs: list[dict], paths: list[Path], against: list[dict],
                against_paths: list[Path], model: str = "gensr") -> None:
    """Put each `against` run's `model` ranks beside the run of the same position as a model
    named AGAINST (the same seeds in the same order pair them): the compared runs against
    other runs of the same model, e.g. before and after a change of config, paired per
    example as every baseline is."""
    if len(against) != len(runs):
        raise CompareError(f"--against: {len(against)} results files for {len(runs)} runs; "
                           "give one per run, in the same seed order")
    for path, run, other_path, other in zip(paths, runs, against_paths, against):
        if model not in other["sampled_ranks"]:
            raise CompareError(f"{other_path}: no {model!r} ranks to compare {path} against")
        if other.get("split") != run.get("split") or other.get("subset") != run.get("subset"):
            raise CompareError(f"{other_path}: split/subset {other.get('split')}/"
                               f"{other.get('subset')}, {path}: {run.get('split')}/"
                               f"{run.get('subset')}")
        run["sampled_ranks"][AGAINST] = other["sampled_ranks"][model]


def compare_runs(runs: list[dict], paths: list[Path], model: str = "gensr",
                 metric: str = "NDCG@10", resamples: int = 10_000, seed: int = 0) -> dict:
    """`model`'s runs (one results file each, in `paths` order) against every other model
    present in all of them; see the module's docstring."""
    if not runs:
        raise CompareError("no results files to compare")
    try:
        per_example([0], metric)
    except ValueError as err:
        raise CompareError(f"--metric {metric}: {err}") from None
    first = paths[0]
    for path, run in zip(paths, runs):
        if model not in run["sampled_ranks"]:
            raise CompareError(f"{path}: no {model!r} ranks (models: "
                               f"{', '.join(sorted(run['sampled_ranks']))})")
        if run.get("split") != runs[0].get("split") or run.get("subset") != runs[0].get("subset"):
            raise CompareError(f"{path}: split/subset {run.get('split')}/{run.get('subset')}, "
                               f"{first}: {runs[0].get('split')}/{runs[0].get('subset')}")
    others = [m for m in runs[0]["sampled_ranks"]
              if m != model and all(m in r["sampled_ranks"] for r in runs)]
    tasks = list(runs[0]["sampled_ranks"][model])
    for path, run in zip(paths[1:], runs[1:]):
        if list(run["sampled_ranks"][model]) != tasks:
            raise CompareError(f"{path}: tasks {list(run['sampled_ranks'][model])}, "
                               f"{first}: {tasks}")
        for task in tasks:
            n, n0 = (len(r["sampled_ranks"][model][task]) for r in (run, runs[0]))
            if n != n0:
                raise CompareError(f"{path}: {n} {task} examples, {first}: {n0}: these runs "
                                   "did not rank the same examples")
        for other in others:  # deterministic baselines: the same ranks, or other candidates
            if other == AGAINST:  # other runs of the model: their ranks differ by seed
                continue
            for task in run["sampled_ranks"][other]:
                if run["sampled_ranks"][other][task] != runs[0]["sampled_ranks"][other].get(task):
                    raise CompareError(
                        f"{path}: {other}'s {task} ranks differ from {first}'s: these runs "
                        "did not rank the same examples on the same candidates")

    def ranks(run: dict, name: str, task: str) -> np.ndarray:
        return np.asarray(run["sampled_ranks"][name][task])

    table: dict = {}
    for name in [model, *others]:
        table[name] = {}
        for task in runs[0]["sampled_ranks"][name]:
            table[name][task] = {}
            for m in METRICS:
                values = [float(per_example(ranks(r, name, task), m).mean()) for r in runs]
                table[name][task][m] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "runs": values}
    paired: dict = {}
    for other in others:
        paired[other] = {}
        for task in tasks:
            if task not in runs[0]["sampled_ranks"][other]:
                continue  # BM25 answers search only
            differences = np.stack([per_example(ranks(r, model, task), metric)
                                    - per_example(ranks(r, other, task), metric) for r in runs])
            paired[other][task] = paired_bootstrap([differences], resamples=resamples, seed=seed)
    return {"model": model, "metric": metric, "runs": [str(p) for p in paths],
            "split": runs[0].get("split"), "tasks": tasks, "table": table, "paired": paired}


def format_comparison(result: dict) -> str:
    """Markdown: every model's sampled metrics per task (mean +- std over the runs for the
    compared model), then its paired difference from each baseline."""
    model, metric, tasks = result["model"], result["metric"], result["tasks"]
    runs = len(result["runs"])
    head = ["model"] + [f"{task} {m}" for task in tasks for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per_task in result["table"].items():
        spread = name in (model, AGAINST) and runs > 1  # the others are deterministic
        cells = [f"{name} ({runs} runs, mean ± sd)" if spread else name]
        for task in tasks:
            for m in METRICS:
                value = per_task.get(task, {}).get(m)
                if value is None:
                    cells.append("-")
                elif spread:
                    cells.append(f"{value['mean']:.4f} ± {value['std']:.4f}")
                else:
                    cells.append(f"{value['mean']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{model} minus each model, per-example {metric}, paired bootstrap over "
                  f"{runs} run(s) and the examples (95 % interval, two-sided p):", "",
              "| against | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for other, per_task in result["paired"].items():
        cells = [other]
        for task in tasks:
            p = per_task.get(task)
            cells.append("-" if p is None else
                         f"{p['difference']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}], "
                         + ("p < 0.001" if p["p"] < 0.001 else f"p = {p['p']:.2g}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def by_popularity(result: dict, runs: list[dict], data_dir: Path, bins: int = 4) -> dict:
    """Each task's examples split into `bins` groups by the target's number of training
    interactions (quantiles), and every model's mean per-example metric in each group (the
    compared model's averaged over its runs): where a model wins or loses, head or tail."""
    from gensr_ray.data import contract
    from gensr_ray.data.contract import train_item_counts
    from gensr_ray.eval.harness import load_eval_examples

    if runs[0].get("subset"):
        raise CompareError("--data: the breakdown needs results over every example, not a "
                           f"subset of {runs[0]['subset']}")
    data_dir = Path(data_dir)
    examples = load_eval_examples(data_dir, result["split"] or "test")
    n_items = contract.read_table(contract.items_dir(data_dir), columns=["item_id"]).num_rows
    counts = train_item_counts(data_dir, n_items)
    metric, breakdown = result["metric"], {}
    for task in result["tasks"]:
        targets = examples.get(task, {}).get("target", np.zeros(0, dtype=np.int64))
        stored = len(runs[0]["sampled_ranks"][result["model"]][task])
        if len(targets) != stored:
            raise CompareError(f"--data {data_dir}: {len(targets)} {result['split']} {task} "
                               f"examples, the results rank {stored}: another dataset")
        popularity = counts[targets]
        edges = np.quantile(popularity, np.linspace(0, 1, bins + 1))
        group = np.clip(np.searchsorted(edges[1:-1], popularity, side="right"), 0, bins - 1)
        rows = []
        for g in range(bins):
            members = group == g
            if not members.any():
                continue
            means = {}
            for name in result["table"]:
                if task not in runs[0]["sampled_ranks"][name]:
                    continue
                means[name] = float(np.mean([
                    per_example(np.asarray(r["sampled_ranks"][name][task])[members], metric).mean()
                    for r in runs]))
            rows.append({"low": int(popularity[members].min()),
                         "high": int(popularity[members].max()),
                         "examples": int(members.sum()), "models": means})
        breakdown[task] = rows
    return breakdown


def format_breakdown(result: dict, breakdown: dict) -> str:
    """Markdown: per task, a row per popularity group, a column per model."""
    names = list(result["table"])
    lines = [f"{result['metric']} by the target's training interactions (quantile groups):", "",
             "| task | target interactions | examples | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for task, rows in breakdown.items():
        for row in rows:
            cells = [task, f"{row['low']}-{row['high']}", str(row["examples"])]
            cells += [f"{row['models'][n]:.3f}" if n in row["models"] else "-" for n in names]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
