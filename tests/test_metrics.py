import math

import numpy as np
import pytest

from gensr_ray.eval.metrics import full_metrics, sampled_metrics, sampled_ranks


def reference_rank(target: float, negatives: list[float]) -> int:
    """Sort the candidates best first, placing the target after every negative it ties with."""
    candidates = [(s, 1) for s in negatives] + [(target, 0)]  # negatives win ties
    order = sorted(candidates, key=lambda c: (-c[0], -c[1]))
    return order.index((target, 0))


def reference_sampled(ranks: list[int], k: int) -> tuple[float, float]:
    hr = sum(1.0 for r in ranks if r < k) / len(ranks)
    ndcg = sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
    return hr, ndcg


def test_ranks_on_hand_made_rankings_with_ties():
    target = np.array([5.0, 1.0, 2.0, 3.0, 0.5])
    negatives = np.array([
        [1.0, 2.0, 3.0, 4.0],  # target best -> 0
        [2.0, 3.0, 4.0, 5.0],  # target worst -> 4
        [2.0, 2.0, 1.0, 0.0],  # two ties -> 2, not 0
        [3.0, 3.0, 3.0, 3.0],  # all tie -> worst
        [0.1, 0.9, 0.5, 0.2],  # one above, one tie -> 2
    ])
    ranks = sampled_ranks(target, negatives)
    assert ranks.tolist() == [0, 4, 2, 4, 2]
    assert ranks.tolist() == [reference_rank(t, n.tolist()) for t, n in zip(target, negatives)]


def test_constant_scores_get_the_worst_rank():
    ranks = sampled_ranks(np.zeros(3), np.zeros((3, 99)))
    assert (ranks == 99).all()
    assert sampled_metrics(ranks, ks=(10,)) == {"HR@10": 0.0, "NDCG@10": 0.0}


def test_sampled_metrics_match_reference_on_random_scores():
    rng = np.random.default_rng(0)
    # Integer scores so that ties are frequent.
    target = rng.integers(0, 10, size=200).astype(float)
    negatives = rng.integers(0, 10, size=(200, 30)).astype(float)
    ranks = sampled_ranks(target, negatives)
    expected = [reference_rank(t, n.tolist()) for t, n in zip(target, negatives)]
    assert ranks.tolist() == expected
    metrics = sampled_metrics(ranks, ks=(1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        hr, ndcg = reference_sampled(expected, k)
        assert metrics[f"HR@{k}"] == pytest.approx(hr)
        assert metrics[f"NDCG@{k}"] == pytest.approx(ndcg)


def test_sampled_metrics_edge_values():
    metrics = sampled_metrics(np.array([0, 0]), ks=(1, 5))
    assert metrics == {"HR@1": 1.0, "NDCG@1": 1.0, "HR@5": 1.0, "NDCG@5": 1.0}
    metrics = sampled_metrics(np.array([1, 99]), ks=(1, 5))
    assert metrics["HR@1"] == 0.0 and metrics["NDCG@1"] == 0.0
    assert metrics["HR@5"] == 0.5
    assert metrics["NDCG@5"] == pytest.approx(0.5 / math.log2(3))


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        sampled_ranks(np.array([np.nan]), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        sampled_ranks(np.array([1.0]), np.array([[0.0, np.nan]]))


def test_full_metrics_hand_made():
    retrieved = np.array([
        [7, 3, 9, 1],   # target 7 at 0
        [3, 9, 1, 7],   # target 7 at 3
        [1, 2, -1, -1],  # target 7 missing (short list padded with -1)
    ])
    targets = np.array([7, 7, 7])
    metrics = full_metrics(retrieved, targets, ks=(1, 4))
    assert metrics["Recall@1"] == pytest.approx(1 / 3)
    assert metrics["NDCG@1"] == pytest.approx(1 / 3)
    assert metrics["Recall@4"] == pytest.approx(2 / 3)
    assert metrics["NDCG@4"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)


def test_full_metrics_rejects_k_beyond_retrieved():
    with pytest.raises(ValueError, match="K=20"):
        full_metrics(np.zeros((2, 10), dtype=int), np.zeros(2, dtype=int), ks=(10, 20))


def test_per_example_metrics_average_to_the_sampled_metrics():
    from gensr_ray.eval.paired import per_example

    ranks = np.array([0, 3, 9, 10, 57, 1])
    for metric, value in sampled_metrics(ranks, (10,)).items():
        assert per_example(ranks, metric).mean() == pytest.approx(value)


def test_paired_bootstrap_finds_a_real_shift_and_not_a_null_one():
    from gensr_ray.eval.paired import paired_bootstrap

    rng = np.random.default_rng(0)
    noise = [rng.normal(0, 0.3, 400), rng.normal(0, 0.3, 300)]
    shifted = paired_bootstrap([n + 0.1 for n in noise], resamples=2000)
    assert shifted["p"] < 0.01 and 0 < shifted["low"] < 0.1 < shifted["high"]
    assert shifted["difference"] == pytest.approx(np.mean([np.mean(n) + 0.1 for n in noise]))
    null = paired_bootstrap(noise, resamples=2000)
    assert null["p"] > 0.05 and null["low"] < 0 < null["high"]
    assert paired_bootstrap([np.zeros(5)])["p"] == 1.0  # identical runs: no difference
    with pytest.raises(ValueError, match="at least one paired example"):
        paired_bootstrap([np.zeros(0)])


def test_paired_bootstrap_over_seeds_keeps_the_spread_between_seeds():
    """Per seed a trial is clearly better or clearly worse than the reference (+0.06, -0.05,
    +0.05): the example-level noise of the seeds' mean is small, the seeds' spread is not."""
    from gensr_ray.eval.paired import paired_bootstrap

    rng = np.random.default_rng(1)
    by_seed = np.stack([rng.normal(shift, 0.05, 600) for shift in (0.06, -0.05, 0.05)])
    seeds_mean_only = paired_bootstrap([by_seed.mean(axis=0)], resamples=4000)
    assert seeds_mean_only["low"] > 0  # the seeds' mean alone looks like a real gain
    both = paired_bootstrap([by_seed], resamples=4000)
    assert both["difference"] == pytest.approx(seeds_mean_only["difference"])
    assert both["low"] < 0 < both["high"] and both["p"] > 0.05 and both["seeds"] == 3
    # a gain on every seed stays a gain
    steady = paired_bootstrap([np.stack([rng.normal(0.05, 0.05, 600) for _ in range(3)])],
                              resamples=4000)
    assert steady["low"] > 0 and steady["p"] < 0.01
    with pytest.raises(ValueError, match="the same seeds"):
        paired_bootstrap([np.zeros((3, 5)), np.zeros((2, 5))])
