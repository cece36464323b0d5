"""SASRec (Kang & McAuley, ICDM 2018, https://arxiv.org/abs/1808.09781): a recommendation baseline.

A causal self-attention encoder over a user's item sequence; the hidden state at the last
position scores every item by an inner product with the (shared) item embedding table, so the
harness's faiss index serves it like any other `baselines.py` model.

Training data: each user's interactions with split == "train", both tasks, in time order (the
interactions table is sorted by (user_id, timestamp)); validation and test interactions never
reach the weights. A user's sequence is cut, from its end, into windows of max_len + 1 items
overlapping by one, so every train transition is a target exactly once. Objective: the paper's
binary cross-entropy of the next item against one uniformly sampled negative per position (an item
outside the user's train items).

Layout: the authors' code normalises before attention; here every block is pre-LN
(x + attn(LN(x)), then x + ffn(LN(x))) with a final LN, and dropout on the embeddings, attention
weights and both residual branches. Sequences are left-padded so that the latest item always sits
at the last position: the position embedding then means "distance from now", the same in
training and in scoring (where the contract's history is at most MAX_HISTORY items).

Scoring an example: the hidden state at the last position over the example's `history` (the
contract's leak-free history). It ignores the query, like LightGCN.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gensr_ray.data import contract
from gensr_ray.data.contract import DataError

log = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    dim: int = 64  # item / position embedding and hidden size
    n_layers: int = 2  # self-attention blocks (the paper's setting)
    n_heads: int = 1  # the paper found one head enough
    max_len: int = 50  # positions; longer train sequences are cut into windows
    dropout: float = 0.2  # the paper's rate for MovieLens-1M
    # Measured on ml-100k validation (2 CPU cores, ~0.9 s an epoch; rec sampled HR@10 / full
    # Recall@20): lr 1e-3: 10 epochs 0.596 / 0.188, 20: 0.692 / 0.228, 40: 0.738 / 0.244;
    # lr 3e-3: 10: 0.652 / 0.202, 20: 0.714 / 0.234, 30: 0.714 / 0.243, 40: 0.722 / 0.255;
    # lr 2e-3, 30: 0.720 / 0.252. Past 20 epochs at 3e-3 the gains are within the noise of 940
    # examples (+-0.015) for twice the time, so 20 epochs (~18 s).
    epochs: int = 20
    batch_size: int = 128  # windows per Adam step
    lr: float = 3e-3
    seed: int = 42
    # sparse item-embedding gradients with lazy Adam (a step costs what its batch touches);
    # False: dense Adam over the whole table every step (bench/sasrec_scaling.py compares)
    sparse: bool = True


class SASRec(nn.Module):
    """Item ids 0..n_items-1; id n_items is padding (its embedding row is kept at zero)."""

    def __init__(self, n_items: int, config: SASRecConfig):
        super().__init__()
        self.n_items = n_items
        self.config = config
        # sparse gradients: a step updates the rows its batch touched (SparseAdam), so its
        # cost does not grow with the catalogue
        self.item_emb = nn.Embedding(n_items + 1, config.dim, padding_idx=n_items,
                                     sparse=config.sparse)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.dim)
        # Small normal init (BERT/GPT style). Unit-variance embeddings (torch's default) make the
        # initial logits h . e of order sqrt(dim) and slow BCE training down several-fold.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items [b, max_len], left-padded with n_items -> hidden states [b, max_len, dim]."""
        length = items.shape[1]
        real = items != self.n_items  # [b, L]
        positions = torch.arange(self.config.max_len - length, self.config.max_len)
        x = self.item_emb(items) + self.pos_emb(positions)
        x = self.dropout(x) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        # A position attends to earlier real items and always to itself, so a padding position
        # (attending to nothing else) never turns into a NaN row of the softmax.
        allowed = causal & (real.unsqueeze(1) | torch.eye(length, dtype=torch.bool))  # [b, L, L]
        for block in self.blocks:
            x = block(x, allowed.unsqueeze(1)) * real.unsqueeze(-1)
        return self.final_norm(x)

    def last_hidden(self, items: torch.Tensor) -> torch.Tensor:
        return self.forward(items)[:, -1]

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight[: self.n_items]


class _Block(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout_p = config.dropout
        self.attn_norm = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.ffn_norm = nn.LayerNorm(config.dim)
        # The paper's point-wise feed-forward: two dim x dim layers with a ReLU between.
        self.ffn = nn.Sequential(nn.Linear(config.dim, config.dim), nn.ReLU(),
                                 nn.Dropout(config.dropout), nn.Linear(config.dim, config.dim))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(dim, dim=-1)
        q, k, v = (t.view(b, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout_p if self.training else 0.0
        )
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(b, length, dim)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def left_pad(sequences: list[np.ndarray], length: int, pad: int) -> np.ndarray:
    """[n, length] int64: each sequence's last `length` items, right-aligned, padded with `pad`."""
    out = np.full((len(sequences), length), pad, dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = np.asarray(seq, dtype=np.int64)[-length:]
        if tail.size:
            out[row, length - tail.size :] = tail
    return out


def train_sequences(data_dir: Path) -> list[np.ndarray]:
    """Per user with train interactions, their train item ids in time order (both tasks)."""
    table = contract.read_table(
        contract.interactions_dir(data_dir), columns=["user_id", "item_id", "timestamp", "split"]
    )
    train = table.column("split").to_numpy(zero_copy_only=False) == "train"
    users = table.column("user_id").to_numpy()[train].astype(np.int64)
    items = table.column("item_id").to_numpy()[train].astype(np.int64)
    stamps = table.column("timestamp").to_numpy()[train]
    order = np.lexsort((stamps, users))  # stable: the table's own order breaks timestamp ties
    users, items = users[order], items[order]
    _, starts = np.unique(users, return_index=True)
    return np.split(items, starts[1:]) if users.size else []


def _windows(sequences: list[np.ndarray], max_len: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Windows of at most max_len + 1 items, from each sequence's end, overlapping by one item;
    returns them with the index of the sequence each came from."""
    windows, owner = [], []
    for index, seq in enumerate(sequences):
        for end in range(seq.size, 1, -max_len):
            windows.append(seq[max(0, end - max_len - 1) : end])
            owner.append(index)
    return windows, np.asarray(owner, dtype=np.int64)


@torch.enable_grad()  # a caller scoring under no_grad may be the one that triggers training
def fit_sasrec(sequences: list[np.ndarray], n_items: int, config: SASRecConfig) -> SASRec:
    """Train on the given item sequences (oldest first); the data-free core of `train_sasrec`."""
    from gensr_ray.data.sampling import sample_unseen

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = SASRec(n_items, config)
    # Adam for the blocks; lazy Adam (moments of the touched rows only) for the item table
    dense = [p for name, p in model.named_parameters()
             if not (config.sparse and name == "item_emb.weight")]
    optimizers = [torch.optim.Adam(dense, lr=config.lr, betas=(0.9, 0.98))]
    if config.sparse:
        optimizers.append(torch.optim.SparseAdam([model.item_emb.weight], lr=config.lr,
                                                 betas=(0.9, 0.98)))
    windows, owner = _windows(sequences, config.max_len)
    if not windows:
        raise DataError("SASRec: no user has two or more train interactions")
    padded = left_pad(windows, config.max_len + 1, n_items)
    inputs, targets = padded[:, :-1], padded[:, 1:]
    # Negatives avoid the user's train items: keys user * n_items + item of every train event.
    seen_keys = np.unique(np.concatenate(
        [index * n_items + seq for index, seq in enumerate(sequences)]))
    # A position is trained when its input is a real item (its target, the next item, then is).
    real = inputs != n_items
    log_every = max(1, config.epochs // 10)
    start = time.monotonic()
    model.train()
    for epoch in range(config.epochs):
        negatives = np.full_like(targets, n_items)
        owners = np.broadcast_to(owner[:, None], targets.shape)[real]
        negatives[real] = sample_unseen(rng, owners, seen_keys, n_items)
        order = rng.permutation(len(windows))
        epoch_loss, epoch_count = 0.0, 0
        for lo in range(0, order.size, config.batch_size):
            rows = order[lo : lo + config.batch_size]
            hidden = model(torch.from_numpy(inputs[rows]))  # [b, L, dim]
            mask = torch.from_numpy(real[rows])
            pos = (hidden * model.item_emb(torch.from_numpy(targets[rows]))).sum(-1)[mask]
            neg = (hidden * model.item_emb(torch.from_numpy(negatives[rows]))).sum(-1)[mask]
            loss = nn.functional.binary_cross_entropy_with_logits(
                torch.cat([pos, neg]), torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
            )
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            epoch_loss += loss.item() * pos.numel()
            epoch_count += pos.numel()
        if (epoch + 1) % log_every == 0 or epoch == 0 or epoch + 1 == config.epochs:
            log.info("sasrec epoch %d/%d loss %.4f (%.1fs)", epoch + 1, config.epochs,
                     epoch_loss / epoch_count, time.monotonic() - start)
    return model.eval()


def train_sasrec(data_dir: Path, n_items: int, config: SASRecConfig | None = None) -> SASRec:
    """Train SASRec on the train split of a prepared dataset."""
    sequences = train_sequences(data_dir)
    if any(seq.size and (seq.min() < 0 or seq.max() >= n_items) for seq in sequences):
        raise DataError(f"{contract.interactions_dir(data_dir)}: item ids outside 0..{n_items - 1}")
    return fit_sasrec(sequences, n_items, config or SASRecConfig())


def pretrain_sasrec(data_dir: Path, config: SASRecConfig | None = None) -> Path:
    """Train SASRec on a dataset's train split and save it at cf/sasrec.pt, where the
    evaluation harness reads it (`gensr pretrain-sasrec`); the path."""
    from gensr_ray.cf.lightgcn import catalogue_sizes

    _, n_items = catalogue_sizes(Path(data_dir))
    path = sasrec_path(data_dir)
    save_sasrec(train_sasrec(Path(data_dir), n_items, config), path)
    return path


def sasrec_path(data_dir: Path) -> Path:
    return Path(data_dir) / "cf" / "sasrec.pt"


def save_sasrec(model: SASRec, path: Path) -> None:
    """Write the weights, item count and config atomically: never a half-written file."""
    from gensr_ray.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        torch.save({"n_items": model.n_items, "config": asdict(model.config),
                    "state_dict": model.state_dict()}, f)


def load_sasrec(path: Path, n_items: int) -> SASRec:
    """Read a model written by `save_sasrec`, checking that it was trained on n_items items."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["n_items"] != n_items:
        raise DataError(
            f"{path}: SASRec trained on {saved['n_items']} items but the items table has "
            f"{n_items}; the file belongs to another dataset, delete it to retrain"
        )
    model = SASRec(n_items, SASRecConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval()


class SASRecBaseline:
    """SASRec as an inner-product model: query vector = last hidden state over the example's
    history, item vectors = the item embedding table. It ignores the query, like LightGCN.

    The model is read from cf/sasrec.pt on first use. It is trained ahead by
    `gensr pretrain-sasrec`, never by an evaluation: on a large catalogue training takes
    far longer than scoring.
    """

    name = "sasrec"
    tasks = ("search", "rec")

    def __init__(self, data_dir: Path, n_items: int):
        self.data_dir = Path(data_dir)
        self.n_items = n_items
        self._model: SASRec | None = None

    def model(self) -> SASRec:
        if self._model is None:
            path = sasrec_path(self.data_dir)
            if not path.is_file():
                raise DataError(f"{path}: no SASRec model; `gensr pretrain-sasrec --data "
                                f"{self.data_dir}` trains it (train split only)")
            self._model = load_sasrec(path, self.n_items)
        return self._model

    def query_vectors(self, batch: dict) -> np.ndarray:
        model = self.model()
        items = left_pad(batch["history"], model.config.max_len, self.n_items)
        with torch.no_grad():
            return model.last_hidden(torch.from_numpy(items)).numpy().astype(np.float32)

    def item_vectors(self) -> np.ndarray:
        model = self.model()
        with torch.no_grad():
            return model.item_table().numpy().astype(np.float32)
