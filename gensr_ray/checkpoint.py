"""The model part of a checkpoint: its layout, its writer and readers (gensr_ray.assemble
rebuilds the model from it).

    <checkpoint>/model/trainable.pt   every trainable tensor by name (LoRA adapters, the GenSR
                                      modules; the whole backbone under full fine-tuning)
    <checkpoint>/model/config.yaml    the run's full config
    <checkpoint>/model/state.json     step, epoch and the metrics at save time
    <checkpoint>/model/vocabulary.json  a random preset's words (its frozen weights' seed)
    <checkpoint>/deepspeed/           engine state for resuming (optimizer, scheduler, step)
    <checkpoint>/manifest/rank-NNNNN.json   size and sha256 of every file rank NNNNN wrote

A checkpoint is used (resumed from, evaluated) only when every rank's manifest is there and
every file it lists has that size and hash: a truncated, missing or altered file makes the
checkpoint incomplete, never a half-loaded model. Files are still read with weights-only
loaders, so a checkpoint whose manifest was rewritten to match runs no code either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from gensr_ray import storage
from gensr_ray.atomic import atomic_open, atomic_write_text
from gensr_ray.config import ConfigError, GenSRConfig, from_dict, read_yaml

TRAINABLE = "trainable.pt"
VOCABULARY = "vocabulary.json"
SUMMARY = "train_summary.json"  # in a `gensr train --out` directory: the final checkpoint
METRICS = "metrics.jsonl"  # in a run's storage directory: every report, one JSON line each
MANIFESTS = "manifest"
PREFIX = "checkpoint_"  # checkpoint directories in a run's storage, named by time (Ray's way)

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, or holding what a safe loader
    refuses. The message names the file."""


def checkpoint_name() -> str:
    """A new checkpoint directory's name: sorts in time order, like Ray Train's own."""
    now = time.time()
    return f"{PREFIX}{time.strftime('%Y-%m-%d_%H-%M-%S', time.localtime(now))}.{int(now % 1 * 1e6):06d}"


def write_manifest(directory: Path, rank: int, world_size: int) -> None:
    """Record size and sha256 of every file in `directory` (what this rank wrote)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if not name.startswith(MANIFESTS + "/"):
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_text(directory / MANIFESTS / f"rank-{rank:05d}.json", json.dumps(
        {"rank": rank, "world_size": world_size, "files": files}, indent=1) + "\n")


def verify_checkpoint(directory: str | Path, hashes: bool = True) -> None:
    """Raise CheckpointError unless every rank's manifest is there and every file matches.

    `directory` is local, or a URI when `hashes` is False (sizes only: nothing downloaded)."""
    manifests = storage.join(directory, MANIFESTS)
    names = [n for n in _listing(manifests) if n.startswith("rank-")]
    if not names:
        raise CheckpointError(f"{directory}: no manifest (an interrupted save, or a checkpoint "
                              "of an older gensr_ray)")
    entries = [json.loads(storage.read_text(storage.join(manifests, n))) for n in names]
    world = entries[0]["world_size"]
    missing = sorted(set(range(world)) - {e["rank"] for e in entries})
    if missing:
        raise CheckpointError(f"{directory}: incomplete, no files of rank(s) {missing[:8]} "
                              f"of {world}")
    fs, root = storage.filesystem(directory)
    for entry in entries:
        for name, want in entry["files"].items():
            info = fs.get_file_info(f"{root}/{name}")
            if info.size != want["size"]:
                found = "missing" if info.size is None else f"{info.size} bytes"
                raise CheckpointError(f"{storage.join(directory, name)}: {found}, the manifest "
                                      f"says {want['size']} bytes (truncated or lost)")
            if hashes and _sha256(Path(root, name)) != want["sha256"]:
                raise CheckpointError(f"{storage.join(directory, name)}: content differs from "
                                      "the manifest's hash (altered or corrupted)")


def checkpoints(run_dir: str) -> list[str]:
    """The checkpoint directories (paths or URIs) of a run, newest first."""
    names = sorted((n for n in _listing(run_dir, directories=True) if n.startswith(PREFIX)),
                   reverse=True)
    return [storage.join(run_dir, n) for n in names]


def remove_incomplete(run_dir: str) -> list[str]:
    """Delete the checkpoints of a run that a crash cut short before Ray registered them
    (files lost or shorter than their manifest says); the ones removed. Registered ones
    (named in Ray's run snapshot, which must keep pointing at existing directories) and
    ones without any manifest are left; resuming skips every damaged one."""
    registered = "".join(storage.read_text(storage.join(run_dir, n))
                         for n in _listing(run_dir) if n.endswith(".json"))
    removed = []
    for path in checkpoints(run_dir):
        if path.rsplit("/", 1)[-1] in registered:
            continue
        try:
            verify_checkpoint(path, hashes=False)
        except CheckpointError as exc:
            if "no manifest" in str(exc):
                continue
            fs, inner = storage.filesystem(path)
            fs.delete_dir(inner)
            log.warning("removed incomplete checkpoint %s: %s", path, exc)
            removed.append(path)
    return removed


def saved_metrics(checkpoint: str) -> dict:
    """The metrics a checkpoint was saved with (its model/state.json), read where it lies;
    {} when it has none or cannot be read (a save cut short)."""
    try:
        return json.loads(storage.read_text(storage.join(checkpoint, "model", "state.json"))
                          ).get("metrics") or {}
    except (OSError, ValueError):
        return {}


def ranked_checkpoints(run_dir: str, metric: str) -> list[tuple[str, float]]:
    """The run's checkpoints that recorded `metric`, best (highest) first; among equal
    values the oldest, the first to reach it (a tie is no improvement, as for patience)."""
    scored = [(path, saved_metrics(path).get(metric)) for path in reversed(checkpoints(run_dir))]
    scored = [(path, float(value)) for path, value in scored if isinstance(value, (int, float))]
    return sorted(scored, key=lambda pair: -pair[1])  # stable: oldest first among ties


def score_metric(cfg: GenSRConfig) -> str | None:
    """The metric that ranks a run's checkpoints: train.best_metric when the run validates."""
    return cfg.train.best_metric if cfg.train.eval_every else None


def prune_checkpoints(run_dir: str, keep: int, metric: str | None = None) -> list[str]:
    """Delete all but the `keep` best checkpoints by `metric` (newest when None) and the
    newest one, which resuming needs whatever its score; the ones deleted."""
    newest = checkpoints(run_dir)
    ranked = [path for path, _ in ranked_checkpoints(run_dir, metric)] if metric else newest
    kept = set(ranked[:keep]) | set(newest[:1])
    removed = [path for path in newest if path not in kept]
    for path in removed:
        fs, inner = storage.filesystem(path)
        fs.delete_dir(inner)
    return removed


def resolve_checkpoint(path: str | Path, which: str = "best") -> str:
    """The checkpoint that `path` names: a checkpoint as given, or for a `gensr train --out`
    directory its best checkpoint by train.best_metric (when the run validated) or its
    last one (`which="last"`, or a run without validation)."""
    if which not in ("best", "last"):
        raise ValueError(f"which={which!r}: expected 'best' or 'last'")
    summary_path = storage.join(str(path), SUMMARY)
    if not storage.exists(summary_path):
        return str(path)
    summary = json.loads(storage.read_text(summary_path))
    chosen = summary.get("best_checkpoint") if which == "best" else None
    chosen = chosen or summary["checkpoint"]
    # relative to the run directory, so a copied or moved run evaluates its own checkpoint
    return chosen if storage.is_uri(chosen) or Path(chosen).is_absolute() \
        else storage.join(str(path), chosen)


def read_state(checkpoint: str | Path) -> dict:
    """The model export's state.json: step, epoch, metrics, and the data it was trained on."""
    return json.loads((model_dir(checkpoint) / "state.json").read_text())


def check_resumable(run_dir: str, current: dict) -> None:
    """Refuse, on the driver before any worker starts, a run whose newest checkpoint was
    trained on other data (the workers would refuse it too, after the worker group's
    start-up). Checkpoints whose state.json cannot be read are left to the workers' own
    fallback to an older intact one."""
    for path in checkpoints(run_dir):
        try:
            state = json.loads(storage.read_text(storage.join(path, "model", "state.json")))
        except (OSError, ValueError):
            continue
        check_same_data(state.get("data"), current, f"checkpoint {path}")
        return


def check_same_data(recorded: dict | None, current: dict, where: str) -> None:
    """Refuse a checkpoint trained on another dataset or other LightGCN tables."""
    if not recorded:
        return  # a checkpoint that recorded no fingerprint
    changed = [what for key, what in (("dataset", "the dataset (meta.json or its shards)"),
                                      ("cf", "the LightGCN tables (cf/lightgcn.npz)"))
               if recorded.get(key) != current.get(key)]
    if changed:
        raise CheckpointError(
            f"{where} was trained on other data: {' and '.join(changed)} changed since "
            f"(fingerprint {recorded} now {current}); pass --allow-data-change (or set "
            "data.allow_change) if you mean to use it on this data")


def check_same_vocabulary(checkpoint: str | Path, current: list[str] | None, backbone: str,
                          where: str) -> None:
    """Refuse to resume a random preset on other words than it started with: its frozen
    weights are drawn from them, so the checkpoint's weights would meet other ones."""
    recorded = read_vocabulary(checkpoint)
    if recorded is None or current is None or recorded == current:
        return
    raise CheckpointError(
        f"{where} was trained on {backbone} with a vocabulary of {len(recorded)} words; this "
        f"run builds one of {len(current)} from the dataset's texts and the prompt templates, "
        "which changed since. A run resumes only on the backbone it started with (`gensr "
        "eval` rebuilds it from the checkpoint's record)")


def _listing(directory: str, directories: bool = False) -> list[str]:
    import pyarrow.fs

    fs, inner = storage.filesystem(directory)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return [i.base_name for i in infos
            if not directories or i.type == pyarrow.fs.FileType.Directory]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_model_export(directory: Path, weights: dict[str, torch.Tensor], cfg: GenSRConfig,
                       state: dict, vocabulary: list[str] | None = None) -> None:
    """The trainable weights, config and state; `vocabulary`: a random preset's words
    (`assemble.preset_vocabulary`), from which its frozen weights are rebuilt."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_open(directory / TRAINABLE, "wb") as f:
        torch.save(weights, f)
    atomic_write_text(directory / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(directory / "state.json", json.dumps(state, indent=2, default=float) + "\n")
    if vocabulary is not None:
        atomic_write_text(directory / VOCABULARY, json.dumps(vocabulary) + "\n")


def read_vocabulary(checkpoint: str | Path) -> list[str] | None:
    """The random preset's words a checkpoint recorded; None when it recorded none (another
    backbone, or a checkpoint written before checkpoints recorded them)."""
    path = model_dir(checkpoint) / VOCABULARY
    if not path.is_file():
        return None
    try:
        words = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a JSON list of words ({exc})") from None
    if not (isinstance(words, list) and words and all(isinstance(w, str) for w in words)):
        raise CheckpointError(f"{path}: not a JSON list of words")
    return words


def model_dir(checkpoint: str | Path) -> Path:
    """The local directory of a checkpoint's model export.

    Accepts a checkpoint directory, its model/ subdirectory, or a `gensr train --out`
    directory (its best checkpoint, see `resolve_checkpoint`), each local or a URI (s3://,
    gs://): from object storage only the model export is copied, once, into this node's
    cache (checkpoint directories are never rewritten)."""
    path = resolve_checkpoint(checkpoint)
    for candidate in (storage.join(path, "model"), path):
        if storage.exists(storage.join(candidate, TRAINABLE)):
            return storage.local_dir(candidate)
    raise FileNotFoundError(f"{checkpoint}: not a gensr checkpoint (no model/{TRAINABLE})")


def load_trainable(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of a checkpoint's model export, checked against the checkpoint's
    manifest when it lies beside the export, and read with the weights-only unpickler."""
    export = model_dir(checkpoint)
    manifest = export.parent / MANIFESTS / "rank-00000.json"
    if export.name == "model" and manifest.is_file():
        want = json.loads(manifest.read_text())["files"].get(f"model/{TRAINABLE}")
        path = export / TRAINABLE
        if want and (path.stat().st_size != want["size"] or _sha256(path) != want["sha256"]):
            raise CheckpointError(f"{path}: does not match the checkpoint's manifest "
                                  "(truncated, altered or corrupted)")
    import pickle

    try:
        return torch.load(export / TRAINABLE, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated zip, foreign
        # pickle: name the file, not torch's internals
        reason = str(exc).split("\n")[0]
        raise CheckpointError(f"{export / TRAINABLE}: cannot be read as weights ({reason})"
                              ) from None


def read_checkpoint_config(checkpoint: str | Path) -> GenSRConfig:
    path = model_dir(checkpoint) / "config.yaml"
    try:
        return from_dict(read_yaml(path))
    except ConfigError as exc:  # a damaged checkpoint, not a bad setting of the user's
        raise CheckpointError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
