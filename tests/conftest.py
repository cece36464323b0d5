"""Shared fixtures: one local Ray cluster on 127.0.0.1 for the whole session, and a model
cache of its own so tiny backbones are built from scratch by the code under test."""

from __future__ import annotations

import os
import warnings

import pytest

# before Ray or DeepSpeed are imported anywhere
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("gensr_cache")
    wheels = os.path.expanduser("~/.cache/gensr_ray/wheels")  # the ml-100k wheel, if fetched
    os.environ["GENSR_CACHE"] = str(path)
    if os.path.isdir(wheels):
        os.symlink(wheels, path / "wheels")
    return path


@pytest.fixture(scope="session")
def _ray_temp_dir(tmp_path_factory):
    import ray

    yield str(tmp_path_factory.mktemp("ray"))
    ray.shutdown()


def _start_cluster(temp_dir: str):
    import ray
    import ray.data

    from gensr_ray.train.launch import ensure_ray

    ensure_ray(num_cpus=2, object_store_memory=512 << 20, temp_dir=temp_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture
def ray_cluster(_ray_temp_dir, model_cache):
    """The shared local cluster, started on first use (again if a test shut it down)."""
    return _start_cluster(_ray_temp_dir)


@pytest.fixture
def restart_ray(ray_cluster, _ray_temp_dir):
    """Shut the shared cluster down and start it again, as a new Ray session (what a command
    run again after an interruption meets)."""
    def restart():
        ray_cluster.shutdown()
        _start_cluster(_ray_temp_dir)
    return restart
