"""The GenSR model: two views of the history, spliced into a task prompt, one Yes/No answer.

    CF view:       frozen LightGCN table -> transformer (model.cf_layers, the authors: 1)
                   -> target attention -> linear
    semantic view: history title tokens -> the backbone's own input embeddings
                   -> 1-layer transformer -> target attention vs the candidate's mean title
    prompt:        template tokens, four positions replaced by the soft vectors
    answer:        hidden state at the answer position x the Yes/No rows of the LM head

Plain torch: no distributed imports. The LM head's weight is read directly (only its two
answer rows are used), so under ZeRO-3 it must be registered as an external parameter of
this module: `answer_head_weight()` names it for the distribution layer.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from gensr_ray.config import SUBSPACES as SUBSPACE_NAMES
from gensr_ray.config import LossConfig, ModelConfig
from gensr_ray.data.contract import TASKS
from gensr_ray.model import shared_prefix
from gensr_ray.model.losses import answer_loss, answer_score, first_rows, info_nce, listwise_loss

SUBSPACES = {
    # subspace -> (adapters created, adapters active per task)
    "shared_lora": (["shared"], {"search": ["shared"], "rec": ["shared"]}),
    "task_lora": (["search", "rec"], {"search": ["search"], "rec": ["rec"]}),
    "task_and_shared_lora": (["shared", "search", "rec"],
                             {"search": ["shared", "search"], "rec": ["shared", "rec"]}),
    "full": ([], {}),
}
if tuple(SUBSPACES) != SUBSPACE_NAMES:
    raise ImportError("gensr_ray.config.SUBSPACES must list the settings SUBSPACES builds")


class EncoderLayer(nn.Module):
    """One post-norm transformer encoder layer (ReLU feed-forward, no dropout).

    The same computation as nn.TransformerEncoderLayer, but every projection is called as a
    module: nn.MultiheadAttention reads its output projection's weights without calling it,
    which ZeRO-3's trace of module calls cannot follow (training then fails after a restore
    with a "tracing error" in backward).
    """

    def __init__(self, dim: int, heads: int, ff_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff_in, self.ff_out = nn.Linear(dim, ff_dim), nn.Linear(ff_dim, dim)
        self.norm_attn, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # initialised as nn.MultiheadAttention initialises its projections
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x [B, N, D]; keep [B, N] marks real positions (a row with none attends to all)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        keep = keep | ~keep.any(-1, keepdim=True)
        attended = nn.functional.scaled_dot_product_attention(q, k, v,
                                                              attn_mask=keep[:, None, None, :])
        x = self.norm_attn(x + self.out(attended.transpose(1, 2).reshape(b, n, d)))
        return self.norm_ff(x + self.ff_out(torch.relu(self.ff_in(x))))


# recency ranks a history position embedding tells apart; older items share the last one
HISTORY_POSITIONS = 64
# popularity buckets: floor(log2(1 + train interactions)), the last one shared by the busiest
POPULARITY_BUCKETS = 24


def popularity_buckets(counts: torch.Tensor) -> torch.Tensor:
    """[n_items] train interaction counts -> bucket ids: 0 for a cold item, then one bucket
    per doubling of the count."""
    return torch.log2(1 + counts.double()).floor().long().clamp(0, POPULARITY_BUCKETS - 1)


def recency(mask: torch.Tensor) -> torch.Tensor:
    """[B, H] rank of each history position from the latest (0), for histories left-aligned
    in time order (`mask` marks the real ones; padding gets a rank that is masked out)."""
    latest = mask.sum(-1, keepdim=True) - 1
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (latest - positions).clamp(0, HISTORY_POSITIONS - 1)


class TargetAttention(nn.Module):
    """Pool a sequence against a target: score_j = h_j^T W e, masked softmax, weighted sum.

    h [B, L, D] with mask [B, L], and target [B, D]; or C targets per sequence, [B, C, D] ->
    [B, C, D] (scoring: one history pooled against each of an example's candidates, without
    a copy of the history per candidate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if target.dim() == 2:
            return self(h, target.unsqueeze(1), mask).squeeze(1)
        scores = torch.einsum("bnd,bcd->bcn", h, self.proj(target))
        mask = mask.unsqueeze(1)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * mask  # rows with no valid position -> 0
        return torch.einsum("bcn,bnd->bcd", weights, h)


# forward() returns a plain dict (DeepSpeed's ZeRO-3 hooks find tensors in dicts, not in
# dataclasses):
#   logits   [B, 2] (Yes, No) logits at the answer position
#   cf_hist  [B, D] projected CF history vector
#   sem_hist [B, D] semantic history vector
GenSROutput = dict


class GenSR(nn.Module):
    def __init__(self, lm: nn.Module, kind: str, cf_items: torch.Tensor, cfg: ModelConfig,
                 yes_id: int, no_id: int, item_counts: torch.Tensor | None = None):
        """`item_counts`: [n_items] train interactions per item, which model.item_popularity
        needs (the model reads no files: gensr_ray.assemble counts them)."""
        super().__init__()
        if cfg.subspace not in SUBSPACES:
            raise ValueError(f"model.subspace={cfg.subspace!r}; expected one of {list(SUBSPACES)}")
        self.lm = lm
        self.kind = kind
        self.cfg = cfg
        self.answer_ids = (yes_id, no_id)
        self.register_buffer("cf_items", cf_items.float(), persistent=False)  # frozen
        width = lm.get_input_embeddings().embedding_dim
        cf_dim = cf_items.shape[1]
        self.cf_encoder = EncoderLayer(cf_dim, cfg.cf_heads, 2 * cf_dim)
        # the layers past the authors' first (none by default, so their checkpoints' names hold)
        self.cf_encoder_more = nn.ModuleList(EncoderLayer(cf_dim, cfg.cf_heads, 2 * cf_dim)
                                             for _ in range(cfg.cf_layers - 1))
        self.cf_attention = TargetAttention(cf_dim)
        self.cf_proj = nn.Linear(cf_dim, width)
        self.sem_encoder = EncoderLayer(width, cfg.sem_heads, 2 * width)
        self.sem_attention = TargetAttention(width)
        if cfg.history_positions:  # zero at first: training starts from the authors' encoders
            self.cf_positions = nn.Embedding(HISTORY_POSITIONS, cf_dim)
            self.sem_positions = nn.Embedding(HISTORY_POSITIONS, width)
            nn.init.zeros_(self.cf_positions.weight)
            nn.init.zeros_(self.sem_positions.weight)
        if cfg.cf_item_offsets:  # zero at first: training starts from the frozen table
            self.cf_offsets = nn.Embedding(cf_items.shape[0], cf_dim)
            nn.init.zeros_(self.cf_offsets.weight)
        if cfg.item_popularity:  # zero at first, as the offsets
            if item_counts is None or item_counts.shape != cf_items.shape[:1]:
                raise ValueError(f"model.item_popularity needs one train interaction count per "
                                 f"item ({cf_items.shape[0]}), got "
                                 f"{None if item_counts is None else tuple(item_counts.shape)}")
            self.register_buffer("item_counts", item_counts.long(), persistent=False)
            self.popularity = nn.Embedding(POPULARITY_BUCKETS, cf_dim)
            nn.init.zeros_(self.popularity.weight)
        self.active_per_task = SUBSPACES[cfg.subspace][1]
        # the discriminative twin: one logit per task from the shared representation
        self.task_heads = nn.Linear(width, len(TASKS)) if cfg.kind == "discriminative" else None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the parameters compute in: DeepSpeed casts parameters to bf16 / fp16 but
        not buffers, so the frozen CF table is cast at lookup (fp32 in storage)."""
        return self.cf_proj.weight.dtype

    def answer_head_weight(self) -> nn.Parameter:
        return self.lm.get_output_embeddings().weight

    # -- the two views: encode the history once, pool it against each candidate -----------
    def cf_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """The items' CF vectors: the frozen LightGCN rows, plus their trained offsets with
        model.cf_item_offsets and their popularity bucket's embedding with
        model.item_popularity."""
        x = self.cf_items[items].to(self.compute_dtype)
        if self.cfg.cf_item_offsets:
            x = x + self.cf_offsets(items)
        if self.cfg.item_popularity:
            x = x + self.popularity(popularity_buckets(self.item_counts[items]))
        return x

    def cf_encode(self, hist_items: torch.Tensor, hist_mask: torch.Tensor) -> torch.Tensor:
        x = self.cf_vectors(hist_items)
        if self.cfg.history_positions:
            x = x + self.cf_positions(recency(hist_mask))
        x = self.cf_encoder(x, hist_mask)
        for layer in self.cf_encoder_more:
            x = layer(x, hist_mask)
        return x

    def cf_pool(self, encoded: torch.Tensor, mask: torch.Tensor, target_item: torch.Tensor,
                per: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(history vector, candidate vector), both projected to the model width; each
        history serves `per` consecutive candidates."""
        target = self.cf_vectors(target_item)
        pooled = self.cf_attention(encoded, target.reshape(encoded.shape[0], per, -1), mask)
        return self.cf_proj(pooled.reshape(target.shape)), self.cf_proj(target)

    def sem_encode(self, title_ids: torch.Tensor, title_mask: torch.Tensor):
        """History title tokens through the backbone's embeddings and a 1-layer transformer."""
        b, h, t = title_ids.shape
        tokens = self.lm.get_input_embeddings()(title_ids)
        if self.cfg.history_positions:  # every token of a title gets its item's recency
            tokens = tokens + self.sem_positions(recency(title_mask.any(-1)))[:, :, None, :]
        tokens = tokens.reshape(b, h * t, -1)
        mask = title_mask.reshape(b, h * t)
        return self.sem_encoder(tokens, mask), mask

    def sem_pool(self, encoded: torch.Tensor, mask: torch.Tensor, target_title_ids: torch.Tensor,
                 target_title_mask: torch.Tensor, per: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(history vector, candidate mean title embedding); each history serves `per`
        consecutive candidates."""
        title = self.lm.get_input_embeddings()(target_title_ids)
        tmask = target_title_mask.unsqueeze(-1).to(title.dtype)
        title_mean = (title * tmask).sum(1) / tmask.sum(1).clamp(min=1.0)
        pooled = self.sem_attention(encoded, title_mean.reshape(encoded.shape[0], per, -1), mask)
        return pooled.reshape(title_mean.shape), title_mean

    def soft_tokens(self, cf_hist, sem_hist, cf_target, title_mean) -> torch.Tensor:
        """[B, 4, D] in slot order; a disabled view contributes zero vectors."""
        if not self.cfg.use_cf:
            cf_hist, cf_target = torch.zeros_like(cf_hist), torch.zeros_like(cf_target)
        if not self.cfg.use_sem:
            sem_hist = torch.zeros_like(sem_hist)
        return torch.stack([cf_hist, sem_hist, cf_target, title_mean], dim=1)

    # -- the prompt and the answer --------------------------------------------------------
    def forward(self, batch: dict) -> GenSROutput:
        """One full prompt per row (training, and scoring any backbone).

        A candidate group (`Collator.group`: it holds "prefix_ids") is scored by `score_group`
        instead, so scoring through a DeepSpeed engine, whose ZeRO-3 hooks gather parameters
        around the module's forward, shares the prefix as well (validation in training)."""
        if "prefix_ids" in batch:
            return {"logits": self.score_group(batch)}
        cf_hist, cf_target = self.cf_pool(self.cf_encode(batch["hist_items"], batch["hist_mask"]),
                                          batch["hist_mask"], batch["target_item"])
        encoded, mask = self.sem_encode(batch["hist_title_ids"], batch["hist_title_mask"])
        sem_hist, title_mean = self.sem_pool(encoded, mask, batch["target_title_ids"],
                                             batch["target_title_mask"])
        soft = self.soft_tokens(cf_hist, sem_hist, cf_target, title_mean)
        embeds = self.splice(self.lm.get_input_embeddings()(batch["input_ids"]),
                             batch["soft_slots"], soft)
        hidden = self.answer_hidden_by_task(embeds, batch)
        return {"logits": self.answer_logits(hidden, batch["task"]), "cf_hist": cf_hist,
                "sem_hist": sem_hist}

    def answer_logits(self, hidden: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """[B, 2] logits: the LM head's Yes and No rows (generative), or the row's task head
        and 0 (discriminative: the answer loss is then BCE on that logit, the score the
        logit itself)."""
        if self.task_heads is None:
            return hidden @ self.answer_head_weight()[list(self.answer_ids)].T
        logit = self.task_heads(hidden).gather(1, task.long().view(-1, 1)).squeeze(1)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)

    @torch.no_grad()
    def score_group(self, g: dict) -> torch.Tensor:
        """Yes/No logits [G x C, 2] for the C candidates of each of G examples of one task
        (`Collator.groups`), sharing what an example's candidates share.

        The history encodings (both views) and, for decoder-only backbones, the KV cache of
        the prompt's candidate-independent prefix are computed once per example, for the G
        examples in one pass; each candidate then runs only its suffix (right-padded, so every
        real position keeps its true position; prefixes are left-padded and their positions
        counted from their first real token).
        """
        n = g["target_item"].shape[0]
        per = n // g["hist_items"].shape[0]  # candidates per example

        def each(x: torch.Tensor) -> torch.Tensor:  # an example's row for each candidate
            return x.repeat_interleave(per, dim=0)

        cf_hist, cf_target = self.cf_pool(self.cf_encode(g["hist_items"], g["hist_mask"]),
                                          g["hist_mask"], g["target_item"], per)
        sem_encoded, mask = self.sem_encode(g["hist_title_ids"], g["hist_title_mask"])
        sem_hist, title_mean = self.sem_pool(sem_encoded, mask, g["target_title_ids"],
                                             g["target_title_mask"], per)
        soft = self.soft_tokens(cf_hist, sem_hist, cf_target, title_mean)
        embed = self.lm.get_input_embeddings()
        suffix = self.splice(embed(g["suffix_ids"]), g["suffix_slots"], soft)
        suffix_mask = g["suffix_mask"]
        steps = torch.arange(suffix_mask.shape[1], device=suffix_mask.device)
        task = TASKS[int(g["task"])]
        with active_adapters(self.lm, self.active_per_task[task]) if self.active_per_task \
                else nullcontext():
            cache, prefix_mask = None, g["prefix_mask"]
            if prefix_mask.shape[1]:
                cache = self.lm.base_model(
                    inputs_embeds=embed(g["prefix_ids"]), attention_mask=prefix_mask,
                    position_ids=(prefix_mask.cumsum(1) - 1).clamp(min=0), use_cache=True).cache
            positions = each(prefix_mask.sum(1, keepdim=True)) + steps
            if cache is not None and shared_prefix.supports(self.lm):
                # the suffixes attend to the one copy of their example's prefix
                prefix = shared_prefix.SharedPrefix(
                    [layer.keys for layer in cache.layers],
                    [layer.values for layer in cache.layers], prefix_mask, suffix_mask)
                with shared_prefix.attending_to(self.lm):
                    out = self.lm.base_model(inputs_embeds=suffix, position_ids=positions,
                                             shared_prefix=prefix)
            else:  # a model without the attention interface: the prefix copied per candidate
                if cache is not None:
                    cache.batch_repeat_interleave(per)
                mask = torch.cat([each(prefix_mask), suffix_mask], dim=1)
                out = self.lm.base_model(inputs_embeds=suffix, attention_mask=mask,
                                         position_ids=positions, cache=cache,
                                         use_cache=cache is not None)
        last = suffix_mask.sum(1) - 1
        return self.answer_logits(out.last_hidden_state[torch.arange(n), last],
                                  torch.full((n,), int(g["task"]), device=last.device))

    @staticmethod
    def splice(embeds: torch.Tensor, slots: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """Replace the embedding at each soft slot k (1..4) by soft[:, k-1]."""
        index = (slots - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        placed = torch.gather(soft, 1, index)
        return torch.where((slots > 0).unsqueeze(-1), placed, embeds)

    def answer_hidden_by_task(self, embeds: torch.Tensor, batch: dict) -> torch.Tensor:
        """Answer-position hidden states; task-specific adapters run per task sub-batch."""
        if not self.active_per_task or self.cfg.subspace == "shared_lora":
            return self.answer_hidden(embeds, batch["attention_mask"])
        hidden = embeds.new_zeros(embeds.shape[0], embeds.shape[-1])
        for task_id, name in enumerate(TASKS):
            rows = (batch["task"] == task_id).nonzero(as_tuple=True)[0]
            # ZeRO-3 gathers the backbone's weights collectively, layer by layer, so every
            # rank must run the same passes (forward and backward) whatever its rows: a task
            # absent from this micro-batch still runs on one row, with weight 0 in the graph
            run = rows if len(rows) else rows.new_zeros(1)
            with active_adapters(self.lm, self.active_per_task[name]):
                part = self.answer_hidden(embeds[run], batch["attention_mask"][run])
            hidden = hidden.index_copy(0, rows, part) if len(rows) else hidden + 0.0 * part.sum()
        return hidden

    def answer_hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "decoder":
            # prompts are left-padded: the last position is the answer position for every row
            out = self.lm.base_model(inputs_embeds=embeds, attention_mask=mask)
            return out.last_hidden_state[:, -1]
        encoded = self.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        start = torch.full((embeds.shape[0], 1), self.lm.config.decoder_start_token_id,
                           dtype=torch.long, device=embeds.device)
        out = self.lm.get_decoder()(input_ids=start, encoder_hidden_states=encoded.last_hidden_state,
                                    encoder_attention_mask=mask)
        hidden = out.last_hidden_state[:, 0]
        if getattr(self.lm.config, "scale_decoder_outputs", self.lm.config.tie_word_embeddings):
            hidden = hidden * self.lm.config.d_model ** -0.5  # as T5's LM head expects
        return hidden


def gensr_loss(out: GenSROutput, label: torch.Tensor, cfg: LossConfig,
               model_cfg: ModelConfig, example_id: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict]:
    """Answer cross-entropy + lambda * InfoNCE(CF history, semantic history), plus, with
    `loss.listwise_weight`, a softmax over each example's candidates (needs `example_id`)."""
    # in fp32 whatever the compute dtype: the softmaxes of both terms lose too much in bf16
    logits = out["logits"].float()
    ce = answer_loss(logits, label)
    total = ce
    parts = {"loss_answer": ce.detach()}
    grouped = cfg.listwise_weight > 0
    if grouped:
        if example_id is None:
            raise ValueError("loss.listwise_weight needs the rows' example ids")
        lw = listwise_loss(answer_score(logits), example_id, label)
        total = total + cfg.listwise_weight * lw
        parts["loss_listwise"] = lw.detach()
    if cfg.contrastive_weight > 0 and model_cfg.use_cf and model_cfg.use_sem:
        cf_hist, sem_hist = out["cf_hist"].float(), out["sem_hist"].float()
        if grouped:  # an example's rows share one history: each would be its own negative
            once = first_rows(example_id)
            cf_hist, sem_hist = cf_hist[once], sem_hist[once]
        cl = info_nce(cf_hist, sem_hist, cfg.temperature, cfg.authors_layernorm)
        total = total + cfg.contrastive_weight * cl
        parts["loss_contrastive"] = cl.detach()
    parts["loss"] = total.detach()
    return total, parts


@contextmanager
def active_adapters(lm: nn.Module, names: list[str]):
    """Activate LoRA adapters by name without touching requires_grad.

    peft's `set_adapter` also freezes inactive adapters, which would change the trainable
    set under an optimizer (and DeepSpeed's gradient hooks) between sub-batches; here only
    the routing changes.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = list(names)
    try:
        yield
    finally:
        for m, p in zip(layers, previous):
            m._active_adapter = p


def apply_subspace(lm: nn.Module, cfg: ModelConfig) -> None:
    """Inject the subspace's LoRA adapters with peft (or unfreeze everything for 'full')."""
    if cfg.subspace not in SUBSPACES:
        raise ValueError(f"model.subspace={cfg.subspace!r}; expected one of {list(SUBSPACES)}")
    adapters = SUBSPACES[cfg.subspace][0]
    if not adapters:
        for p in lm.parameters():
            p.requires_grad_(True)
        return
    from peft import LoraConfig, inject_adapter_in_model

    for name in adapters:
        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                            lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets))
        inject_adapter_in_model(config, lm, adapter_name=name)
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in lm.parameters()):
        raise ValueError(f"model.lora_targets={cfg.lora_targets} matched no module of the backbone")
    route_default(lm, cfg)


def route_default(lm: nn.Module, cfg: ModelConfig) -> None:
    """The routing used when a batch is not split by task: the rec task's adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    default = SUBSPACES[cfg.subspace][1]["rec"]
    for m in lm.modules():
        if isinstance(m, BaseTunerLayer):
            m._active_adapter = list(default)
