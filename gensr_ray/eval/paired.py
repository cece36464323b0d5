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
    interval (examples resampled within each group) and a two-sided p-value for "no
    difference" (twice the share of resamples on the other side of 0, at least 1/resamples).
    """
    if not differences or any(len(d) == 0 for d in differences):
        raise ValueError("every group needs at least one paired example")
    rng = np.random.default_rng(seed)
    observed = float(np.mean([np.mean(d) for d in differences]))
    stats = np.zeros(resamples)
    for d in differences:
        d = np.asarray(d, dtype=np.float64)
        for lo in range(0, resamples, 256):  # bounded memory: 256 resamples x examples
            picks = rng.integers(0, len(d), size=(min(256, resamples - lo), len(d)))
            stats[lo:lo + len(picks)] += d[picks].mean(axis=1)
    stats /= len(differences)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    other_side = np.mean(stats <= 0) if observed > 0 else np.mean(stats >= 0)
    p = min(1.0, max(2 * float(other_side), 1 / resamples)) if observed != 0 else 1.0
    return {"difference": observed, "low": float(low), "high": float(high), "p": p,
            "examples": int(sum(len(d) for d in differences))}
