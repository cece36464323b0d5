"""Reading line-oriented input files safely: gzipped or plain, strict UTF-8, JSON or Python
dict literals, with every failure reported as a DataError naming the file and the line."""

from __future__ import annotations

import ast
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from gensr_ray.data.contract import DataError

GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line; gzip is recognised by its magic bytes.

    Raises DataError for a missing or empty file, a truncated or corrupt gzip stream and bytes
    that are not UTF-8, naming the line where reading stopped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if is_gzip(path) else open
    lineno = 0
    seen = False
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: line {lineno}: not UTF-8 text ({exc.reason} at "
                                    f"byte {exc.start})") from None
                text = text.strip()
                if text:
                    seen = True
                    yield lineno, text
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{path}: line {lineno + 1}: cannot read past this point, the gzip "
                        f"stream is truncated or corrupt ({exc or type(exc).__name__})") from None
    if not seen:
        raise DataError(f"{path}: empty file")


def parse_record(text: str, where: str) -> dict:
    """One JSON object, or a Python dict literal (McAuley's 2014 metadata), never eval'd."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DataError(f"{where}: neither JSON nor a Python dict literal: "
                            f"{_clip(text)}") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an object, got {type(value).__name__}: "
                        f"{_clip(text)}")
    return value


def iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, text in iter_lines(path):
        yield lineno, parse_record(text, f"{path}: line {lineno}")


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
