"""Gradient conflict between the two tasks: the cosine of the search loss's gradient and the
recommendation loss's gradient on the parameters both tasks train.

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

from gensr_ray.model.gensr import SUBSPACES

KINDS = ("attention", "mlp", "lora_A", "lora_B", "view encoders", "projection", "embeddings",
         "other")
_LAYER = re.compile(r"\.(?:layers|block|h)\.(\d+)\.")
_VIEWS = ("cf_encoder.", "cf_attention.", "sem_encoder.", "sem_attention.")


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
    return dot / math.sqrt(ss * rr) if ss > 0 and rr > 0 else None


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
        "task_only": {t: {"params": e["params"], "norm": math.sqrt(e["sq"])}
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
