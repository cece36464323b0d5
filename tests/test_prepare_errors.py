"""`gensr prepare` against an unusable --out, and after a prepare that was killed mid-write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gensr_ray.atomic import this_host
from gensr_ray.cli import main as gensr

# fills the atomic_directory of its argument and sleeps there until killed
_HOLD_TEMP_DIR = """
import sys, time
from gensr_ray.atomic import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    print(tmp, flush=True)
    time.sleep(600)
"""


def _prepare(out: Path, *flags: str) -> int:
    return gensr(["prepare", "--dataset", "synthetic", "--out", str(out), "--no-cf", *flags])


def test_out_naming_a_file_fails_at_once_and_writes_nothing(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for flags in ((), ("--overwrite",)):
        assert _prepare(a_file, *flags) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"--out {a_file} is a file" in err
    assert a_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    # below a file: the same, naming the file in the way
    assert _prepare(a_file / "data") == 2
    assert f"{a_file} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_is_checked_before_the_loader_runs(tmp_path, capsys):
    """ml100k with a source that does not exist: the error is about --out, so nothing was
    read, downloaded or written before it."""
    a_file = tmp_path / "out"
    a_file.write_text("")
    code = gensr(["prepare", "--dataset", "ml100k", "--source", str(tmp_path / "missing"),
                  "--out", str(a_file)])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {a_file} is a file" in err and "missing" not in err


def _hold_temp_dir(target: Path) -> tuple[subprocess.Popen, Path]:
    """A process inside atomic_directory(target), and its temporary directory."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_TEMP_DIR, str(target)],
                            stdout=subprocess.PIPE, text=True, env=env)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir() and tmp.parent == target.parent
    return proc, tmp


def test_prepare_removes_temp_dirs_of_killed_processes_and_keeps_live_ones(tmp_path):
    data = tmp_path / "data"
    killed, killed_tmp = _hold_temp_dir(data / "killed")
    (killed_tmp / "meta.json").write_text("{}")  # half a dataset
    killed.kill()
    killed.wait()
    running, running_tmp = _hold_temp_dir(data / "running")
    try:
        host, dead_pid = this_host(), killed.pid
        # made by hand: this process (alive), a dead process on another host, a name that
        # atomic_directory never makes
        mine = data / f".mine.tmp-{os.getpid()}@{host}-abcd1234"
        other_host = data / f".theirs.tmp-{dead_pid}@another-host+1-abcd1234"
        unknown = data / ".keep.tmp-abcd1234"
        # a replace killed between its two renames: the old dataset is the only copy
        swapped_out = data / f".previous.old-{dead_pid}@{host}"
        # a replace killed after them: the new dataset is in place, the old one is garbage
        replaced = data / f".current.old-{dead_pid}@{host}"
        for d in (mine, other_host, unknown, swapped_out, replaced, data / "current"):
            d.mkdir()
        (swapped_out / "meta.json").write_text('{"old": true}')

        assert _prepare(data / "synthetic") == 0

        assert not killed_tmp.exists() and not replaced.exists()
        assert (data / "previous" / "meta.json").read_text() == '{"old": true}'
        assert all(d.is_dir() for d in (running_tmp, mine, other_host, unknown))
        assert (data / "synthetic" / "meta.json").is_file()
        assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == [
            "current", "previous", "synthetic"]
    finally:
        running.kill()
        running.wait()
