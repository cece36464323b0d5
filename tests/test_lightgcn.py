import logging

import numpy as np
import pytest
from helpers import write_dataset

from gensr_ray.cf.lightgcn import (
    CFTables,
    LightGCNConfig,
    load_cf,
    save_cf,
    train_edges,
    train_lightgcn,
)
from gensr_ray.data.contract import DataError

ITEMS_PER_CLUSTER = 10
USERS_PER_CLUSTER = 6
FAST = LightGCNConfig(epochs=100, lr=0.01, batch_size=64)


def cluster_of_user(u: int) -> int:
    return u // USERS_PER_CLUSTER


def cluster_items(c: int) -> list[int]:
    return list(range(c * ITEMS_PER_CLUSTER, (c + 1) * ITEMS_PER_CLUSTER))


def clustered_interactions(eval_cluster_shift: int = 0):
    """Users of cluster c touch only cluster-c items in train; each user's valid and test items
    are two cluster-c items the user never had in train (their cluster neighbours did).

    eval_cluster_shift=1 moves valid/test to the other cluster's items, which must not change
    anything LightGCN learns.
    """
    rows = []
    for u in range(2 * USERS_PER_CLUSTER):
        c = cluster_of_user(u)
        own = cluster_items(c)
        held_valid, held_test = own[u % USERS_PER_CLUSTER], own[(u + 1) % USERS_PER_CLUSTER]
        ts = 0
        for i in own:
            if i not in (held_valid, held_test):
                rows.append((u, i, "rec", None, ts, "train"))
                ts += 1
        shift = eval_cluster_shift * ITEMS_PER_CLUSTER * (1 - 2 * c)
        rows.append((u, held_valid + shift, "search", "words", ts, "valid"))
        rows.append((u, held_test + shift, "rec", None, ts + 1, "test"))
    return rows


def write_clustered(root, eval_cluster_shift: int = 0):
    items = [f"cluster{i // ITEMS_PER_CLUSTER} thing{i}" for i in range(2 * ITEMS_PER_CLUSTER)]
    return write_dataset(
        root, items, 2 * USERS_PER_CLUSTER, clustered_interactions(eval_cluster_shift),
        num_negatives={"train": 1, "valid": 2, "test": 2},
    )


def test_train_edges_are_exactly_the_train_split(tmp_path):
    root = write_clustered(tmp_path)
    users, items = train_edges(root)
    expected = {(u, i) for u, i, _, _, _, split in clustered_interactions() if split == "train"}
    assert set(zip(users.tolist(), items.tolist())) == expected
    assert len(users) == len(expected)  # unique pairs


def test_training_lowers_loss_and_ranks_held_out_cluster_item_first(tmp_path, caplog):
    root = write_clustered(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="gensr_ray.cf.lightgcn"):
        tables = train_lightgcn(root, FAST)
    assert "lightgcn epoch 100/100" in caplog.text
    assert tables.user_emb.shape == (12, 64) and tables.item_emb.shape == (20, 64)
    assert tables.user_emb.dtype == np.float32 and tables.item_emb.dtype == np.float32
    assert len(tables.losses) == 100
    assert tables.losses[-1] < 0.5 * tables.losses[0]
    scores = tables.user_emb @ tables.item_emb.T
    for u, i, _, _, _, split in clustered_interactions():
        if split == "test":  # never seen by the model, seen by the user's cluster neighbours
            other = cluster_items(1 - cluster_of_user(u))
            assert scores[u, i] > scores[u, other].max(), f"user {u}"


def test_valid_and_test_interactions_do_not_reach_training(tmp_path):
    # Equality, not quality, is asserted here: a few epochs are enough.
    config = LightGCNConfig(epochs=20, lr=0.01, batch_size=64)
    a = train_lightgcn(write_clustered(tmp_path / "a"), config)
    b = train_lightgcn(write_clustered(tmp_path / "b", eval_cluster_shift=1), config)
    np.testing.assert_allclose(a.user_emb, b.user_emb, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.item_emb, b.item_emb, rtol=0, atol=1e-6)


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    tables = CFTables(
        user_emb=rng.normal(size=(5, 4)).astype(np.float32),
        item_emb=rng.normal(size=(7, 4)).astype(np.float32),
        config=LightGCNConfig(dim=4, epochs=3),
        losses=[0.7, 0.6, 0.5],
    )
    path = tmp_path / "cf" / "lightgcn.npz"
    save_cf(tables, path)
    assert [p.name for p in path.parent.iterdir()] == ["lightgcn.npz"]  # no temp file left
    loaded = load_cf(path)
    np.testing.assert_array_equal(loaded.user_emb, tables.user_emb)
    np.testing.assert_array_equal(loaded.item_emb, tables.item_emb)
    assert loaded.config == tables.config
    assert loaded.losses == tables.losses


def test_load_missing_tables_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="gensr prepare"):
        load_cf(tmp_path / "cf" / "lightgcn.npz")


def test_non_finite_tables_are_refused_naming_the_file_and_row(tmp_path):
    """NaN tables trained with loss NaN, changed no weight and wrote a final checkpoint."""
    rng = np.random.default_rng(0)
    item_emb = rng.normal(size=(7, 4)).astype(np.float32)
    item_emb[3, 1] = np.nan
    path = tmp_path / "cf" / "lightgcn.npz"
    save_cf(CFTables(user_emb=rng.normal(size=(5, 4)).astype(np.float32), item_emb=item_emb,
                     config=LightGCNConfig(dim=4, epochs=3), losses=[0.7]), path)
    with pytest.raises(DataError, match=r"lightgcn.npz: item_emb holds 1 non-finite values "
                                        r"\(first in row 3\)"):
        load_cf(path)


def test_pretrain_cf_epochs_zero_is_an_error_not_the_default(capsys):
    from gensr_ray.cli import main

    assert main(["pretrain-cf", "--data", "nowhere", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err


def test_pretrain_cf_on_a_uri_says_where_the_tables_are_trained(capsys):
    from gensr_ray.cli import main

    assert main(["pretrain-cf", "--data", "s3://bucket/data"]) == 2
    assert "needs a local dataset directory" in capsys.readouterr().err


def test_pretrain_cf_names_a_device_torch_does_not_know(tmp_path, capsys):
    from gensr_ray.cli import main

    data = write_clustered(tmp_path / "data")
    assert main(["pretrain-cf", "--data", str(data), "--device", "abacus"]) == 2
    err = capsys.readouterr().err
    assert "pretrain-cf --device: LightGCN device 'abacus'" in err
    assert "Traceback" not in err
    assert not (data / "cf" / "lightgcn.npz").exists()  # refused before any training


@pytest.mark.parametrize("layers", [1, 2, 3])  # no scratch hop, one, both in turn
def test_hand_written_gradient_matches_autograd_on_the_dense_adjacency(layers):
    """One BPR step's loss and ego gradient against autograd through the dense matrix."""
    import torch

    from gensr_ray.cf.lightgcn import _BPRStep, _normalized_adjacency, _Propagation

    rng = np.random.default_rng(0)
    n_users, n_items, dim, reg = 7, 11, 5, 0.1
    pairs = np.unique(np.stack([rng.integers(0, n_users - 1, 40),  # the last user has no edge
                                rng.integers(0, n_items, 40)], axis=1), axis=0)
    sparse = _normalized_adjacency(pairs[:, 0], pairs[:, 1], n_users, n_items)
    dense = sparse.to_dense()
    assert torch.equal(dense, dense.T)
    shape = (n_users + n_items, dim)
    start = torch.randn(shape)
    # repeated ids in a batch: their gradients must add up
    u = torch.tensor([0, 0, 3, 6])
    i = torch.tensor([1, 4, 4, 10]) + n_users
    j = torch.tensor([2, 2, 9, 0]) + n_users

    ego = torch.nn.Parameter(start.clone())
    ego.grad = torch.zeros(shape)
    # buffers for a larger batch than this one: the step uses their leading rows
    propagation = _Propagation(sparse, layers, shape)
    for hop in propagation.hops:  # scratch contents must never leak into the result
        hop.fill_(float("nan"))
    step = _BPRStep(propagation, shape, batch=6, reg=reg)
    loss = step(ego, u, i, j)

    reference = start.clone().requires_grad_(True)
    layer, total = reference, reference
    for _ in range(layers):
        layer = dense @ layer
        total = total + layer
    final = total / (layers + 1)
    bpr = -torch.nn.functional.logsigmoid(
        (final[u] * final[i]).sum(-1) - (final[u] * final[j]).sum(-1)).mean()
    l2 = sum(reference[x].pow(2).sum() for x in (u, i, j)) / (2 * u.numel())
    expected = bpr + reg * l2
    expected.backward()
    assert loss == pytest.approx(expected.detach().item(), rel=1e-5)
    torch.testing.assert_close(ego.grad, reference.grad, rtol=1e-5, atol=1e-6)
