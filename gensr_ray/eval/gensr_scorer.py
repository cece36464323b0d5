"""GenSR in the evaluation harness.

Sampled protocol: GenSR scores the target and its stored negatives pointwise.
Full-catalogue protocol: a dense first stage (LightGCN by default) retrieves `depth`
candidates from the whole catalogue with faiss, and GenSR reranks them.
"""

from __future__ import annotations

import numpy as np
import torch

from gensr_ray.data.contract import TASKS
from gensr_ray.eval.harness import order_pool
from gensr_ray.inputs.build import build_features
from gensr_ray.model.losses import answer_score


class GenSRScorer:
    name = "gensr"
    tasks = ("search", "rec")

    def __init__(self, model, backbone, cfg, first_stage: dict, depth: int, batch_size: int):
        # parameters and the CF buffer alike in the scoring dtype, on the scoring device
        self.device = torch.device("cuda" if cfg.eval.use_gpu else "cpu")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[cfg.eval.precision]
        self.model = model.to(self.device, dtype).eval()
        self.encoder, self.collate = build_features(cfg, backbone.tokenizer, backbone.kind)
        self.first_stage = first_stage  # task -> a harness scorer with retrieve()
        self.depth = depth
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, batch: dict, candidates: np.ndarray) -> np.ndarray:
        return score_candidates(self.model, self.model.kind, self.encoder, self.collate, batch,
                                candidates, self.batch_size, self._to_device)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def retrieve(self, batch: dict, k: int, exclude_per_example: list) -> np.ndarray:
        return rerank(self.first_stage, self.depth, self.score, batch, k, exclude_per_example)


def score_candidates(forward, kind: str, encoder, collate, batch: dict, candidates: np.ndarray,
                     batch_size: int, to_device) -> np.ndarray:
    """Scores [n, c] of each example's candidates; `forward` is the GenSR module or a
    DeepSpeed engine wrapping it (every call is one forward of the module).

    Decoder-only backbones: per example, the shared prefix's KV cache and the history
    encodings are computed once for all its candidates (bench/scoring.py measures the gain),
    for batch_size // c examples of a task per forward, those with prefixes of similar
    length together (each candidate attends to its example's prefix padded to the longest
    of the forward). Others: one full prompt per
    (example, candidate) row, `batch_size` rows per forward. Either way the forwards and
    their order depend only on how many examples of each task the batch holds (decoders:
    sum over tasks of ceil(n_task / (batch_size // c)), search first), which keeps ZeRO-3
    ranks with equal shares of each task in step."""
    if kind == "decoder":
        scores = np.empty(candidates.shape, dtype=np.float32)
        per_call = max(1, batch_size // max(1, candidates.shape[1]))
        for task_rows in task_chunks(batch["task"], len(batch["task"])):  # a task at a time
            groups = {i: encoder.encode_group(batch["task"][i], list(batch["history"][i]),
                                              batch["query"][i], candidates[i].tolist())
                      for i in task_rows}
            by_length = sorted(task_rows, key=lambda i: len(groups[i]["prefix_ids"]))
            for lo in range(0, len(by_length), per_call):
                rows = np.array(by_length[lo:lo + per_call])
                logits = forward(to_device(collate.groups([groups[i] for i in rows])))["logits"]
                scores[rows] = answer_score(logits).float().cpu().numpy().reshape(len(rows), -1)
        return scores
    rows = encoder.encode(batch, candidates=candidates)
    scores = []
    for lo in range(0, len(rows["target"]), batch_size):
        part = {k: v[lo:lo + batch_size] for k, v in rows.items()}
        logits = forward(to_device(collate(part)))["logits"]
        scores.append(answer_score(logits).float().cpu().numpy())
    return np.concatenate(scores).reshape(candidates.shape)


def task_chunks(tasks, size: int):
    """Index arrays of at most `size` examples of one task, each task's examples in order, the
    tasks in a fixed order (contract.TASKS, then any other sorted): grouping by task rather
    than by consecutive runs keeps the forwards full when a batch's tasks alternate (one
    forward per example otherwise), and the fixed order has every ZeRO-3 rank switch task
    adapters at the same forward, whichever task its share starts with."""
    tasks = np.asarray(tasks, dtype=object)
    present = set(tasks.tolist())
    for task in [t for t in TASKS if t in present] + sorted(present - set(TASKS)):
        rows = np.flatnonzero(tasks == task)
        for lo in range(0, rows.size, size):
            yield rows[lo:lo + size]


def rerank(first_stage: dict, depth: int, score, batch: dict, k: int,
           exclude_per_example: list) -> np.ndarray:
    """The full-catalogue protocol for a reranker: the task's first stage retrieves
    max(k, depth) candidates, `score(batch, candidates)` orders them; the top k item ids."""
    pool = first_stage_pool(first_stage, depth, batch, k, exclude_per_example)
    return order_pool(pool, score(batch, np.where(pool >= 0, pool, 0)), k)


def first_stage_pool(first_stage: dict, depth: int, batch: dict, k: int,
                     exclude_per_example: list) -> np.ndarray:
    """The candidates [n, max(k, depth)] the task's first stage retrieves (-1: none left)."""
    return first_stage[batch["task"][0]].retrieve(batch, max(k, depth), exclude_per_example)


def first_stages(cfg, baselines: dict) -> dict:
    """task -> the first-stage scorer the config names, taken from `build_baselines`."""
    from gensr_ray.config import ConfigError

    names = {"rec": ("eval.first_stage", cfg.eval.first_stage),
             "search": ("eval.first_stage_search" if cfg.eval.first_stage_search
                        else "eval.first_stage",
                        cfg.eval.first_stage_search or cfg.eval.first_stage)}
    stage = {}
    for task, (setting, name) in names.items():
        if name == "sasrec" and name not in baselines:
            raise ConfigError(f"{setting}='sasrec': this dataset has no SASRec model; "
                              "`gensr pretrain-sasrec --data DIR` trains it")
        if name not in baselines or (task == "rec" and name == "bm25"):
            options = sorted(b for b in baselines if task == "search" or b != "bm25")
            raise ConfigError(f"{setting}={name!r} is not a {task} first stage; "
                              f"expected one of {options}")
        stage[task] = baselines[name]
    return stage
