"""Full-catalogue top-k with faiss (the harness's `topk_excluding` over a flat index) against
brute-force numpy top-k, on random item vectors, each query with its own exclusion list.

    python bench/retrieval.py                     # 1M items x 64 dims, 256 queries, k=20
    python bench/retrieval.py --items 200000 --queries 1024

Both are exact: the script checks they return the same items (up to the order of equal
scores) and prints queries/s of each, then `ratio=<faiss / numpy>`.
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
    args = parser.parse_args()
    import numpy as np

    from gensr_ray.eval.retrieval import build_ip_index, topk_excluding

    rng = np.random.default_rng(0)
    items = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    exclude = [np.sort(rng.choice(args.items, args.exclude, replace=False))
               for _ in range(args.queries)]
    index = build_ip_index(items)

    t0 = time.perf_counter()
    got = topk_excluding(index, queries, args.k, exclude)
    faiss_rate = args.queries / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    want = numpy_topk(items, queries, args.k, exclude)
    numpy_rate = args.queries / (time.perf_counter() - t0)

    same = np.mean([set(a) == set(b) for a, b in zip(got, want)])
    print(f"{args.items:,} items x {args.dim} dims, {args.queries} queries, k={args.k}, "
          f"{args.exclude} exclusions each")
    print(f"faiss flat: {faiss_rate:.1f} queries/s   numpy: {numpy_rate:.1f} queries/s   "
          f"same top-k sets: {same:.4f}")
    print(f"ratio={faiss_rate / numpy_rate:.2f}")


if __name__ == "__main__":
    main()
