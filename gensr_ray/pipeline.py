"""The pipeline's steps as library functions: the CLI, the Ray jobs, Tune trials and tests
call these."""

from __future__ import annotations

import time
from pathlib import Path


def prepare_dataset(dataset: str, out: Path, seed: int = 42, source: Path | None = None,
                    search_fraction: float | None = None, rows_per_shard: int = 8192,
                    with_cf: bool = True, overwrite: bool = False, reviews: Path | None = None,
                    meta: Path | None = None, data_dir: Path | None = None,
                    k_core: int | None = None, query_files: Path | None = None) -> dict:
    """Build a dataset in the contract (+ its LightGCN tables); prints a summary.

    amazon needs `reviews` and `meta` (and reads HEM `query_files` if given); kuaisar needs
    `data_dir`; `k_core` (default 5) applies to both."""
    from gensr_ray.data.build import WriteOptions, write_dataset
    from gensr_ray.data.contract import DataError

    started = time.perf_counter()
    if dataset == "ml100k":
        from gensr_ray.data.movielens import SEARCH_FRACTION, load_ml100k

        fraction = SEARCH_FRACTION if search_fraction is None else search_fraction
        raw = load_ml100k(source, seed=seed, search_fraction=fraction)
    elif dataset == "synthetic":
        from gensr_ray.data.synthetic import generate_synthetic

        kwargs = {} if search_fraction is None else {"search_fraction": search_fraction}
        raw = generate_synthetic(seed=seed, **kwargs)
    elif dataset == "amazon":
        from gensr_ray.data import amazon

        if reviews is None or meta is None:
            raise DataError("--dataset amazon needs --reviews FILE and --meta FILE")
        raw = amazon.load_amazon(
            reviews, meta, seed=seed, query_files=query_files,
            search_fraction=amazon.SEARCH_FRACTION if search_fraction is None
            else search_fraction, k_core=amazon.K_CORE if k_core is None else k_core)
    elif dataset == "kuaisar":
        from gensr_ray.data import kuaisar

        if data_dir is None:
            raise DataError("--dataset kuaisar needs --data-dir DIR (with rec_inter.csv, "
                            "src_inter.csv and item_features.csv)")
        if search_fraction is not None:
            raise DataError("--search-fraction does not apply to kuaisar (its search events "
                            "are real)")
        raw = kuaisar.load_kuaisar(data_dir, k_core=kuaisar.K_CORE if k_core is None else k_core)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected ml100k, synthetic, amazon or "
                         "kuaisar")

    after_build = None
    if with_cf:
        def after_build(tmp_dir: Path) -> None:
            from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
            from gensr_ray.data.contract import cf_path

            t0 = time.perf_counter()
            save_cf(train_lightgcn(tmp_dir, LightGCNConfig(seed=seed)), cf_path(tmp_dir))
            print(f"LightGCN pretrained on the training split in {time.perf_counter() - t0:.1f}s")

    opts = WriteOptions(seed=seed, rows_per_shard=rows_per_shard, overwrite=overwrite)
    meta_json = write_dataset(raw, out, opts, after_build=after_build)
    counts = meta_json["counts"]
    print(f"prepared {dataset} in {out} ({time.perf_counter() - started:.1f}s)")
    print(format_statistics(dataset, meta_json))
    for split, by_task in counts["examples"].items():
        print(f"  {split:5s} examples: search {by_task['search']:6d}  rec {by_task['rec']:6d}")
    return meta_json


def format_statistics(dataset: str, meta: dict) -> str:
    """A paper-style dataset table from meta.json, and the loader's drop counts."""
    c = meta["counts"]
    search, rec = c["interactions"]["search"], c["interactions"]["rec"]
    share = search / max(1, search + rec)
    lines = [
        "| dataset | users | items | search events | rec events | search share | distinct queries |",
        "|---|---|---|---|---|---|---|",
        (f"| {dataset} | {c['users']} | {c['items']} | {search} | {rec} | {share:.1%} | "
         f"{c.get('distinct_queries', '-')} |"),
    ]
    dropped = meta.get("loader", {}).get("dropped")
    if dropped:
        lines.append("dropped: " + ", ".join(f"{name} {n}" for name, n in dropped.items()))
    return "\n".join(lines)


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


