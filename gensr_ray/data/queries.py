"""Synthetic search queries from category paths, the way product-search work builds them.

HEM (Ai et al., SIGIR'17, "Learning a Hierarchical Embedding Model for Personalized Product
Search") turns each category path of an item into a query: the words of the path
concatenated, stop words and repeated words removed; one-level paths are skipped because
they are too broad to be a query. Datasets without real queries (Amazon, MovieLens) use this
construction; such queries are synthetic and the dataset's README says so.
"""

from __future__ import annotations

import re

# A small English stop-word list (the function words that appear in category names).
STOP_WORDS = frozenset(
    "a an and are as at be by for from in into is it its of on or s t the to with & - , "
    "other others".split()
)

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric words; apostrophes are dropped so "children's" -> "childrens"."""
    return _TOKEN.findall(text.lower().replace("'", "").replace("\u2019", ""))


def query_from_path(path: list[str], min_levels: int = 2) -> str | None:
    """One query from one category path, or None for a path too short to be a query."""
    if len(path) < min_levels:
        return None
    words: list[str] = []
    for level in path:
        for word in tokenize(level):
            if word not in STOP_WORDS and word not in words:
                words.append(word)
    return " ".join(words) or None
