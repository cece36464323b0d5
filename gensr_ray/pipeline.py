"""The pipeline's steps as library functions: the CLI, the Ray jobs, Tune trials and tests
call these."""

from __future__ import annotations

import time
from pathlib import Path


def prepare_dataset(dataset: str, out: Path, seed: int = 42, source: Path | None = None,
                    search_fraction: float | None = None, rows_per_shard: int = 8192,
                    with_cf: bool = True, overwrite: bool = False) -> dict:
    """Build a dataset in the contract (+ its LightGCN tables); prints a summary."""
    from gensr_ray.data.build import WriteOptions, write_dataset

    started = time.perf_counter()
    if dataset == "ml100k":
        from gensr_ray.data.movielens import SEARCH_FRACTION, load_ml100k

        fraction = SEARCH_FRACTION if search_fraction is None else search_fraction
        raw = load_ml100k(source, seed=seed, search_fraction=fraction)
    elif dataset == "synthetic":
        from gensr_ray.data.synthetic import generate_synthetic

        kwargs = {} if search_fraction is None else {"search_fraction": search_fraction}
        raw = generate_synthetic(seed=seed, **kwargs)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected ml100k or synthetic")

    after_build = None
    if with_cf:
        def after_build(tmp_dir: Path) -> None:
            from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
            from gensr_ray.data.contract import cf_path

            t0 = time.perf_counter()
            save_cf(train_lightgcn(tmp_dir, LightGCNConfig(seed=seed)), cf_path(tmp_dir))
            print(f"LightGCN pretrained on the training split in {time.perf_counter() - t0:.1f}s")

    opts = WriteOptions(seed=seed, rows_per_shard=rows_per_shard, overwrite=overwrite)
    meta = write_dataset(raw, out, opts, after_build=after_build)
    counts = meta["counts"]
    print(f"prepared {dataset} in {out} ({time.perf_counter() - started:.1f}s): "
          f"{counts['users']} users, {counts['items']} items, "
          f"{counts['interactions']['search']} search / {counts['interactions']['rec']} rec events")
    for split, by_task in counts["examples"].items():
        print(f"  {split:5s} examples: search {by_task['search']:6d}  rec {by_task['rec']:6d}")
    return meta


def ensure_data(cfg):
    """Make data.path absolute (workers may run elsewhere) and prepare it if the config says
    which dataset to build when it is missing."""
    from gensr_ray.data.contract import DataError

    cfg.data.path = str(Path(cfg.data.path).resolve())
    if not Path(cfg.data.path).exists():
        if not cfg.data.prepare_if_missing:
            raise DataError(f"data.path {cfg.data.path} does not exist; run `gensr prepare` "
                            "first or set data.prepare_if_missing")
        prepare_dataset(cfg.data.prepare_if_missing, Path(cfg.data.path))
    return cfg


def run_training(cfg, out: Path, callbacks: list | None = None) -> dict:
    """Train with Ray Train; returns {"checkpoint": path, "metrics": dict} (also in out/).

    `callbacks`: extra Ray Train callbacks (Tune trials pass TuneReportCallback)."""
    import json
    import shutil

    from gensr_ray.distributed import fit
    from gensr_ray.model.build import resolve_config_backbone

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = fit(cfg, out, resolve_config_backbone(cfg), callbacks=callbacks)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    checkpoint = Path(result.checkpoint.path)
    if cfg.scale.num_workers == 0:  # local mode keeps the checkpoint in a temporary dir
        final = out / "checkpoint_final"
        shutil.rmtree(final, ignore_errors=True)
        shutil.move(str(checkpoint), final)
        checkpoint = final
    summary = {"checkpoint": str(checkpoint), "metrics": result.metrics}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


