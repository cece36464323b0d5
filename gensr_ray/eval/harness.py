"""Evaluate any scorer on a prepared dataset under both protocols; write JSON and a text table.

Sampled protocol (the paper's): rank the target among the split's stored negatives.
Full-catalogue protocol: retrieve the top K items out of the whole catalogue, skipping items the
user already interacted with in earlier splits, and look for the target.

A scorer is anything with `name`, `tasks`, and
    score(batch, candidates [n, c] int) -> scores [n, c]
    retrieve(batch, k, exclude_per_example: list[int array]) -> item ids [n, k], best first
so a model that is not an inner product (GenSR reranking retrieved candidates) plugs in beside the
baselines. `DenseScorer` adapts the inner-product baselines of `baselines.py`.

A reranker whose scoring is costly to start (GenSR on a pool of Ray workers) may instead offer
    pool(batch, k, exclude_per_example) -> candidate ids [n, m] (its first stage's, -1: none)
    score_many([(batch, candidates), ...]) -> [scores, ...]
and the harness asks it for every task's and both protocols' scores in one call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gensr_ray.data import contract
from gensr_ray.data.contract import DataError, train_item_counts
from gensr_ray.eval.metrics import (
    DEFAULT_KS,
    NO_ITEM,
    full_metrics,
    sampled_candidates,
    sampled_metrics,
    stored_ranks,
)

log = logging.getLogger(__name__)

# Examples scored per call: bounds the memory of query matrices and retrieved lists.
CHUNK = 1024
# Earlier splits whose interactions the full-catalogue protocol excludes.
_EARLIER = {"valid": ("train",), "test": ("train", "valid")}


def load_eval_examples(data_dir: Path, split: str, max_examples: int = 0,
                       seed: int = 0) -> dict[str, dict]:
    """One batch per task present in examples/<split> (tasks without examples are left out).

    max_examples > 0 keeps a seeded random subset of that many examples per task (in their
    stored order), for models too slow to score every example.
    """
    if split not in _EARLIER:
        raise ValueError(f"evaluation split must be 'valid' or 'test'; got {split!r}")
    directory = contract.examples_dir(data_dir, split)
    table = contract.read_table(
        directory,
        columns=["example_id", "user_id", "task", "query", "history", "target", "negatives"],
    )
    example_id = table.column("example_id").to_numpy().astype(np.int64)
    task = np.asarray(table.column("task").to_pylist(), dtype=object)
    user_id = table.column("user_id").to_numpy().astype(np.int64)
    query = table.column("query").to_pylist()
    history = table.column("history").to_pylist()
    target = table.column("target").to_numpy().astype(np.int64)
    negatives = table.column("negatives").to_pylist()
    batches: dict[str, dict] = {}
    for name in contract.TASKS:
        rows = np.flatnonzero(task == name)
        if rows.size == 0:
            continue
        if 0 < max_examples < rows.size:
            rng = np.random.default_rng([seed, contract.TASKS.index(name)])
            rows = np.sort(rng.choice(rows, size=max_examples, replace=False))
        # a user who touched nearly the whole catalogue has fewer negatives: padded with
        # NO_ITEM to the widest example's count (see metrics.sampled_candidates)
        width = max(len(negatives[r]) for r in rows)
        if width == 0:
            raise DataError(f"{directory}: no {name} example stores any negative")
        stored = np.full((rows.size, width), NO_ITEM, dtype=np.int64)
        for i, r in enumerate(rows):
            stored[i, :len(negatives[r])] = negatives[r]
        batches[name] = {
            "example_id": example_id[rows],
            "task": [name] * rows.size,
            "user_id": user_id[rows],
            "query": [query[r] for r in rows],
            "history": [np.asarray(history[r], dtype=np.int64) for r in rows],
            "target": target[rows],
            "negatives": stored,
        }
    unknown = set(task.tolist()) - set(contract.TASKS)
    if unknown:
        raise DataError(f"{directory}: unknown task values {sorted(unknown)}")
    return batches


def exclusions(data_dir: Path, split: str) -> dict[int, np.ndarray]:
    """Per user, the sorted item ids of their interactions in splits before `split`."""
    if split not in _EARLIER:
        raise ValueError(f"evaluation split must be 'valid' or 'test'; got {split!r}")
    table = contract.read_table(
        contract.interactions_dir(data_dir), columns=["user_id", "item_id", "split"]
    )
    earlier = np.isin(table.column("split").to_numpy(zero_copy_only=False), _EARLIER[split])
    users = table.column("user_id").to_numpy()[earlier].astype(np.int64)
    items = table.column("item_id").to_numpy()[earlier].astype(np.int64)
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    uniq, starts = np.unique(users, return_index=True)
    ends = np.r_[starts[1:], users.size]
    return {int(u): np.unique(items[s:e]) for u, s, e in zip(uniq, starts, ends)}


class DenseScorer:
    """Adapts an inner-product model (`baselines.py`) to the scorer interface."""

    def __init__(self, model, index: str = "flat", search_width: int = 64):
        self.model = model
        self.index_kind, self.search_width = index, search_width
        self.name = model.name
        self.tasks = tuple(model.tasks)
        self._items: np.ndarray | None = None
        self._index = None

    def _item_vectors(self) -> np.ndarray:
        if self._items is None:
            self._items = np.ascontiguousarray(self.model.item_vectors(), dtype=np.float32)
        return self._items

    def score(self, batch: dict, candidates: np.ndarray) -> np.ndarray:
        queries = self.model.query_vectors(batch)  # [n, d]
        items = self._item_vectors()  # [n_items, d]
        candidates = np.asarray(candidates, dtype=np.int64)
        # the candidates' vectors only (n x c x d), never the examples x catalogue scores
        return np.einsum("nd,ncd->nc", queries, items[candidates])

    def retrieve(self, batch: dict, k: int, exclude_per_example: list[np.ndarray]) -> np.ndarray:
        from gensr_ray.eval.retrieval import build_ip_index, topk_excluding

        if self._index is None:  # built once, reused for every task and chunk
            self._index = build_ip_index(self._item_vectors(), self.index_kind,
                                         self.search_width)
        return topk_excluding(self._index, self.model.query_vectors(batch), k, exclude_per_example)


class LazyScorer:
    """A scorer built on its first use: an evaluation that never asks for it (GenSR alone,
    whose first stage is another baseline) never pays for building it."""

    def __init__(self, name: str, tasks: tuple[str, ...], build):
        self.name, self.tasks, self._build, self._scorer = name, tasks, build, None

    def _get(self):
        if self._scorer is None:
            self._scorer = self._build()
        return self._scorer

    def score(self, batch: dict, candidates: np.ndarray) -> np.ndarray:
        return self._get().score(batch, candidates)

    def retrieve(self, batch: dict, k: int, exclude_per_example: list[np.ndarray]) -> np.ndarray:
        return self._get().retrieve(batch, k, exclude_per_example)


def _chunk(batch: dict, lo: int, hi: int) -> dict:
    return {key: value[lo:hi] for key, value in batch.items()}


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {key: round(float(value), 4) for key, value in metrics.items()}


def evaluate(
    data_dir: Path,
    split: str,
    scorers: dict,
    ks: Sequence[int] = DEFAULT_KS,
    full_k: int | None = None,
    max_examples: int = 0,
    seed: int = 0,
) -> dict:
    """Sampled and full-catalogue metrics of every scorer on every task it answers.

    full_k: how many items to retrieve in the full protocol (default and minimum: max(ks)).
    Returns {"split", "num_examples": {task: n}, "models": {name: {task: {"sampled": {...},
    "full": {...}}}}, "sampled_ranks": {name: {task: [rank per example]}}}, floats rounded
    to 4 decimals.
    """
    ks = tuple(sorted(set(ks)))
    full_k = max(ks) if full_k is None else full_k
    if full_k < max(ks):
        raise ValueError(f"full_k={full_k} is below the largest K {max(ks)}")
    batches = load_eval_examples(data_dir, split, max_examples, seed)
    seen = exclusions(data_dir, split)
    empty = np.zeros(0, dtype=np.int64)
    # The example's own target is never excluded: if the user met the item before (e.g. through
    # the other task), excluding it would make the example unanswerable rather than harder.
    excluded = {
        task: [
            np.setdiff1d(seen.get(int(u), empty), [t])
            for u, t in zip(batch["user_id"], batch["target"])
        ]
        for task, batch in batches.items()
    }
    results: dict = {
        "split": split,
        "subset": {"max_examples_per_task": max_examples, "seed": seed} if max_examples else None,
        "num_examples": {task: len(batches[task]["target"]) if task in batches else 0
                         for task in contract.TASKS},
        "models": {},
        # each example's 0-based sampled rank, in the stored order of the (seeded) examples:
        # what paired comparisons between models or runs resample
        "sampled_ranks": {},
    }
    for name, scorer in scorers.items():
        ranks_of = results["sampled_ranks"][name] = {}
        if hasattr(scorer, "score_many"):
            results["models"][name] = _evaluate_in_one_pass(scorer, batches, excluded, ks,
                                                            full_k, ranks_of)
            continue
        per_task: dict = {}
        for task in scorer.tasks:
            if task not in batches:
                continue
            batch = batches[task]
            n = len(batch["target"])
            ranks, retrieved = [], []
            for lo in range(0, n, CHUNK):
                part = _chunk(batch, lo, lo + CHUNK)
                candidates = sampled_candidates(part["target"], part["negatives"])
                scores = np.asarray(scorer.score(part, candidates), dtype=np.float64)
                ranks.append(stored_ranks(scores, part["negatives"]))
                retrieved.append(scorer.retrieve(part, full_k, excluded[task][lo : lo + CHUNK]))
            ranks_of[task] = np.concatenate(ranks).tolist()
            per_task[task] = {
                "sampled": _round(sampled_metrics(np.concatenate(ranks), ks)),
                "full": _round(full_metrics(np.concatenate(retrieved), batch["target"], ks)),
            }
            log.info("evaluated %s on %s/%s (%d examples)", name, split, task, n)
        results["models"][name] = per_task
    return results


def _evaluate_in_one_pass(scorer, batches: dict, excluded: dict, ks: tuple, full_k: int,
                          ranks_of: dict) -> dict:
    """Both protocols of every task through one `score_many` call: the sampled candidates
    and the first stage's pool of each task, scored together, then ranked here."""
    tasks = [task for task in scorer.tasks if task in batches]
    requests, pools = [], {}
    for task in tasks:
        batch = batches[task]
        n = len(batch["target"])
        pools[task] = np.concatenate([
            scorer.pool(_chunk(batch, lo, lo + CHUNK), full_k, excluded[task][lo:lo + CHUNK])
            for lo in range(0, n, CHUNK)])
        sampled = sampled_candidates(batch["target"], batch["negatives"])
        requests += [(batch, sampled), (batch, np.where(pools[task] >= 0, pools[task], 0))]
    scores = scorer.score_many(requests)
    per_task = {}
    for i, task in enumerate(tasks):
        ranks = stored_ranks(scores[2 * i], batches[task]["negatives"])
        ranks_of[task] = ranks.tolist()
        retrieved = order_pool(pools[task], scores[2 * i + 1], full_k)
        per_task[task] = {
            "sampled": _round(sampled_metrics(ranks, ks)),
            "full": _round(full_metrics(retrieved, batches[task]["target"], ks)),
        }
    return per_task


def order_pool(pool: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The top k of each row of `pool` by `scores`, best first; -1 entries stay last."""
    scores = np.where(pool >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(pool, order, axis=1)


def format_table(results: dict) -> str:
    """One plain-text table: a row per model, a column per task/protocol/metric at K=10 and 20
    (or at every K evaluated if neither was); '-' where a model does not answer a task."""
    present: set[int] = set()
    for per_task in results["models"].values():
        for protocols in per_task.values():
            present |= {int(key.split("@")[1]) for key in protocols["sampled"]}
    table_ks = [k for k in (10, 20) if k in present] or sorted(present)
    columns = [
        (task, protocol, metric, k)
        for task in contract.TASKS
        for protocol, metrics in (("sampled", ("HR", "NDCG")), ("full", ("Recall", "NDCG")))
        for k in table_ks
        for metric in metrics
    ]
    headers = ["model"] + [f"{t}/{p}/{m}@{k}" for t, p, m, k in columns]
    rows = []
    for name, per_task in results["models"].items():
        row = [name]
        for task, protocol, metric, k in columns:
            value = per_task.get(task, {}).get(protocol, {}).get(f"{metric}@{k}")
            row.append("-" if value is None else f"{value:.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    counts = ", ".join(f"{task} {n}" for task, n in results["num_examples"].items())
    title = f"split {results['split']} ({counts} examples"
    subset = results.get("subset")
    if subset:
        title += f"; seeded subset of at most {subset['max_examples_per_task']} per task, " \
                 f"seed {subset['seed']}"
    out = [title + ")", line(headers)]
    out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_results(results: dict, path: Path) -> None:
    """Write results as JSON, and beside it the same figures as a Markdown table (.md) and
    a CSV with a row per model and a column per task/protocol/metric (.csv); atomically."""
    from gensr_ray.atomic import atomic_open, atomic_write_text

    path = Path(path)
    with atomic_open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    columns = sorted({f"{task}/{protocol}/{metric}"
                      for per_task in results["models"].values()
                      for task, protocols in per_task.items()
                      for protocol, metrics in protocols.items() for metric in metrics},
                     key=_column_order)
    rows = [[name] + [_cell(per_task, column) for column in columns]
            for name, per_task in results["models"].items()]
    csv_text = "\n".join(",".join(row) for row in [["model", *columns], *rows]) + "\n"
    atomic_write_text(path.with_suffix(".csv"), csv_text)
    shown = [c for c in columns if c.rsplit("@", 1)[1] in ("10", "20")] or columns
    keep = [columns.index(c) + 1 for c in shown]
    lines = [f"# Evaluation: split {results['split']}", "",
             format_table(results).splitlines()[0], "",
             "| model | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
    lines += ["| " + " | ".join([row[0], *(row[i] or "-" for i in keep)]) + " |"
              for row in rows]
    if results.get("checkpoint"):
        lines += ["", f"Checkpoint: `{results['checkpoint']}`"]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")


def _cell(per_task: dict, column: str) -> str:
    task, protocol, metric = column.split("/")
    value = per_task.get(task, {}).get(protocol, {}).get(metric)
    return "" if value is None else f"{value:.4f}"


def _column_order(column: str) -> tuple:
    task, protocol, metric = column.split("/")
    name, k = metric.split("@")
    return (contract.TASKS.index(task) if task in contract.TASKS else 9, protocol != "sampled",
            int(k), name)


def build_baselines(data_dir: Path, index: str = "flat", search_width: int = 64) -> dict:
    """popularity, lightgcn, sasrec and bm25 scorers for a prepared dataset.

    index, search_width: the faiss index of the dense models' full-catalogue retrieval
    (`retrieval.build_ip_index`; eval.index, eval.index_search_width).

    LightGCN tables are read from cf/lightgcn.npz; when that file is missing they are trained
    with the default config (train split only) and saved there, so later runs reuse them.
    SASRec is read from cf/sasrec.pt, which `gensr pretrain-sasrec` writes; without it SASRec
    is left out (with a warning), never trained here.
    """
    from gensr_ray.cf.lightgcn import LightGCNConfig, load_cf, save_cf, train_lightgcn
    from gensr_ray.eval.baselines import BM25, LightGCNBaseline, Popularity
    from gensr_ray.eval.sasrec import SASRecBaseline, sasrec_path

    items = contract.read_table(contract.items_dir(data_dir), columns=["item_id", "text"])
    n_items = items.num_rows
    counts = train_item_counts(data_dir, n_items)

    path = contract.cf_path(data_dir)
    if path.is_file():
        cf = load_cf(path)
    else:
        log.info("no LightGCN tables at %s; training them now (train split only)", path)
        cf = train_lightgcn(data_dir, LightGCNConfig())
        save_cf(cf, path)
        log.info("saved LightGCN tables to %s", path)
    if cf.item_emb.shape[0] != n_items:
        raise DataError(
            f"{path}: {cf.item_emb.shape[0]} items but the items table has {n_items}; the tables "
            "belong to another dataset, delete the file to retrain"
        )
    models = [Popularity(counts), LightGCNBaseline(cf)]
    if sasrec_path(data_dir).is_file():
        models.append(SASRecBaseline(data_dir, n_items))
    else:
        log.warning("SASRec left out: no model at %s; `gensr pretrain-sasrec --data %s` "
                    "trains it", sasrec_path(data_dir), data_dir)
    scorers = {model.name: DenseScorer(model, index, search_width) for model in models}
    # an inverted index over the item texts, built when its results are first asked for
    scorers[BM25.name] = LazyScorer(BM25.name, BM25.tasks, lambda: BM25(
        [text or "" for text in items.column("text").to_pylist()]))
    return scorers
