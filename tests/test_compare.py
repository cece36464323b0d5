"""`gensr compare`: one model's runs (one results file per seed) against the baselines, on
results files written as `gensr eval --out` writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gensr_ray.cli import main
from gensr_ray.eval.compare import CompareError, compare_runs, format_comparison, load_results
from gensr_ray.eval.harness import write_results

BASELINE = {"search": [0, 3, 12, 40, 1, 7, 25, 2], "rec": [5, 9, 0, 60, 14, 3, 11, 30]}


def _results(gensr_ranks: dict, baseline: dict = BASELINE) -> dict:
    """A results dict of the harness's shape: `gensr` and one baseline, per-example ranks."""
    def summary(ranks: dict) -> dict:
        return {task: {"sampled": {"NDCG@10": 0.0}, "full": {}} for task in ranks}
    return {"split": "test", "subset": None,
            "num_examples": {task: len(r) for task, r in baseline.items()},
            "models": {"gensr": summary(gensr_ranks), "sasrec": summary(baseline)},
            "sampled_ranks": {"gensr": gensr_ranks, "sasrec": baseline}}


def _write(tmp_path, runs: list[dict]) -> list:
    paths = []
    for i, results in enumerate(runs):
        path = tmp_path / f"s{i}" / "results.json"
        path.parent.mkdir()
        write_results(results, path)
        paths.append(path)
    return paths


def _ndcg(ranks) -> float:
    ranks = np.asarray(ranks, dtype=float)
    return float(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0).mean())


def test_three_seeds_give_mean_sd_and_a_paired_interval(tmp_path):
    # every seed ranks each target at most as low as the baseline, most of them better
    seeds = [{task: [max(0, r - shift) for r in ranks] for task, ranks in BASELINE.items()}
             for shift in (2, 3, 5)]
    paths = _write(tmp_path, [_results(s) for s in seeds])
    result = compare_runs(load_results(paths), paths, resamples=2000)

    for task in ("search", "rec"):
        values = [_ndcg(s[task]) for s in seeds]
        got = result["table"]["gensr"][task]["NDCG@10"]
        assert got["mean"] == pytest.approx(np.mean(values))
        assert got["std"] == pytest.approx(np.std(values, ddof=1))
        assert result["table"]["sasrec"][task]["NDCG@10"]["std"] == pytest.approx(0.0, abs=1e-12)
        paired = result["paired"]["sasrec"][task]
        assert paired["difference"] == pytest.approx(np.mean(values) - _ndcg(BASELINE[task]))
        assert 0 < paired["low"] <= paired["difference"] <= paired["high"]
        assert paired["seeds"] == 3 and paired["examples"] == 8
    table = format_comparison(result)
    assert "| gensr (3 runs, mean ± sd) |" in table and "| sasrec |" in table


def test_the_command_writes_json_and_markdown_and_refuses_runs_on_other_candidates(
        tmp_path, capsys):
    same = _write(tmp_path, [_results(BASELINE), _results({t: [r + 1 for r in rs]
                                                            for t, rs in BASELINE.items()})])
    out = tmp_path / "cmp" / "recipe.json"
    assert main(["compare", *map(str, same), "--out", str(out), "--resamples", "500"]) == 0
    assert json.loads(out.read_text())["runs"] == [str(p) for p in same]
    assert out.with_suffix(".md").read_text().startswith("| model |")
    assert "gensr minus each model" in capsys.readouterr().out

    # a baseline ranked differently: another dataset, or other stored negatives
    other = dict(BASELINE, rec=[r + 1 for r in BASELINE["rec"]])
    moved = tmp_path / "moved"
    moved.mkdir()
    [bad] = _write(moved, [_results(BASELINE, baseline=other)])
    assert main(["compare", str(same[0]), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: sasrec's rec ranks differ from {same[0]}'s" in err


def test_runs_are_compared_against_other_runs_of_the_model_seed_by_seed(tmp_path, capsys):
    """--against: before and after a change of config, each seed's run against the same
    seed's earlier one, paired per example; their ranks differ by seed, as a model's do."""
    before = [{t: [r + shift for r in rs] for t, rs in BASELINE.items()} for shift in (0, 4)]
    after = [{t: [max(0, r - 1) for r in rs] for t, rs in ranks.items()} for ranks in before]
    (tmp_path / "after").mkdir()
    (tmp_path / "before").mkdir()
    new = _write(tmp_path / "after", [_results(r) for r in after])
    old = _write(tmp_path / "before", [_results(r) for r in before])
    out = tmp_path / "cmp.json"
    assert main(["compare", *map(str, new), "--against", *map(str, old), "--out", str(out),
                 "--resamples", "500"]) == 0
    result = json.loads(out.read_text())
    for task in ("search", "rec"):
        gain = np.mean([_ndcg(a[task]) - _ndcg(b[task]) for a, b in zip(after, before)])
        paired = result["paired"]["against runs"][task]
        assert paired["difference"] == pytest.approx(gain) and gain > 0
        assert paired["seeds"] == 2 and paired["examples"] == 8
        assert result["table"]["against runs"][task]["NDCG@10"]["runs"] == pytest.approx(
            [_ndcg(b[task]) for b in before])
    assert "| against runs (2 runs, mean ± sd) |" in capsys.readouterr().out
    assert main(["compare", *map(str, new), "--against", str(old[0])]) == 2
    assert "--against: 1 results files for 2 runs" in capsys.readouterr().err


def test_unreadable_or_incomplete_files_are_named(tmp_path, capsys):
    [good] = _write(tmp_path, [_results(BASELINE)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["compare", str(good), str(broken)]) == 2
    assert f"{broken}: not a readable results file" in capsys.readouterr().err
    with pytest.raises(CompareError, match=r"no 'twin' ranks \(models: gensr, sasrec\)"):
        compare_runs(load_results([good]), [good], model="twin")
    with pytest.raises(CompareError, match="--metric MRR@10"):
        compare_runs(load_results([good]), [good], metric="MRR@10")
    # GenSR alone (no baseline to confirm the candidates): the example counts must agree
    alone = [{**_results(BASELINE), "sampled_ranks": {"gensr": ranks}}
             for ranks in (BASELINE, {t: r[:-2] for t, r in BASELINE.items()})]
    (tmp_path / "alone").mkdir()
    paths = _write(tmp_path / "alone", alone)
    with pytest.raises(CompareError, match=f"{paths[1]}: 6 search examples, {paths[0]}: 8"):
        compare_runs(load_results(paths), paths)


def test_the_popularity_breakdown_groups_examples_by_their_target_s_training_count(tmp_path,
                                                                                   capsys):
    from gensr_ray.data import contract
    from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
    from gensr_ray.data.writer import write_dataset
    from gensr_ray.eval.compare import by_popularity
    from gensr_ray.eval.harness import load_eval_examples

    data = tmp_path / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=3)), data)
    examples = load_eval_examples(data, "test")
    table = contract.read_table(contract.interactions_dir(data), columns=["item_id", "split"])
    train = table.column("split").to_numpy(zero_copy_only=False) == "train"
    counts = np.bincount(table.column("item_id").to_numpy()[train])
    # the model ranks a target first when it is popular (>= the median count), 20th otherwise;
    # the baseline ranks every target 5th
    ranks, baseline = {}, {}
    for task, batch in examples.items():
        popular = counts[batch["target"]] >= np.median(counts[batch["target"]])
        ranks[task] = np.where(popular, 0, 20).tolist()
        baseline[task] = [4] * len(popular)
    paths = _write(tmp_path, [_results(ranks, baseline)] * 2)
    runs = load_results(paths)
    result = compare_runs(runs, paths, resamples=200)
    breakdown = by_popularity(result, runs, data, bins=4)

    for task, groups in breakdown.items():
        assert sum(g["examples"] for g in groups) == len(examples[task]["target"])
        assert all(a["high"] <= b["low"] for a, b in zip(groups, groups[1:]))  # head last
        assert groups[0]["models"]["gensr"] < groups[-1]["models"]["gensr"] == 1.0
        assert all(g["models"]["sasrec"] == pytest.approx(1 / np.log2(6)) for g in groups)

    out = tmp_path / "cmp.json"
    assert main(["compare", *map(str, paths), "--data", str(data), "--out", str(out)]) == 0
    assert "by the target's training interactions" in out.with_suffix(".md").read_text()
    assert json.loads(out.read_text())["by_popularity"]["rec"][-1]["models"]["gensr"] == 1.0

    # results of another dataset: a different number of examples
    short = {task: r[:-1] for task, r in ranks.items()}
    (tmp_path / "other").mkdir()
    other = _write(tmp_path / "other", [_results(short, {t: b[:-1] for t, b in baseline.items()})])
    assert main(["compare", *map(str, other), "--data", str(data)]) == 2
    assert "examples, the results rank" in capsys.readouterr().err
