"""GPU throughput of the GPU config: a 0.5B decoder (random weights, Qwen2.5-0.5B's shape) with
LoRA + DeepSpeed ZeRO-3 + bf16, on N GPUs through Ray Train.

    python bench/gpu_throughput.py                  # every visible GPU, 40 steps
    python bench/gpu_throughput.py --gpus 1 --steps 60 --batch-size 64

Prints samples/s, backbone tokens/s (the prompt's tokens; the semantic view's title tokens
go through GenSR's own 1-layer encoder and are not counted), model FLOPs utilisation (MFU) and
peak GPU memory, last `ratio=<MFU>`. Without a GPU it stops at once (exit code 2).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import backbone_shape, bench_data, peak_bf16_tflops, quiet, reports  # noqa: E402

CONFIG = Path(__file__).parent.parent / "configs" / "gpu" / "qwen2.5-0.5b-lora-zero3.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=0, help="workers, one GPU each (0: all)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per GPU per step")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-GPU bf16 peak (default: looked up from the device name)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. --set scale.zero_stage=2 (repeatable)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("bench/gpu_throughput.py needs CUDA GPUs and found none "
              f"(torch {torch.__version__}, cuda available: {torch.cuda.is_available()}). "
              "Run it on a GPU node with the gpu extra installed.", file=sys.stderr)
        raise SystemExit(2)
    quiet()
    from gensr_ray.config import apply_overrides, load_config
    from gensr_ray.train.launch import ensure_ray, run_training

    gpus = args.gpus or torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_bf16_tflops(name)
    # no dashboard: a GPU image may carry ray without its `default` extra
    ensure_ray(object_store_memory=4 << 30, include_dashboard=False)
    data = bench_data(None, n_users=2000, n_items=3000)
    cfg = apply_overrides(load_config(CONFIG), {
        "data.path": str(data), "model.backbone": "preset:random-qwen2-0.5b",
        "train.batch_size": args.batch_size, "train.max_steps": args.steps,
        "train.log_every": args.warmup, "train.checkpoint_every": 0, "train.warmup_steps": 1,
        "scale.num_workers": gpus, "scale.cpus_per_worker": 2.0})
    cfg = apply_overrides(cfg, args.set)
    shape = backbone_shape(cfg)  # measured on the CPU once

    out = Path(tempfile.mkdtemp(prefix="gensr-gpu-bench-"))
    started = time.perf_counter()
    run_training(cfg, out)
    wall = time.perf_counter() - started
    rows = reports(cfg, out)
    first, last = rows[0], rows[-1]
    rows_per_s = ((last["step"] - first["step"]) * args.batch_size * gpus
                  / (last["elapsed_s"] - first["elapsed_s"]))
    tokens_per_s = rows_per_s * shape["tokens_per_row"]
    # LoRA: forward 2N + activation gradients 2N FLOPs per token through frozen weights
    # (no weight gradients), non-embedding parameters; adapters and GenSR modules ignored.
    flops = 4 * shape["params"] * tokens_per_s
    memory = max(r.get("gpu_mem_peak_gib", 0.0) for r in rows)
    print(f"{gpus} x {name}, {shape['params'] / 1e6:.0f}M non-embedding params, "
          f"{shape['tokens_per_row']:.0f} backbone tokens/row, batch {args.batch_size}/GPU, "
          f"ZeRO-{cfg.scale.zero_stage} {cfg.scale.precision} LoRA, "
          f"{(last['elapsed_s'] - first['elapsed_s']) / (last['step'] - first['step']):.3f} s/step")
    print(f"samples/s {rows_per_s:.1f}  tokens/s {tokens_per_s:.0f}  "
          f"model TFLOP/s {flops / 1e12:.1f}  peak GPU memory {memory:.2f} GiB  "
          f"(run wall {wall:.0f}s)")
    if peak is None:
        print(f"unknown peak for {name!r}: pass --peak-tflops for MFU")
        raise SystemExit(0)
    print(f"ratio={flops / (gpus * peak * 1e12):.4f}")


if __name__ == "__main__":
    main()
