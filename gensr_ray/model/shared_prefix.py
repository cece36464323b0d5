"""Attention of many candidates' suffixes to their example's one shared prefix, without copies.

Scoring runs an example's C candidates as C suffixes after one prefix whose keys and values
were computed once. Handing those to a stock attention kernel means a prefix cache expanded
to every candidate (C copies of it per layer, then a `cat` with each suffix, then another
copy per query head under grouped-query attention): on a CPU that copying took a third of the
scoring time. Here the suffix queries of all an example's candidates attend to the prefix in
one product against its single copy, each suffix attends causally to itself, and the two
partial softmaxes are merged exactly (one running maximum, summed normalisers).

`attending_to(model)` routes a Hugging Face decoder's attention (any model class with
the attention-backend interface: Llama, Qwen2, ...) through `shared_prefix_attention` for the
calls inside it. Plain torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

NAME = "gensr_shared_prefix"


@dataclass
class SharedPrefix:
    """One forward's prefixes: per layer, keys and values [G, kv_heads, P, head_dim] of G
    examples' left-padded prefixes (mask [G, P]), and the mask [G x C, S] of their C
    candidates' right-padded suffixes, example by example."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefix_mask: torch.Tensor
    suffix_mask: torch.Tensor

    def __post_init__(self):
        # read once per forward, not per layer (on a GPU each read waits for the device)
        self.prefix_padded = not bool(self.prefix_mask.all())


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask=None, scaling: float | None = None,
                            dropout: float = 0.0, shared_prefix: SharedPrefix | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """Attention output [G x C, S, heads, head_dim] of the suffixes' queries [G x C, heads, S,
    head_dim] over their example's prefix and, causally, their own keys and values
    [G x C, kv_heads, S, head_dim] (the model's `attention_mask` is not used: the masks come
    with `shared_prefix`)."""
    if shared_prefix is None:
        raise ValueError(f"attention {NAME!r} runs only inside shared_prefix.attending_to")
    if dropout:
        raise ValueError(f"attention {NAME!r} is for inference: dropout must be 0")
    # in fp32 whatever the model's dtype (as torch's fused kernels accumulate): the prefix's
    # and the suffixes' keys and values are small next to the scores
    prefix_keys = shared_prefix.keys[module.layer_idx].float()
    prefix_values = shared_prefix.values[module.layer_idx].float()
    key, value = key.float(), value.float()
    n, heads, steps, dim = query.shape
    g, kv_heads, length, _ = prefix_keys.shape
    per, groups = n // g, heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    lowest = torch.finfo(torch.float32).min
    # query heads of one key/value head side by side: [N, kv_heads, groups x S, dim], scaled
    # here rather than the larger products below
    q = (query.float() * scaling).reshape(n, kv_heads, groups * steps, dim)

    def by_candidate(x: torch.Tensor) -> torch.Tensor:  # [G, kv, C x groups x S, ...] -> [N, ...]
        x = x.reshape(g, kv_heads, per, groups * steps, *x.shape[3:]).transpose(1, 2)
        return x.reshape(n, kv_heads, groups * steps, *x.shape[4:])

    def by_example(x: torch.Tensor) -> torch.Tensor:  # the inverse of by_candidate
        x = x.reshape(g, per, kv_heads, groups * steps, *x.shape[3:]).transpose(1, 2)
        return x.reshape(g, kv_heads, per * groups * steps, *x.shape[4:])

    # every query of an example's candidates against its one prefix: [G, kv, C x groups x S, P]
    to_prefix = torch.matmul(by_example(q), prefix_keys.transpose(-1, -2))
    if shared_prefix.prefix_padded:
        to_prefix.masked_fill_(~shared_prefix.prefix_mask.bool()[:, None, None, :], lowest)
    # each suffix against itself, causal, its right padding masked: [N, kv, groups x S, S]
    to_self = torch.matmul(q, key.transpose(-1, -2))
    step = torch.arange(steps, device=query.device)
    allowed = (step[None, :] <= step[:, None])[None] & shared_prefix.suffix_mask.bool()[:, None, :]
    to_self.masked_fill_(~allowed.repeat(1, groups, 1)[:, None], lowest)

    top = torch.maximum(by_candidate(to_prefix.amax(-1)), to_self.amax(-1))  # [N, kv, gS]
    to_prefix.sub_(by_example(top).unsqueeze(-1)).exp_()
    to_self.sub_(top.unsqueeze(-1)).exp_()
    total = by_candidate(to_prefix.sum(-1)) + to_self.sum(-1)
    out = by_candidate(torch.matmul(to_prefix, prefix_values))
    out += torch.matmul(to_self, value)
    out /= total.unsqueeze(-1)
    # [N, kv, groups x S, dim] -> [N, S, heads, dim], as Hugging Face's attention returns it
    out = out.reshape(n, heads, steps, dim).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


def supports(model) -> bool:
    """Whether `model` (a Hugging Face decoder) dispatches attention through the interface."""
    return bool(getattr(model, "_supports_attention_backend", False))


@contextmanager
def attending_to(model):
    """Inside, `model`'s attention layers run `shared_prefix_attention` (the caller passes
    `shared_prefix=` to the model's forward); the configured attention is restored after."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, shared_prefix_attention)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
