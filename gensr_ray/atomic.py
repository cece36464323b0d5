"""Atomic writes: readers see the old file or directory or the whole new one, never half of it.

The one place that writes this way, for files (results, tables, checkpoint exports) and for
directories (prepared datasets, materialised backbones).

A process killed while it fills a directory (SIGKILL, the OOM killer, a preempted node) leaves
its temporary sibling behind. Their names record the owner, `.NAME.tmp-PID@HOST-XXXXXXXX`, so
the next atomic_directory in the same parent removes those whose owner has ended on this host
(remove_stale), and never one whose process still runs or that another host owns.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

# .NAME.tmp-PID@HOST-RANDOM (being filled) and .NAME.old-PID@HOST (being replaced); HOST may
# hold '-', the random part of mkdtemp never does
_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp-(?P<tmp_pid>\d+)@(?P<tmp_host>.+)-[a-z0-9_]+"
                    r"|old-(?P<old_pid>\d+)@(?P<old_host>.+))")


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


@contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it becomes `target`.

    replace=True swaps out an existing `target` (removed afterwards). replace=False keeps a
    `target` that another process finished first and drops ours (concurrent builders of the
    same cache entry). On failure the temporary directory is removed and `target` untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    owner = f"{os.getpid()}@{this_host()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{owner}-", dir=target.parent))
    try:
        yield tmp
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old-{owner}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, target)
        except OSError:
            if replace:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def this_host() -> str:
    """This machine as the temporary names record it: the host name, and on Linux the pid
    namespace, because containers that share a host name (docker --net=host, as Ray's cluster
    launcher runs them) do not share process ids."""
    host = socket.gethostname().replace("/", "_") or "localhost"
    try:
        return f"{host}+{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def remove_stale(parent: Path) -> list[Path]:
    """Remove the temporary directories in `parent` whose owner process has ended on this
    host; returns what it removed or put back.

    A `.NAME.old-*` directory is the previous `NAME` of a replace: removed if `NAME` exists
    (the new one got in place), else renamed back to `NAME` (the swap never happened).
    Directories of other hosts, of live processes, or not named by atomic_directory stay.
    """
    host, handled = this_host(), []
    for entry in Path(parent).iterdir():
        match = _STALE.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match["tmp_pid"] or match["old_pid"])
        if (match["tmp_host"] or match["old_host"]) != host or _alive(pid):
            continue
        target = entry.with_name(match["name"])
        if match["old_pid"] and not target.exists():
            try:
                os.rename(entry, target)
            except OSError:
                continue  # another process got there first
            log.warning("put %s back in place: process %d was killed while replacing it",
                        target, pid)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by process %d (ended) on this host", entry, pid)
        handled.append(entry)
    return handled


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, run by another user
    return True
