import numpy as np
import pytest

from gensr_ray.eval.retrieval import build_ip_index, topk_excluding


def brute_force_topk(items, queries, k, exclude):
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)
    out = np.full((len(queries), k), -1)
    for row, excluded in enumerate(exclude):
        order = [i for i in np.argsort(-scores[row], kind="stable") if i not in set(excluded)]
        out[row, : min(k, len(order))] = order[:k]
    return out


def test_faiss_topk_matches_numpy_with_exclusions():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    exclude = [rng.choice(300, size=rng.integers(0, 30), replace=False) for _ in range(40)]
    index = build_ip_index(items)
    got = topk_excluding(index, queries, 20, exclude)
    assert got.shape == (40, 20)
    np.testing.assert_array_equal(got, brute_force_topk(items, queries, 20, exclude))
    for row, excluded in enumerate(exclude):
        assert not np.isin(got[row], excluded).any()


def test_excluding_a_query_s_best_items_shifts_its_list():
    rng = np.random.default_rng(1)
    items = rng.normal(size=(50, 8)).astype(np.float32)
    query = rng.normal(size=(1, 8)).astype(np.float32)
    index = build_ip_index(items)
    plain = topk_excluding(index, query, 10, [np.array([], dtype=np.int64)])
    shifted = topk_excluding(index, query, 10, [plain[0, :3]])
    np.testing.assert_array_equal(shifted[0, :7], plain[0, 3:])


def test_small_catalogue_pads_with_minus_one():
    items = np.eye(4, dtype=np.float32)
    index = build_ip_index(items)
    got = topk_excluding(index, np.array([[0.0, 3.0, 2.0, 1.0]], dtype=np.float32), 6, [np.array([2])])
    assert got.tolist() == [[1, 3, 0, -1, -1, -1]]


def test_exclusion_count_must_match_queries():
    index = build_ip_index(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="exclusion"):
        topk_excluding(index, np.eye(3, dtype=np.float32), 2, [np.array([0])])
