"""The GPU path end to end on one GPU, in a few minutes: bf16 ZeRO-3 LoRA training of a 0.5B
decoder through Ray Train, a checkpoint, a resume from it, GPU scoring, and the GPU scores'
agreement with the fp32 CPU path, and the evaluator's Ray Data scoring pool on the GPU.

    python bench/gpu_check.py                     # 100 steps + 40 resumed, 100 scored examples
    python bench/gpu_check.py --steps 100 --out /tmp/gpu-check
    python bench/gpu_check.py --smoke             # the script itself on a CPU: tiny Llama

The backbone is `preset:random-qwen2-0.5b` (Qwen2.5-0.5B's shape, random weights, the
dataset's vocabulary), on a generated dataset: nothing is downloaded. Prints tokens/s, samples/s,
MFU, peak GPU memory, the resume, the scoring throughput and agreement, and writes
gpu_check.json into --out. Without a GPU it stops at once (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import backbone_shape, bench_data, peak_bf16_tflops, quiet, reports  # noqa: E402

CONFIG = Path(__file__).parent.parent / "configs" / "gpu" / "qwen2.5-0.5b-lora-zero3.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps, first run")
    parser.add_argument("--resume-steps", type=int, default=40,
                        help="steps after the resume (0: no resume, e.g. to check scoring alone)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step")
    parser.add_argument("--examples", type=int, default=100, help="test examples scored on GPU")
    parser.add_argument("--cpu-examples", type=int, default=3,
                        help="of those, scored again in fp32 on the CPU for agreement")
    parser.add_argument("--out", type=Path, default=None, help="run and results directory")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on a CPU: tiny Llama, bf16 on the CPU accelerator")
    args = parser.parse_args()

    import torch

    if args.smoke:
        import os

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.steps, args.resume_steps, args.batch_size = 20, 10, 10
        args.examples, args.cpu_examples = 8, 4
    elif not torch.cuda.is_available():
        print(f"bench/gpu_check.py needs a CUDA GPU and found none (torch {torch.__version__})",
              file=sys.stderr)
        raise SystemExit(2)
    quiet()
    from gensr_ray.config import apply_overrides, load_config
    from gensr_ray.train.launch import ensure_ray, run_training

    out = args.out or Path(tempfile.mkdtemp(prefix="gensr-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    gpu = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    print(f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    started = time.perf_counter()
    ensure_ray(object_store_memory=(512 << 20) if args.smoke else (4 << 30),
               include_dashboard=False)
    data = bench_data(str(out / "data") if (out / "data").exists() else None,
                      n_users=1500, n_items=2000, out=out / "data")
    cfg = apply_overrides(load_config(CONFIG), {
        "data.path": str(data), "model.backbone": "preset:random-qwen2-0.5b",
        "train.batch_size": args.batch_size, "train.max_steps": args.steps,
        "train.log_every": min(20, max(1, args.steps // 4)), "train.checkpoint_every": args.steps, "train.warmup_steps": 10,
        "scale.num_workers": 1, "scale.cpus_per_worker": 4.0,
        "eval.use_gpu": True, "eval.precision": "bf16"})
    if args.smoke:
        cfg = apply_overrides(cfg, {
            "model.backbone": "preset:tiny-llama", "model.lora_targets": ["q_proj", "v_proj"],
            "scale.use_gpu": False, "scale.cpus_per_worker": 0.5, "eval.use_gpu": False,
            "train.log_every": 5, "train.warmup_steps": 2})
    shape = backbone_shape(cfg)
    print(f"data and backbone ready in {time.perf_counter() - started:.0f}s: "
          f"{shape['params'] / 1e6:.0f}M non-embedding params, "
          f"{shape['tokens_per_row']:.1f} backbone tokens/row", flush=True)

    progress = {"gpu": gpu, "torch": torch.__version__,
                "setup_s": round(time.perf_counter() - started, 1)}

    def phase(**figures) -> None:  # what is known so far, kept if a time limit cuts the run
        progress.update(figures)
        (out / "gpu_check.json").write_text(json.dumps(progress, indent=2) + "\n")
        print(json.dumps(figures), flush=True)

    # 1. train, checkpoint at the last step
    run = out / "run"
    t0 = time.perf_counter()
    first = run_training(cfg, run)
    train_wall = time.perf_counter() - t0
    rows = reports(cfg, run)
    speed = _throughput(rows, args.batch_size, shape)
    phase(train_wall_s=round(train_wall, 1), loop_s=round(rows[-1]["elapsed_s"], 1), **speed,
          input_wait_frac=[round(r.get("input_wait_frac", 0.0), 3) for r in rows])
    # 2. resume the same run with a larger budget: it must continue from the checkpoint
    t0 = time.perf_counter()
    resumed = (run_training(apply_overrides(cfg, {"train.max_steps":
                                                  args.steps + args.resume_steps}), run)
               if args.resume_steps else first)
    resume_wall = time.perf_counter() - t0
    after = reports(cfg, run)[len(rows):] or rows[-1:]
    resumed_from = ({r.get("resumed_from") for r in after} if args.resume_steps
                    else {args.steps})
    phase(resume_wall_s=round(resume_wall, 1), resumed_from=sorted(resumed_from))

    # 3. score on the GPU (bf16) and, for a few examples, on the CPU (fp32)
    scoring, scored = _score(resumed["checkpoint"], cfg, args.examples, args.cpu_examples,
                             gpu_run=not args.smoke)
    phase(**scoring)
    # 4. the same examples through the evaluator's Ray Data scoring pool
    scoring.update(_score_pool(resumed["checkpoint"], cfg, *scored, gpu_run=not args.smoke))

    peak = peak_bf16_tflops(gpu)
    result = {
        **progress, "steps": first["metrics"]["step"],
        "resumed_to": resumed["metrics"]["step"], "resumed_from": sorted(resumed_from),
        "loss_first": rows[0]["loss"], "loss_last": after[-1]["loss"],
        "train_wall_s": round(train_wall, 1), "resume_wall_s": round(resume_wall, 1),
        **speed, "mfu": round(speed["model_tflops"] / peak, 4) if peak else None,
        "gpu_mem_peak_gib": round(max(r.get("gpu_mem_peak_gib", 0.0) for r in rows + after), 2),
        **scoring, "total_wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = (resumed_from == {args.steps} and result["resumed_to"] == args.steps + args.resume_steps
          and scoring["pair_agreement"] >= 0.95)
    print("gpu check:", "OK" if ok else "FAILED", f"(results in {out / 'gpu_check.json'})")
    raise SystemExit(0 if ok else 1)


def _throughput(rows: list[dict], batch_size: int, shape: dict) -> dict:
    """Steady state between the first and the last report (start-up left out)."""
    first, last = rows[0], rows[-1]
    samples_per_s = ((last["step"] - first["step"]) * batch_size
                     / (last["elapsed_s"] - first["elapsed_s"]))
    tokens_per_s = samples_per_s * shape["tokens_per_row"]
    # LoRA: forward 2N + activation gradients 2N FLOPs per token through frozen weights
    return {"samples_per_s": round(samples_per_s, 1), "step_s": round(batch_size / samples_per_s, 3),
            "tokens_per_s": round(tokens_per_s),
            "model_tflops": round(4 * shape["params"] * tokens_per_s / 1e12, 2)}


def _score(checkpoint: str, cfg, n: int, n_cpu: int, gpu_run: bool = True) -> tuple:
    import numpy as np
    import torch

    from gensr_ray.assemble import load_for_eval
    from gensr_ray.config import apply_overrides
    from gensr_ray.data import contract
    from gensr_ray.eval.gensr_scorer import GenSRScorer
    from gensr_ray.eval.metrics import sampled_metrics, sampled_ranks

    examples = contract.read_table(contract.examples_dir(cfg.data.path, "test")).slice(0, n)
    batch = examples.to_pydict()
    candidates = np.array([[t] + list(negs) for t, negs in zip(batch["target"],
                                                               batch["negatives"])])
    scores = {}
    timing = {}
    for device, precision, rows in (("gpu", "bf16", n), ("cpu", "fp32", n_cpu)):
        run_cfg = apply_overrides(cfg, {"eval.use_gpu": gpu_run and device == "gpu",
                                        "eval.precision": precision})
        model, backbone, run_cfg = load_for_eval(checkpoint, run_cfg)
        scorer = GenSRScorer(model, backbone, run_cfg, {}, depth=0,
                             batch_size=run_cfg.eval.batch_size)
        part = {k: v[:rows] for k, v in batch.items()}
        scorer.score({k: v[:1] for k, v in part.items()}, candidates[:1])  # warm-up
        sync = torch.cuda.synchronize if run_cfg.eval.use_gpu else (lambda: None)
        sync()
        t0 = time.perf_counter()
        scores[device] = scorer.score(part, candidates[:rows])
        sync()
        timing[device] = time.perf_counter() - t0
        del model, scorer
    gpu, cpu = scores["gpu"], scores["cpu"]
    ranks = sampled_ranks(gpu[:, 0], gpu[:, 1:])
    metrics = sampled_metrics(ranks, ks=(10,))
    k = len(cpu)
    diff = np.abs(gpu[:k] - cpu)
    order_gpu, order_cpu = np.argsort(-gpu[:k], axis=1), np.argsort(-cpu, axis=1)
    # candidate pairs the fp32 scores tell apart by more than bf16's resolution (8 significant
    # bits, a few roundings deep): the bf16 GPU path must order them the same way
    tol = 2 ** -6 * np.abs(cpu).max()
    gap_cpu = cpu[:, :, None] - cpu[:, None, :]
    gap_gpu = gpu[:k, :, None] - gpu[:k, None, :]
    decisive = np.abs(gap_cpu) > tol
    return {
        "scored_examples": len(gpu), "candidates": gpu.shape[1],
        "gpu_candidates_per_s": round(gpu.size / timing["gpu"]),
        "cpu_fp32_candidates_per_s": round(cpu.size / timing["cpu"], 1),
        "HR@10": round(metrics["HR@10"], 4), "NDCG@10": round(metrics["NDCG@10"], 4),
        "agreement_examples": k,
        "max_abs_diff": round(float(diff.max()), 4),
        "score_scale": round(float(np.abs(cpu).max()), 4),
        "decisive_pairs": int(decisive.sum() // 2),
        "pair_agreement": float((np.sign(gap_gpu) == np.sign(gap_cpu))[decisive].mean())
        if decisive.any() else 1.0,
        "top1_agreement": float((order_gpu[:, 0] == order_cpu[:, 0]).mean()),
        "top10_overlap": float(np.mean([len(set(a[:10]) & set(b[:10])) / 10
                                        for a, b in zip(order_gpu, order_cpu)])),
    }, (batch, candidates, gpu)


def _score_pool(checkpoint: str, cfg, batch: dict, candidates, in_process, gpu_run: bool) -> dict:
    """The evaluator's distributed path: a Ray Data actor pool of one GPU worker, bf16,
    against the in-process scores of the same examples."""
    import numpy as np

    from gensr_ray.config import apply_overrides
    from gensr_ray.eval.distributed import DistributedGenSRScorer
    from gensr_ray.eval.metrics import sampled_ranks

    pool_cfg = apply_overrides(cfg, {"eval.use_gpu": gpu_run, "eval.precision": "bf16",
                                     "eval.num_workers": 1, "eval.cpus_per_worker": 2.0})
    t0 = time.perf_counter()
    pooled = DistributedGenSRScorer(checkpoint, pool_cfg, {}).score(batch, candidates)
    pool_s = time.perf_counter() - t0
    ranks = sampled_ranks(in_process[:, 0], in_process[:, 1:])
    pooled_ranks = sampled_ranks(pooled[:, 0], pooled[:, 1:])
    return {
        # start-up (actor, model load) included: a lower bound of the pool's steady rate
        "pool_candidates_per_s": round(pooled.size / pool_s),
        "pool_wall_s": round(pool_s, 1),
        "pool_max_abs_diff": round(float(np.abs(pooled - in_process).max()), 4),
        "pool_rank_agreement": float((pooled_ranks == ranks).mean()),
    }


if __name__ == "__main__":
    main()
