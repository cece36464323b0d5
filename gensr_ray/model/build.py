"""Assemble GenSR and its input pipeline from a config: the one place that wires them."""

from __future__ import annotations

from pathlib import Path

import torch

from gensr_ray.config import GenSRConfig
from gensr_ray.data import contract
from gensr_ray.model.backbone import Backbone, load_backbone, resolve_backbone
from gensr_ray.model.features import Collator, ExampleEncoder, ItemTokens, tokenize_titles
from gensr_ray.model.gensr import GenSR, apply_subspace
from gensr_ray.model.prompts import all_template_text


def vocabulary_texts(data_path: str | Path) -> list[str]:
    """Every text a prompt can contain: item titles and texts, queries, templates."""
    items = contract.read_table(contract.items_dir(data_path), ["title", "text"])
    queries = contract.read_table(contract.interactions_dir(data_path), ["query"])
    texts = items.column("title").to_pylist() + items.column("text").to_pylist()
    texts += sorted({q for q in queries.column("query").to_pylist() if q})
    return texts + all_template_text()


def resolve_config_backbone(cfg: GenSRConfig) -> str:
    """The backbone as a local directory (presets are materialised once into the cache)."""
    spec = cfg.model.backbone
    from gensr_ray.model.backbone import RANDOM_PRESETS

    random_preset = spec.removeprefix("preset:") in RANDOM_PRESETS
    texts = vocabulary_texts(cfg.data.path) if random_preset else None
    return str(resolve_backbone(spec, texts))


def build_model(cfg: GenSRConfig, backbone_dir: str) -> tuple[GenSR, Backbone]:
    """Backbone with its subspace (LoRA adapters or full) + the GenSR modules, seeded."""
    from gensr_ray.cf.lightgcn import load_cf

    torch.manual_seed(cfg.train.seed)
    backbone = load_backbone(backbone_dir)
    apply_subspace(backbone.model, cfg.model)
    cf = load_cf(contract.cf_path(cfg.data.path))
    model = GenSR(backbone.model, backbone.kind, torch.from_numpy(cf.item_emb), cfg.model,
                  backbone.yes_id, backbone.no_id)
    return model, backbone


def item_tokens(cfg: GenSRConfig, tokenizer) -> ItemTokens:
    titles = contract.read_table(contract.items_dir(cfg.data.path), ["title"])
    return tokenize_titles(tokenizer, titles.column("title").to_pylist(),
                           cfg.data.prompt_title_tokens, cfg.data.title_tokens,
                           cfg.data.target_title_tokens)


def build_features(cfg: GenSRConfig, tokenizer, kind: str) -> tuple[ExampleEncoder, Collator]:
    items = item_tokens(cfg, tokenizer)
    encoder = ExampleEncoder(tokenizer, items, cfg.model.prompt, cfg.model.query_in_prompt,
                             append_eos=(kind == "encoder-decoder"))
    return encoder, Collator(items, tokenizer.pad_token_id)
