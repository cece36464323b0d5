"""`ray job submit` against a real local head with the job server."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from gensr_ray.config import GenSRConfig
from gensr_ray.train.launch import run_location

ROOT = Path(__file__).parent.parent


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_ray_job_submit_runs_the_debug_training(tmp_path, model_cache, monkeypatch):
    """A real head with the job server on 127.0.0.1; the job is the debug training run, with
    log.wandb (offline) and log.mlflow (a file store in --out). What the job prints holds the
    driver's lines only (workers' output, Ray's INFO lines, DeepSpeed's, transformers' and
    W&B's notices stay out of it), and both trackers hold every report."""
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import tempfile

    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    gcs, dashboard, client_port, agent, agent_grpc, metrics, runtime_env = _free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # unix socket paths must stay short
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         f"--port={gcs}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2",
         "--object-store-memory=400000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = tmp_path / "job_run"
    runtime_env = {**yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text()),
                   "working_dir": str(ROOT),
                   "env_vars": {"GENSR_CACHE": str(model_cache), "RAY_USAGE_STATS_ENABLED": "0",
                                "WANDB_MODE": "offline"}}
    try:
        _wait_for_dashboard(dashboard, head)
        # the CLI, as users run it; a fresh process so it reads RAY_AUTH_MODE from `env`
        submit = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit",
             f"--address=http://127.0.0.1:{dashboard}",
             f"--runtime-env-json={json.dumps(runtime_env)}", "--",
             "python", "-m", "jobs.train", "--config", "configs/debug.yaml", "--out", str(out),
             "--set", f"data.path={tmp_path / 'data'}", "--set", "train.max_steps=6",
             "--set", "train.log_every=3", "--set", "log.wandb=true",
             "--set", "log.mlflow=true"],
            env=env, capture_output=True, text=True, timeout=600)
        logs = submit.stdout + submit.stderr
        assert submit.returncode == 0 and "succeeded" in logs, logs[-3000:]
        assert "final checkpoint:" in logs
        summary = json.loads((out / "train_summary.json").read_text())
        # relative to the run directory, so a copied run evaluates its own checkpoint
        assert not Path(summary["checkpoint"]).is_absolute()
        assert (out / summary["checkpoint"] / "model" / "trainable.pt").is_file()
        metrics = Path(run_location(GenSRConfig(), out).metrics)
        reports = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["step"] for r in reports] == [3, 6]
        # the job's own output, between `ray job submit`'s header and its verdict
        printed = logs.split("Tailing logs until the job exits")[1].split("succeeded")[0]
        # less the job manager's own lines (one echoes the entrypoint and its flags)
        printed = "\n".join(line for line in printed.splitlines()
                             if "job_manager.py:" not in line and " cli.py:" not in line
                             and not line.startswith("Running entrypoint for job"))
        assert "step 6/6 | loss" in printed
        for noise in ("(RayTrainWorker", "(TrainController", "(SplitCoordinator", "WARNING",
                      "Loading weights", "lightgcn epoch", "DeepSpeed", "wandb", "Traceback"):
            assert noise not in printed, (noise, printed[-3000:])
        _check_trackers(out, reports, monkeypatch)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def _check_trackers(out: Path, reports: list[dict], monkeypatch) -> None:
    """MLflow holds the config as parameters and every report's metrics at its step; W&B's
    offline log holds the config and each reported value."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads it to open one
    client = MlflowClient((out / "mlruns").as_uri())
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("gensr").experiment_id])
    assert mlflow_run.data.params["train.max_steps"] == "6"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss_answer")
    assert [(h.step, h.value) for h in history] == [(r["step"], r["loss_answer"])
                                                    for r in reports]
    (log,) = out.glob("wandb/offline-run-*/run-*.wandb")
    written = log.read_bytes()
    assert b"train.max_steps" in written
    for r in reports:
        assert json.dumps(r["loss_answer"]).encode() in written


def _wait_for_dashboard(port: int, head, timeout: float = 120.0) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited: {head.stdout.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except Exception as exc:  # 401 (token auth) also means the server is up
            if getattr(exc, "code", None) in (401, 403):
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
