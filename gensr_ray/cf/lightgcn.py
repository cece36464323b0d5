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
import warnings
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
    # where the graph is propagated: auto = the first GPU torch sees, else the CPU; or a torch
    # device string ("cpu", "cuda:1"). The initial table is drawn on the CPU either way.
    device: str = "auto"


@dataclass
class CFTables:
    user_emb: np.ndarray  # [n_users, dim] float32, final (layer-mean) embeddings
    item_emb: np.ndarray  # [n_items, dim] float32
    config: LightGCNConfig
    losses: list[float] = field(default_factory=list)  # mean BPR loss (with reg) per epoch
    epoch_seconds: list[float] = field(default_factory=list)  # wall time per epoch (not saved)


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


def resolve_device(name: str):
    """The torch device a LightGCNConfig.device names; `auto`: cuda when available."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"LightGCN device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"LightGCN device {name!r}: torch sees no CUDA device here")
    return device


def _normalized_adjacency(users, items, n_users: int, n_items: int):
    """D^-1/2 A D^-1/2 of the (users + items) bipartite graph as a sparse CSR tensor.

    CSR: a product with a dense matrix runs row by row into a preallocated output, no sort."""
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
    coo = torch.sparse_coo_tensor(
        indices, torch.from_numpy(values).float(), (n, n), check_invariants=True
    ).coalesce()
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state": products with a dense matrix are stable
        warnings.simplefilter("ignore", UserWarning)
        csr = coo.to_sparse_csr()
        if max(n, csr.values().numel()) < 2**31:
            # 32-bit indices: MKL's product takes int32, and converted the int64 indices
            # (a copy of all of them) on every call: ~11 % of a product at 10M non-zeros
            csr = torch.sparse_csr_tensor(
                csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape
            )
        return csr


class _Propagation:
    """final = mean over layers 0..L of A^l x, into buffers allocated once.

    A is symmetric, so the same operator maps the gradient of the final embeddings back to
    the ego embeddings: d final / d ego applied to g is mean over l of A^l g."""

    def __init__(self, adjacency, layers: int, shape: tuple[int, int]):
        import torch

        self.adjacency, self.layers = adjacency, layers
        device = adjacency.device
        # the hops between the first and the last, alternating: the last goes straight into out
        self.hops = tuple(
            torch.empty(shape, device=device) for _ in range(min(2, max(0, layers - 1)))
        )

    def __call__(self, x, out):
        out.copy_(x)
        current = x
        for layer in range(self.layers - 1):
            hop = self.hops[layer % 2]
            # addmm_ with beta=0 writes in place (ignoring the old contents, NaN included);
            # torch.mm(..., out=hop) computes into a fresh table and copies it over: 2.5x
            # slower on a 600k-node graph, with the page faults of a new allocation each time
            hop.addmm_(self.adjacency, current, beta=0)
            out.add_(hop)
            current = hop
        if self.layers:
            # the last hop feeds only the sum: accumulated into out by the product itself
            out.addmm_(self.adjacency, current)
        return out.mul_(1.0 / (self.layers + 1))


class _BPRStep:
    """One step's loss and ego gradient for BPR + L2, written by hand into buffers allocated
    once (table-sized: the final embeddings and their gradient; batch-sized: the gathered
    rows and their gradients).

    Why not autograd: it allocates fresh table- and batch-sized tensors on every step, and
    past a few hundred thousand nodes the page faults of those allocations (the allocator
    returns large blocks to the system on free) cost as much as the sparse products, so an
    epoch grew faster than the graph. tests/test_lightgcn.py checks this gradient against
    autograd through the dense adjacency."""

    def __init__(self, propagate: _Propagation, shape: tuple[int, int], batch: int, reg: float):
        import torch

        self.propagate, self.reg = propagate, reg
        device = propagate.adjacency.device
        self.final = torch.empty(shape, device=device)
        self.grad_final = torch.empty(shape, device=device)
        self.rows = torch.empty(3 * batch, shape[1], device=device)  # user, positive, negative
        self.grads = torch.empty(3 * batch, shape[1], device=device)
        self.diff = torch.empty(batch, shape[1], device=device)

    def __call__(self, ego, u, i, j) -> float:
        """Set ego.grad for the batch of (user, positive, negative) node ids; return the loss."""
        import torch

        batch = u.numel()
        nodes = torch.cat([u, i, j])  # one gather and one scatter for the three roles
        rows, grads, diff = self.rows[: 3 * batch], self.grads[: 3 * batch], self.diff[:batch]
        with torch.no_grad():
            self.propagate(ego, self.final)
            torch.index_select(self.final, 0, nodes, out=rows)
            user, pos, neg = rows.split(batch)
            grad_user, grad_pos, grad_neg = grads.split(batch)
            torch.sub(pos, neg, out=diff)
            # margin = <user, pos - neg>; BPR = mean softplus(-margin)
            torch.mul(user, diff, out=grad_user)  # scratch: the row-wise products
            margin = grad_user.sum(-1)
            bpr = float(torch.nn.functional.softplus(-margin).mean())
            # d BPR / d margin = -sigmoid(-margin) / batch
            coef = torch.sigmoid(-margin).mul_(-1.0 / batch).unsqueeze(1)
            torch.mul(diff, coef, out=grad_user)
            torch.mul(user, coef, out=grad_pos)
            torch.neg(grad_pos, out=grad_neg)
            self.grad_final.zero_()
            self.grad_final.index_add_(0, nodes, grads)
            self.propagate(self.grad_final, ego.grad)
            # L2 on the batch's ego rows, sum / (2 * batch) as in the LightGCN reference code
            torch.index_select(ego, 0, nodes, out=rows)
            l2 = float(torch.linalg.vector_norm(rows)) ** 2 / (2 * batch)
            # scaled in place, not through index_add_'s alpha: on CPU alpha costs a scaled
            # copy of the rows inside the scatter, 2.4x the time of the plain scatter
            ego.grad.index_add_(0, nodes, rows.mul_(self.reg / batch))
        return bpr + self.reg * l2


def fit_lightgcn(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, config: LightGCNConfig
) -> CFTables:
    """Train on the given (user, item) edges; the data-free core of `train_lightgcn`."""
    import torch

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    adjacency = _normalized_adjacency(users, items, n_users, n_items).to(device)
    shape = (n_users + n_items, config.dim)
    propagate = _Propagation(adjacency, config.layers, shape)
    # Normal(0, 0.1) init, as in the LightGCN reference implementation.
    ego = torch.nn.Parameter((torch.randn(shape) * 0.1).to(device))
    ego.grad = torch.zeros(shape, device=device)
    # fused: one pass over the table, no table-sized temporaries (5x faster than foreach on CPU)
    optimizer = torch.optim.Adam([ego], lr=config.lr, fused=True)

    batch = max(config.batch_size, -(-users.size // max(1, config.max_steps_per_epoch)))
    # edges in key order: the negatives are drawn in this order, so that the sampler's
    # lookups into seen_keys walk forward instead of jumping (2-6x faster on large graphs)
    seen_keys = np.sort(users.astype(np.int64) * n_items + items)
    users, items = seen_keys // n_items, seen_keys % n_items
    step = _BPRStep(propagate, shape, min(batch, users.size), config.reg)
    log_every = max(1, config.epochs // 10)
    losses: list[float] = []
    start = time.monotonic()
    # the one display of a long pretraining on a terminal; the epoch lines under -v
    epochs = tqdm(range(config.epochs), desc="LightGCN", unit="epoch", disable=None,
                  leave=False, file=sys.stderr)
    epoch_seconds: list[float] = []
    for epoch in epochs:
        epoch_start = time.monotonic()
        negatives = sample_unseen(rng, users, seen_keys, n_items)
        order = rng.permutation(users.size)
        epoch_loss = 0.0
        for lo in range(0, users.size, batch):
            # a random batch, taken in key order: its users ascend, so the step's gathers and
            # scatters into the tables walk forward (the gradient is a sum: order-free)
            rows = np.sort(order[lo : lo + batch])
            u = torch.from_numpy(users[rows]).to(device)
            i = torch.from_numpy(items[rows] + n_users).to(device)
            j = torch.from_numpy(negatives[rows] + n_users).to(device)
            # The whole graph is propagated per step: every embedding a batch touches depends on
            # its neighbours' ego embeddings, and the graph is small (users + items nodes).
            loss = step(ego, u, i, j)
            optimizer.step()
            epoch_loss += loss * u.numel()
        losses.append(epoch_loss / users.size)
        epoch_seconds.append(time.monotonic() - epoch_start)
        epochs.set_postfix_str(f"loss {losses[-1]:.4f}", refresh=False)
        if (epoch + 1) % log_every == 0 or epoch == 0 or epoch + 1 == config.epochs:
            log.debug(
                "lightgcn epoch %d/%d loss %.4f (%.1fs)",
                epoch + 1, config.epochs, losses[-1], time.monotonic() - start,
            )
    with torch.no_grad():
        final = propagate(ego, step.final).cpu().numpy()  # the step's scratch table
    return CFTables(
        user_emb=np.ascontiguousarray(final[:n_users]),
        item_emb=np.ascontiguousarray(final[n_users:]),
        config=config,
        losses=losses,
        epoch_seconds=epoch_seconds,
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
