"""Exact inner-product top-k over the item catalogue with faiss (full-catalogue protocol).

Flat (exact) indexes only: evaluation numbers must not depend on an approximate index's recall.
faiss is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def build_ip_index(item_vectors: np.ndarray):
    """A `faiss.IndexFlatIP` over item_vectors [n_items, d]; row i is item id i.

    On a faiss-gpu build with a visible GPU the index is copied to GPU 0; otherwise it stays on
    the CPU. Either way callers use the same `search` API.
    """
    import faiss

    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"expected item vectors [n_items > 0, d]; got shape {vectors.shape}")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        # The GPU index does not own its resources; keep them alive as long as the index.
        index.gensr_resources = resources
    return index


def topk_excluding(
    index, query_vectors: np.ndarray, k: int, exclude: Sequence[np.ndarray]
) -> np.ndarray:
    """Top-k item ids [n, k] per query, best first, skipping each query's excluded item ids.

    Searches k + (longest exclusion list) so that k items always survive the filter when the
    catalogue is large enough; pads with -1 when it is not.
    """
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    n = queries.shape[0]
    if len(exclude) != n:
        raise ValueError(f"{n} queries but {len(exclude)} exclusion lists")
    if k <= 0:
        raise ValueError(f"k must be positive; got {k}")
    out = np.full((n, k), -1, dtype=np.int64)
    if n == 0:
        return out
    longest = max(len(e) for e in exclude)
    search_k = min(k + longest, index.ntotal)
    _, ids = index.search(queries, search_k)
    for row in range(n):
        candidates = ids[row]
        # faiss marks missing results with -1; drop those together with excluded items.
        keep = candidates[(candidates >= 0) & ~np.isin(candidates, exclude[row])][:k]
        out[row, : keep.size] = keep
    return out
