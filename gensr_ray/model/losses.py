"""GenSR's losses and scores: plain functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer token over {Yes, No}; logits [B, 2] = (yes, no)."""
    return F.cross_entropy(logits, (label < 0.5).long())


def answer_score(logits: torch.Tensor) -> torch.Tensor:
    """Ranking score: log P(Yes) - log P(No) with P restricted to {Yes, No}.

    Only the Yes/No rows of the LM head are computed, so P("Yes") is normalised over the two
    answer words; the log-odds orders candidates exactly as that probability does.
    """
    return logits[:, 0] - logits[:, 1]


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float,
             authors_layernorm: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned views; other rows of the batch are negatives.

    With `authors_layernorm` the L2-normalised vectors go through a LayerNorm before the dot
    product, as in the authors' code, which makes the "cosine" logits ~dim/temperature.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    if authors_layernorm:
        a = F.layer_norm(a, a.shape[-1:])
        b = F.layer_norm(b, b.shape[-1:])
    logits = a @ b.T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def listwise_loss(scores: torch.Tensor, group: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of each example's target against its negatives in the batch.

    scores [B]: answer scores (Yes/No log-odds); group [B]: the example each row belongs to;
    label [B]: 1 for the target row. An example counts when the batch holds its target and at
    least one of its negatives; a batch with none gives a zero that keeps the graph.
    """
    _, inverse = torch.unique(group, return_inverse=True)
    n = int(inverse.max()) + 1
    peak = torch.full((n,), float("-inf"), dtype=scores.dtype, device=scores.device)
    peak = peak.scatter_reduce(0, inverse, scores.detach(), reduce="amax")
    total = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    total = total.index_add(0, inverse, torch.exp(scores - peak[inverse]))
    positive = torch.zeros_like(total).index_add(0, inverse, scores * label)
    targets = torch.zeros_like(total).index_add(0, inverse, label)
    size = torch.bincount(inverse, minlength=n)
    counted = (targets == 1) & (size > 1)
    if not bool(counted.any()):
        return scores.sum() * 0.0
    return (torch.log(total) + peak - positive)[counted].mean()


def first_rows(group: torch.Tensor) -> torch.Tensor:
    """Index of the first row of each distinct example in `group`, in batch order."""
    _, inverse = torch.unique(group, return_inverse=True)
    rows = torch.arange(group.numel(), device=group.device)
    first = torch.full((int(inverse.max()) + 1,), group.numel(), device=group.device,
                       dtype=rows.dtype).scatter_reduce(0, inverse, rows, reduce="amin")
    return first.sort().values
