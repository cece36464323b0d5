"""Fresh negatives (`train.negatives=fresh`): each epoch trains on negatives of its own.

`gensr prepare` stores each training example's negatives once, so with the default every
epoch shows the model the same (example, negative) rows, four of an example's five. With
`fresh`, a worker replaces each negative row's item before the rows are padded, drawn
uniformly among the items the user never touched (the rule the stored ones follow,
gensr_ray.data.writer), and rebuilds that row's prompt. Draws are seeded by the run's seed,
the epoch, the worker's rank and the micro-batch's position in the epoch, so a resumed run
draws what the uninterrupted one would have.

`train.negative_popularity` (alpha) weights the draws: an item comes up in proportion to
(its training interactions + 1) ** alpha. Uniform negatives (alpha 0) are mostly items few
users touched, so the model seldom has to tell a popular target from a popular item the
user passed over; at alpha 1 negatives are as popular as the positives, and popularity alone
no longer separates them. Only training interactions count, so nothing of the held-out
splits reaches training.

Each worker holds the (user, item) keys of every interaction: 8 bytes per interaction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gensr_ray.data import contract
from gensr_ray.data.contract import TASKS, train_item_counts
from gensr_ray.data.sampling import draw_outside


class FreshNegatives:
    """Redraws the negative rows of a worker's micro-batches (numpy dicts from Ray Data)."""

    def __init__(self, data_root: Path, encoder, seed: int, rank: int,
                 popularity: float = 0.0):
        table = contract.read_table(contract.interactions_dir(data_root),
                                    columns=["user_id", "item_id"])
        self.n_items = contract.read_table(contract.items_dir(data_root),
                                           columns=["item_id"]).num_rows
        users = table.column("user_id").to_numpy().astype(np.int64)
        items = table.column("item_id").to_numpy().astype(np.int64)
        self.touched = np.unique(users * self.n_items + items)  # sorted keys
        self.cumulative = None if popularity == 0 else np.cumsum(
            (train_item_counts(data_root, self.n_items) + 1.0) ** popularity)
        self.encoder, self.seed, self.rank = encoder, seed, rank
        self.kept = 0  # negatives left as stored: their user touched nearly every item

    def redraw(self, rows: dict, epoch: int, micro: int) -> dict:
        """`rows` with each label-0 row's item and prompt replaced; positives untouched."""
        negative = np.flatnonzero(np.asarray(rows["label"]) == 0)
        if negative.size == 0:
            return rows
        rng = np.random.default_rng([self.seed, epoch, self.rank, micro])
        users = np.asarray(rows["user_id"], dtype=np.int64)[negative]
        drawn, clashing = draw_outside(rng, users, self.touched, self.n_items,
                                       cumulative=self.cumulative)
        keep = np.zeros(negative.size, dtype=bool)
        keep[clashing] = True
        self.kept += int(keep.sum())
        rows = dict(rows)
        targets = np.array(rows["target"], copy=True)
        prompt_ids, prompt_slots = list(rows["prompt_ids"]), list(rows["prompt_slots"])
        for r, item, stored in zip(negative.tolist(), drawn.tolist(), keep.tolist()):
            if stored:
                continue
            query = rows["query"][r]
            prompt = self.encoder.assembler.build(
                TASKS[int(rows["task"][r])], [int(h) for h in rows["history"][r]], item,
                None if query is None else str(query))
            targets[r] = item
            prompt_ids[r] = np.asarray(prompt.ids, dtype=np.int32)
            prompt_slots[r] = np.asarray(prompt.slots, dtype=np.int8)
        rows["target"], rows["prompt_ids"], rows["prompt_slots"] = targets, prompt_ids, prompt_slots
        return rows
