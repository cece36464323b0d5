"""Evaluate a checkpoint and/or the baselines on a split: the one place that does it, for
`gensr eval`, the Ray eval job and every Tune trial."""

from __future__ import annotations

from pathlib import Path

from gensr_ray.assemble import load_for_eval
from gensr_ray.checkpoint import (
    check_same_data,
    read_checkpoint_config,
    read_state,
    resolve_checkpoint,
)
from gensr_ray.config import GenSRConfig, apply_overrides
from gensr_ray.data.contract import local_root
from gensr_ray.data.validate import validate_dataset
from gensr_ray.eval.distributed import DistributedGenSRScorer
from gensr_ray.eval.gensr_scorer import GenSRScorer, first_stages
from gensr_ray.eval.harness import build_baselines, evaluate


def evaluate_run(checkpoint: str | Path | None = None, data: str | Path | None = None,
                 split: str | None = None, with_baselines: bool = False,
                 max_examples: int | None = None, cfg: GenSRConfig | None = None,
                 allow_data_change: bool = False, which: str = "best") -> dict:
    """The harness's results for GenSR from `checkpoint` (if given) and, with
    `with_baselines`, every baseline, side by side on the same examples.

    `cfg` defaults to the checkpoint's own config; `data` to its dataset; `split` to its
    eval.split (test without a checkpoint); `max_examples` to its eval.max_examples. A
    checkpoint trained on other data than `data` is refused unless `allow_data_change` (or
    the config's data.allow_change). A `gensr train --out` directory stands for its best
    checkpoint, or its last with `which="last"` (`resolve_checkpoint`).
    """
    if checkpoint is None and not with_baselines:
        raise ValueError("nothing to evaluate: give a checkpoint and/or with_baselines")
    if checkpoint is not None:  # a run directory names its best or its last checkpoint
        checkpoint = resolve_checkpoint(checkpoint, which)
    if checkpoint is not None and cfg is None:
        cfg = read_checkpoint_config(checkpoint)
    data = data or (cfg.data.path if cfg else None)
    if data is None:
        raise ValueError("the dataset is required to evaluate the baselines alone")
    fingerprint = validate_dataset(data)  # the whole contract, before any work
    if checkpoint is not None and not (allow_data_change or cfg.data.allow_change):
        check_same_data(read_state(checkpoint).get("data"), fingerprint,
                        f"checkpoint {checkpoint}")
    source, data = data, local_root(data)  # this node's copy of a dataset given as a URI
    baselines = build_baselines(data, *((cfg.eval.index, cfg.eval.index_search_width) if cfg
                                        else ()))
    scorers = dict(baselines) if with_baselines else {}
    seed = 0
    if checkpoint is not None:
        cfg.data.path = str(data)
        stages = first_stages(cfg, baselines)
        if cfg.eval.num_workers > 0:  # N Ray workers, each loading the checkpoint itself
            from gensr_ray.ray_init import ensure_ray, object_store_bytes

            ensure_ray(object_store_memory=object_store_bytes(cfg.scale.object_store_gb))
            # workers read the dataset where it lies (their own mirror of a URI)
            scorers["gensr"] = DistributedGenSRScorer(
                checkpoint, apply_overrides(cfg, {"data.path": str(source)}), stages)
        else:
            from gensr_ray.allocator import keep_freed_memory

            keep_freed_memory()  # as a scoring worker does
            model, backbone, cfg = load_for_eval(checkpoint, cfg)
            scorers["gensr"] = GenSRScorer(model, backbone, cfg, stages, cfg.eval.rerank_depth,
                                           cfg.eval.batch_size)
        max_examples = cfg.eval.max_examples if max_examples is None else max_examples
        seed = cfg.eval.seed
    results = evaluate(data, split or (cfg.eval.split if checkpoint is not None else "test"),
                       scorers, max_examples=max_examples or 0, seed=seed)
    if checkpoint is not None:
        results["checkpoint"] = str(checkpoint)
    return results
