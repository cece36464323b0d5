"""LightGCN's time per epoch as the graph grows: the mean of epochs 2 and 3 (the first pays
for allocation) on generated bipartite graphs of growing size, and the fitted exponent of time
against edges.

    python bench/lightgcn_scaling.py                       # 200k, 1M, 4M, 8M generated pairs
    python bench/lightgcn_scaling.py --edges 50000 200000  # quicker
    python bench/lightgcn_scaling.py --device cuda         # on a GPU

Users and items grow with the edges (20 edges per user, 10 per item on average, Zipf-skewed
items; distinct pairs are the graph's edges). Prints seconds per epoch per size and the
exponent between neighbouring sizes, the exponent b of time ~ edges^b over all sizes (least
squares on the logs; goal <= 1.1), the extrapolation to full KuaiSAR's train edges, and last
`ratio=<b>`.
"""

from __future__ import annotations

import argparse

import numpy as np

KUAISAR_EDGES = 5_000_000  # order of full KuaiSAR's distinct train (user, item) pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", type=int, nargs="+",
                        default=[200_000, 1_000_000, 4_000_000, 8_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="cpu (the default), cuda, or auto (a GPU when torch sees one)")
    args = parser.parse_args()
    import torch

    from gensr_ray.cf.lightgcn import LightGCNConfig, fit_lightgcn

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    # torch's sparse kernels load on first use: not part of any size's time
    fit_lightgcn(np.arange(200) % 100, (7 * np.arange(200)) % 150, 100, 150,
                 LightGCNConfig(epochs=1, device=args.device))
    times = []
    for edges in args.edges:
        n_users, n_items = max(1, edges // 20), max(1, edges // 10)
        users = rng.integers(0, n_users, size=edges)
        items = np.minimum(rng.zipf(1.3, size=edges) - 1, n_items - 1)
        pairs = np.unique(np.stack([users, items], axis=1), axis=0)
        config = LightGCNConfig(epochs=3, device=args.device)
        tables = fit_lightgcn(pairs[:, 0], pairs[:, 1], n_users, n_items, config)
        per_epoch = float(np.mean(tables.epoch_seconds[1:]))
        assert np.isfinite(tables.losses).all()
        batch = max(config.batch_size, -(-len(pairs) // config.max_steps_per_epoch))
        step = ""
        if times:
            step = (f", exponent from the previous size "
                    f"{np.log(per_epoch / times[-1][1]) / np.log(len(pairs) / times[-1][0]):.2f}")
        times.append((len(pairs), per_epoch))
        print(f"{len(pairs):>9,d} edges ({n_users:,d} users, {n_items:,d} items): "
              f"{per_epoch:7.2f} s/epoch, {-(-len(pairs) // batch)} steps of {batch:,d}{step}",
              flush=True)
    x, y = np.log([t[0] for t in times]), np.log([t[1] for t in times])
    exponent = float(np.polyfit(x, y, 1)[0]) if len(times) > 1 else float("nan")
    scale = times[-1][1] * (KUAISAR_EDGES / times[-1][0]) ** exponent
    print(f"time ~ edges^{exponent:.2f}; extrapolated to {KUAISAR_EDGES:,d} edges: "
          f"{scale:.0f} s/epoch on {args.device} ({args.threads} CPU threads)")
    print(f"ratio={exponent:.2f}")


if __name__ == "__main__":
    main()
