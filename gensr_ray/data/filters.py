"""Event filters shared by the loaders of real datasets, on compact numpy arrays.

Each returns a boolean keep-mask and is counted by the caller in RawDataset.notes["dropped"]:
- `first_per_pair`: one event per (user, item), the earliest; an exact repeat (same
  timestamp) is a duplicate event, a later one a repeat event;
- `k_core`: iteratively drop users and items with fewer than k events until none is left;
- `min_events_per_user`: users with a single event give no example (an example needs a
  history), so they are dropped.
"""

from __future__ import annotations

import numpy as np


def first_per_pair(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray
                   ) -> tuple[np.ndarray, int, int]:
    """(keep mask, duplicate events, repeat events); ties keep the earlier row."""
    n = len(users)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep, 0, 0
    order = np.lexsort((np.arange(n), timestamps, items, users))
    u, i, t = users[order], items[order], timestamps[order]
    new_pair = np.ones(n, dtype=bool)
    new_pair[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    keep[order[new_pair]] = True
    same_time = np.zeros(n, dtype=bool)
    same_time[1:] = ~new_pair[1:] & (t[1:] == t[:-1])
    # a dropped event at the same time as the one before it in its pair is an exact duplicate
    duplicates = int(same_time.sum())
    repeats = int((~new_pair).sum()) - duplicates
    return keep, duplicates, repeats


def k_core(users: np.ndarray, items: np.ndarray, k: int, keep: np.ndarray | None = None
           ) -> np.ndarray:
    """Keep-mask of the k-core: every kept user and item has >= k kept events."""
    keep = np.ones(len(users), dtype=bool) if keep is None else keep.copy()
    if k <= 1:
        return keep
    while True:
        user_count = np.bincount(users[keep], minlength=int(users.max(initial=0)) + 1)
        item_count = np.bincount(items[keep], minlength=int(items.max(initial=0)) + 1)
        ok = keep & (user_count[users] >= k) & (item_count[items] >= k)
        if (ok == keep).all():
            return keep
        keep = ok


def min_events_per_user(users: np.ndarray, keep: np.ndarray, minimum: int = 2) -> np.ndarray:
    count = np.bincount(users[keep], minlength=int(users.max(initial=0)) + 1)
    return keep & (count[users] >= minimum)


def filter_events(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                  keep: np.ndarray, k: int, dropped: dict) -> np.ndarray:
    """The loaders' event filters in order (first per pair, k-core, single-event users) on
    the events in `keep`; each drop is counted into `dropped`. Returns the new keep-mask."""
    rows = np.flatnonzero(keep)
    first, dropped["duplicate_events"], dropped["repeat_events"] = first_per_pair(
        users[rows], items[rows], timestamps[rows])
    keep = np.zeros(len(users), dtype=bool)
    keep[rows[first]] = True
    for name, step in (("below_k_core", lambda m: k_core(users, items, k, m)),
                       ("users_with_single_event", lambda m: min_events_per_user(users, m))):
        before = int(keep.sum())
        keep = step(keep)
        dropped[name] = before - int(keep.sum())
    return keep


def encode(values) -> tuple[np.ndarray, list]:
    """Dense integer codes (first-seen order) and the distinct values."""
    index: dict = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64,
                        count=len(values))
    return codes, list(index)
