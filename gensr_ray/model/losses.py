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
