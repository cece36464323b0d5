"""GenSR scoring on N Ray workers: each holds the model once, examples stream to them.

`DistributedGenSRScorer` offers the harness's one-pass interface (gensr_ray.eval.harness):
the sampled protocol's candidates (target and stored negatives) and the full protocol's (the
first stage's, retrieved on the driver, where the baselines' faiss indexes are) of every task
are scored in one Ray Data pipeline: the examples with their candidate lists ->
`map_batches` over a pool of `eval.num_workers` scoring actors (a callable class, each
loading the model once for the whole evaluation) -> the scores, which the driver puts back
in order.

The pool runs without Ray's actor restarts. With them (Ray Data's default), Ray core logs at
error level on the driver, in every evaluation, that a restarted actor's constructor arguments
might be gone from the object store (ray-project/ray#53727): a line that looks like a failure
when nothing is wrong. A pass that loses a worker is resumed here instead, on a fresh pool,
for the examples not yet scored (`eval.scorer_retries`).
"""

from __future__ import annotations

import logging
import sys
import warnings

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from gensr_ray.config import GenSRConfig
from gensr_ray.eval.gensr_scorer import GenSRScorer, first_stage_pool, rerank

# Examples sent to an actor per call. Every call costs the driver and Ray's own processes
# about the same CPU whatever its size (~14 ms on a 2-core machine, where that CPU is taken
# from the scorers), so calls are made large; but a pass ends with its slowest worker, so each
# worker gets about CALLS_PER_WORKER of them, which keeps the spread of the last ones small.
MIN_PER_CALL, MAX_PER_CALL, CALLS_PER_WORKER = 16, 128, 32
PAD = -1  # candidate slots beyond a request's width (item ids are >= 0)

log = logging.getLogger(__name__)


def _lost_worker_errors() -> tuple[type[Exception], ...]:
    """What a pass raises when a scoring worker's process or node is gone."""
    from ray import exceptions

    return (exceptions.RayActorError, exceptions.WorkerCrashedError,
            exceptions.NodeDiedError, exceptions.ObjectLostError)


class _ScoringActor:
    """One scoring worker: the checkpoint's model, loaded once, scoring batches of examples."""

    def __init__(self, checkpoint: str, cfg: GenSRConfig):
        import torch

        from gensr_ray.allocator import keep_freed_memory
        from gensr_ray.assemble import load_for_eval

        keep_freed_memory()  # the same activations every forward: reuse, not fresh pages
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
    actor_class = _ScoringActor  # what each worker of the pool runs

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
        # blocks of one call's examples, made here, so that the actors share the work from the
        # first call; every request's candidate lists padded to one width, since a call (Ray
        # Data bundles small blocks up to the batch size, which it requires where actors hold
        # GPUs) may span two requests
        per_call = examples_per_call(total, e.num_workers)
        width = max(np.shape(c)[1] for _, c in requests if len(c))
        blocks = []
        for r, (batch, candidates) in enumerate(requests):
            table = _table(r, batch, candidates, width)
            blocks += [table.slice(lo, per_call) for lo in range(0, len(candidates), per_call)]
        scored = [np.zeros(len(c), dtype=bool) for _, c in requests]
        # examples/s and ETA on the driver, for passes long enough to wait on
        with tqdm(total=total, unit="ex", desc=f"gensr scoring ({e.num_workers} workers)",
                  mininterval=5, disable=total < 4 * MIN_PER_CALL, file=sys.stderr) as bar:
            for attempt in range(e.scorer_retries + 1):
                try:
                    for part in self._pass(blocks, per_call).iter_batches(
                            batch_size=None, batch_format="numpy"):
                        for request in np.unique(part["request"]):
                            rows = part["request"] == request
                            positions = part["position"][rows]
                            scores = out[request]
                            scores[positions] = part["scores"][rows, :scores.shape[1]]
                            scored[request][positions] = True
                        bar.update(len(part["position"]))
                    break
                except _lost_worker_errors() as error:
                    blocks = _unscored(blocks, scored)
                    if not blocks:  # lost after it had delivered every score
                        break
                    if attempt == e.scorer_retries:
                        raise
                    log.warning("a scoring worker was lost (%s); resuming the pass on a fresh "
                                "pool for the %d examples not yet scored (retry %d of %d)",
                                type(error).__name__, sum(b.num_rows for b in blocks),
                                attempt + 1, e.scorer_retries)
        return out

    def _pass(self, blocks: list[pa.Table], per_call: int):
        """The lazy Ray Data pipeline scoring `blocks` on a fresh pool of actors."""
        import ray.data

        e = self.cfg.eval
        with warnings.catch_warnings():
            # max_restarts goes through map_batches' **ray_remote_args, which Ray 2.60 marks
            # deprecated (removed in 2.64) without another way to set it for an actor pool
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            return ray.data.from_arrow(blocks).map_batches(
                self.actor_class, batch_size=per_call, batch_format="numpy",
                fn_constructor_kwargs={"checkpoint": self.checkpoint, "cfg": self.cfg},
                compute=ray.data.ActorPoolStrategy(size=e.num_workers),
                num_cpus=e.cpus_per_worker, num_gpus=1 if e.use_gpu else 0, max_restarts=0)


def examples_per_call(total: int, workers: int) -> int:
    """Examples per actor call in a pass of `total` examples over `workers` actors."""
    return int(np.clip(-(-total // (max(1, workers) * CALLS_PER_WORKER)),
                       MIN_PER_CALL, MAX_PER_CALL))


def _unscored(blocks: list[pa.Table], scored: list[np.ndarray]) -> list[pa.Table]:
    """The rows of `blocks` (each a slice of one request) not marked in `scored`."""
    left = []
    for block in blocks:
        keep = ~scored[block["request"][0].as_py()][block["position"].to_numpy()]
        if keep.any():
            left.append(block.filter(pa.array(keep)))
    return left


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
