"""Negative sampling: the one place items a user never touched are drawn.

- `sample_untouched`: the stored negatives of an example (distinct items, none the user ever
  touched; fewer when the user touched nearly the whole catalogue), drawn once when a dataset
  is written;
- `sample_unseen`: one negative per training edge for pairwise losses (LightGCN's BPR,
  SASRec), outside the user's training items, vectorised over edges;
- `draw_outside`: its core, uniform or weighted per item, which also serves GenSR's fresh
  negatives per epoch (gensr_ray.train.negatives, `train.negative_popularity`).
"""

from __future__ import annotations

import numpy as np

from gensr_ray.data.contract import DataError


def sample_untouched(rng: np.random.Generator, n_items: int, touched: set[int], count: int
                     ) -> np.ndarray:
    """`count` distinct items outside `touched`, by rejection (catalogues dwarf histories).

    A user who touched all but fewer than `count` items gets every untouched item (in a random
    order): never an item the user touched, and the shortfall shows as a shorter list."""
    available = n_items - len(touched)
    if available <= count:
        untouched = np.setdiff1d(np.arange(n_items), np.fromiter(touched, np.int64, len(touched)))
        return rng.permutation(untouched).astype(np.int32)
    chosen: list[int] = []
    picked: set[int] = set()
    while len(chosen) < count:
        for item in rng.integers(0, n_items, size=2 * count).tolist():
            if item not in touched and item not in picked:
                picked.add(item)
                chosen.append(item)
                if len(chosen) == count:
                    break
    return np.asarray(chosen, dtype=np.int32)


def sample_unseen(
    rng: np.random.Generator, users: np.ndarray, seen_keys: np.ndarray, n_items: int
) -> np.ndarray:
    """One uniform item per user that is not among the user's train items (rejection sampling).

    seen_keys: sorted user * n_items + item keys of the train edges.
    """
    negatives, clashing = draw_outside(rng, users, seen_keys, n_items)
    if clashing.size:
        raise DataError("could not sample BPR negatives: some user has interacted with almost "
                        "every item")
    return negatives


def draw_outside(rng: np.random.Generator, users: np.ndarray, seen_keys: np.ndarray,
                 n_items: int, rounds: int = 100,
                 cumulative: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One item per user outside the user's keys (sorted user * n_items + item), by
    rejection, vectorised; and the positions still clashing after `rounds` redraws (users
    who touched nearly the whole catalogue), whose items are then ones the user touched.

    Items are drawn uniformly, or with `cumulative` (the running sum of [n_items] non-negative
    weights) in proportion to their weights."""
    users = np.asarray(users, dtype=np.int64)

    def draw(size: int) -> np.ndarray:
        if cumulative is None:
            return rng.integers(0, n_items, size=size)
        picked = np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right")
        return np.minimum(picked, n_items - 1)

    negatives = draw(users.size)
    todo = np.arange(users.size)
    for redraw in range(rounds + 1):
        keys = users[todo] * n_items + negatives[todo]
        pos = np.searchsorted(seen_keys, keys)
        todo = todo[seen_keys[np.minimum(pos, seen_keys.size - 1)] == keys]
        if todo.size == 0 or redraw == rounds:
            break
        negatives[todo] = draw(todo.size)
    return negatives, todo
