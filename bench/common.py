"""Shared set-up for the benchmarks: a prepared dataset to run on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def bench_data(path: str | None, n_users: int = 200, n_items: int = 400) -> Path:
    """`path` if given, else a synthetic dataset (with LightGCN tables) in a temp dir."""
    if path:
        return Path(path)
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
    from gensr_ray.data import contract
    from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
    from gensr_ray.data.writer import write_dataset

    out = Path(tempfile.mkdtemp(prefix="gensr-bench-")) / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=0, n_users=n_users, n_items=n_items, events_per_user=30)),
                  out, after_build=lambda d: save_cf(train_lightgcn(d, LightGCNConfig(epochs=10)),
                                                     contract.cf_path(d)))
    return out


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
