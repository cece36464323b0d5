"""The worker side of distribution: the Ray Train context, torch.distributed and DeepSpeed.

The per-worker loop (gensr_ray.train.loop) calls `Strategy` and never imports deepspeed,
torch.distributed or ray.train itself. The driver side (Ray init, the TorchTrainer) is
gensr_ray.train.launch; this module imports neither it nor the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

import torch

from gensr_ray import storage
from gensr_ray.checkpoint import (
    METRICS,
    CheckpointError,
    check_same_data,
    check_same_vocabulary,
    checkpoint_name,
    checkpoints,
    prune_checkpoints,
    score_metric,
    verify_checkpoint,
    write_manifest,
    write_model_export,
)
from gensr_ray.config import ConfigError, GenSRConfig
from gensr_ray.tracking import RunLoggers, Tracker

log = logging.getLogger(__name__)

CHECKPOINT_STATE = "deepspeed"  # engine.save_checkpoint directory inside a checkpoint
CHECKPOINT_MODEL = "model"  # gathered trainable weights + peft adapters, for evaluation
TAG = "state"


def check_precision_supported(precision: str) -> None:
    """DeepSpeed refuses fp16 where its accelerator has no fp16 kernels (on CPUs: oneDNN's,
    which need AVX512-FP16 or AMX), deep inside its engine; say so by the setting's name."""
    if precision != "fp16":
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():  # None, not False, on CPUs without it
        raise ConfigError(f"scale.precision=fp16: DeepSpeed's {accelerator.device_name()} "
                          f"accelerator on this machine ({socket.gethostname()}) has no fp16 "
                          f"support (CPUs need oneDNN fp16 kernels: AVX512-FP16 or AMX-FP16); "
                          f"use scale.precision=bf16 or fp32")


def deepspeed_config(cfg: GenSRConfig, world_size: int) -> dict:
    """The DeepSpeed config, computed from typed settings (never hand-kept JSON)."""
    t, s = cfg.train, cfg.scale
    zero: dict = {"stage": s.zero_stage}
    if s.zero_stage == 3:
        # small parameters stay whole; the backbone's matrices are partitioned
        zero.update({"stage3_param_persistence_threshold": s.zero3_persistence_threshold,
                     "stage3_gather_16bit_weights_on_model_save": False})
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": s.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": s.precision == "bf16"},
        # dynamic loss scaling (loss_scale 0) keeps fp16 gradients in range
        "fp16": {"enabled": s.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            # DeepSpeed's FusedAdam / CPUAdam compile for minutes on a fresh machine (nvcc and
            # ninja on the image): torch's AdamW unless asked for, fused on GPUs (one kernel
            # for all parameters, no compiler), the plain loop on CPUs
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.999],
                       "eps": 1e-8, **_torch_adamw(s)},
        },
        "scheduler": _scheduler(t),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _scheduler(t) -> dict:
    if t.lr_schedule == "cosine":
        # DeepSpeed's WarmupCosineLR scales the optimizer's lr: 0 -> lr linearly over the
        # warm-up, then half a cosine down to 0 at max_steps
        return {"type": "WarmupCosineLR",
                "params": {"total_num_steps": t.max_steps, "warmup_min_ratio": 0.0,
                           "warmup_num_steps": max(2, t.warmup_steps), "cos_min_ratio": 0.0,
                           "warmup_type": "linear"}}
    return {"type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
                       "warmup_num_steps": max(1, t.warmup_steps), "warmup_type": "linear"}}


def _torch_adamw(s) -> dict:
    if s.fused_adam or s.offload_optimizer:
        return {"torch_adam": False}
    return {"torch_adam": True, **({"fused": True} if s.use_gpu else {})}


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def configure_accelerator(use_gpu: bool) -> None:
    """Pick DeepSpeed's accelerator before deepspeed is first imported in this process."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SingleProcessContext:
    """Rank 0 of 1, for running the strategy in a plain process, outside Ray Train (tools
    that need the engine but no cluster, and tests of the DeepSpeed path alone)."""

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0


class Strategy:
    """The worker's view of the job: rank, data shard, DeepSpeed engine, checkpoints.

    `context` defaults to Ray Train's (inside train_loop_per_worker); reporting and the data
    shard need it, the engine and saving do not. `run_dir` is the run's checkpoint storage
    (a path or URI): resuming looks there for the newest intact checkpoint."""

    def __init__(self, cfg: GenSRConfig, context=None, run_dir: str | None = None,
                 tensorboard: str | None = None, loggers: dict | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.tracker = Tracker(tensorboard)  # local mode only: a worker group's driver logs
        configure_accelerator(cfg.scale.use_gpu)
        _quiet()
        if context is None:
            import ray.train

            context = ray.train.get_context()
        self.context = context
        self.rank = self.context.get_world_rank()
        self.world_size = self.context.get_world_size()
        # W&B / MLflow (log.wandb, log.mlflow): rank 0 logs each report
        self.loggers = RunLoggers(cfg.log, cfg.to_dict(), **(loggers or {})) \
            if self.rank == 0 and (cfg.log.wandb or cfg.log.mlflow) else None
        self.engine = None
        self.vocabulary: list[str] | None = None  # a random preset's words (see prepare)
        self._init_process_group()

    # -- set-up -------------------------------------------------------------------------
    def _init_process_group(self) -> None:
        import deepspeed
        import torch.distributed as dist

        # the shared-memory allreduce op JIT-compiles for a minute on every fresh CPU
        # machine; plain gloo is what we want there
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            # Ray Train local mode (num_workers=0): one process, no process group yet
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group("nccl" if self.cfg.scale.use_gpu else "gloo",
                                    rank=0, world_size=1)
            # local mode destroys its group at the end of a run; DeepSpeed keeps the groups
            # it derived from the last one, which a second run in this process must not use
            from deepspeed.utils import groups

            for name, value in list(vars(groups).items()):
                if name.endswith("_GROUP") and isinstance(value, dist.ProcessGroup):
                    setattr(groups, name, None)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        if self.cfg.scale.use_gpu:
            torch.cuda.set_device(self.context.get_local_rank())

    @property
    def device(self) -> torch.device:
        if self.cfg.scale.use_gpu:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    def prepare(self, model: torch.nn.Module, vocabulary: list[str] | None = None):
        """Wrap the model in a DeepSpeed engine (ZeRO partitioning, optimizer, scheduler).
        `vocabulary`: the backbone's record for checkpoints (`assemble.preset_vocabulary`)."""
        import deepspeed

        self.vocabulary = vocabulary
        check_precision_supported(self.cfg.scale.precision)
        if self.cfg.scale.zero_stage == 3:
            # GenSR reads the Yes/No rows of the LM head outside the head's own forward
            deepspeed.zero.register_external_parameter(model, model.answer_head_weight())
        model.train()  # from_pretrained returns eval mode: dropout as the backbone configures it
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params,
            config=deepspeed_config(self.cfg, self.world_size))
        return self.engine

    def dataset_shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    # -- the step -----------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """Optimizer step at accumulation boundaries; True when the step happened."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def memory(self) -> dict[str, float]:
        """This worker's peak accelerator memory so far, in GiB (nothing on CPUs)."""
        if not self.cfg.scale.use_gpu:
            return {}
        return {"gpu_mem_peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over all workers."""
        return {k: v / self.world_size for k, v in self.sum(values).items()}

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum scalar metrics over all workers (every worker calls it: a collective)."""
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        if dist.is_initialized() and self.world_size > 1:
            if self.cfg.scale.use_gpu:
                t = t.to(self.device)
            dist.all_reduce(t)
        return dict(zip(keys, t.cpu().tolist()))

    @contextlib.contextmanager
    def evaluating(self):
        """The engine in eval mode (no dropout) for the block, in training mode after it."""
        self.engine.eval()
        try:
            yield self.engine
        finally:
            self.engine.train()

    # -- checkpoints --------------------------------------------------------------------
    def report(self, metrics: dict, state: dict | None = None) -> None:
        """Report metrics to Ray Train; with `state`, also a checkpoint every rank writes."""
        import ray.train

        local = _local_mode(self.context)
        if self.loggers is not None:
            self.loggers.log(metrics)
        if state is None:
            ray.train.report(metrics)
            if local:
                self._log_local(metrics, None)
            return
        tmp = Path(tempfile.mkdtemp(prefix="gensr-ckpt-"))
        try:
            self.save(tmp, state)
            if local:
                # Ray Train's local mode keeps no checkpoints: persist it like a worker group
                # would, so the same --out resumes in either mode
                checkpoint = self._persist_local(tmp)
            else:
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
            if local:
                self._log_local(metrics, storage.uri_of(checkpoint.filesystem, checkpoint.path))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # Ray has copied it to storage

    def close(self) -> None:
        """End the W&B / MLflow runs and the local-mode TensorBoard writer."""
        if self.loggers is not None:
            self.loggers.close()
        self.tracker.close()

    def _log_local(self, metrics: dict, checkpoint: str | None) -> None:
        """Local mode runs no Ray Train callbacks: append the report to the run's
        metrics.jsonl here, as the driver's callback does for a worker group."""
        self.tracker.log(metrics)
        path = storage.join(self.run_dir, METRICS)
        lines = storage.read_text(path).splitlines() if storage.exists(path) else []
        lines.append(json.dumps({**metrics, "checkpoint": checkpoint}, default=float))
        storage.write_text(path, "\n".join(lines) + "\n")

    def _persist_local(self, tmp: Path):
        import pyarrow.fs
        import ray.train

        if not self.run_dir:
            raise ValueError("local mode needs the run's storage (Strategy(run_dir=...))")
        target = storage.join(self.run_dir, checkpoint_name())
        fs, inner = storage.filesystem(target)
        fs.create_dir(inner, recursive=True)
        pyarrow.fs.copy_files(str(tmp), inner, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
        prune_checkpoints(self.run_dir, self.cfg.scale.num_to_keep, score_metric(self.cfg))
        return ray.train.Checkpoint(path=inner, filesystem=fs)

    def save(self, directory: Path, state: dict) -> None:
        """DeepSpeed state (every rank its partition) + gathered trainable weights (rank 0)."""
        import deepspeed

        self.engine.save_checkpoint(str(directory / CHECKPOINT_STATE), tag=TAG,
                                    client_state=state)
        model = self.engine.module
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        weights = {}
        for name, param in trainable:
            # the optimizer's fp32 master copy, gathered from every rank's partition (a
            # collective: every rank calls it); under bf16 / fp16 the module's own parameter
            # is the rounded working copy
            master = deepspeed.utils.safe_get_full_fp32_param(param)
            if master is not None:
                if self.is_rank_0:
                    weights[name] = master.detach().to("cpu", torch.float32, copy=True)
                continue
            # no ZeRO optimizer: gather the (fp32) parameter itself
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.is_rank_0:
                    weights[name] = param.detach().to("cpu", torch.float32, copy=True)
        if self.is_rank_0:
            write_model_export(directory / CHECKPOINT_MODEL, weights, self.cfg, state,
                               self.vocabulary)
        write_manifest(directory, self.rank, self.world_size)  # last: what this rank wrote

    def restore(self, data: dict | None = None) -> dict | None:
        """Load the newest intact checkpoint of the run into the engine; its client state, or
        None when the run has none. `data` is the dataset's fingerprint: a checkpoint trained
        on other data is refused unless data.allow_change.

        Candidates are every checkpoint directory in the run's storage, newest first (one
        written before a crash but never registered with Ray included), then Ray's latest.
        One whose files do not match its manifest is skipped with a warning; every rank sees
        the same files, so every rank picks the same checkpoint."""
        import ray.train

        candidates = []
        if self.run_dir:
            fs, _ = storage.filesystem(self.run_dir)
            candidates = [ray.train.Checkpoint(path=storage.filesystem(c)[1], filesystem=fs)
                          for c in checkpoints(self.run_dir)]
        latest = ray.train.get_checkpoint()
        if latest is not None and not any(c.path == latest.path for c in candidates):
            candidates.append(latest)
        skipped = []
        for checkpoint in candidates:
            with checkpoint.as_directory() as directory:
                try:
                    verify_checkpoint(directory)
                except CheckpointError as exc:
                    log.warning("rank %d: skipping checkpoint: %s", self.rank, exc)
                    skipped.append(str(exc))
                    continue
                check_same_vocabulary(Path(directory), self.vocabulary, self.cfg.model.backbone,
                                      f"checkpoint {checkpoint.path}")
                state = self.load(Path(directory))
            if not self.cfg.data.allow_change:
                check_same_data(state.get("data"), data or {}, f"checkpoint {checkpoint.path}")
            log.info("rank %d resumed from %s at step %s", self.rank, checkpoint.path,
                     state.get("step"))
            return state
        if skipped:
            raise CheckpointError(f"{self.run_dir}: no intact checkpoint to resume from ("
                                  + "; ".join(skipped[:3]) + ")")
        return None

    def load(self, directory: Path) -> dict:
        """Load a checkpoint directory's DeepSpeed state into the engine; its client state.

        DeepSpeed's own loader unpickles whatever the files hold (weights_only=False), so a
        file planted in checkpoint storage would run code on every worker; here every file
        is read with torch's weights-only unpickler, which admits tensors, containers and
        the few DeepSpeed types a checkpoint holds, and refuses anything else."""
        self.engine.checkpoint_engine.load = _weights_only_load
        _, state = self.engine.load_checkpoint(
            str(directory / CHECKPOINT_STATE), tag=TAG,
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if state is None:
            raise CheckpointError(f"{directory / CHECKPOINT_STATE}: no DeepSpeed state "
                                  f"tagged {TAG!r}")
        return state


def _weights_only_load(path: str, map_location=None):
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("\n\n")[0].strip()
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and "
                              f"DeepSpeed's checkpoint types ({reason})") from None


def _local_mode(context) -> bool:
    return type(context).__name__.startswith("Local")
