"""Gradient conflict between the two tasks: the cosine of the search loss's gradient and the
recommendation loss's gradient on the parameters both tasks train (`gensr diagnose`, and
train.conflict_every during training).

Per parameter, each worker holds (dot, |g_search|^2, |g_rec|^2) of its gradient partition
(`parameter_sums`); the sums over workers are those of the whole gradient, so a group's cosine
is sum(dot) / sqrt(sum(|g_s|^2) * sum(|g_r|^2)) over the parameters of the group
(`group_cosines`). Groups: every shared parameter ("overall"), each module kind (attention,
MLP, LoRA A / B, the view encoders, the projection, embeddings, other), each backbone layer.
Parameters one task never uses (a task's own LoRA adapter, the discriminative twin's task
heads) have a cosine of 0 by construction: they are reported apart, and left out of every
group.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from gensr_ray.config import ConfigError
from gensr_ray.data import contract
from gensr_ray.model.gensr import SUBSPACES, gensr_loss

KINDS = ("attention", "mlp", "lora_A", "lora_B", "view encoders", "projection", "embeddings",
         "other")
_LAYER = re.compile(r"\.(?:layers|block|h)\.(\d+)\.")
_VIEWS = ("cf_encoder.", "cf_attention.", "sem_encoder.", "sem_attention.", "cf_positions.",
          "sem_positions.")


def parameter_group(name: str) -> tuple[int | None, str]:
    """(backbone layer or None, module kind) of a GenSR parameter name."""
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match and name.startswith("lm.") else None
    if ".lora_A." in name:
        return layer, "lora_A"
    if ".lora_B." in name:
        return layer, "lora_B"
    if name.startswith(_VIEWS):
        return None, "view encoders"
    if name.startswith("cf_proj."):
        return None, "projection"
    lowered = name.lower()
    if "attn" in lowered or "attention" in lowered:
        return layer, "attention"
    if "mlp" in lowered or "densereludense" in lowered:
        return layer, "mlp"
    if "embed" in lowered or "lm_head" in lowered or lowered.startswith("lm.shared."):
        return layer, "embeddings"
    return layer, "other"


def task_of(name: str, subspace: str) -> str | None:
    """The task that alone trains this parameter (a task's own LoRA adapter), "heads" for the
    discriminative twin's task heads (each task trains its own row), else None."""
    if name.startswith("task_heads."):
        return "heads"
    for task in (a for a in SUBSPACES[subspace][0] if a in ("search", "rec")):
        if f".lora_A.{task}." in name or f".lora_B.{task}." in name:
            return task
    return None


def parameter_sums(search: dict[str, torch.Tensor], rec: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """name -> float64 tensor (dot, |g_search|^2, |g_rec|^2) of two gradients (or this
    worker's partitions of them); a missing gradient counts as zeros."""
    out = {}
    for name in sorted(set(search) | set(rec)):
        s, r = search.get(name), rec.get(name)
        s = s.double().flatten() if s is not None else None
        r = r.double().flatten() if r is not None else None
        dot = (s @ r) if s is not None and r is not None else torch.zeros((), dtype=torch.float64)
        ss = (s @ s) if s is not None else torch.zeros((), dtype=torch.float64)
        rr = (r @ r) if r is not None else torch.zeros((), dtype=torch.float64)
        out[name] = torch.stack([dot, ss, rr])
    return out


def _cosine(dot: float, ss: float, rr: float) -> float | None:
    # a Python float: metrics ride in checkpoints, read back by the weights-only unpickler
    return float(dot / math.sqrt(ss * rr)) if ss > 0 and rr > 0 else None


def group_cosines(sums: dict[str, np.ndarray], subspace: str) -> dict:
    """One batch: {"overall": cos, "by_kind": {kind: cos}, "by_layer": {layer: cos},
    "task_only": {task: {"params": n, "norm": |g_task|}}} from summed (dot, ss, rr)."""
    groups: dict[str, np.ndarray] = {}
    task_only: dict[str, dict] = {}
    for name, (dot, ss, rr) in sums.items():
        task = task_of(name, subspace)
        if task is not None:
            entry = task_only.setdefault(task, {"params": 0, "sq": 0.0})
            entry["params"] += 1
            entry["sq"] += {"search": ss, "rec": rr}.get(task, ss + rr)
            continue
        layer, kind = parameter_group(name)
        keys = ["overall", f"kind:{kind}"] + ([f"layer:{layer}"] if layer is not None else [])
        for key in keys:
            groups[key] = groups.get(key, np.zeros(3)) + np.array([dot, ss, rr])
    return {
        "overall": _cosine(*groups["overall"]) if "overall" in groups else None,
        "by_kind": {k: _cosine(*groups[f"kind:{k}"]) for k in KINDS if f"kind:{k}" in groups},
        "by_layer": {int(key.split(":")[1]): _cosine(*v) for key, v in sorted(
            groups.items(), key=lambda kv: int(kv[0].split(":")[1])
            if kv[0].startswith("layer:") else -1) if key.startswith("layer:")},
        "task_only": {t: {"params": e["params"], "norm": float(math.sqrt(e["sq"]))}
                      for t, e in sorted(task_only.items())},
    }


def summarize(per_batch: list[dict]) -> dict:
    """Mean and standard deviation over batches of every group's cosine."""
    def stats(values: list[float | None]) -> dict:
        kept = [v for v in values if v is not None]
        return {"mean": float(np.mean(kept)) if kept else None,
                "std": float(np.std(kept)) if kept else None, "batches": len(kept)}

    kinds = [k for k in KINDS if any(k in b["by_kind"] for b in per_batch)]
    layers = sorted({layer for b in per_batch for layer in b["by_layer"]})
    return {
        "overall": {**stats([b["overall"] for b in per_batch]),
                    "per_batch": [b["overall"] for b in per_batch]},
        "by_kind": {k: stats([b["by_kind"].get(k) for b in per_batch]) for k in kinds},
        "by_layer": {str(layer): stats([b["by_layer"].get(layer) for b in per_batch])
                     for layer in layers},
        "task_only": per_batch[-1]["task_only"] if per_batch else {},
    }


def conflict_metrics(cosines: dict) -> dict[str, float]:
    """One batch's cosines as training metrics: conflict/overall and conflict/<kind>."""
    out = {"conflict/overall": cosines["overall"]} if cosines["overall"] is not None else {}
    out.update({f"conflict/{kind.replace(' ', '_')}": value
                for kind, value in cosines["by_kind"].items() if value is not None})
    return out


def format_table(summary: dict) -> str:
    """The summary as a text table: group, mean cosine, std over batches."""
    def cell(s: dict) -> str:
        return "-" if s["mean"] is None else f"{s['mean']:+.4f}  {s['std']:.4f}"

    lines = [f"{'group':24s} {'cosine':>7s}  {'std':>6s}",
             f"{'overall (shared)':24s} {cell(summary['overall'])}"]
    lines += [f"{'kind ' + k:24s} {cell(s)}" for k, s in summary["by_kind"].items()]
    lines += [f"{'layer ' + k:24s} {cell(s)}" for k, s in summary["by_layer"].items()]
    for task, entry in summary["task_only"].items():
        label = "task heads" if task == "heads" else f"{task}-only adapters"
        lines.append(f"{label:24s} {entry['params']} parameters, each part used by one task "
                     "only (cosine 0 by construction, left out above)")
    return "\n".join(lines)


# -- measuring on a worker group ------------------------------------------------------
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


def measure_batch(cfg, strategy, engine, encoder, collate, batch: dict) -> dict:
    """One batch's group cosines, measured by the worker group (every worker calls it): each
    worker takes its share of both tasks' examples, backpropagates the search loss, keeps its
    gradient (partition), clears it, then the same for the recommendation loss; the per
    parameter sums are added up over workers when ZeRO-3 partitions the gradients. Leaves no
    gradient behind; needs train.grad_accum 1 (each backward is a boundary)."""
    import torch.distributed as dist

    rank, world = strategy.rank, strategy.world_size
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    partitioned = cfg.scale.zero_stage == 3
    grads = {}
    for task in contract.TASKS:
        share = {k: v[rank::world] for k, v in batch[task].items()}
        rows = encoder.encode(share, negatives_per_example=cfg.train.negatives_per_example)
        inputs = strategy.to_device(collate(rows))
        loss, _ = gensr_loss(engine(inputs), inputs["label"], cfg.loss, cfg.model,
                             inputs["example_id"])
        strategy.backward(loss)
        grads[task] = _gradients(params, partitioned)
        engine.optimizer.zero_grad()
    sums = parameter_sums(grads["search"], grads["rec"])
    names = sorted(sums)
    stacked = torch.stack([sums[n] for n in names])
    if partitioned and world > 1 and dist.is_initialized():
        dist.all_reduce(stacked)  # disjoint partitions: their sums are the whole's
    return group_cosines(dict(zip(names, stacked.numpy())), cfg.model.subspace)


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


