"""Inner-product top-k over the item catalogue with faiss (full-catalogue protocol).

`flat` (exact, the default) is what evaluation numbers are reported with. For catalogues of
millions of items `ivf` (IVF-Flat) trades a measured recall for speed (bench/retrieval.py
prints its recall against the flat index). HNSW is not offered: on inner products of
unnormalised embeddings (LightGCN's) its recall@10 stayed at 0.73-0.85 where IVF reached 0.999
(efSearch 64-512 against nprobe 64, 20k clustered items). faiss is imported inside the
functions so that importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gensr_ray.config import FAISS_INDEXES as INDEXES

GPU_MAX_K = 2048  # faiss-gpu answers at most this many neighbours per query


def build_ip_index(item_vectors: np.ndarray, kind: str = "flat", search_width: int = 64):
    """An inner-product index over item_vectors [n_items, d]; row i is item id i.

    kind: flat | ivf (4 sqrt(n) lists, `search_width` of them probed). On a faiss-gpu build
    with a visible GPU the index is copied to GPU 0 (the CPU index is kept beside it for
    filtered searches); otherwise it stays on the CPU. Either way callers use
    `topk_excluding`.
    """
    import faiss

    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"expected item vectors [n_items > 0, d]; got shape {vectors.shape}")
    if kind not in INDEXES:
        raise ValueError(f"unknown index {kind!r}; expected one of {INDEXES}")
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        lists = max(1, min(n // 39, int(4 * math.sqrt(n))))  # faiss wants >= 39 points a list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = vectors[rng.choice(n, min(n, 64 * lists), replace=False)]  # k-means: 64 a list
        index.train(sample)
        index.nprobe = min(search_width, lists)
    index.add(vectors)
    cpu = index
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        # The GPU index does not own its resources; keep them alive as long as the index.
        index.gensr_resources = resources
        index.gensr_cpu = cpu
    return index


def topk_excluding(
    index, query_vectors: np.ndarray, k: int, exclude: Sequence[np.ndarray],
    max_k: int | None = None,
) -> np.ndarray:
    """Top-k item ids [n, k] per query, best first, skipping each query's excluded item ids.

    A query whose k + (exclusions) fits `max_k` (faiss-gpu's 2048 on a GPU index; the
    catalogue otherwise) is answered by one batched search deep enough that k items survive
    the filter. A longer exclusion list (a user with a very long history) is filtered inside
    the search instead, with an ID selector on the CPU index. Lists are padded with -1 when
    the catalogue has fewer than k items left.
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
    on_gpu = hasattr(index, "gensr_cpu")
    max_k = max_k or (GPU_MAX_K if on_gpu else index.ntotal)
    depth = np.array([min(k + len(e), index.ntotal) for e in exclude])
    batched = np.flatnonzero(depth <= max_k)
    if batched.size:
        _, ids = index.search(queries[batched], int(depth[batched].max()))
        out[batched] = _first_k_kept(ids, [exclude[row] for row in batched], k, index.ntotal)
    for row in np.flatnonzero(depth > max_k):
        out[row] = _filtered_search(getattr(index, "gensr_cpu", index), queries[row], k,
                                    exclude[row])
    return out


def _first_k_kept(ids: np.ndarray, exclude: Sequence[np.ndarray], k: int, n_items: int
                  ) -> np.ndarray:
    """Per row of candidate ids [n, depth] (best first; faiss's -1 for missing), the first k
    that are neither missing nor in the row's exclusion list, padded with -1.

    One membership test for all rows (keys row * (n_items + 1) + item) rather than one per
    row, which cost ~60 us a query in numpy's call overhead."""
    n = ids.shape[0]
    stride = n_items + 1  # -1 maps to row * stride - 1, which no real (row, item) key takes
    lengths = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=n)
    excluded_items = (np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude])
                      if lengths.sum() else np.zeros(0, dtype=np.int64))
    excluded_rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    in_range = (excluded_items >= 0) & (excluded_items < n_items)
    excluded_keys = excluded_rows[in_range] * stride + excluded_items[in_range]
    keys = np.arange(n, dtype=np.int64)[:, None] * stride + ids
    keep = (ids >= 0) & ~np.isin(keys, excluded_keys)
    rank = np.cumsum(keep, axis=1)
    rows, cols = np.nonzero(keep & (rank <= k))
    out = np.full((n, k), -1, dtype=np.int64)
    out[rows, rank[rows, cols] - 1] = ids[rows, cols]
    return out


def _filtered_search(index, query: np.ndarray, k: int, excluded: np.ndarray) -> np.ndarray:
    """Top-k of one query among the items not excluded, filtered inside the search."""
    import faiss

    inner = faiss.IDSelectorBatch(np.ascontiguousarray(excluded, dtype=np.int64))
    selector = faiss.IDSelectorNot(inner)  # `inner` stays referenced until the search returns
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe)
    else:
        params = faiss.SearchParameters(sel=selector)
    _, ids = index.search(query[None, :], min(k, index.ntotal), params=params)
    out = np.full(k, -1, dtype=np.int64)
    found = ids[0][ids[0] >= 0]
    out[:found.size] = found
    return out
