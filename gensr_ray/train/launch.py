"""The driver side of training: a Ray cluster, a TorchTrainer, its callbacks and placement.

`run_training` is what the CLI, the Ray jobs, Tune trials and tests call. Workers run
gensr_ray.train.loop; the worker side of distribution is gensr_ray.train.strategy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gensr_ray import storage
from gensr_ray.assemble import resolve_config_backbone
from gensr_ray.checkpoint import (
    METRICS,
    SUMMARY,
    CheckpointError,
    check_resumable,
    checkpoints,
    ranked_checkpoints,
    remove_incomplete,
    score_metric,
)
from gensr_ray.config import ConfigError, GenSRConfig
from gensr_ray.data.contract import DataError
from gensr_ray.data.validate import validate_dataset
from gensr_ray.inputs.build import item_tokens
from gensr_ray.model.backbone import backbone_kind, load_tokenizer
from gensr_ray.ray_init import ensure_ray, object_store_bytes, started_local_cluster
from gensr_ray.tracking import Tracker
from gensr_ray.train.curves import plot_training, read_metrics
from gensr_ray.train.dataset import DATA_TASK_CPUS, training_dataset
from gensr_ray.train.loop import train_loop_per_worker
from gensr_ray.train.progress import TrainingProgress
from gensr_ray.train.strategy import configure_accelerator

log = logging.getLogger(__name__)

CURVES = "training_curves.png"  # in --out: loss parts and validation against the step


@dataclass(frozen=True)
class RunLocation:
    """Where a run writes: its --out (a local directory or a URI) and Ray Train's storage.

    The run's name is derived from --out, so each --out (and each Tune trial) has its own
    directory under a shared storage prefix and only ever resumes from its own checkpoints.
    """

    out: str
    storage_path: str  # scale.storage_path, or <out>/ray

    @property
    def name(self) -> str:
        digest = hashlib.sha256(self.out.encode()).hexdigest()[:10]
        return f"{self.out.rstrip('/').rsplit('/', 1)[-1] or 'run'}-{digest}"

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def metrics(self) -> str:
        return storage.join(self.run_dir, METRICS)

    @property
    def tensorboard(self) -> str:
        """TensorBoard event files, written on the driver's node: <out>/tensorboard, or for
        an --out on object storage this node's $GENSR_CACHE/tensorboard/<name>."""
        if storage.is_uri(self.out):
            return str(storage.cache_root() / "tensorboard" / self.name)
        return storage.join(self.out, "tensorboard")


    def loggers(self, cfg: GenSRConfig) -> dict:
        """Where the rank-0 worker's W&B and MLflow runs write (gensr_ray.tracking.RunLoggers):
        W&B's files in <out>/wandb (for an --out on object storage, this node's cache); MLflow to log.mlflow_tracking_uri, $MLFLOW_TRACKING_URI
        (read here, on the driver) or a file store in <out>/mlruns."""
        local = not storage.is_uri(self.out)
        uri = cfg.log.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if cfg.log.mlflow and not uri:
            if not local:
                raise ConfigError("log.mlflow with an --out on object storage needs "
                                  "log.mlflow_tracking_uri (or $MLFLOW_TRACKING_URI)")
            uri = Path(self.out, "mlruns").as_uri()
        # W&B writes into <dir>/wandb
        wandb_dir = self.out if local else str(storage.cache_root() / "wandb" / self.name)
        return {"name": self.name, "wandb_dir": wandb_dir, "mlflow_uri": uri or None}


def run_location(cfg: GenSRConfig, out: str | Path) -> RunLocation:
    out = storage.absolute(out)
    return RunLocation(out, storage.absolute(cfg.scale.storage_path or storage.join(out, "ray")))


def _metrics_log_callback(path: str, tensorboard: str):
    """A Ray Train callback (runs in the controller) appending each report to `path` and
    logging it to TensorBoard in `tensorboard`.

    `path` lives on the run's storage (a local directory or s3://, gs://), next to the
    checkpoints, and keeps the lines of earlier attempts of the same run.
    """
    from ray.train import UserCallback

    class MetricsLog(UserCallback):
        def __init__(self):
            self.lines: list[str] | None = None
            self.tracker = Tracker(tensorboard)

        def after_report(self, run_context, metrics, checkpoint):
            import pyarrow.fs

            fs, file = pyarrow.fs.FileSystem.from_uri(path)
            if self.lines is None:  # first report of this attempt: keep earlier lines
                self.lines = []
                if fs.get_file_info(file).type == pyarrow.fs.FileType.File:
                    with fs.open_input_stream(file) as f:
                        self.lines = f.read().decode().splitlines()
            self.tracker.log(metrics[0])  # rank 0's report
            row = {**metrics[0], "checkpoint": storage.uri_of(checkpoint.filesystem,
                                                              checkpoint.path)
                   if checkpoint else None}
            self.lines.append(json.dumps(row, default=float))
            fs.create_dir(file.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(file) as f:
                f.write(("\n".join(self.lines) + "\n").encode())

    return MetricsLog()


def check_resources(cfg: GenSRConfig) -> None:
    """Refuse a worker group this machine's cluster can never hold, or one that leaves Ray
    Data no CPU (either would wait forever); on a cluster that may grow (an autoscaler), say
    what is waited for."""
    import ray

    s = cfg.scale
    if s.num_workers == 0:
        return
    need = {"CPU": s.num_workers * s.cpus_per_worker, "GPU": s.num_workers if s.use_gpu else 0}
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0)}
    left = have.get("CPU", 0.0) - need["CPU"]
    if short:
        message = (f"scale.num_workers={s.num_workers} x scale.cpus_per_worker="
                   f"{s.cpus_per_worker}{' + 1 GPU each' if s.use_gpu else ''} needs "
                   + ", ".join(f"{v:g} {k}" for k, v in short.items())
                   + "; the cluster has " + ", ".join(f"{have.get(k, 0.0):g} {k}" for k in short))
        remedy = "lower scale.num_workers or scale.cpus_per_worker"
    elif left < DATA_TASK_CPUS:
        # the workers would start and then wait forever for their first batch: Ray Data's
        # read/tokenize tasks run only on the CPUs the workers leave free
        message = (f"scale.num_workers={s.num_workers} x scale.cpus_per_worker="
                   f"{s.cpus_per_worker} needs {need['CPU']:g} of the cluster's "
                   f"{have.get('CPU', 0.0):g} CPUs and leaves less than {DATA_TASK_CPUS} for "
                   "Ray Data's read/tokenize tasks")
        remedy = ("lower scale.cpus_per_worker (e.g. "
                  f"{(have.get('CPU', 0.0) - 0.5) / s.num_workers:g})")
    else:
        return
    if started_local_cluster():
        raise ConfigError(f"{message}: {remedy}")
    log.warning("%s: waiting for the cluster to grow (autoscaler)", message)


def fit(cfg: GenSRConfig, where: RunLocation, callbacks: list | None = None,
        data: dict | None = None):
    """Run the training job with Ray Train; returns the ray.train.Result.

    The driver loads the backbone's tokenizer for the Ray Data tasks; each worker
    materialises the backbone itself (train.loop), so no process reads a directory that only
    the driver's node has."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s
    # by default), and a worker's report waits for that poll: a report every step cost
    # ~1.8 s a step (bench/report_cost.py). 0.2 s makes a report cost nothing measurable; a
    # value the user set wins. The controller inherits it from this process.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # DeepSpeed may be imported here too (by transformers' integrations): it would probe
    # for a GPU and warn that it found none
    configure_accelerator(cfg.scale.use_gpu)
    ensure_ray(object_store_memory=object_store_bytes(cfg.scale.object_store_gb))
    check_resources(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    backbone_dir = resolve_config_backbone(cfg)
    tokenizer, kind = load_tokenizer(backbone_dir), backbone_kind(backbone_dir)
    if not storage.is_uri(cfg.data.path):
        # tokenised once here for this node's tasks and workers (a dataset on object
        # storage is mirrored, and its titles tokenised, by the first process of each node)
        item_tokens(cfg, tokenizer)
    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        # the config object crosses the Ray boundary as it is (pickled), never as a dict
        train_loop_config={"cfg": cfg, "run_dir": where.run_dir, "data": data,
                           "tensorboard": where.tensorboard, "loggers": where.loggers(cfg)},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(
            name=where.name, storage_path=where.storage_path,
            failure_config=FailureConfig(max_failures=s.max_failures),
            # with validation, the best checkpoints by train.best_metric are kept (and the
            # latest, which Ray keeps whatever its score, for resuming)
            checkpoint_config=CheckpointConfig(
                num_to_keep=s.num_to_keep, checkpoint_score_attribute=score_metric(cfg),
                checkpoint_score_order="max"),
            callbacks=[_metrics_log_callback(where.metrics, where.tensorboard),
                       *(callbacks or [])]),
        datasets={"train": _in_current_placement_group(training_dataset(cfg, tokenizer, kind))},
    )
    return trainer.fit()


def _in_current_placement_group(ds):
    """Run a dataset's tasks inside the caller's placement group, when there is one.

    A Tune trial reserves a bundle for its Ray Data tasks (gensr_ray.study); scheduling the
    tasks there gives Ray Data fixed limits (the group's bundles) instead of a share of the
    cluster negotiated with the trainer, which on a small node left it nothing to run on.
    """
    import ray.util
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.get_current_placement_group()
    if group is not None:
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        ds.context.scheduling_strategy = strategy
        ds.context.scheduling_strategy_large_args = strategy
    return ds


def run_training(cfg: GenSRConfig, out: str | Path, callbacks: list | None = None,
                 progress: bool = True) -> dict:
    """Train with Ray Train; returns {"checkpoint": path or URI, "metrics": dict}, also
    written to <out>/train_summary.json. `out` may be a local directory or a URI.

    `callbacks`: extra Ray Train callbacks (Tune trials pass TuneReportCallback);
    `progress`: the driver's progress display (gensr_ray.train.progress)."""
    where = run_location(cfg, out)
    if not storage.is_uri(where.out):
        Path(where.out).mkdir(parents=True, exist_ok=True)
    with run_lock(where.out):
        data = validate_dataset(cfg.data.path)  # before any worker starts
        remove_incomplete(where.run_dir)  # saves cut short by a crash; resume skips them too
        if not cfg.data.allow_change:
            check_resumable(where.run_dir, data)
        try:
            with TrainingProgress(where.metrics, cfg.train.max_steps, score_metric(cfg),
                                  quiet=not progress):
                result = fit(cfg, where, callbacks=callbacks, data=data)
        except Exception as exc:  # Ray raises a worker's error wrapped in its own
            raise _user_error(exc) or exc from exc
        if result.error is not None:
            raise _user_error(result.error) or RuntimeError(
                f"training failed: {result.error}") from result.error
        if result.checkpoint is not None:
            # Ray reports (filesystem, path without scheme): a URI evaluation can open
            checkpoint = storage.uri_of(result.checkpoint.filesystem, result.checkpoint.path)
        else:  # local mode re-run of a finished run: Ray holds none, the storage does
            saved = checkpoints(where.run_dir)
            if not saved:
                raise RuntimeError("training reported no checkpoint")
            checkpoint = saved[0]
        summary = {"checkpoint": _relative_to(checkpoint, where.out), "metrics": result.metrics}
        best = ranked_checkpoints(where.run_dir, score_metric(cfg)) if score_metric(cfg) else []
        if best:
            summary.update(best_checkpoint=_relative_to(best[0][0], where.out),
                           best_metric=score_metric(cfg), best_value=best[0][1])
        storage.write_text(storage.join(where.out, SUMMARY),
                           json.dumps(summary, indent=2, default=float) + "\n")
        plot_training(read_metrics(where.metrics), storage.join(where.out, CURVES),
                      title=f"{where.name}: {cfg.model.backbone}, {cfg.model.prompt} prompt")
    return {**summary, "checkpoint": checkpoint,
            **({"best_checkpoint": best[0][0]} if best else {})}


def _user_error(error: BaseException) -> Exception | None:
    """The bad-input error (data, config, checkpoint) a worker raised, as this process's own
    exception: the CLI prints its one line instead of Ray's traceback of the worker group."""
    seen, pending = set(), [error]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # a RayTaskError: the exception the task raised
        if isinstance(cause, BaseException) and cause is not exc:
            pending.append(cause)
            continue
        for kind in (DataError, ConfigError, CheckpointError):
            if isinstance(exc, kind):
                return kind(*exc.args)
        pending += [exc.__cause__, *getattr(exc, "worker_failures", {}).values()]
    return None


@contextmanager
def run_lock(out: str) -> Iterator[None]:
    """One `gensr train` per --out at a time. The lock is an flock on a file in --out (for a
    URI, in this machine's cache: it guards against runs started from the same machine); the
    OS releases it when its process dies, so a crashed run leaves no stale lock behind."""
    if storage.is_uri(out):
        path = storage.cache_root() / "locks" / (hashlib.sha256(out.encode()).hexdigest()[:16]
                                                 + ".lock")
    else:
        path = Path(out) / ".gensr-train.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"{out} is in use by another `gensr train` ({holder}); wait for "
                              "it to finish or choose another --out") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def _relative_to(path: str, out: str) -> str:
    """`path` relative to the run directory when it lies inside it (a copied run evaluates
    its own checkpoint), else as it is."""
    prefix = out.rstrip("/") + "/"
    return path.removeprefix(prefix)
