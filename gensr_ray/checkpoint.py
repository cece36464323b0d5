"""The model part of a checkpoint: what evaluation loads, without DeepSpeed.

    <checkpoint>/model/trainable.pt   every trainable tensor by name (LoRA adapters, the GenSR
                                      modules; the whole backbone under full fine-tuning)
    <checkpoint>/model/config.yaml    the run's full config
    <checkpoint>/model/state.json     step, epoch and the metrics at save time
    <checkpoint>/deepspeed/           engine state for resuming (optimizer, scheduler, step)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from gensr_ray.atomic import atomic_open
from gensr_ray.config import GenSRConfig, from_dict

TRAINABLE = "trainable.pt"


def write_model_export(directory: Path, weights: dict[str, torch.Tensor], cfg: GenSRConfig,
                       state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_open(directory / TRAINABLE, "wb") as f:
        torch.save(weights, f)
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (directory / "state.json").write_text(json.dumps(state, indent=2, default=float) + "\n")


def model_dir(checkpoint: str | Path) -> Path:
    """Accept a checkpoint directory, its model/ subdirectory, or a `gensr train --out`
    directory (its final checkpoint, from train_summary.json)."""
    path = Path(checkpoint)
    if (path / "train_summary.json").is_file():
        path = Path(json.loads((path / "train_summary.json").read_text())["checkpoint"])
    if (path / "model" / TRAINABLE).is_file():
        return path / "model"
    if (path / TRAINABLE).is_file():
        return path
    raise FileNotFoundError(f"{checkpoint}: not a gensr checkpoint (no model/{TRAINABLE})")


def read_checkpoint_config(checkpoint: str | Path) -> GenSRConfig:
    return from_dict(yaml.safe_load((model_dir(checkpoint) / "config.yaml").read_text()))


def load_for_eval(checkpoint: str | Path, cfg: GenSRConfig | None = None):
    """(model in eval mode, backbone, config) rebuilt from a checkpoint on the CPU."""
    from gensr_ray.model.build import build_model, resolve_config_backbone

    cfg = cfg or read_checkpoint_config(checkpoint)
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    weights = torch.load(model_dir(checkpoint) / TRAINABLE, map_location="cpu", weights_only=True)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: checkpoint does not match the model built from its "
                         f"config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    empty = [n for n, w in weights.items() if w.numel() == 0]
    if empty:
        raise ValueError(f"{checkpoint}: empty tensors {empty[:5]} (saved without gathering)")
    model.load_state_dict(weights, strict=False)
    model.eval()
    return model, backbone, cfg
