"""Validation while training: the model being trained scores a seeded subset of the valid split
(sampled protocol, both tasks), every rank its share; sums are reduced over ranks, so every
rank holds the same metrics and takes the same early-stopping decision.

Under ZeRO-3 a forward gathers the partitioned weights collectively, so every rank must run
the same forwards: shares are padded to equal length (padding counts with weight 0), each
task scored apart, and `score_candidates` runs the same forwards for the same number of
examples of a task.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gensr_ray.config import ConfigError, GenSRConfig
from gensr_ray.eval.gensr_scorer import score_candidates
from gensr_ray.eval.harness import load_eval_examples
from gensr_ray.eval.metrics import sampled_candidates, sampled_metrics, stored_ranks

KS = (10,)
METRICS = tuple(f"{m}@{k}" for k in KS for m in ("HR", "NDCG"))


def rank_share(n: int, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `n` examples that `rank` scores, padded to ceil(n / world_size) by repeating
    one of them, and their weights (0 for the padding)."""
    mine = np.arange(rank, n, world_size)
    per_rank = -(-n // world_size)
    fill = mine[:1] if mine.size else np.zeros(1, dtype=np.int64)
    rows = np.concatenate([mine, np.repeat(fill, per_rank - mine.size)])
    weight = (np.arange(per_rank) < mine.size).astype(np.float64)
    return rows, weight


def _subset(batch: dict, rows: np.ndarray) -> dict:
    return {key: value[rows] if isinstance(value, np.ndarray) else [value[r] for r in rows]
            for key, value in batch.items()}


class Validator:
    """One rank's share of the validation subset, and the scoring of it."""

    def __init__(self, cfg: GenSRConfig, encoder, collate, kind: str, rank: int,
                 world_size: int, data_dir: Path):
        batches = load_eval_examples(data_dir, "valid", cfg.train.eval_examples, cfg.eval.seed)
        task = cfg.train.best_metric.split("/")[1]
        if task != "mean" and task not in batches:
            raise ConfigError(f"train.best_metric={cfg.train.best_metric!r}: the valid split of "
                              f"{data_dir} has no {task} examples")
        self.encoder, self.collate, self.kind = encoder, collate, kind
        self.batch_size = cfg.eval.batch_size
        self.shares = {}
        for name in sorted(batches):  # the same order on every rank
            rows, weight = rank_share(len(batches[name]["target"]), rank, world_size)
            self.shares[name] = (_subset(batches[name], rows), weight)

    @torch.no_grad()
    def run(self, forward: Callable, to_device: Callable, reduce_sum: Callable) -> dict:
        """{"val/<task>/HR@10", "val/<task>/NDCG@10"} for each task and their mean over tasks.

        forward: the model or its DeepSpeed engine (in eval mode); reduce_sum: sums a dict of
        floats over ranks."""
        sums: dict[str, float] = {}
        for task, (batch, weight) in self.shares.items():
            candidates = sampled_candidates(batch["target"], batch["negatives"])
            scores = score_candidates(forward, self.kind, self.encoder, self.collate, batch,
                                      candidates, self.batch_size, to_device)
            ranks = stored_ranks(scores, batch["negatives"])[weight > 0]
            # a rank may hold no example (fewer examples than ranks): it adds zeros
            values = sampled_metrics(ranks, KS) if ranks.size else dict.fromkeys(METRICS, 0.0)
            sums.update({f"{task}/{m}": values[m] * ranks.size for m in METRICS})
            sums[f"{task}/n"] = float(ranks.size)
        totals = reduce_sum(sums)
        metrics = {f"val/{task}/{m}": totals[f"{task}/{m}"] / totals[f"{task}/n"]
                   for task in self.shares for m in METRICS}
        for m in METRICS:
            metrics[f"val/mean/{m}"] = float(np.mean([metrics[f"val/{t}/{m}"]
                                                      for t in self.shares]))
        return metrics


class BestTracker:
    """The best value of the metric so far, and validations since it improved (patience).

    Its state rides in every checkpoint, so a resumed run keeps counting where it stopped."""

    def __init__(self, metric: str, patience: int, state: dict | None = None):
        self.metric, self.patience = metric, patience
        state = state or {}
        self.best: float | None = state.get("value")
        self.best_step: int | None = state.get("step")
        self.since = int(state.get("since", 0))

    def update(self, metrics: dict, step: int) -> bool:
        """Record a validation; True when the run should stop (patience exhausted)."""
        value = metrics[self.metric]
        if self.best is None or value > self.best:  # ties are not improvements
            self.best, self.best_step, self.since = value, step, 0
        else:
            self.since += 1
        return 0 < self.patience <= self.since

    def state(self) -> dict:
        return {"value": self.best, "step": self.best_step, "since": self.since}
