"""Candidates scored per second: shared prefix (KV cache + history encodings computed once per
example) vs one full prompt per candidate (the authors' way), same model and candidates.

    python bench/scoring.py                       # tiny Llama, title_text prompt, synthetic data
    python bench/scoring.py --backbone preset:smollm2-135m-L4 --data data/ml100k --examples 10
    python bench/scoring.py --prompt authors      # the authors' prompt: a short shared prefix
    python bench/scoring.py --device cuda --precision bf16 --backbone preset:random-qwen2-0.5b

`inputs`: building the batched path's inputs alone (token ids, collation; no model), a
ceiling on the rates below; `full`: one prompt per candidate, a forward per example;
`shared`: one example's shared prefix and its candidates' suffixes per forward; `batched`:
the evaluator's path (`score_candidates`), the shared prefixes of --batch-size // candidates
examples of a task padded into one forward. Prints the rates, the largest score difference from `full`, and
last `ratio=<batched / full>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import bench_data, quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="preset:tiny-llama")
    parser.add_argument("--prompt", default="title_text")
    parser.add_argument("--data", default=None, help="prepared dataset (default: synthetic)")
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=500, help="rows per forward (batched)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--profile", action="store_true",
                        help="also profile one pass of the batched and of the full path: "
                             "device kernel time against wall time (GPU), and the operators "
                             "that take the most time")
    args = parser.parse_args()
    quiet()
    import numpy as np
    import torch

    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.config import GenSRConfig, apply_overrides
    from gensr_ray.data import contract
    from gensr_ray.eval.gensr_scorer import score_candidates, task_chunks
    from gensr_ray.inputs.build import build_features
    from gensr_ray.model.losses import answer_score

    torch.set_num_threads(args.threads)
    data = bench_data(args.data)
    cfg = apply_overrides(GenSRConfig(), {"data.path": str(data), "model.backbone": args.backbone,
                                          "model.prompt": args.prompt})
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    if backbone.kind != "decoder":
        raise SystemExit("bench/scoring.py: the shared KV-cache prefix needs a decoder-only backbone")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    model = model.to(args.device, dtype).eval()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def to_device(batch: dict) -> dict:
        return {k: v.to(args.device) for k, v in batch.items()}

    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    ex = contract.read_table(contract.examples_dir(data, "test")).slice(0, args.examples).to_pydict()
    n = len(ex["target"])
    candidates = [[ex["target"][i]] + list(ex["negatives"][i]) for i in range(n)]

    def full(i):
        rows = encoder.encode({k: [v[i]] for k, v in ex.items()}, candidates=np.array([candidates[i]]))
        return answer_score(model(to_device(collate(rows)))["logits"]).float().cpu()

    def shared(i):
        group = encoder.encode_group(ex["task"][i], list(ex["history"][i]), ex["query"][i],
                                     candidates[i])
        return answer_score(model.score_group(to_device(collate.group(group)))).float().cpu()

    batch = {k: ex[k] for k in ("task", "history", "query")}
    all_candidates = np.array(candidates)

    def batched():
        scores = score_candidates(model, backbone.kind, encoder, collate, batch, all_candidates,
                                  args.batch_size, to_device)
        return [torch.from_numpy(row) for row in scores]

    # the input side alone (token ids, collation): a ceiling on every rate below
    start = time.perf_counter()
    per_call = max(1, args.batch_size // len(candidates[0]))
    for rows in task_chunks(ex["task"], per_call):
        collate.groups([encoder.encode_group(ex["task"][i], list(ex["history"][i]),
                                             ex["query"][i], candidates[i]) for i in rows])
    rate = n * len(candidates[0]) / (time.perf_counter() - start)
    print(f"inputs : {rate:8.1f} candidates/s (encode_group + collate, no model)")

    results = {}
    with torch.no_grad():
        for name, fn in (("full", full), ("shared", shared), ("batched", None)):
            (fn or (lambda _: batched()))(0)  # warm-up
            sync()
            start = time.perf_counter()
            results[name] = batched() if fn is None else [fn(i) for i in range(n)]
            sync()
            elapsed = time.perf_counter() - start
            rate = n * len(candidates[0]) / elapsed
            results[name + "_rate"] = rate
            print(f"{name:7s}: {rate:8.1f} candidates/s ({n} examples x {len(candidates[0])})")
    diff = max(float((a - b).abs().max()) for other in ("shared", "batched")
               for a, b in zip(results["full"], results[other]))
    prefix = np.mean([len(encoder.encode_group(ex["task"][i], list(ex["history"][i]),
                                               ex["query"][i], candidates[i][:1])["prefix_ids"])
                      for i in range(n)])
    where = f"{args.threads} threads" if args.device == "cpu" else torch.cuda.get_device_name(0)
    print(f"backbone {args.backbone}, prompt {args.prompt}, {args.precision} on {where}, mean "
          f"shared prefix {prefix:.0f} tokens; max |score difference| {diff:.2e}")
    print(f"shared/full {results['shared_rate'] / results['full_rate']:.2f}")
    if args.profile:
        with torch.no_grad():
            _profile(batched, full, n, args.device)
    print(f"ratio={results['batched_rate'] / results['full_rate']:.2f}")


def _profile(batched, full, n: int, device: str) -> None:
    """Where a pass's time goes: the device's kernel time against the wall time (a device
    idle most of the wall is waiting on the host), and the top operators of each path."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "device_time_total" if device == "cuda" else "cpu_time_total"
    for name, run in (("batched", batched), ("full", lambda: [full(i) for i in range(n)])):
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            run()
        wall = time.perf_counter() - start
        events = prof.key_averages()
        # kernel events only: an operator's own row repeats its kernels' time
        busy = sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
        kernels = f", device kernels {busy:.2f}s" if device == "cuda" else ""
        print(f"profile {name}: wall {wall:.2f}s (profiler on){kernels}")
        print(events.table(sort_by=sort, row_limit=18, max_name_column_width=48))


if __name__ == "__main__":
    main()
