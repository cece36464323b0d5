"""The model part of a checkpoint: its layout, its writer and readers (gensr_ray.assemble
rebuilds the model from it).

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

from gensr_ray import storage
from gensr_ray.atomic import atomic_open, atomic_write_text
from gensr_ray.config import GenSRConfig, from_dict

TRAINABLE = "trainable.pt"
SUMMARY = "train_summary.json"  # in a `gensr train --out` directory: the final checkpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, or holding what a safe loader
    refuses. The message names the file."""


def write_model_export(directory: Path, weights: dict[str, torch.Tensor], cfg: GenSRConfig,
                       state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_open(directory / TRAINABLE, "wb") as f:
        torch.save(weights, f)
    atomic_write_text(directory / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(directory / "state.json", json.dumps(state, indent=2, default=float) + "\n")


def model_dir(checkpoint: str | Path) -> Path:
    """The local directory of a checkpoint's model export.

    Accepts a checkpoint directory, its model/ subdirectory, or a `gensr train --out`
    directory (its final checkpoint, from train_summary.json), each local or a URI (s3://,
    gs://): from object storage only the model export is copied, once, into this node's
    cache (checkpoint directories are never rewritten)."""
    path = str(checkpoint)
    summary = storage.join(path, SUMMARY)
    if storage.exists(summary):
        final = json.loads(storage.read_text(summary))["checkpoint"]
        # relative to the run directory, so a copied or moved run evaluates its own checkpoint
        path = final if storage.is_uri(final) or Path(final).is_absolute() \
            else storage.join(path, final)
    for candidate in (storage.join(path, "model"), path):
        if storage.exists(storage.join(candidate, TRAINABLE)):
            return storage.local_dir(candidate)
    raise FileNotFoundError(f"{checkpoint}: not a gensr checkpoint (no model/{TRAINABLE})")


def read_checkpoint_config(checkpoint: str | Path) -> GenSRConfig:
    return from_dict(yaml.safe_load((model_dir(checkpoint) / "config.yaml").read_text()))
