"""Steady-state samples/s of the Ray Train + DeepSpeed ZeRO-3 path vs a plain single-process
torch loop on the same model, data and batch, in one run; start-up time reported beside it.

    python bench/trainer_overhead.py                 # tiny Llama, synthetic data, CPU
    python bench/trainer_overhead.py --steps 60 --batch-size 50

Both sides use one training process with the same number of torch threads (the Ray worker
reserves that many CPUs; the remaining core feeds Ray Data). Throughput is measured between
the first and the last report after `--warmup` steps. Prints last `ratio=<plain / ray>`
(1.0 = no overhead; the goal is <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import bench_data, quiet  # noqa: E402


def plain_loop(cfg, steps: int, warmup: int) -> float:
    """Rows/s of forward -> loss -> backward -> AdamW step with no distribution at all."""
    import torch

    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.data import contract
    from gensr_ray.inputs.build import build_features
    from gensr_ray.model.gensr import gensr_loss

    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    per_example = 1 + cfg.train.negatives_per_example
    needed = (steps + 1) * cfg.train.batch_size // per_example + 1
    examples = contract.read_table(contract.examples_dir(cfg.data.path, "train")).slice(0, needed)
    rows = encoder.encode(examples.to_pydict(), negatives_per_example=cfg.train.negatives_per_example)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bs = cfg.train.batch_size
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        batch = collate({k: v[step * bs:(step + 1) * bs] for k, v in rows.items()})
        loss, _ = gensr_loss(model(batch), batch["label"], cfg.loss, cfg.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    return (steps - warmup) * bs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="preset:tiny-llama")
    parser.add_argument("--prompt", default="minimal")
    parser.add_argument("--data", default=None, help="prepared dataset (default: synthetic)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    quiet()
    import torch

    from gensr_ray.config import GenSRConfig, apply_overrides
    from gensr_ray.train.launch import ensure_ray, run_location, run_training

    data = bench_data(args.data, n_users=300, n_items=500)
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(data), "model.backbone": args.backbone, "model.prompt": args.prompt,
        "model.subspace": "full", "train.batch_size": args.batch_size,
        "train.max_steps": args.steps, "train.log_every": args.warmup,
        "train.warmup_steps": 1, "data.shuffle_seed": -1,
        "scale.num_workers": 1, "scale.cpus_per_worker": float(args.threads)})

    torch.set_num_threads(args.threads)
    plain = plain_loop(cfg, args.steps, args.warmup)
    print(f"plain torch loop:       {plain:8.1f} rows/s ({args.threads} thread(s), "
          f"batch {args.batch_size})")

    started = time.perf_counter()
    ensure_ray(num_cpus=args.threads + 1)
    ray_up = time.perf_counter() - started
    out = Path(tempfile.mkdtemp(prefix="gensr-bench-run-"))
    fit_start = time.perf_counter()
    run_training(cfg, out)
    fit_wall = time.perf_counter() - fit_start
    reports = [json.loads(line) for line in Path(run_location(cfg, out).metrics).open()]
    first, last = reports[0], reports[-1]  # first report is at step `warmup`
    ray_rate = (last["step"] - first["step"]) * args.batch_size / (last["elapsed_s"] - first["elapsed_s"])
    startup = fit_wall - last["elapsed_s"]
    print(f"Ray Train + DeepSpeed:  {ray_rate:8.1f} rows/s (ZeRO-{cfg.scale.zero_stage}, 1 worker, "
          f"steps {first['step']}..{last['step']})")
    print(f"start-up: cluster {ray_up:.1f}s, workers + data + engine + checkpoint "
          f"{startup:.1f}s (fit wall {fit_wall:.1f}s)")
    print(f"ratio={plain / ray_rate:.2f}")


if __name__ == "__main__":
    main()
