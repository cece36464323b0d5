"""Bad data, damaged checkpoints, changed tables and concurrent runs, on the real pipeline:
each ends in one clear error, or in the work kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gensr_ray.checkpoint import (
    CheckpointError,
    check_same_vocabulary,
    checkpoints,
    read_vocabulary,
)
from gensr_ray.cli import main
from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.validate import validate_dataset
from gensr_ray.data.writer import WriteOptions, write_dataset
from gensr_ray.train.launch import run_location, run_lock, run_training


def _with_cf(tmp: Path, seed: int = 0) -> None:
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn

    save_cf(train_lightgcn(tmp, LightGCNConfig(epochs=5, seed=seed)), contract.cf_path(tmp))


@pytest.fixture
def dataset(tmp_path) -> Path:
    out = tmp_path / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=1, n_users=40, n_items=150,
                                                      events_per_user=10)),
                  out, WriteOptions(rows_per_shard=100), after_build=_with_cf)
    return out


def _rewrite(shard: Path, column: str, row: int, value) -> None:
    table = pq.read_table(shard)
    values = table[column].to_pylist()
    values[row] = value
    index = table.schema.get_field_index(column)
    table = table.set_column(index, column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, shard)


# -- the data contract --------------------------------------------------------------------

def test_an_item_id_out_of_range_names_file_row_and_column(dataset):
    shard = contract.shard_files(contract.examples_dir(dataset, "train"))[1]
    history = pq.read_table(shard)["history"][3].as_py()
    _rewrite(shard, "history", 3, [*history[:-1], -1])
    with pytest.raises(contract.DataError, match=rf"{shard}: row 3, column history: item id -1 "
                                                 r"outside 0\.\.149"):
        validate_dataset(dataset)


def test_a_null_target_and_a_user_out_of_range_are_refused(dataset):
    shard = contract.shard_files(contract.examples_dir(dataset, "test"))[0]
    _rewrite(shard, "target", 5, None)
    with pytest.raises(contract.DataError, match=rf"{shard}: row 5, column target is null"):
        validate_dataset(dataset)
    _rewrite(shard, "target", 5, 0)
    _rewrite(shard, "user_id", 0, 40)
    with pytest.raises(contract.DataError, match=r"row 0, column user_id: user id 40 outside"):
        validate_dataset(dataset)


def test_a_lost_training_shard_is_refused_and_training_never_starts(dataset, capsys):
    shards = contract.shard_files(contract.examples_dir(dataset, "train"))
    assert len(shards) > 1
    shards[-1].unlink()
    code = main(["train", "--config", str(Path(__file__).parent.parent / "configs" / "debug.yaml"),
                 "--out", str(dataset.parent / "run"), "--set", f"data.path={dataset}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{dataset / 'examples' / 'train'}: {len(shards) - 1} shards, but meta.json records " \
           f"{len(shards)}" in err
    assert "Traceback" not in err


def test_lightgcn_tables_of_another_catalogue_are_refused(dataset):
    with np.load(contract.cf_path(dataset)) as tables:
        arrays = dict(tables)
    arrays["item_emb"] = arrays["item_emb"][:-1]
    np.savez(contract.cf_path(dataset), **arrays)
    with pytest.raises(contract.DataError, match=r"item_emb has shape \(149, \d+\) but the "
                                                 r"dataset has 150 rows"):
        validate_dataset(dataset)


# -- one run per --out ---------------------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused_and_a_dead_one_leaves_no_lock(tmp_path):
    out = str(tmp_path / "run")
    Path(out).mkdir()
    with run_lock(out), pytest.raises(ConfigError, match=r"is in use by another `gensr train` "
                                                         r"\(pid \d+ on "):
        with run_lock(out):
            pass
    # a holder killed without any clean-up: the OS drops its lock with the process
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from gensr_ray.train.launch import run_lock\n"
        f"with run_lock({out!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError):
        with run_lock(out):
            pass
    holder.kill()
    holder.wait()
    with run_lock(out):
        pass


# -- checkpoints ---------------------------------------------------------------------------

def _config(data: Path, **overrides) -> GenSRConfig:
    base = {"data.path": str(data), "model.backbone": "preset:tiny-llama",
            "model.prompt": "minimal", "model.lora_targets": ["q_proj", "v_proj"],
            "train.batch_size": 10, "train.lr": 1e-3, "train.warmup_steps": 1,
            "train.log_every": 2, "train.checkpoint_every": 2, "scale.num_workers": 1,
            "scale.cpus_per_worker": 0.5, "scale.num_to_keep": 3}
    return apply_overrides(GenSRConfig(), {**base, **overrides})


def _steps(cfg: GenSRConfig, out: Path) -> list[dict]:
    path = Path(run_location(cfg, out).metrics)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_damaged_latest_checkpoint_falls_back_and_changed_tables_are_refused(
        ray_cluster, dataset, tmp_path, capsys):
    cfg = _config(dataset, **{"train.max_steps": 4})
    out = tmp_path / "run"
    first = run_training(cfg, out)
    run_dir = run_location(cfg, out).run_dir
    newest, older = checkpoints(run_dir)[:2]
    assert Path(first["checkpoint"]) == Path(newest)

    # a truncated optimizer state in the newest checkpoint: the rerun goes on from the older
    # one. A copy that a crash cut short before Ray registered it is removed.
    optim = next(Path(newest, "deepspeed").rglob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])
    unregistered = Path(run_dir, "checkpoint_2999-01-01_00-00-00.000000")
    shutil.copytree(older, unregistered)
    next(unregistered.rglob("*model_states.pt")).unlink()
    resumed = run_training(apply_overrides(cfg, {"train.max_steps": 6}), out)
    assert resumed["metrics"]["step"] == 6
    assert {m["resumed_from"] for m in _steps(cfg, out) if m["step"] > 4} == {2}
    assert not unregistered.exists()

    # the trainable export of a checkpoint, truncated: a clear error, not torch's
    final = Path(resumed["checkpoint"])
    from gensr_ray.assemble import load_for_eval

    spare = tmp_path / "spare"
    shutil.copytree(final, spare)
    trainable = spare / "model" / "trainable.pt"
    trainable.write_bytes(trainable.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=r"trainable.pt: does not match the checkpoint's "
                                              r"manifest"):
        load_for_eval(spare)

    # LightGCN pretrained again with another seed: evaluation and resume refuse the run
    assert main(["pretrain-cf", "--data", str(dataset), "--epochs", "2", "--seed", "7"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--max-examples", "8"]) == 2
    err = capsys.readouterr().err
    assert "was trained on other data: the LightGCN tables (cf/lightgcn.npz) changed" in err
    assert "--allow-data-change" in err
    with pytest.raises(CheckpointError, match="was trained on other data"):
        run_training(apply_overrides(cfg, {"train.max_steps": 8}), out)
    assert main(["eval", "--checkpoint", str(out), "--max-examples", "8",
                 "--allow-data-change"]) == 0


def test_local_mode_resumes_from_its_own_checkpoint(ray_cluster, dataset, tmp_path):
    # with fresh negatives: the worker redraws each batch's negatives before it trains on them
    cfg = _config(dataset, **{"train.max_steps": 2, "scale.num_workers": 0,
                              "train.negatives": "fresh"})
    out = tmp_path / "local"
    run_training(cfg, out)
    resumed = run_training(apply_overrides(cfg, {"train.max_steps": 4}), out)
    assert resumed["metrics"]["step"] == 4 and resumed["metrics"]["resumed_from"] == 2
    assert resumed["metrics"]["negatives_kept_stored"] == 0
    run_dir = Path(run_location(cfg, out).run_dir)
    assert Path(resumed["checkpoint"]).parent == run_dir

    # a checkpoint written after the last registered one (a run killed right after saving):
    # intact, so the next run goes on from it rather than from an older one
    other = tmp_path / "other"
    ahead = run_training(apply_overrides(cfg, {"train.max_steps": 6}), other)
    shutil.copytree(ahead["checkpoint"], run_dir / "checkpoint_2999-01-01_00-00-00.000000")
    again = run_training(apply_overrides(cfg, {"train.max_steps": 8}), out)
    assert again["metrics"]["step"] == 8 and again["metrics"]["resumed_from"] == 6


def test_more_workers_than_the_machine_holds_is_refused_before_waiting(ray_cluster, dataset,
                                                                       tmp_path):
    cfg = _config(dataset, **{"scale.num_workers": 1000})
    with pytest.raises(ConfigError, match=r"scale.num_workers=1000 x scale.cpus_per_worker=0.5 "
                                          r"needs 500 CPU; the cluster has 2 CPU"):
        run_training(cfg, tmp_path / "big")
    # workers that fit but take every CPU: Ray Data's tasks could never run, training would
    # wait forever for its first batch
    cfg = _config(dataset, **{"scale.num_workers": 1, "scale.cpus_per_worker": 2})
    with pytest.raises(ConfigError, match=r"needs 2 of the cluster's 2 CPUs and leaves less "
                                          r"than 0.25 for Ray Data.*lower scale.cpus_per_worker "
                                          r"\(e.g. 1.5\)"):
        run_training(cfg, tmp_path / "all")


def test_eval_checks_its_output_path_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["eval", "--baselines", "--data", str(tmp_path / "nowhere"),
                 "--out", str(blocker / "results.json")]) == 2
    assert f"--out {blocker / 'results.json'}: cannot create {blocker}" in capsys.readouterr().err


def test_a_damaged_checkpoint_config_is_a_checkpoint_error(tmp_path, capsys):
    export = tmp_path / "ckpt" / "model"
    export.mkdir(parents=True)
    (export / "trainable.pt").write_bytes(b"")
    (export / "config.yaml").write_text("model: {backbone: [unclosed\n")
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert f"{export / 'config.yaml'}: line" in err and "Traceback" not in err


def test_a_random_preset_resumes_only_on_the_words_it_started_with(tmp_path):
    export = tmp_path / "ckpt" / "model"
    export.mkdir(parents=True)
    (export / "trainable.pt").write_bytes(b"")  # what makes it a checkpoint to the readers
    assert read_vocabulary(tmp_path / "ckpt") is None  # recorded nothing: nothing to check
    check_same_vocabulary(tmp_path / "ckpt", ["a", "b"], "preset:tiny-llama", "checkpoint c")
    (export / "vocabulary.json").write_text(json.dumps(["a", "b"]))
    check_same_vocabulary(tmp_path / "ckpt", ["a", "b"], "preset:tiny-llama", "checkpoint c")
    check_same_vocabulary(tmp_path / "ckpt", None, "preset:smollm2-135m", "checkpoint c")
    with pytest.raises(CheckpointError, match=r"checkpoint c was trained on preset:tiny-llama "
                                              r"with a vocabulary of 2 words; this run builds "
                                              r"one of 3"):
        check_same_vocabulary(tmp_path / "ckpt", ["a", "b", "c"], "preset:tiny-llama",
                              "checkpoint c")
    for damaged in ("[unclosed", json.dumps({"a": 1}), json.dumps([]), json.dumps(["a", 2])):
        (export / "vocabulary.json").write_text(damaged)
        with pytest.raises(CheckpointError, match="vocabulary.json: not a JSON list of words"):
            read_vocabulary(tmp_path / "ckpt")


# -- a killed driver's local cluster ------------------------------------------------------

_DRIVER = """
import sys, time
import ray
from gensr_ray.train.launch import ensure_ray
ensure_ray(num_cpus=1, include_dashboard=False, temp_dir=sys.argv[1])
print(ray._private.worker._global_node.all_processes["raylet"][0].process.pid, flush=True)
time.sleep(300)
"""


def _agents(raylet: int) -> set[int]:
    """Pids of the Ray agent processes the raylet `raylet` started."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            if parent == raylet and command.startswith((b"ray::DashboardAgent",
                                                        b"ray::RuntimeEnvAgent")):
                found.add(int(entry.name))
    return found


def _running(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists()
            and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
def test_agents_left_by_a_killed_driver_are_stopped_and_live_ones_kept(tmp_path):
    import os
    import signal
    import time

    from gensr_ray.ray_init import reap_orphaned_agents

    drivers, dirs, raylets = [], [], []
    for name in ("killed", "alive"):
        # short paths: Ray's socket names must fit in 107 bytes
        temp_dir = Path(f"/tmp/gr-{name}-{os.getpid()}")
        dirs.append(temp_dir)
        drivers.append(subprocess.Popen([sys.executable, "-c", _DRIVER, str(temp_dir)],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True))
    try:
        raylets = [int(driver.stdout.readline()) for driver in drivers]
        deadline = time.monotonic() + 60
        while not all(len(_agents(r)) == 2 for r in raylets) and time.monotonic() < deadline:
            time.sleep(1)
        orphans, live = (_agents(r) for r in raylets)
        assert len(orphans) == 2 and len(live) == 2
        drivers[0].send_signal(signal.SIGKILL)
        drivers[0].wait()
        time.sleep(3)  # the raylet and GCS fate-share with the driver; the agents do not
        assert _running(orphans) == orphans

        stopped = set(reap_orphaned_agents())
        assert orphans <= stopped and not (live & stopped)
        deadline = time.monotonic() + 20
        while _running(orphans) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _running(orphans)
        assert _running(live) == live
    finally:
        for driver in drivers:
            driver.kill()
            driver.wait()
        for temp_dir in dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_object_store_follows_the_machine_or_the_setting():
    from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides
    from gensr_ray.ray_init import MIN_OBJECT_STORE, object_store_bytes

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = object_store_bytes()
    assert size == max(MIN_OBJECT_STORE, int(min(0.3 * memory, 0.9 * shutil.disk_usage(
        "/dev/shm").free)))
    assert object_store_bytes(1.5) == 3 << 29
    with pytest.raises(ConfigError, match="scale.object_store_gb=-1.0 is out of range"):
        apply_overrides(GenSRConfig(), {"scale.object_store_gb": -1.0})


_MINIMAL_RAY_DRIVER = """
import sys
import ray
import ray._private.utils as ray_utils
from gensr_ray.ray_init import ensure_ray
# what ray without its `default` extra reports: the dashboard's packages are missing
ray_utils.get_dashboard_dependency_error = lambda: "No module named 'aiohttp'"
ensure_ray(num_cpus=1, temp_dir=sys.argv[1])
print("cpus", ray.cluster_resources()["CPU"], flush=True)
ray.shutdown()
"""


def test_a_local_cluster_starts_where_ray_lacks_its_dashboard_packages():
    """On an image with ray but not ray[default] (as on many GPU images), `gensr train` failed
    with "Cannot include dashboard with missing packages": the local cluster asked for the
    dashboard whether or not it could run."""
    temp_dir = Path(f"/tmp/gr-minimal-{os.getpid()}")  # Ray's socket names fit in 107 bytes
    try:
        done = subprocess.run([sys.executable, "-c", _MINIMAL_RAY_DRIVER, str(temp_dir)],
                              capture_output=True, text=True, timeout=180,
                              env={**os.environ, "RAY_ADDRESS": ""})
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cpus 1.0" in done.stdout
