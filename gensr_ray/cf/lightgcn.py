"""LightGCN (He et al., SIGIR 2020, https://arxiv.org/abs/2002.02126) pretrained on train edges.

GenSR's collaborative view reads a frozen item table from this model (docs/design.md). Only rows of
the interactions table with split == "train" are used, both tasks together: a validation or test
interaction reaching the graph would leak the answer into every later evaluation.

The model has no weights besides the layer-0 ("ego") embeddings. Each layer multiplies by the
symmetrically normalised bipartite adjacency D^-1/2 A D^-1/2; the final embedding is the mean of
layers 0..L. Trained with BPR, one uniform negative per positive per epoch.

torch is imported inside the training functions so that loading saved tables needs only numpy.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gensr_ray.data import contract
from gensr_ray.data.contract import DataError
from gensr_ray.data.sampling import sample_unseen
from gensr_ray.data.validate import check_cf_tables

log = logging.getLogger(__name__)


@dataclass
class LightGCNConfig:
    dim: int = 64  # embedding size; GenSR's CF view is 64-d
    layers: int = 2  # propagation layers (the paper's and GenSR's setting)
    # Every step propagates the whole graph, so few large steps are cheapest. Measured on
    # ml-100k validation (2 CPU cores): batch 8192 / lr 1e-2 / 100 epochs trains in ~20 s and
    # beats batch 2048 / lr 1e-3 / 200 epochs (~100 s): rec HR@10 0.702 vs 0.693, full
    # Recall@20 0.237 vs 0.218, search HR@10 0.742 vs 0.737.
    epochs: int = 100
    batch_size: int = 8192  # BPR triples per Adam step
    # ... and at most this many steps an epoch: each step propagates the whole graph, so a
    # fixed batch makes an epoch cost edges^2 / batch; past 16 x batch_size edges the batch
    # grows with the graph instead, and an epoch costs O(edges) (ml-100k: 10 steps, unchanged)
    max_steps_per_epoch: int = 16
    lr: float = 1e-2
    reg: float = 1e-4  # L2 on the batch's layer-0 embeddings, as in the LightGCN paper
    seed: int = 42


@dataclass
class CFTables:
    user_emb: np.ndarray  # [n_users, dim] float32, final (layer-mean) embeddings
    item_emb: np.ndarray  # [n_items, dim] float32
    config: LightGCNConfig
    losses: list[float] = field(default_factory=list)  # mean BPR loss (with reg) per epoch


def train_edges(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unique (user, item) pairs of the train split, both tasks: the graph's only edges.

    Repeats (the same item through search and rec) are merged: an edge is there or not.
    """
    table = contract.read_table(
        contract.interactions_dir(data_dir), columns=["user_id", "item_id", "split"]
    )
    split = table.column("split").to_numpy(zero_copy_only=False)
    train = split == "train"
    users = table.column("user_id").to_numpy()[train].astype(np.int64)
    items = table.column("item_id").to_numpy()[train].astype(np.int64)
    pairs = np.unique(np.stack([users, items], axis=1), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def catalogue_sizes(data_dir: Path) -> tuple[int, int]:
    """(n_users, n_items) from the users and items tables (ids are their row indices)."""
    n_users = contract.read_table(contract.users_dir(data_dir), columns=["user_id"]).num_rows
    n_items = contract.read_table(contract.items_dir(data_dir), columns=["item_id"]).num_rows
    return n_users, n_items


def train_lightgcn(data_dir: Path, config: LightGCNConfig | None = None) -> CFTables:
    """Train LightGCN on the train split of a prepared dataset and return its final tables."""
    config = config or LightGCNConfig()
    n_users, n_items = catalogue_sizes(data_dir)
    users, items = train_edges(data_dir)
    if users.size == 0:
        raise DataError(f"{contract.interactions_dir(data_dir)}: no split == 'train' interactions")
    if users.max() >= n_users or items.max() >= n_items or min(users.min(), items.min()) < 0:
        raise DataError(
            f"{contract.interactions_dir(data_dir)}: user/item ids outside the users "
            f"({n_users}) / items ({n_items}) tables"
        )
    return fit_lightgcn(users, items, n_users, n_items, config)


def _normalized_adjacency(users, items, n_users: int, n_items: int):
    """D^-1/2 A D^-1/2 of the (users + items) bipartite graph as a coalesced sparse COO tensor."""
    import torch

    n = n_users + n_items
    rows = np.concatenate([users, items + n_users])
    cols = np.concatenate([items + n_users, users])
    degree = np.bincount(rows, minlength=n).astype(np.float64)
    # Nodes without train edges (cold users/items) keep their ego embedding only.
    inv_sqrt = np.zeros(n)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    values = inv_sqrt[rows] * inv_sqrt[cols]
    indices = torch.from_numpy(np.stack([rows, cols]))
    # Built once per training run, so checking the indices is cheap insurance against a segfault.
    return torch.sparse_coo_tensor(
        indices, torch.from_numpy(values).float(), (n, n), check_invariants=True
    ).coalesce()


def fit_lightgcn(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, config: LightGCNConfig
) -> CFTables:
    """Train on the given (user, item) edges; the data-free core of `train_lightgcn`."""
    import torch

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    adjacency = _normalized_adjacency(users, items, n_users, n_items)
    # Normal(0, 0.1) init, as in the LightGCN reference implementation.
    ego = torch.nn.Parameter(torch.randn(n_users + n_items, config.dim) * 0.1)
    optimizer = torch.optim.Adam([ego], lr=config.lr)

    def propagate() -> torch.Tensor:
        layer, total = ego, ego
        for _ in range(config.layers):
            layer = torch.sparse.mm(adjacency, layer)
            total = total + layer
        return total / (config.layers + 1)

    batch = max(config.batch_size, -(-users.size // max(1, config.max_steps_per_epoch)))
    seen_keys = np.sort(users * n_items + items)
    log_every = max(1, config.epochs // 10)
    losses: list[float] = []
    start = time.monotonic()
    # the one display of a long pretraining on a terminal; the epoch lines under -v
    epochs = tqdm(range(config.epochs), desc="LightGCN", unit="epoch", disable=None,
                  leave=False, file=sys.stderr)
    for epoch in epochs:
        order = rng.permutation(users.size)
        batch_users, batch_pos = users[order], items[order]
        batch_neg = sample_unseen(rng, batch_users, seen_keys, n_items)
        epoch_loss = 0.0
        for lo in range(0, users.size, batch):
            u = torch.from_numpy(batch_users[lo : lo + batch])
            i = torch.from_numpy(batch_pos[lo : lo + batch]) + n_users
            j = torch.from_numpy(batch_neg[lo : lo + batch]) + n_users
            # The whole graph is propagated per step: every embedding a batch touches depends on
            # its neighbours' ego embeddings, and the graph is small (users + items nodes).
            final = propagate()
            pos_score = (final[u] * final[i]).sum(-1)
            neg_score = (final[u] * final[j]).sum(-1)
            bpr = -torch.nn.functional.logsigmoid(pos_score - neg_score).mean()
            reg = (ego[u].pow(2).sum() + ego[i].pow(2).sum() + ego[j].pow(2).sum()) / (2 * u.numel())
            loss = bpr + config.reg * reg
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * u.numel()
        losses.append(epoch_loss / users.size)
        epochs.set_postfix_str(f"loss {losses[-1]:.4f}", refresh=False)
        if (epoch + 1) % log_every == 0 or epoch == 0 or epoch + 1 == config.epochs:
            log.debug(
                "lightgcn epoch %d/%d loss %.4f (%.1fs)",
                epoch + 1, config.epochs, losses[-1], time.monotonic() - start,
            )
    with torch.no_grad():
        final = propagate().numpy().astype(np.float32)
    return CFTables(
        user_emb=np.ascontiguousarray(final[:n_users]),
        item_emb=np.ascontiguousarray(final[n_users:]),
        config=config,
        losses=losses,
    )


def save_cf(tables: CFTables, path: Path) -> None:
    """Write the tables as .npz atomically: never a half-written file."""
    from gensr_ray.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        np.savez(
            f,
            user_emb=tables.user_emb.astype(np.float32),
            item_emb=tables.item_emb.astype(np.float32),
            losses=np.asarray(tables.losses, dtype=np.float64),
            config=np.array(json.dumps(asdict(tables.config))),
        )


def load_cf(path: Path) -> CFTables:
    """Read tables written by `save_cf`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no LightGCN tables; run `gensr prepare` (it pretrains them) on this dataset"
        )
    with np.load(path, allow_pickle=False) as data:
        tables = CFTables(
            user_emb=data["user_emb"],
            item_emb=data["item_emb"],
            config=LightGCNConfig(**json.loads(str(data["config"]))),
            losses=data["losses"].tolist(),
        )
    check_cf_tables(str(path), tables.user_emb, tables.item_emb)
    return tables
