"""Connect to Ray: the cluster in RAY_ADDRESS, or a local one this process starts.

The one place that calls ray.init, for training, Tune and distributed evaluation alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
_LOCAL_CLUSTER = False  # this process started the cluster: it will not grow
# a local cluster's raylet starts these; they outlive it when its driver is killed (SIGKILL)
_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


MIN_OBJECT_STORE = 512 << 20


def object_store_bytes(setting_gb: float = 0.0) -> int:
    """A local cluster's object store: `setting_gb` (scale.object_store_gb) when given, else
    30 % of this machine's memory (Ray's own rule) within 90 % of /dev/shm's free space,
    where Ray keeps it: a store larger than /dev/shm falls back to slow disk. At least
    512 MiB (what a few Ray Data blocks need)."""
    if setting_gb > 0:
        return int(setting_gb * (1 << 30))
    size = 0.3 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if Path("/dev/shm").is_dir():
        import shutil

        size = min(size, 0.9 * shutil.disk_usage("/dev/shm").free)
    return max(MIN_OBJECT_STORE, int(size))


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None,
               temp_dir: str | None = None, include_dashboard: bool | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (ray job submit sets it) or start a local one,
    its object store `object_store_memory` bytes (default: `object_store_bytes()`).

    A local cluster starts the dashboard (and its job server) when its packages are installed
    (include_dashboard=None, Ray's own rule), so an image with ray but without its `default`
    extra still trains; True insists on it, False never starts it."""
    import ray

    global _LOCAL_CLUSTER
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # keeps a local cluster's sockets on 127.0.0.1 instead of the machine's address
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from gensr_ray.console import quiet_ray_data, verbose

    quiet_ray_data()

    # workers' output stays in Ray's log files unless -v; the driver shows its own progress
    log_to_driver = verbose()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        return
    reap_orphaned_agents()
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory or object_store_bytes(),
             include_dashboard=include_dashboard, _temp_dir=temp_dir,
             log_to_driver=log_to_driver,
             _node_ip_address="127.0.0.1")
    _LOCAL_CLUSTER = True


def started_local_cluster() -> bool:
    """True when this process started its own cluster (it will not grow)."""
    return _LOCAL_CLUSTER



def reap_orphaned_agents() -> list[int]:
    """Stop this user's Ray agent processes whose raylet is gone (left by a killed driver's
    local cluster); the pids stopped. An agent of a live cluster has its raylet as parent
    and is never touched. Linux only (reads /proc); elsewhere a no-op."""
    import signal

    proc = Path("/proc")
    if not proc.is_dir():
        return []
    stopped = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            if not command.startswith(_AGENTS):
                continue
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_command = (proc / parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if b"raylet" in parent_command:
            continue
        os.kill(int(entry.name), signal.SIGKILL)  # without a raylet they hang on SIGTERM
        log.warning("stopped %s (pid %s): its local Ray cluster's driver was killed",
                    command.split()[0], entry.name)
        stopped.append(int(entry.name))
    return stopped
