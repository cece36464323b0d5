"""Ranking metrics for the two evaluation protocols, pure numpy.

Sampled protocol (the paper's): each example ranks its target against stored negatives; a
target's rank is how many negatives score at least as high, so a model that gives every
candidate the same score gets the worst rank, not the best (ties never favour the target).
An example whose user touched all but a few items is stored with fewer negatives and ranks
its target among those.

Full-catalogue protocol: a retriever returns the top K item ids out of the whole catalogue; each
example has exactly one relevant item (its target), so Recall@K is "target in the top K".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)
NO_ITEM = -1  # an empty negative slot (see sampled_candidates)


def sampled_ranks(target_scores: np.ndarray, negative_scores: np.ndarray) -> np.ndarray:
    """0-based rank of each target among its negatives: number of negatives scoring >= target.

    target_scores: [n]; negative_scores: [n, m]. Raises ValueError on NaN, which would otherwise
    compare False everywhere and silently give the target rank 0.
    """
    target = np.asarray(target_scores, dtype=np.float64)
    negatives = np.asarray(negative_scores, dtype=np.float64)
    if target.ndim != 1 or negatives.ndim != 2 or negatives.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected target_scores [n] and negative_scores [n, m]; got {target.shape} and "
            f"{negatives.shape}"
        )
    if np.isnan(target).any() or np.isnan(negatives).any():
        raise ValueError("scores contain NaN; the model produced invalid scores")
    return (negatives >= target[:, None]).sum(axis=1).astype(np.int64)


def sampled_candidates(target: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """[n, 1 + m] candidates of the sampled protocol: the target, then the stored negatives.

    An example stored with fewer negatives than its split's widest (its user touched nearly
    the whole catalogue) has its empty slots, NO_ITEM, filled with its target: a valid id to
    score, whose score `stored_ranks` ignores."""
    target = np.asarray(target, dtype=np.int64)
    negatives = np.asarray(negatives, dtype=np.int64).reshape(len(target), -1)
    filled = np.where(negatives == NO_ITEM, target[:, None], negatives)
    return np.concatenate([target[:, None], filled], axis=1)


def stored_ranks(scores: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """`sampled_ranks` of [n, 1 + m] scores of `sampled_candidates`: each target ranked among
    the negatives its example has (empty slots never outrank it)."""
    scores = np.asarray(scores, dtype=np.float64)
    present = np.asarray(negatives).reshape(len(scores), -1) != NO_ITEM
    return sampled_ranks(scores[:, 0], np.where(present, scores[:, 1:], -np.inf))


def sampled_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@K (rank < K) and NDCG@K (1 / log2(rank + 2) if rank < K), averaged over examples."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"expected a non-empty [n] array of ranks; got shape {ranks.shape}")
    if (ranks < 0).any():
        raise ValueError("ranks must be >= 0")
    gain = 1.0 / np.log2(ranks + 2.0)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, gain, 0.0).mean())
    return out


def full_metrics(
    retrieved: np.ndarray, targets: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@K and NDCG@K of one relevant item per example over the retrieved top-K lists.

    retrieved: [n, K] item ids, best first (-1 pads a short list); targets: [n].
    """
    retrieved = np.asarray(retrieved)
    targets = np.asarray(targets)
    if retrieved.ndim != 2 or targets.shape != (retrieved.shape[0],) or targets.size == 0:
        raise ValueError(
            f"expected retrieved [n, K] and targets [n] with n > 0; got {retrieved.shape} and "
            f"{targets.shape}"
        )
    if max(ks) > retrieved.shape[1]:
        raise ValueError(f"K={max(ks)} but only {retrieved.shape[1]} items were retrieved")
    match = retrieved == targets[:, None]
    # Position of the target in the list; lists without it get K (a miss for every cutoff).
    pos = np.where(match.any(axis=1), match.argmax(axis=1), retrieved.shape[1])
    gain = 1.0 / np.log2(pos + 2.0)
    out: dict[str, float] = {}
    for k in ks:
        hit = pos < k
        out[f"Recall@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, gain, 0.0).mean())
    return out
