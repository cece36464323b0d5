"""`gensr diagnose`: the gradient conflict between search and recommendation of a checkpoint,
measured by the training stack itself (Ray Train workers, the DeepSpeed engine, ZeRO-3).

On M seeded batches of training examples (B of each task, shared out over the workers),
each worker backpropagates the search loss, keeps its partition of the gradient, clears it,
then does the same for the recommendation loss; per parameter it sums the dot product and the
squared norms of its partitions, and the sums are added up over workers (ZeRO-3 partitions
are disjoint; below stage 3 every worker holds the whole, averaged gradient). The cosines
per group (gensr_ray.train.conflict) are written to <out>/conflict.json and conflict.png and
printed as a table.

The losses are the training losses of each task's rows. The contrastive term (InfoNCE) takes
its negatives from the other rows of a worker's batch, as in training: with it, the figures
depend on how a batch is shared out; without it (loss.contrastive_weight 0) any number of
workers measures the same gradients.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from gensr_ray import storage
from gensr_ray.assemble import build_model, resolve_config_backbone
from gensr_ray.checkpoint import (
    load_trainable,
    read_checkpoint_config,
    read_vocabulary,
    resolve_checkpoint,
)
from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides
from gensr_ray.inputs.build import build_features
from gensr_ray.ray_init import ensure_ray, object_store_bytes
from gensr_ray.train.conflict import measure_batch, seeded_batches, summarize
from gensr_ray.train.strategy import Strategy, configure_accelerator


def diagnose_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg: GenSRConfig = config["cfg"]
    strategy = Strategy(cfg)
    words = read_vocabulary(config["checkpoint"])  # a random preset as it was trained
    model, backbone = build_model(cfg, resolve_config_backbone(cfg, words))
    model.load_state_dict(load_trainable(config["checkpoint"]), strict=False)
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    engine = strategy.prepare(model)
    engine.eval()  # no dropout: the same gradients whatever the number of workers
    rank = strategy.rank
    per_batch = [measure_batch(cfg, strategy, engine, encoder, collate, batch)
                 for batch in seeded_batches(cfg.data.path, config["batches"],
                                             config["per_task"], config["seed"])]
    # the summary travels as a checkpoint (Ray Train keeps metrics only with one), from rank
    # 0 to the run's storage, wherever rank 0 runs
    if rank != 0:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "conflict.json").write_text(json.dumps(summarize(per_batch)))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_diagnosis(checkpoint: str, out: Path, batches: int = 8, per_task: int = 16,
                  seed: int = 0, workers: int | None = None, which: str = "best") -> dict:
    """Diagnose `checkpoint` on a worker group; writes conflict.json and conflict.png into
    `out`, returns the summary. `per_task` is rounded down to a multiple of the workers, so
    that every worker holds an equal share (DeepSpeed averages the workers' gradients)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # absolute paths: the workers do not run in this process's directory
    path = storage.absolute(resolve_checkpoint(checkpoint, which))
    cfg = read_checkpoint_config(path)
    cfg.data.path = storage.absolute(cfg.data.path)
    if workers is not None:
        cfg = apply_overrides(cfg, {"scale.num_workers": workers})
    world = max(1, cfg.scale.num_workers)
    if batches < 1 or per_task < world:
        raise ConfigError(f"--batches {batches} and --examples {per_task} (per task and batch) "
                          f"must be >= 1 and >= the {world} workers")
    per_task -= per_task % world
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configure_accelerator(cfg.scale.use_gpu)
    ensure_ray(object_store_memory=object_store_bytes(cfg.scale.object_store_gb))
    s = cfg.scale
    trainer = TorchTrainer(
        diagnose_loop_per_worker,
        train_loop_config={"cfg": cfg, "checkpoint": path, "batches": batches,
                           "per_task": per_task, "seed": seed},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker,
                                                           **({"GPU": 1} if s.use_gpu else {})}),
        run_config=RunConfig(name="diagnose", storage_path=str((out / "ray").resolve())))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        measured = json.loads((Path(directory) / "conflict.json").read_text())
    summary = {"checkpoint": str(path), "subspace": cfg.model.subspace,
               "backbone": cfg.model.backbone, "batches": batches,
               "examples_per_task": per_task, "workers": world, "seed": seed, **measured}
    (out / "conflict.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_conflict(summary, out / "conflict.png")
    return summary


def plot_conflict(summary: dict, path: Path) -> None:
    """Cosine per backbone layer (mean and spread over batches), the overall figure dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [(int(k), v) for k, v in summary["by_layer"].items() if v["mean"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    if layers:
        ax.errorbar([k for k, _ in layers], [v["mean"] for _, v in layers],
                    yerr=[v["std"] for _, v in layers], marker="o", capsize=3,
                    label="per layer (mean ± std over batches)")
    overall = summary["overall"]["mean"]
    if overall is not None:
        ax.axhline(overall, linestyle="--", color="grey", label=f"all shared: {overall:+.3f}")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("backbone layer")
    ax.set_ylabel("cos(grad search, grad rec)")
    ax.set_title(f"gradient conflict: {summary['subspace']}, {summary['batches']} batches")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
