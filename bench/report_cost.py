"""What reporting metrics costs a training step: the same Ray Train + DeepSpeed run with a
report every step (`train.log_every=1`) and every 20 steps, steady-state seconds per step of
each (between the reports at steps --warmup and --steps).

    python bench/report_cost.py                   # tiny Llama, synthetic data, 2 workers
    python bench/report_cost.py --steps 400

A report averages the window's losses over the workers (one all-reduce), hands the metrics to
Ray Train, whose controller appends them to metrics.jsonl and TensorBoard. Prints both step
times and last `ratio=<every step / every 20>` (goal: close to 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import bench_data, quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args()
    quiet()
    from gensr_ray.config import GenSRConfig, apply_overrides
    from gensr_ray.train.launch import ensure_ray, run_location, run_training

    data = bench_data(None, n_users=300, n_items=500)
    ensure_ray(num_cpus=2)
    seconds = {}
    for every in (20, 1):
        cfg = apply_overrides(GenSRConfig(), {
            "data.path": str(data), "model.prompt": "minimal", "train.batch_size":
            args.batch_size, "train.max_steps": args.steps, "train.log_every": every,
            "train.warmup_steps": 1, "scale.num_workers": 2, "scale.cpus_per_worker": 0.5})
        out = Path(tempfile.mkdtemp(prefix=f"gensr-report-{every}-"))
        run_training(cfg, out, progress=False)
        rows = [json.loads(line) for line in Path(run_location(cfg, out).metrics).open()]
        at = {r["step"]: r["elapsed_s"] for r in rows}
        seconds[every] = (at[args.steps] - at[args.warmup]) / (args.steps - args.warmup)
        print(f"log_every={every:2d}: {seconds[every] * 1000:7.1f} ms/step "
              f"({len(rows)} reports)", flush=True)
    print(f"ratio={seconds[1] / seconds[20]:.2f}")


if __name__ == "__main__":
    main()
