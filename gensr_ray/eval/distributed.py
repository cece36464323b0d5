"""GenSR scoring on N Ray workers: each holds the model once, examples stream to them.

`DistributedGenSRScorer` offers the harness's one-pass interface (gensr_ray.eval.harness):
the sampled protocol's candidates (target and stored negatives) and the full protocol's (the
first stage's, retrieved on the driver, where the baselines' faiss indexes are) of every task
are scored in one Ray Data pipeline: the examples with their candidate lists ->
`map_batches` over a pool of `eval.num_workers` scoring actors (a callable class, each
loading the model once for the whole evaluation) -> the scores, which the driver puts back
in order.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from gensr_ray.config import GenSRConfig
from gensr_ray.eval.gensr_scorer import GenSRScorer, first_stage_pool, rerank

# examples per task sent to an actor at a time: large enough to keep it busy between calls,
# small enough that N actors share a few thousand examples evenly
EXAMPLES_PER_CALL = 16
PAD = -1  # candidate slots beyond a request's width (item ids are >= 0)


class _ScoringActor:
    """One scoring worker: the checkpoint's model, loaded once, scoring batches of examples."""

    def __init__(self, checkpoint: str, cfg: GenSRConfig):
        import torch

        from gensr_ray.assemble import load_for_eval

        torch.set_num_threads(max(1, int(cfg.eval.cpus_per_worker)))
        model, backbone, cfg = load_for_eval(checkpoint, cfg)
        self.scorer = GenSRScorer(model, backbone, cfg, {}, depth=0,
                                  batch_size=cfg.eval.batch_size)

    def __call__(self, batch: dict) -> dict:
        # a batch may span two requests, whose candidate lists differ in width: each is
        # scored at its own width, the scores padded back to the common one with NaN
        candidates = np.stack([np.asarray(c, dtype=np.int64) for c in batch["candidates"]])
        scores = np.full(candidates.shape, np.nan, dtype=np.float32)
        for request in np.unique(batch["request"]):
            rows = np.flatnonzero(batch["request"] == request)
            width = int((candidates[rows[0]] != PAD).sum())
            examples = {"task": [batch["task"][i] for i in rows],
                        "query": [batch["query"][i] for i in rows],
                        "history": [np.asarray(batch["history"][i], dtype=np.int64)
                                    for i in rows]}
            scores[rows, :width] = self.scorer.score(examples, candidates[rows, :width])
        return {"request": batch["request"], "position": batch["position"], "scores": scores}


class DistributedGenSRScorer:
    """The harness scorer for GenSR, scoring on a pool of Ray actors."""

    name = "gensr"
    tasks = ("search", "rec")

    def __init__(self, checkpoint: str, cfg: GenSRConfig, first_stage: dict):
        self.checkpoint = str(checkpoint)
        self.cfg = cfg
        self.first_stage = first_stage  # task -> a harness scorer with retrieve()
        self.depth = cfg.eval.rerank_depth

    def pool(self, batch: dict, k: int, exclude_per_example: list) -> np.ndarray:
        return first_stage_pool(self.first_stage, self.depth, batch, k, exclude_per_example)

    def score(self, batch: dict, candidates: np.ndarray) -> np.ndarray:
        return self.score_many([(batch, candidates)])[0]

    def retrieve(self, batch: dict, k: int, exclude_per_example: list) -> np.ndarray:
        return rerank(self.first_stage, self.depth, self.score, batch, k, exclude_per_example)

    def score_many(self, requests: list[tuple[dict, np.ndarray]]) -> list[np.ndarray]:
        """Scores of each (examples, candidates [n, c]) request, in one pass over the pool."""
        import ray.data

        e = self.cfg.eval
        out = [np.empty(np.shape(c), dtype=np.float32) for _, c in requests]
        total = sum(len(c) for _, c in requests)
        if total == 0:
            return out
        context = ray.data.DataContext.get_current()  # the bar below replaces Ray Data's logs
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        # blocks of EXAMPLES_PER_CALL examples, made here, so that the actors share the work
        # from the first call; every request's candidate lists padded to one width, since a
        # call (Ray Data bundles small blocks up to the batch size, which it requires where
        # actors hold GPUs) may span two requests
        width = max(np.shape(c)[1] for _, c in requests if len(c))
        blocks = []
        for r, (batch, candidates) in enumerate(requests):
            table = _table(r, batch, candidates, width)
            blocks += [table.slice(lo, EXAMPLES_PER_CALL)
                       for lo in range(0, len(candidates), EXAMPLES_PER_CALL)]
        scored = ray.data.from_arrow(blocks).map_batches(
            _ScoringActor, batch_size=EXAMPLES_PER_CALL, batch_format="numpy",
            fn_constructor_kwargs={"checkpoint": self.checkpoint, "cfg": self.cfg},
            compute=ray.data.ActorPoolStrategy(size=e.num_workers),
            num_cpus=e.cpus_per_worker, num_gpus=1 if e.use_gpu else 0)
        # examples/s and ETA on the driver, for passes long enough to wait on
        with tqdm(total=total, unit="ex", desc=f"gensr scoring ({e.num_workers} workers)",
                  mininterval=5, disable=total < 4 * EXAMPLES_PER_CALL, file=sys.stderr) as bar:
            for part in scored.iter_batches(batch_size=None, batch_format="numpy"):
                for request in np.unique(part["request"]):
                    rows = part["request"] == request
                    scores = out[request]
                    scores[part["position"][rows]] = part["scores"][rows, :scores.shape[1]]
                bar.update(len(part["position"]))
        return out


def _table(request: int, batch: dict, candidates: np.ndarray, width: int) -> pa.Table:
    n = len(candidates)
    padded = np.full((n, width), PAD, dtype=np.int64)
    padded[:, :np.shape(candidates)[1]] = candidates
    return pa.table({
        "request": pa.array(np.full(n, request), pa.int64()),
        "position": pa.array(np.arange(n), pa.int64()),
        "task": pa.array(list(batch["task"]), pa.string()),
        "query": pa.array(list(batch["query"]), pa.string()),
        "history": pa.array([np.asarray(h).tolist() for h in batch["history"]],
                            pa.list_(pa.int64())),
        "candidates": pa.array(padded.tolist(), pa.list_(pa.int64())),
    })
