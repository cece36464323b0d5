"""The worker side of distribution: the Ray Train context, torch.distributed and DeepSpeed.

The per-worker loop (gensr_ray.train.loop) calls `Strategy` and never imports deepspeed,
torch.distributed or ray.train itself. The driver side (Ray init, the TorchTrainer) is
gensr_ray.train.launch; this module imports neither it nor the loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

import torch

from gensr_ray.checkpoint import write_model_export
from gensr_ray.config import GenSRConfig

log = logging.getLogger(__name__)

CHECKPOINT_STATE = "deepspeed"  # engine.save_checkpoint directory inside a checkpoint
CHECKPOINT_MODEL = "model"  # gathered trainable weights + peft adapters, for evaluation
TAG = "state"


def deepspeed_config(cfg: GenSRConfig, world_size: int) -> dict:
    """The DeepSpeed config, computed from typed settings (never hand-kept JSON)."""
    t, s = cfg.train, cfg.scale
    zero: dict = {"stage": s.zero_stage}
    if s.zero_stage == 3:
        # small GenSR modules stay unpartitioned; the backbone's matrices are partitioned
        zero.update({"stage3_param_persistence_threshold": 10_000,
                     "stage3_gather_16bit_weights_on_model_save": False})
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": s.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": s.bf16},
        "optimizer": {
            "type": "AdamW",
            # FusedAdam / CPUAdam compile for minutes on a fresh machine: torch's AdamW unless
            # asked for (GPU images with a warm build cache)
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.999],
                       "eps": 1e-8, "torch_adam": not (s.fused_adam or s.offload_optimizer)},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
                       "warmup_num_steps": max(1, t.warmup_steps), "warmup_type": "linear"},
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


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


class Strategy:
    """The worker's view of the job: rank, data shard, DeepSpeed engine, checkpoints."""

    def __init__(self, cfg: GenSRConfig):
        import ray.train

        self.cfg = cfg
        configure_accelerator(cfg.scale.use_gpu)
        _quiet()
        self.context = ray.train.get_context()
        self.rank = self.context.get_world_rank()
        self.world_size = self.context.get_world_size()
        self.engine = None
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

    def prepare(self, model: torch.nn.Module):
        """Wrap the model in a DeepSpeed engine (ZeRO partitioning, optimizer, scheduler)."""
        import deepspeed

        if self.cfg.scale.zero_stage == 3:
            # GenSR reads the Yes/No rows of the LM head outside the head's own forward
            deepspeed.zero.register_external_parameter(model, model.answer_head_weight())
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

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over all workers."""
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        if dist.is_initialized() and self.world_size > 1:
            if self.cfg.scale.use_gpu:
                t = t.to(self.device)
            dist.all_reduce(t)
            t /= self.world_size
        return dict(zip(keys, t.cpu().tolist()))

    # -- checkpoints --------------------------------------------------------------------
    def report(self, metrics: dict, state: dict | None = None) -> None:
        """Report metrics to Ray Train; with `state`, also a checkpoint every rank writes."""
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        tmp = Path(tempfile.mkdtemp(prefix="gensr-ckpt-"))
        try:
            self.save(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            # Ray has copied it to storage; local mode keeps pointing at it (the driver moves it)
            if not _local_mode(self.context):
                shutil.rmtree(tmp, ignore_errors=True)

    def save(self, directory: Path, state: dict) -> None:
        """DeepSpeed state (every rank its partition) + gathered trainable weights (rank 0)."""
        import deepspeed

        self.engine.save_checkpoint(str(directory / CHECKPOINT_STATE), tag=TAG,
                                    client_state=state)
        model = self.engine.module
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        weights = {}
        # ZeRO-3 partitions parameters: gather them, or peft would save empty adapters
        for name, param in trainable:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.is_rank_0:
                    weights[name] = param.detach().to("cpu", copy=True)
        if self.is_rank_0:
            write_model_export(directory / CHECKPOINT_MODEL, weights, self.cfg, state)

    def restore(self) -> dict | None:
        """Load the latest Ray Train checkpoint into the engine; its client state or None."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            _, state = self.engine.load_checkpoint(
                str(Path(directory) / CHECKPOINT_STATE), tag=TAG,
                load_optimizer_states=True, load_lr_scheduler_states=True)
        log.info("rank %d resumed from %s at step %s", self.rank, checkpoint.path,
                 state.get("step"))
        return state


def _local_mode(context) -> bool:
    return type(context).__name__.startswith("Local")
