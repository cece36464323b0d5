"""Item titles tokenised once per node, read by every process that needs them.

Every process that builds model inputs (the driver, each Ray Data task, each training worker,
each scorer) needs the catalogue's title tokens. Tokenising the catalogue in each of them
costs time and memory that grow with the catalogue. Here the first process on a node writes
the token tables as .npy files under $GENSR_CACHE/title_tokens/<key>/, and every process
memory-maps them: pages are shared through the OS page cache, so a process's private memory
grows with the rows it reads, not with the catalogue.

The key covers what the tables depend on: the items table (its shards' names, sizes and
modification times in this node's copy of the dataset), the tokenizer (its serialised
vocabulary and rules, and its pad id) and the three title lengths.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from gensr_ray import storage
from gensr_ray.atomic import atomic_directory
from gensr_ray.data import contract
from gensr_ray.inputs.features import ItemTokens, RaggedIds

log = logging.getLogger(__name__)

FILES = ("prompt_values", "prompt_offsets", "sem", "sem_len", "target", "target_len")
CHUNK = 50_000  # titles tokenised per call: bounds the memory of the lists the tokenizer returns


def tokenizer_digest(tokenizer) -> str:
    """A digest of what decides the ids a tokenizer produces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole pipeline, serialised
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.pad_token_id}|".encode())
    digest.update(text.encode())
    return digest.hexdigest()[:16]


def cache_key(items_dir: Path, tokenizer, prompt_len: int, sem_len: int,
              target_len: int) -> str:
    shards = [Path(p) for p in contract.shard_files(Path(items_dir))]
    if not shards:
        raise contract.DataError(f"{items_dir}: no part-*.parquet shards")
    listing = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in shards]
    text = json.dumps([str(Path(items_dir).resolve()), listing, tokenizer_digest(tokenizer),
                       prompt_len, sem_len, target_len])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_item_tokens(data_path: str | Path, tokenizer, prompt_len: int, sem_len: int,
                       target_len: int) -> ItemTokens:
    """The catalogue's title tokens for `tokenizer`, memory-mapped from this node's cache;
    built (once, under a lock other processes on the node wait on) when missing."""
    items_dir = contract.items_dir(contract.local_root(data_path))
    key = cache_key(items_dir, tokenizer, prompt_len, sem_len, target_len)
    directory = storage.cache_root() / "title_tokens" / key
    if not _complete(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with open(directory.parent / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not _complete(directory):
                titles = contract.read_table(items_dir, ["title"]).column("title").to_pylist()
                log.info("tokenising %d item titles into %s", len(titles), directory)
                tables = tokenize_titles(tokenizer, titles, prompt_len, sem_len, target_len)
                with atomic_directory(directory, replace=True) as tmp:
                    for name in FILES:
                        np.save(tmp / f"{name}.npy", _array(tables, name))
    return _load(directory)


def tokenize_titles(tokenizer, titles: list[str | None], prompt_len: int, sem_len: int,
                    target_len: int) -> ItemTokens:
    """Title token tables, each title tokenised once (without special tokens): the first
    `prompt_len` ids for prompts, and tables cut / padded to `sem_len` and `target_len`
    (an empty title gets one pad position)."""
    n, pad = len(titles), tokenizer.pad_token_id
    keep = max(prompt_len, sem_len, target_len)
    sem = np.full((n, sem_len), pad, dtype=np.int32)
    target = np.full((n, target_len), pad, dtype=np.int32)
    sem_lens = np.ones(n, dtype=np.int32)
    target_lens = np.ones(n, dtype=np.int32)
    prompt_lens = np.zeros(n, dtype=np.int64)
    prompt_parts = []
    for start in range(0, n, CHUNK):
        chunk = [t or "" for t in titles[start:start + CHUNK]]
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else []
        for i, ids in enumerate(encoded, start):
            ids = ids[:keep]
            if ids:
                sem[i, :min(len(ids), sem_len)] = ids[:sem_len]
                target[i, :min(len(ids), target_len)] = ids[:target_len]
                sem_lens[i] = min(len(ids), sem_len)
                target_lens[i] = min(len(ids), target_len)
            prompt_parts.append(np.asarray(ids[:prompt_len], dtype=np.int32))
            prompt_lens[i] = len(prompt_parts[-1])
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(prompt_lens, out=offsets[1:])
    values = np.concatenate(prompt_parts) if prompt_parts else np.zeros(0, dtype=np.int32)
    return ItemTokens(RaggedIds(values.astype(np.int32), offsets), sem, sem_lens, target,
                      target_lens)


def _array(tables: ItemTokens, name: str) -> np.ndarray:
    if name == "prompt_values":
        return tables.prompt.values
    if name == "prompt_offsets":
        return tables.prompt.offsets
    return getattr(tables, name)


def _complete(directory: Path) -> bool:
    return all((directory / f"{name}.npy").is_file() for name in FILES)


def _load(directory: Path) -> ItemTokens:
    arrays = {}
    for name in FILES:
        path = directory / f"{name}.npy"
        try:  # allow_pickle=False: a planted file can hold plain arrays only, never code
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise contract.DataError(f"{path}: not a plain token table ({exc}); delete "
                                     f"{directory} and it is built again") from None
    return ItemTokens(RaggedIds(arrays["prompt_values"], arrays["prompt_offsets"]),
                      arrays["sem"], arrays["sem_len"], arrays["target"], arrays["target_len"])
