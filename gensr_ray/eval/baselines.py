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
    """Okapi BM25 of the query against each item's text, held as an inverted index.

    BM25(q, d) = sum over query tokens t of idf(t) * tf(t,d) * (k1+1) / (tf(t,d) + k1*(1-b+b*|d|/avgdl)),
    idf(t) = ln(1 + (N - df + 0.5)/(df + 0.5)) (the non-negative Lucene form). Only the
    (item, term) pairs that occur are stored (a posting list per term, items ascending), so
    memory grows with the catalogue's text, not items x vocabulary; a query touches only its
    terms' postings. Search only: a rec example has no query. A harness scorer itself (score,
    retrieve), not an inner-product model.

    Retrieval meets many equal scores (items of the same length matching the same single
    term, and every item no query term reaches). They are ordered by a fixed, seeded
    permutation of the items: ordering them by id would favour whatever the ids correlate
    with (on MovieLens, low ids are the popular films).
    """

    name = "bm25"
    tasks = ("search",)

    def __init__(self, items_text: list[str], k1: float = 1.2, b: float = 0.75):
        self.n_items = len(items_text)
        self.vocab: dict[str, int] = {}
        items, terms, counts, lengths = [], [], [], np.zeros(self.n_items, dtype=np.float64)
        for row, text in enumerate(items_text):
            doc = Counter(tokenize(text or ""))
            lengths[row] = sum(doc.values())
            for term, count in doc.items():
                items.append(row)
                terms.append(self.vocab.setdefault(term, len(self.vocab)))
                counts.append(count)
        items, terms = np.asarray(items, dtype=np.int64), np.asarray(terms, dtype=np.int64)
        tf = np.asarray(counts, dtype=np.float64)
        avg_len = lengths.mean() if self.n_items and lengths.mean() > 0 else 1.0
        df = np.bincount(terms, minlength=len(self.vocab))
        idf = np.log1p((self.n_items - df + 0.5) / (df + 0.5))
        norm = k1 * (1.0 - b + b * lengths / avg_len)
        weights = (idf[terms] * tf * (k1 + 1.0) / (tf + norm[items])).astype(np.float32)
        order = np.lexsort((items, terms))  # by term, then item: one sorted posting list each
        self._items, self._weights = items[order], weights[order]
        self._start = np.searchsorted(terms[order], np.arange(len(self.vocab) + 1))
        self.tie_rank = np.random.default_rng(0).permutation(self.n_items)  # item -> its rank
        self._tie_order = np.argsort(self.tie_rank)  # items in tie-break order

    def _query_terms(self, query: str | None) -> list[tuple[int, float]]:
        if query is None:
            raise ValueError("BM25 got an example without a query (a rec example?)")
        counts = Counter(self.vocab[t] for t in tokenize(query) if t in self.vocab)
        return [(term, float(count)) for term, count in counts.items()]

    def _postings(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._start[term], self._start[term + 1]
        return self._items[lo:hi], self._weights[lo:hi]

    def score(self, batch: dict, candidates: np.ndarray) -> np.ndarray:
        candidates = np.asarray(candidates, dtype=np.int64)
        scores = np.zeros(candidates.shape, dtype=np.float32)
        for row, query in enumerate(batch["query"]):
            for term, count in self._query_terms(query):
                items, weights = self._postings(term)
                at = np.minimum(np.searchsorted(items, candidates[row]), len(items) - 1)
                hit = items[at] == candidates[row]
                scores[row] += np.where(hit, count * weights[at], 0.0).astype(np.float32)
        return scores

    def retrieve(self, batch: dict, k: int, exclude_per_example: list[np.ndarray]) -> np.ndarray:
        """Top-k item ids per example, best first; equal scores (zero-score items included)
        in `tie_rank` order; -1 where fewer than k items are left after the exclusions."""
        out = np.full((len(batch["query"]), k), -1, dtype=np.int64)
        for row, query in enumerate(batch["query"]):
            terms = self._query_terms(query)
            parts = [self._postings(t) for t, _ in terms]
            counts = [c for _, c in terms]
            if parts:
                hits = np.concatenate([items for items, _ in parts])
                gains = np.concatenate([c * w for (_, w), c in zip(parts, counts)])
                items, where = np.unique(hits, return_inverse=True)
                scores = np.bincount(where, weights=gains).astype(np.float32)
            else:
                items, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
            excluded = np.asarray(exclude_per_example[row], dtype=np.int64)
            keep = ~np.isin(items, excluded)
            items, scores = items[keep], scores[keep]
            best = items[np.lexsort((self.tie_rank[items], -scores))][:k]
            if best.size < k:  # then the items no query term reaches, in tie-break order
                rest = self._tie_order[:k + best.size + excluded.size]
                rest = rest[~np.isin(rest, np.concatenate([best, excluded]))]
                best = np.concatenate([best, rest[:k - best.size]])
            out[row, :best.size] = best
        return out
