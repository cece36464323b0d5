"""Paths that may be URIs: local directories, or object storage (s3://, gs://, any filesystem
pyarrow knows) for datasets, run outputs, checkpoints and backbones.

Nodes of a cluster share nothing but object storage, so every process that needs a file
reads it through here: by URI directly where it streams (Ray Data reading shards), or from a
local mirror that each node makes once (`mirror`) where the code needs a local path (numpy
tables, Hugging Face directories).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gensr_ray.atomic import atomic_directory, atomic_open, atomic_write_text

# pyarrow filesystem type -> URI scheme, to turn Ray Train's (filesystem, path) into a URI
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def cache_root() -> Path:
    """This node's cache: materialised backbones, dataset and checkpoint mirrors."""
    return Path(os.environ.get("GENSR_CACHE", Path.home() / ".cache" / "gensr_ray"))


def absolute(path: str | Path) -> str:
    """A URI as it is; a local path made absolute."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def join(base: str | Path, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def filesystem(path: str | Path):
    """(pyarrow filesystem, path inside it) of a URI or a local path."""
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(str(path))
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def exists(path: str | Path) -> bool:
    import pyarrow.fs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def read_text(path: str | Path) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str | Path, text: str) -> None:
    """Write a whole file: atomically on a local disk (rename); object stores replace an
    object in one request."""
    if not is_uri(path):
        atomic_write_text(path, text)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def write_bytes(path: str | Path, data: bytes) -> None:
    """`write_text` for bytes."""
    if not is_uri(path):
        with atomic_open(path, "wb") as f:
            f.write(data)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def uri_of(fs, path: str) -> str:
    """The URI of `path` on pyarrow filesystem `fs` (Ray Train reports checkpoints as a
    filesystem and a path without the scheme)."""
    if fs is None or fs.type_name == "local":
        return path
    scheme = _SCHEMES.get(fs.type_name)
    if scheme is None:
        raise ValueError(f"cannot name a URI for {path!r} on a {fs.type_name!r} filesystem; "
                         "use local, s3:// or gs:// storage")
    return f"{scheme}://{path.lstrip('/')}"


def mirror(uri: str, version: str = "") -> Path:
    """A local copy of the directory at `uri` in this node's cache, made once (atomically,
    so concurrent processes of a node share one copy). `version` is part of the cache key:
    pass what changes when the directory's content does."""
    import pyarrow.fs

    key = hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "root"
    target = cache_root() / "mirrors" / f"{name}-{key}"
    if (target / ".complete").is_file():
        return target
    fs, inner = filesystem(uri)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory")
    with atomic_directory(target) as tmp:
        pyarrow.fs.copy_files(inner, str(tmp), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        (tmp / ".complete").write_text(uri + "\n")
    return target


def local_dir(path: str | Path, version: str = "") -> Path:
    """`path` itself when local, else its mirror in this node's cache."""
    return mirror(str(path), version) if is_uri(path) else Path(path)
