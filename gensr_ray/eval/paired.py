"""Paired comparison of two models (or two trials) ranked on the same stored candidates.

Both were scored on the same examples with the same stored negatives, so the difference is
measured per example and resampled per example (a paired bootstrap): the interval says how
much of the difference the choice of examples explains. Pure numpy.
"""

from __future__ import annotations

import numpy as np


def per_example(ranks, metric: str) -> np.ndarray:
    """HR@K or NDCG@K of each example from its 0-based sampled rank (as sampled_metrics)."""
    name, k = metric.split("@")
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < int(k)
    if name == "HR":
        return hit.astype(np.float64)
    if name == "NDCG":
        return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    raise ValueError(f"no per-example form of {metric!r}: expected HR@K or NDCG@K")


def paired_bootstrap(differences: list[np.ndarray], resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """The mean over groups (tasks) of each group's mean per-example difference, its bootstrap
    interval and a two-sided p-value for "no difference" (twice the share of resamples on
    the other side of 0, at least 1/resamples).

    A group is [examples] (one run each side) or [seeds, examples]: runs paired by seed (the
    same seed draws the same initialisation and data order for both sides). Examples are
    resampled within each group and, with several seeds, the seeds too, the same seeds for
    every group: the interval then holds the spread over seeds as well as over examples,
    which a bootstrap of the seeds' mean alone would leave out.
    """
    groups = [np.atleast_2d(np.asarray(d, dtype=np.float64)) for d in differences]
    if not groups or any(g.shape[1] == 0 for g in groups):
        raise ValueError("every group needs at least one paired example")
    seeds = groups[0].shape[0]
    if any(g.shape[0] != seeds for g in groups):
        raise ValueError("every group needs the same seeds")
    rng = np.random.default_rng(seed)
    observed = float(np.mean([g.mean() for g in groups]))
    stats = np.zeros(resamples)
    for lo in range(0, resamples, 256):  # bounded memory: 256 resamples x seeds x examples
        n = min(256, resamples - lo)
        seed_picks = (rng.integers(0, seeds, size=(n, seeds)) if seeds > 1
                      else np.zeros((n, 1), dtype=np.int64))
        for g in groups:
            picks = rng.integers(0, g.shape[1], size=(n, g.shape[1]))
            stats[lo:lo + n] += g[seed_picks[:, :, None], picks[:, None, :]].mean(axis=(1, 2))
    stats /= len(groups)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    other_side = np.mean(stats <= 0) if observed > 0 else np.mean(stats >= 0)
    p = min(1.0, max(2 * float(other_side), 1 / resamples)) if observed != 0 else 1.0
    return {"difference": observed, "low": float(low), "high": float(high), "p": p,
            "examples": int(sum(g.shape[1] for g in groups)), "seeds": seeds}
