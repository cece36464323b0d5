import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import write_dataset

from gensr_ray.data.contract import DataError
from gensr_ray.eval.harness import build_baselines, evaluate
from gensr_ray.eval.sasrec import (
    SASRec,
    SASRecBaseline,
    SASRecConfig,
    fit_sasrec,
    left_pad,
    pretrain_sasrec,
    sasrec_path,
    train_sequences,
)

N_ITEMS = 60
# Small and quick, but enough steps to learn the walk below (a few seconds on 2 CPU cores).
WALK_CONFIG = SASRecConfig(dim=32, max_len=20, epochs=40, batch_size=64, lr=5e-3, seed=0)


def walk_dataset(root, n_users=160, length=12, seed=0):
    """Every user walks item s, s+1, s+2, ... (mod N_ITEMS) from a random start s, alternating
    rec and search events, so the next item is always the last one + 1 whichever the task.
    The last two steps are the valid and test interactions."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start = int(rng.integers(N_ITEMS))
        for t in range(length):
            item = (start + t) % N_ITEMS
            task, query = ("search", f"item {item}") if (t + u) % 2 else ("rec", None)
            split = "train" if t < length - 2 else ("valid", "test")[t - (length - 2)]
            rows.append((u, item, task, query, t, split))
    return write_dataset(root, [f"item {i}" for i in range(N_ITEMS)], n_users, rows,
                         num_negatives={"train": 1, "valid": 20, "test": 20})


def test_left_pad_keeps_the_latest_items_right_aligned():
    out = left_pad([np.array([1, 2, 3]), np.array([], dtype=np.int64), np.arange(10)], 4, 99)
    assert out.tolist() == [[99, 1, 2, 3], [99, 99, 99, 99], [6, 7, 8, 9]]


def test_model_is_causal():
    torch.manual_seed(0)
    model = SASRec(20, SASRecConfig(dim=16, max_len=8)).eval()
    items = torch.tensor([[20, 20, 3, 5, 7, 9, 11, 13]])  # two padding positions first
    changed = items.clone()
    changed[0, 5] = 2
    with torch.no_grad():
        before, after = model(items), model(changed)
    assert torch.isfinite(before).all()
    assert torch.equal(before[0, :5], after[0, :5])  # earlier positions never see position 5
    assert not torch.allclose(before[0, 5:], after[0, 5:])


def test_train_sequences_are_the_train_split_in_time_order(tmp_path):
    rows = [(0, 3, "rec", None, 2, "train"), (0, 1, "search", "q", 1, "train"),
            (0, 4, "rec", None, 3, "valid"), (1, 2, "rec", None, 0, "train"),
            (1, 5, "rec", None, 1, "test"), (0, 0, "rec", None, 4, "test")]
    root = write_dataset(tmp_path, [f"item {i}" for i in range(8)], 2, rows,
                         num_negatives={"train": 1, "valid": 1, "test": 1})
    assert [s.tolist() for s in train_sequences(root)] == [[1, 3], [2]]


def test_training_is_deterministic_given_the_seed():
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 30, size=int(n)) for n in rng.integers(2, 40, size=20)]
    config = SASRecConfig(dim=16, max_len=10, epochs=2, batch_size=8)
    first, second = (fit_sasrec(sequences, 30, config).state_dict() for _ in range(2))
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = fit_sasrec(sequences, 30, SASRecConfig(**{**vars(config), "seed": 1})).state_dict()
    assert not torch.equal(first["item_emb.weight"], other["item_emb.weight"])


def test_learns_a_sequential_pattern_popularity_cannot_and_is_read_back(tmp_path, caplog):
    root = walk_dataset(tmp_path / "walk")
    with caplog.at_level(logging.WARNING, logger="gensr_ray.eval.harness"):
        baselines = build_baselines(root)
    # never trained by an evaluation: left out, and the warning says how to train it
    assert "sasrec" not in baselines
    assert f"SASRec left out: no model at {sasrec_path(root)}" in caplog.text
    assert "gensr pretrain-sasrec --data" in caplog.text
    with pytest.raises(DataError, match=r"sasrec.pt: no SASRec model; `gensr pretrain-sasrec"):
        SASRecBaseline(root, N_ITEMS).item_vectors()

    path = pretrain_sasrec(root, WALK_CONFIG)
    assert path == sasrec_path(root) and path.is_file()
    sasrec = build_baselines(root)["sasrec"]
    results = evaluate(root, "test", {"popularity": baselines["popularity"], "sasrec": sasrec})
    models = results["models"]
    for task in ("rec", "search"):  # it ignores the query, so search is the same walk
        assert models["sasrec"][task]["sampled"]["HR@10"] >= 0.9
        assert models["sasrec"][task]["full"]["Recall@10"] >= 0.8
        assert models["popularity"][task]["sampled"]["HR@10"] <= 0.7
        assert models["popularity"][task]["full"]["Recall@10"] <= 0.4

    # The saved model scores exactly as the trained one, whatever config it was trained with.
    batch = {"history": [np.array([4, 5, 6]), np.array([58, 59])]}
    reloaded = SASRecBaseline(root, N_ITEMS)
    np.testing.assert_array_equal(reloaded.query_vectors(batch), sasrec.model.query_vectors(batch))
    np.testing.assert_array_equal(reloaded.item_vectors(), sasrec.model.item_vectors())
    assert reloaded.model().config == WALK_CONFIG
    # Next items of 4,5,6 and of 58,59 (the walk wraps around) come first among the items the
    # user has not met (negatives were never the user's own items, so those may score high too).
    scores = reloaded.query_vectors(batch) @ reloaded.item_vectors().T
    for row, history in enumerate(batch["history"]):
        scores[row, history] = -np.inf
    assert np.argmax(scores, axis=1).tolist() == [7, 0]

    # A model trained on another dataset's catalogue is refused, not silently misused.
    other = write_dataset(tmp_path / "other", [f"item {i}" for i in range(12)], 2,
                          [(0, 1, "rec", None, 0, "train"), (0, 2, "rec", None, 1, "test")],
                          num_negatives={"train": 1, "valid": 1, "test": 1})
    sasrec_path(other).parent.mkdir(parents=True)
    shutil.copy(path, sasrec_path(other))
    with pytest.raises(DataError, match="60 items but the items table has 12.*another dataset"):
        SASRecBaseline(other, 12).item_vectors()


def test_pretrain_sasrec_command_replaces_the_model_and_checks_its_flags(tmp_path, capsys):
    from gensr_ray.cli import main

    root = walk_dataset(tmp_path / "walk", n_users=20)
    assert main(["pretrain-sasrec", "--data", str(root), "--epochs", "1", "--seed", "3"]) == 0
    assert f"SASRec model written to {sasrec_path(root)}" in capsys.readouterr().out
    saved = torch.load(sasrec_path(root), weights_only=True)["config"]
    assert (saved["epochs"], saved["seed"], saved["sparse"]) == (1, 3, True)
    assert main(["pretrain-sasrec", "--data", str(root), "--epochs", "2"]) == 0
    assert torch.load(sasrec_path(root), weights_only=True)["config"]["epochs"] == 2
    capsys.readouterr()
    assert main(["pretrain-sasrec", "--data", str(root), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err


def test_a_step_touches_only_the_item_rows_of_its_batch():
    config = SASRecConfig(dim=16, max_len=8, seed=0)
    model = SASRec(1000, config)
    before = model.item_emb.weight.detach().clone()
    hidden = model(torch.tensor([[1000, 1000, 3, 4, 5]]))  # left-padded with id 1000
    (hidden[:, -1] * model.item_emb(torch.tensor([7]))).sum().backward()
    grad = model.item_emb.weight.grad
    assert grad.is_sparse  # no dense items x dim gradient, whatever the catalogue's size
    assert set(grad.coalesce().indices()[0].tolist()) <= {3, 4, 5, 7, 1000}
    torch.optim.SparseAdam([model.item_emb.weight], lr=0.1).step()
    after = model.item_emb.weight.detach()
    moved = {i for i in range(1001) if not torch.equal(after[i], before[i])}
    assert moved == {3, 4, 5, 7}  # the padding row stays zero
    assert not SASRec(10, replace(config, sparse=False)).item_emb.sparse
