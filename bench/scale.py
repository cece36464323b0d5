"""The stages around training at growing KuaiSAR-shaped sizes: time and peak memory of
`gensr prepare`, LightGCN, SASRec, the baselines' evaluation and a short training run, and how
each grows with the number of events.

    python bench/scale.py                          # 100k, 400k, 1.6M generated events
    python bench/scale.py --events 50000 200000    # quicker

Each size writes KuaiSAR's three CSVs (bench/prepare_memory.py's generator: 40 events per
user, items and queries Zipf-like, 40 % search) and runs, as a user would, each a fresh
command in its own process tree:

    gensr prepare --dataset kuaisar --no-cf      (5-core filter, examples, negatives)
    gensr pretrain-cf --epochs 1                 (LightGCN, one epoch)
    gensr pretrain-sasrec --epochs 1             (SASRec, one epoch)
    gensr eval --baselines --split test          (popularity, LightGCN, SASRec, BM25; full
               --max-examples N                   catalogue and sampled protocols; a seeded
                                                  N test examples per task at every size)
    gensr train configs/debug.yaml, 20 steps     (Ray Train + DeepSpeed, 2 workers: start-up
                                                  dominates)

The evaluation ranks a fixed number of test examples at every size (--eval-examples, 2,000 per
task), so its time shows how the cost of one example grows with the catalogue. Ranking every
test example exactly costs test users x items, which no index removes; `--eval-examples 0`
measures that.

Peak memory is the largest sum of RSS over the command's process tree (sampled every 0.2 s;
for training that includes the local Ray cluster it starts). Prints a table, the fitted
exponent of time against generated events per stage (least squares on the logs), and last
`ratio=<the worst exponent>` (goal <= 1.2). A stage that fails or passes --stage-limit is
shown as such and left out of the fit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

STAGES = ("prepare", "lightgcn", "sasrec", "baselines", "train")


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def run_stage(command: list[str], limit: float, log: Path) -> dict:
    """Run one command; its wall time, peak process-tree RSS and whether it succeeded."""
    peak, done = [0], threading.Event()
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = "timeout"
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    if code not in (0, "timeout"):
        # a local Ray cluster started by the command may outlive a crash: stop it
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"],
                       capture_output=True, check=False)
    return {"seconds": seconds, "peak_gb": peak[0] / 2**30, "ok": code == 0,
            "status": "ok" if code == 0 else ("timeout" if code == "timeout" else f"exit {code}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    parser.add_argument("--stage-limit", type=float, default=600.0, help="seconds per stage")
    parser.add_argument("--eval-examples", type=int, default=2000,
                        help="test examples per task the baselines rank (0: all)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args()
    from prepare_memory import write_csvs

    gensr = str(Path(sys.executable).parent / "gensr")
    work = Path(tempfile.mkdtemp(prefix="gensr-scale-"))
    env_cache = os.environ.setdefault("GENSR_CACHE", str(work / "cache"))
    print(f"work directory {work}; GENSR_CACHE {env_cache}")
    rows: dict[int, dict[str, dict]] = {}
    kept: dict[int, tuple[int, int]] = {}  # events, items after the 5-core filter
    for events in args.events:
        shape = argparse.Namespace(users=max(10, events // 40), events=events,
                                   items=max(50, events // 8), queries=max(20, events // 20),
                                   search_share=0.4, seed=0)
        csvs, data = work / f"csv-{events}", work / f"data-{events}"
        write_csvs(shape, csvs)
        commands = {
            "prepare": [gensr, "prepare", "--dataset", "kuaisar", "--data-dir", str(csvs),
                        "--out", str(data), "--no-cf"],
            "lightgcn": [gensr, "pretrain-cf", "--data", str(data), "--epochs", "1"],
            "sasrec": [gensr, "pretrain-sasrec", "--data", str(data), "--epochs", "1"],
            "baselines": [gensr, "eval", "--data", str(data), "--baselines", "--split", "test",
                          "--out", str(work / f"baselines-{events}.json"),
                          "--max-examples", str(args.eval_examples)],
            "train": [gensr, "train", "--config", "configs/debug.yaml",
                      "--out", str(work / f"run-{events}"), "--set", f"data.path={data}",
                      "--set", "train.max_steps=20"],
        }
        rows[events] = {}
        for stage in STAGES:
            if stage != "prepare" and not rows[events]["prepare"]["ok"]:
                rows[events][stage] = {"ok": False, "status": "no data", "seconds": 0.0,
                                       "peak_gb": 0.0}
                continue
            result = run_stage(commands[stage], args.stage_limit,
                               work / f"{stage}-{events}.log")
            rows[events][stage] = result
            if stage == "prepare" and result["ok"]:
                import json

                counts = json.loads((data / "meta.json").read_text())["counts"]
                kept[events] = (sum(counts["interactions"].values()), counts["items"])
            print(f"{events:>10,d} events  {stage:<9}  {result['seconds']:8.1f} s  "
                  f"{result['peak_gb']:6.2f} GB  {result['status']}", flush=True)
        if not args.keep:
            import shutil

            shutil.rmtree(csvs, ignore_errors=True)

    print()
    print("| stage | " + " | ".join(f"{e:,d} events" for e in args.events) + " | exponent |")
    print("|---|" + "---|" * (len(args.events) + 1))
    print("| kept (5-core): events, items | " + " | ".join(
        f"{kept[e][0]:,d}, {kept[e][1]:,d}" if e in kept else "-" for e in args.events)
        + " | |")
    worst = 0.0
    for stage in STAGES:
        cells, xs, ys = [], [], []
        for events in args.events:
            r = rows[events][stage]
            cells.append(f"{r['seconds']:.1f} s, {r['peak_gb']:.2f} GB" if r["ok"]
                         else r["status"])
            if r["ok"]:
                xs.append(events)
                ys.append(r["seconds"])
        exponent = float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(xs) > 1 else None
        if exponent is not None:
            worst = max(worst, exponent)
        print(f"| {stage} | " + " | ".join(cells) + " | "
              + (f"{exponent:.2f}" if exponent is not None else "-") + " |")
    print(f"ratio={worst:.2f}")


if __name__ == "__main__":
    main()
