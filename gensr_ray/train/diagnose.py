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

import numpy as np

from gensr_ray.assemble import build_model, resolve_config_backbone
from gensr_ray.checkpoint import load_trainable, read_checkpoint_config, resolve_checkpoint
from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.inputs.build import build_features
from gensr_ray.model.gensr import gensr_loss
from gensr_ray.ray_init import ensure_ray, object_store_bytes
from gensr_ray.train.conflict import format_table, group_cosines, parameter_sums, summarize
from gensr_ray.train.strategy import Strategy, configure_accelerator

COLUMNS = ["example_id", "task", "query", "history", "target", "negatives"]


def seeded_batches(data_dir: str, batches: int, per_task: int, seed: int) -> list[dict]:
    """`batches` dicts {task: example columns} of `per_task` training examples of each task,
    drawn without replacement (with replacement when a task has fewer examples)."""
    table = contract.read_table(contract.examples_dir(contract.local_root(data_dir), "train"),
                                columns=COLUMNS)
    tasks = np.asarray(table.column("task").to_pylist(), dtype=object)
    out: list[dict] = [{} for _ in range(batches)]
    for t, task in enumerate(contract.TASKS):
        rows = np.flatnonzero(tasks == task)
        if rows.size == 0:
            raise ConfigError(f"{data_dir}: no {task} training examples to diagnose with")
        rng = np.random.default_rng([seed, t])
        need = batches * per_task
        chosen = rng.choice(rows, size=need, replace=need > rows.size)
        for b in range(batches):
            out[b][task] = table.take(chosen[b * per_task:(b + 1) * per_task]).to_pydict()
    return out


def diagnose_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    cfg: GenSRConfig = config["cfg"]
    strategy = Strategy(cfg)
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    model.load_state_dict(load_trainable(config["checkpoint"]), strict=False)
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    engine = strategy.prepare(model)
    engine.eval()  # no dropout: the same gradients whatever the number of workers
    rank, world = strategy.rank, strategy.world_size
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    partitioned = cfg.scale.zero_stage == 3
    per_batch = []
    for batch in seeded_batches(cfg.data.path, config["batches"], config["per_task"],
                                config["seed"]):
        grads = {}
        for task in contract.TASKS:
            share = {k: v[rank::world] for k, v in batch[task].items()}
            rows = encoder.encode(share, negatives_per_example=cfg.train.negatives_per_example)
            inputs = strategy.to_device(collate(rows))
            loss, _ = gensr_loss(engine(inputs), inputs["label"], cfg.loss, cfg.model)
            strategy.backward(loss)
            grads[task] = _gradients(params, partitioned)
            engine.optimizer.zero_grad()
        sums = parameter_sums(grads["search"], grads["rec"])
        names = sorted(sums)
        stacked = torch.stack([sums[n] for n in names])
        if partitioned and world > 1 and dist.is_initialized():
            dist.all_reduce(stacked)  # disjoint partitions: their sums are the whole's
        per_batch.append(group_cosines(dict(zip(names, stacked.numpy())), cfg.model.subspace))
    # the summary travels as a checkpoint (Ray Train keeps metrics only with one), from rank
    # 0 to the run's storage, wherever rank 0 runs
    if rank != 0:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "conflict.json").write_text(json.dumps(summarize(per_batch)))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _gradients(params, partitioned: bool) -> dict:
    """This worker's gradient of each trainable parameter: its ZeRO-3 partition, or the
    whole (averaged) gradient below stage 3."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    out = {}
    for name, p in params:
        grad = safe_get_local_grad(p) if partitioned else safe_get_full_grad(p)
        if grad is not None:
            out[name] = grad.detach().double().cpu().clone()
    return out


def run_diagnosis(checkpoint: str, out: Path, batches: int = 8, per_task: int = 16,
                  seed: int = 0, workers: int | None = None, which: str = "best") -> dict:
    """Diagnose `checkpoint` on a worker group; writes conflict.json and conflict.png into
    `out`, returns the summary. `per_task` is rounded down to a multiple of the workers, so
    that every worker holds an equal share (DeepSpeed averages the workers' gradients)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path = resolve_checkpoint(checkpoint, which)
    cfg = read_checkpoint_config(path)
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


def print_summary(summary: dict) -> None:
    print(format_table(summary))
