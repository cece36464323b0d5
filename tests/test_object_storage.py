"""Nodes that share nothing but object storage, and surviving the loss of one of them.

A 2-node Ray cluster on 127.0.0.1 whose nodes each have their own cache directory (backbones,
dataset and checkpoint mirrors; the driver has another), with the dataset and the run's output
on an S3 server the test starts (moto, on 127.0.0.1). The dataset is prepared straight onto
S3 (its local copy is gone before training starts), so nothing a worker reads can come from
the driver's disk. Mid-run, after a checkpoint, the node of one training worker (one per node,
STRICT_SPREAD) is lost and a fresh node with an empty cache joins: with `scale.max_failures`
Ray Train restarts the worker group, the run resumes from the checkpoint on S3, and its
checkpoint URI evaluates. A second run of the same config under another --out, sharing the
storage prefix, starts from scratch rather than resuming the first one's checkpoints, and
serves as the uninterrupted reference.

Tolerance: Ray Data's streaming split assigns rows to workers in arrival order, so two runs
of the same seed may see the same rows in a different grouping (with one shard order and no
shuffle they have matched exactly). The final answer loss (mean of the last 8 steps) of the
resumed run must lie within 0.05 (absolute; ~10 % of chance level, 0.50) of the
uninterrupted run's.

Slow (three Ray Train runs on two nodes): `pytest -m multinode` runs these tests alone.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from gensr_ray import storage
from gensr_ray.config import GenSRConfig, apply_overrides

pytestmark = pytest.mark.multinode
BUCKET = "gensr-test"
STEPS = 24
TOLERANCE = 0.05
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on 127.0.0.1 with one bucket; AWS_* point pyarrow (Ray's
    storage, our reads and writes) and boto3 at it, in this process and in the nodes."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**AWS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def nodes(s3, tmp_path_factory, model_cache):
    """Head and worker nodes, each with a cache directory of its own (one cluster for the
    module: the first test replaces the worker node)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the shared single-node cluster; tests after this one restart it
    caches = []

    def node_args(name: str) -> dict:
        caches.append(tmp_path_factory.mktemp(f"cache-{name}"))
        return {"num_cpus": 1, "object_store_memory": 300 << 20,
                "env_vars": {"GENSR_CACHE": str(caches[-1])}}

    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={**node_args("head"), "include_dashboard": True,
                                      "dashboard_port": _free_port()})
    worker = cluster.add_node(**node_args("worker"))
    cluster.wait_for_nodes()
    yield cluster, worker, node_args, caches
    ray.shutdown()
    cluster.shutdown()


def _free_port() -> int:
    """A port nothing listens on (another Ray on this machine may hold the default 8265)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(data: str, **overrides) -> GenSRConfig:
    return apply_overrides(GenSRConfig(), {
        "data.path": data, "data.shuffle_seed": -1, "model.backbone": "preset:tiny-llama",
        "model.prompt": "minimal", "model.lora_r": 4, "train.batch_size": 20,
        "train.lr": 3e-3, "train.warmup_steps": 2, "train.max_steps": STEPS,
        "train.log_every": 8, "train.checkpoint_every": 8, "scale.num_workers": 2,
        "scale.cpus_per_worker": 0.5, "scale.placement_strategy": "STRICT_SPREAD",
        "scale.max_failures": 2, "scale.storage_path": f"s3://{BUCKET}/ray",
        "eval.max_examples": 10, **overrides})


def _reports(cfg: GenSRConfig, out: str) -> list[dict]:
    from gensr_ray.train.launch import run_location

    path = run_location(cfg, out).metrics
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines()]


def test_training_on_nodes_that_share_only_object_storage(nodes, model_cache):
    from gensr_ray.data.synthetic import SyntheticOptions
    from gensr_ray.data.writer import WriteOptions
    from gensr_ray.eval.run import evaluate_run
    from gensr_ray.prepare import ensure_data, prepare_dataset
    from gensr_ray.train.launch import run_location, run_training

    cluster, worker_node, node_args, caches = nodes
    data = f"s3://{BUCKET}/data/synthetic"
    prepare_dataset(SyntheticOptions(seed=0, n_users=80, n_items=140, events_per_user=14),
                    data, WriteOptions(rows_per_shard=300))
    cfg = ensure_data(_config(data))
    assert cfg.data.path == data  # a URI stays a URI

    out = f"s3://{BUCKET}/runs/interrupted"
    result: dict = {}
    errors: list = []

    def train():
        try:
            result.update(run_training(cfg, out))
        except BaseException as exc:  # surfaced below, with the run's reports
            errors.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not any(r["checkpoint"] for r in _reports(cfg, out)):
        assert time.monotonic() < deadline and thread.is_alive(), (errors, "no checkpoint")
        time.sleep(0.5)
    before = _reports(cfg, out)
    saved_step = max(r["step"] for r in before if r["checkpoint"])
    assert all(r["checkpoint"].startswith(f"s3://{BUCKET}/ray/") for r in before
               if r["checkpoint"])
    cluster.remove_node(worker_node)  # the node of one training worker dies
    cluster.add_node(**node_args("replacement"))  # a fresh node, empty cache, joins
    thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors

    after = _reports(cfg, out)[len(before):]
    assert result["metrics"]["step"] == STEPS
    assert after[-1]["resumed_from"] >= saved_step > 0  # from the checkpoint on S3
    summary = json.loads(storage.read_text(f"{out}/train_summary.json"))
    assert summary["checkpoint"] == result["checkpoint"]
    assert summary["checkpoint"].startswith(f"s3://{BUCKET}/ray/{run_location(cfg, out).name}/")

    # every node built its own backbone and mirrored the dataset into its own cache
    for cache in caches:
        assert list((cache / "backbones").glob("tiny-llama-*")), cache
        assert list((cache / "mirrors").glob("synthetic-*")), cache

    # the checkpoint, by the run's URI: the model export is mirrored, the metrics computed
    results = evaluate_run(out, split="test")
    gensr = results["models"]["gensr"]
    assert set(gensr) == {"search", "rec"} and 0.0 <= gensr["rec"]["sampled"]["HR@10"] <= 1.0
    assert results["checkpoint"] == result["checkpoint"]  # the run's URI named its checkpoint

    # another --out under the same storage prefix is another run: it does not resume the
    # first, and trained without interruption it ends where the interrupted one did
    other = f"s3://{BUCKET}/runs/uninterrupted"
    assert run_location(cfg, other).name != run_location(cfg, out).name
    baseline = run_training(cfg, other)
    assert baseline["metrics"]["step"] == STEPS
    assert {r["resumed_from"] for r in _reports(cfg, other)} == {0}
    final, expected = result["metrics"]["loss_answer"], baseline["metrics"]["loss_answer"]
    print(f"\nnode loss: checkpoint at step {saved_step}, resumed from step "
          f"{after[-1]['resumed_from']}; final answer loss {final:.4f} vs uninterrupted "
          f"{expected:.4f} (tolerance {TOLERANCE})")
    assert abs(final - expected) <= TOLERANCE

    # no checkpoint is half-written: each holds both ranks' ZeRO partitions and the export
    prefix = f"ray/{run_location(cfg, out).name}/"
    files: dict[str, list[str]] = {}
    for key in _keys(prefix):
        name = key[len(prefix):]
        if name.startswith("checkpoint_") and "/" in name:  # not Ray's snapshot file
            checkpoint, _, rest = name.partition("/")
            files.setdefault(checkpoint, []).append(rest)
    assert files
    for checkpoint, names in files.items():
        assert sum(n.endswith("optim_states.pt") for n in names) == 2, (checkpoint, names)
        assert "model/trainable.pt" in names and not [n for n in names if n.endswith(".tmp")]


def _keys(prefix: str) -> list[str]:
    """Every object key under `prefix` in the test bucket."""
    import boto3

    pages = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).get_paginator(
        "list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_tune_trial_trains_and_evaluates_on_object_storage(nodes, tmp_path):
    """A study whose dataset and checkpoints live on S3: the trial's run gets its own name
    under the shared prefix, and its validation reads the checkpoint back by URI."""
    import yaml

    from gensr_ray.data.synthetic import SyntheticOptions
    from gensr_ray.prepare import ensure_data, prepare_dataset
    from gensr_ray.study import load_sweep, run_study

    data = f"s3://{BUCKET}/data/tune"
    prepare_dataset(SyntheticOptions(seed=1, n_users=60, n_items=140, events_per_user=12), data)
    cfg = ensure_data(_config(data, **{
        "scale.num_workers": 1, "scale.placement_strategy": "PACK", "scale.max_failures": 0,
        "scale.storage_path": f"s3://{BUCKET}/tune-ray", "train.max_steps": 4,
        "train.log_every": 2, "train.checkpoint_every": 4}))
    sweep = tmp_path / "one.yaml"
    trials = {"no_contrastive": {"loss.contrastive_weight": 0.0}}
    sweep.write_text(yaml.safe_dump({"metric": "mean/sampled/NDCG@10", "mode": "max",
                                     "trials": trials}))
    study = run_study(cfg, load_sweep(sweep), tmp_path / "study")
    assert study["best"] == "no_contrastive", study["rows"]
    row = study["rows"][0]
    assert "error" not in row and 0.0 <= row["mean/sampled/NDCG@10"] <= 1.0
    keys = _keys("tune-ray/")
    runs = {k.split("/")[1] for k in keys} - {""}  # "" : the prefix's own marker
    assert len(runs) == 1 and next(iter(runs)).startswith("run-")  # the trial's own run name
    assert any(k.endswith("/model/trainable.pt") for k in keys)
