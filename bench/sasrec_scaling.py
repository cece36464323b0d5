"""SASRec's time per epoch as the catalogue grows at a fixed number of events: sparse
item-embedding updates (lazy Adam on the rows a batch touches, the default) against dense
Adam over the whole table every step.

    python bench/sasrec_scaling.py                            # 200k events; 20k, 200k, 2M items
    python bench/sasrec_scaling.py --events 50000 --items 10000 100000

Users have 20 events each, items are drawn Zipf-skewed over the catalogue. Prints seconds per
epoch (the second of two: the first pays for allocation) per catalogue size and mode, and
last `ratio=<dense / sparse>` at the largest catalogue.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--items", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from gensr_ray.eval.sasrec import SASRecConfig, fit_sasrec

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n_users = max(1, args.events // 20)
    last = {}
    print(f"{args.events:,d} events, {n_users:,d} users")
    for n_items in args.items:
        items = np.minimum(rng.zipf(1.2, size=args.events) - 1, n_items - 1)
        sequences = np.array_split(items, n_users)
        for sparse in (True, False):
            config = SASRecConfig(epochs=1, sparse=sparse)
            fit_sasrec(sequences, n_items, config)  # allocation, first-touch of the table
            start = time.perf_counter()
            fit_sasrec(sequences, n_items, config)
            seconds = time.perf_counter() - start
            last[sparse] = seconds
            print(f"{n_items:>10,d} items  {'sparse' if sparse else 'dense ':6}  "
                  f"{seconds:7.2f} s/epoch", flush=True)
    print(f"ratio={last[False] / last[True]:.1f}")


if __name__ == "__main__":
    main()
