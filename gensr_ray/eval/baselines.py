"""Baselines as inner-product models: score(example, item) = query_vector . item_vector.

Writing every baseline this way lets one faiss index serve the full-catalogue protocol and one
gather serve the sampled one (see `harness.DenseScorer`). A `batch` is one task's examples as a
dict: user_id [n] int, query list[str | None], history list[int array], target [n] int,
negatives [n, m] int.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def tokenize(text: str) -> list[str]:
    """Lowercase, drop apostrophes (so "don't" -> "dont"), split on anything not [0-9a-z]."""
    return [t for t in _NON_ALNUM.split(text.lower().replace("'", "")) if t]


class Popularity:
    """Train-split interaction counts; the same ranking for every user and query."""

    name = "popularity"
    tasks = ("search", "rec")

    def __init__(self, train_item_counts: np.ndarray):
        # log1p keeps the order and keeps inner products small; only the order matters.
        self._items = np.log1p(np.asarray(train_item_counts, dtype=np.float32))[:, None]

    def query_vectors(self, batch: dict) -> np.ndarray:
        return np.ones((len(batch["target"]), 1), dtype=np.float32)

    def item_vectors(self) -> np.ndarray:
        return self._items


class LightGCNBaseline:
    """LightGCN user . item embeddings. It ignores the query: on search it is a query-blind
    personalised ranker, which is what it is worth comparing GenSR's search numbers against."""

    name = "lightgcn"
    tasks = ("search", "rec")

    def __init__(self, cf_tables):
        self._users = np.ascontiguousarray(cf_tables.user_emb, dtype=np.float32)
        self._items = np.ascontiguousarray(cf_tables.item_emb, dtype=np.float32)

    def query_vectors(self, batch: dict) -> np.ndarray:
        return self._users[np.asarray(batch["user_id"], dtype=np.int64)]

    def item_vectors(self) -> np.ndarray:
        return self._items


class BM25:
    """Okapi BM25 of the query against each item's text, factored into an inner product.

    BM25(q, d) = sum over query tokens t of idf(t) * tf(t,d) * (k1+1) / (tf(t,d) + k1*(1-b+b*|d|/avgdl))
    is linear in the query's term counts, so item vector = that per-term weight over the
    vocabulary and query vector = the query's term counts. idf(t) = ln(1 + (N - df + 0.5)/(df + 0.5))
    (the non-negative Lucene form). Search only: a rec example has no query.
    """

    name = "bm25"
    tasks = ("search",)

    def __init__(self, items_text: list[str], k1: float = 1.2, b: float = 0.75):
        docs = [Counter(tokenize(text or "")) for text in items_text]
        self.vocab = {t: i for i, t in enumerate(sorted(set().union(*docs)))}
        n_docs = len(docs)
        lengths = np.array([sum(d.values()) for d in docs], dtype=np.float64)
        avg_len = lengths.mean() if n_docs and lengths.mean() > 0 else 1.0
        # Dense [n_items, vocab]: a few thousand terms x a few thousand items for ml-100k. A large
        # catalogue (Amazon: 10^5 items x 10^5 terms) needs a sparse matrix and a sparse search.
        tf = np.zeros((n_docs, max(len(self.vocab), 1)), dtype=np.float64)
        for row, doc in enumerate(docs):
            for term, count in doc.items():
                tf[row, self.vocab[term]] = count
        df = (tf > 0).sum(axis=0)
        idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        norm = k1 * (1.0 - b + b * lengths / avg_len)
        self._items = (idf * tf * (k1 + 1.0) / (tf + norm[:, None])).astype(np.float32)

    def query_vectors(self, batch: dict) -> np.ndarray:
        out = np.zeros((len(batch["query"]), self._items.shape[1]), dtype=np.float32)
        for row, query in enumerate(batch["query"]):
            if query is None:
                raise ValueError("BM25 got an example without a query (a rec example?)")
            for term in tokenize(query):
                col = self.vocab.get(term)
                if col is not None:  # words no item contains add nothing to any score
                    out[row, col] += 1.0
        return out

    def item_vectors(self) -> np.ndarray:
        return self._items
