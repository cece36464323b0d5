"""Assemble GenSR from a config: the backbone directory, the model with its subspace and frozen
LightGCN table, and the same model rebuilt from a checkpoint for evaluation.

The one module that wires the plain-torch model to files (the dataset, the CF tables, the
backbone cache, checkpoints); `gensr_ray.model` itself reads none.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gensr_ray.checkpoint import load_trainable, read_checkpoint_config, read_vocabulary
from gensr_ray.config import ConfigError, GenSRConfig
from gensr_ray.data import contract
from gensr_ray.inputs.build import vocabulary_texts
from gensr_ray.model.backbone import (
    RANDOM_PRESETS,
    Backbone,
    load_backbone,
    preset_words,
    resolve_backbone,
)
from gensr_ray.model.gensr import GenSR, apply_subspace


def resolve_config_backbone(cfg: GenSRConfig, words: list[str] | None = None) -> str:
    """The backbone as a local directory (presets are materialised once into the cache).

    Random presets build their vocabulary from the dataset's texts and the prompt templates,
    or take `words` (a checkpoint's record: see `preset_vocabulary`)."""
    if not is_random_preset(cfg):
        return str(resolve_backbone(cfg.model.backbone))
    texts = None if words is not None else vocabulary_texts(
        cfg.data.path, cfg.data.item_noun, cfg.data.item_noun_plural)
    return str(resolve_backbone(cfg.model.backbone, texts, words))


def is_random_preset(cfg: GenSRConfig) -> bool:
    """A preset whose weights are drawn at random from a seed and the dataset's words."""
    return cfg.model.backbone.removeprefix("preset:") in RANDOM_PRESETS


def preset_vocabulary(cfg: GenSRConfig, backbone_dir: str) -> list[str] | None:
    """What a checkpoint records of its backbone: a random preset's words (its weights are
    drawn from them and a seed, and stored nowhere), so that a template or data edit since
    does not give the checkpoint other base weights; None for every other backbone."""
    return preset_words(backbone_dir) if is_random_preset(cfg) else None


def build_model(cfg: GenSRConfig, backbone_dir: str) -> tuple[GenSR, Backbone]:
    """Backbone with its subspace (LoRA adapters or full) + the GenSR modules, seeded."""
    from gensr_ray.cf.lightgcn import load_cf

    torch.manual_seed(cfg.train.seed)
    backbone = load_backbone(backbone_dir, cfg.model.attn_implementation)
    if cfg.scale.precision == "fp16" and backbone.kind == "encoder-decoder":
        # T5's feed-forward activations overflow fp16 (its own docs say so); bf16 is safe
        raise ConfigError(f"scale.precision=fp16 is not supported for the encoder-decoder "
                          f"backbone {backbone_dir}; use bf16")
    if cfg.model.gradient_checkpointing:
        # non-reentrant: works with inputs_embeds, frozen embeddings (LoRA) and ZeRO-3 hooks
        backbone.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_subspace(backbone.model, cfg.model)
    root = contract.local_root(cfg.data.path)
    cf = load_cf(contract.cf_path(root))
    counts = None
    if cfg.model.item_popularity:  # the train split's counts, as the popularity baseline's
        counts = torch.from_numpy(contract.train_item_counts(root, cf.item_emb.shape[0]))
    model = GenSR(backbone.model, backbone.kind, torch.from_numpy(cf.item_emb), cfg.model,
                  backbone.yes_id, backbone.no_id, item_counts=counts)
    return model, backbone


def load_for_eval(checkpoint: str | Path, cfg: GenSRConfig | None = None):
    """(model in eval mode, backbone, config) rebuilt from a checkpoint on the CPU."""
    cfg = cfg or read_checkpoint_config(checkpoint)
    model, backbone = build_model(cfg, resolve_config_backbone(cfg, read_vocabulary(checkpoint)))
    weights = load_trainable(checkpoint)
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
