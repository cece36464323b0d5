"""Shared set-up for the benchmarks: a prepared dataset to run on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}


def bench_data(path: str | None, n_users: int = 200, n_items: int = 400,
               out: Path | None = None) -> Path:
    """`path` if given, else a synthetic dataset (with LightGCN tables) at `out` or in a temp
    dir."""
    if path:
        return Path(path)
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
    from gensr_ray.data import contract
    from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
    from gensr_ray.data.writer import write_dataset

    out = out or Path(tempfile.mkdtemp(prefix="gensr-bench-")) / "data"
    raw = generate_synthetic(SyntheticOptions(seed=0, n_users=n_users, n_items=n_items,
                                              events_per_user=30))
    write_dataset(raw, out, after_build=lambda d: save_cf(
        train_lightgcn(d, LightGCNConfig(epochs=10)), contract.cf_path(d)))
    return out


def backbone_shape(cfg) -> dict:
    """Non-embedding parameters of the backbone and its mean tokens per pointwise row.

    Only the prompt's tokens (the four soft tokens included) go through the backbone; the
    semantic view's title tokens go through GenSR's 1-layer encoder, not the backbone, and
    are not counted."""
    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.data import contract
    from gensr_ray.inputs.build import build_features

    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    embedding = model.lm.get_input_embeddings().weight.numel()
    params = sum(p.numel() for n, p in model.lm.named_parameters() if "lora_" not in n)
    encoder, _ = build_features(cfg, backbone.tokenizer, backbone.kind)
    sample = contract.read_table(contract.examples_dir(cfg.data.path, "train")).slice(0, 64)
    rows = encoder.encode(sample.to_pydict(),
                          negatives_per_example=cfg.train.negatives_per_example)
    tokens = sum(len(p) for p in rows["prompt_ids"]) / len(rows["prompt_ids"])
    # tied LM head: its matrix is the embedding's, counted once and left out as an embedding
    return {"params": params - embedding, "tokens_per_row": tokens}


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def reports(cfg, run: Path) -> list[dict]:
    """Every metrics row Ray Train reported for a `gensr train --out run` directory."""
    import json

    from gensr_ray.train.launch import run_location

    path = Path(run_location(cfg, run).metrics)
    return [json.loads(line) for line in path.read_text().splitlines()]


def quiet() -> None:
    import logging
    import warnings

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
