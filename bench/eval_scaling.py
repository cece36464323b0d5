"""Examples scored per second by GenSR's distributed scorer with 2 Ray workers against 1, and
the single-process scorer beside them, on the same checkpoint, examples and candidates.

    python bench/eval_scaling.py                  # tiny Llama, title_text prompt, synthetic data
    python bench/eval_scaling.py --rounds 1 --examples 400 --backbone preset:smollm2-135m-L4

Each distributed figure is wall time of one `score` call, actor start-up (model loading)
included, as `gensr eval` pays it. The checkpoint is a seeded, untrained model export: speed
does not depend on the weights. The 1-worker and 2-worker passes are repeated in turn
(`--rounds`, 3 by default: ~9 minutes on a 2-core machine), so that a drift of the
machine's speed falls on both; one round's ratio moved by +-0.07 here. Prints the rates,
each round's ratio, and last `ratio=<2 workers / 1 worker>` (the median over rounds).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import bench_data, quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="preset:tiny-llama")
    parser.add_argument("--prompt", default="title_text")
    parser.add_argument("--examples", type=int, default=3752,
                        help="examples (100 candidates each); the default is the size of the "
                             "demo's evaluation pass")
    parser.add_argument("--workers", type=int, default=2, help="the larger pool")
    parser.add_argument("--rounds", type=int, default=3,
                        help="passes of each pool size, alternated; the ratio is the median")
    args = parser.parse_args()
    quiet()
    import numpy as np
    import torch

    from gensr_ray.allocator import keep_freed_memory
    from gensr_ray.assemble import build_model, load_for_eval, resolve_config_backbone
    from gensr_ray.checkpoint import write_model_export
    from gensr_ray.config import GenSRConfig, apply_overrides
    from gensr_ray.data.validate import fingerprint
    from gensr_ray.eval.distributed import DistributedGenSRScorer
    from gensr_ray.eval.gensr_scorer import GenSRScorer
    from gensr_ray.eval.harness import load_eval_examples
    from gensr_ray.ray_init import ensure_ray

    data = bench_data(None, n_users=max(200, args.examples), n_items=600)
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(data), "model.backbone": args.backbone, "model.prompt": args.prompt,
        "eval.cpus_per_worker": 1.0})
    model, _ = build_model(cfg, resolve_config_backbone(cfg))
    checkpoint = Path(tempfile.mkdtemp(prefix="gensr-eval-bench-")) / "ckpt"
    write_model_export(checkpoint / "model", {n: p.detach().clone() for n, p in
                                              model.named_parameters() if p.requires_grad},
                       cfg, {"step": 0, "data": fingerprint(data)})
    batch = load_eval_examples(data, "test", max_examples=args.examples)["rec"]
    candidates = np.concatenate([batch["target"][:, None], batch["negatives"]], axis=1)
    n = len(candidates)

    ensure_ray(num_cpus=args.workers)
    ratios, scores = [], {}
    for round_ in range(args.rounds):
        rates = {}
        for workers in (1, args.workers):
            scorer = DistributedGenSRScorer(
                str(checkpoint), apply_overrides(cfg, {"eval.num_workers": workers}), {})
            t0 = time.perf_counter()
            scores[workers] = scorer.score(batch, candidates)
            rates[workers] = n / (time.perf_counter() - t0)
            print(f"{workers} worker(s): {rates[workers]:.1f} examples/s "
                  f"({n} examples x {candidates.shape[1]} candidates)", flush=True)
        ratios.append(rates[args.workers] / rates[1])
        print(f"round {round_ + 1}: {args.workers} workers / 1 = {ratios[-1]:.2f}", flush=True)

    torch.set_num_threads(1)  # as one scoring worker runs
    keep_freed_memory()
    model, backbone, local_cfg = load_for_eval(checkpoint, cfg)
    single = GenSRScorer(model, backbone, local_cfg, {}, depth=0, batch_size=cfg.eval.batch_size)
    t0 = time.perf_counter()
    reference = single.score(batch, candidates)
    print(f"single process, 1 thread, model loaded: {n / (time.perf_counter() - t0):.1f} "
          "examples/s", flush=True)
    diff = max(float(np.abs(s - reference).max()) for s in scores.values())
    print(f"largest score difference against the single process: {diff:.2e}")
    print(f"ratio={float(np.median(ratios)):.2f}")


if __name__ == "__main__":
    main()
