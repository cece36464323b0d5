"""The input pipeline of a config and a dataset: item title tokens, the example encoder and the
collator, built from the dataset's items table."""

from __future__ import annotations

from pathlib import Path

from gensr_ray.config import GenSRConfig
from gensr_ray.data import contract
from gensr_ray.inputs.features import Collator, ExampleEncoder, ItemTokens
from gensr_ray.inputs.prompts import all_template_text
from gensr_ray.inputs.title_cache import cached_item_tokens


def vocabulary_texts(data_path: str | Path, item_noun: str = "item",
                     item_plural: str = "") -> list[str]:
    """Every text a prompt can contain: item titles and texts, queries, templates."""
    root = contract.local_root(data_path)
    items = contract.read_table(contract.items_dir(root), ["title", "text"])
    queries = contract.read_table(contract.interactions_dir(root), ["query"])
    texts = items.column("title").to_pylist() + items.column("text").to_pylist()
    texts += sorted({q for q in queries.column("query").to_pylist() if q})
    return texts + all_template_text(item_noun, item_plural)


def item_tokens(cfg: GenSRConfig, tokenizer) -> ItemTokens:
    """The catalogue's title tokens, tokenised once per node (gensr_ray.inputs.title_cache)."""
    return cached_item_tokens(cfg.data.path, tokenizer, cfg.data.prompt_title_tokens,
                              cfg.data.title_tokens, cfg.data.target_title_tokens)


def build_features(cfg: GenSRConfig, tokenizer, kind: str) -> tuple[ExampleEncoder, Collator]:
    """The example encoder and collator for a backbone of `kind` (decoder | encoder-decoder)."""
    items = item_tokens(cfg, tokenizer)
    encoder = ExampleEncoder(tokenizer, items, cfg.model.prompt, cfg.model.query_in_prompt,
                             append_eos=(kind == "encoder-decoder"), item_noun=cfg.data.item_noun,
                             item_plural=cfg.data.item_noun_plural,
                             splice_bug=cfg.model.authors_splice_bug)
    return encoder, Collator(items, tokenizer.pad_token_id)
