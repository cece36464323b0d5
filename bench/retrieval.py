"""Full-catalogue top-k with faiss (the harness's `topk_excluding`) against brute-force numpy
top-k, on clustered random item vectors, each query with its own exclusion list.

    python bench/retrieval.py                     # 1M items x 64 dims, 256 queries, k=20
    python bench/retrieval.py --items 200000 --queries 1024 --index flat

The flat index is exact: the script checks it returns the same items as numpy (up to the
order of equal scores). The IVF index (eval.index=ivf) is approximate: its recall@k against
the exact top-k is printed. Then queries/s of each and `ratio=<index / numpy>` for --index
(default ivf; its build time is reported apart, it is paid once per evaluation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))


def numpy_topk(items, queries, k: int, exclude) -> "np.ndarray":  # noqa: F821
    """The reference: every score, excluded items set to -inf, argpartition, then sort."""
    import numpy as np

    out = np.empty((len(queries), k), dtype=np.int64)
    for lo in range(0, len(queries), 64):  # 64 x n_items scores at a time
        scores = queries[lo:lo + 64] @ items.T
        for row, excluded in enumerate(exclude[lo:lo + 64]):
            scores[row, excluded] = -np.inf
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[lo:lo + 64] = np.take_along_axis(part, order, axis=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--exclude", type=int, default=50, help="excluded items per query")
    parser.add_argument("--index", choices=["flat", "ivf"], default="ivf",
                        help="the index whose speed the ratio reports")
    parser.add_argument("--search-width", type=int, default=64, help="ivf: lists probed")
    args = parser.parse_args()
    import numpy as np

    from gensr_ray.eval.retrieval import build_ip_index, topk_excluding

    rng = np.random.default_rng(0)
    # clustered like trained embeddings, not isotropic noise (on which no index beats a scan)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    items = centres[rng.integers(1000, size=args.items)]
    items += 0.5 * rng.standard_normal((args.items, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    exclude = [np.sort(rng.choice(args.items, args.exclude, replace=False))
               for _ in range(args.queries)]

    t0 = time.perf_counter()
    want = numpy_topk(items, queries, args.k, exclude)
    numpy_rate = args.queries / (time.perf_counter() - t0)
    print(f"{args.items:,} items x {args.dim} dims, {args.queries} queries, k={args.k}, "
          f"{args.exclude} exclusions each")
    print(f"numpy brute force: {numpy_rate:.1f} queries/s")
    rates = {}
    for kind in ("flat", "ivf"):
        t0 = time.perf_counter()
        index = build_ip_index(items, kind, args.search_width)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = topk_excluding(index, queries, args.k, exclude)
        rates[kind] = args.queries / (time.perf_counter() - t0)
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(got, want)])
        width = f", {args.search_width} lists probed" if kind == "ivf" else ""
        print(f"faiss {kind}{width}: {rates[kind]:.1f} queries/s (built in {built:.1f} s), "
              f"recall@{args.k} against exact {recall:.4f}")
    print(f"ratio={rates[args.index] / numpy_rate:.2f}")


if __name__ == "__main__":
    main()
