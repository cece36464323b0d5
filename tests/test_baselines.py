import json
import logging
import math
import re
from collections import Counter

import numpy as np
import pytest
from helpers import write_dataset

from gensr_ray.cf.lightgcn import CFTables, LightGCNConfig
from gensr_ray.data import contract
from gensr_ray.eval.baselines import BM25, LightGCNBaseline, Popularity, tokenize
from gensr_ray.eval.harness import (
    DenseScorer,
    build_baselines,
    evaluate,
    exclusions,
    format_table,
    load_eval_examples,
    write_results,
)

CORPUS = [
    "The Matrix: a sci-fi action film about a simulated world",
    "Sleepless in Seattle, a romantic comedy",
    "Alien - sci-fi horror in space; the crew's ship",
    "A comedy about a comedy club's comedy night",
    "",
]


def textbook_bm25(query: str, docs: list[str], k1: float = 1.2, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 summed over query tokens, with the Lucene idf ln(1 + (N - df + 0.5)/(df + 0.5))."""
    def tok(text):
        return re.findall(r"[a-z0-9]+", text.lower().replace("'", ""))

    tokens = [tok(d) for d in docs]
    avgdl = sum(len(t) for t in tokens) / len(tokens)
    n = len(docs)
    scores = np.zeros(n)
    for term in tok(query):
        df = sum(term in t for t in tokens)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for d, t in enumerate(tokens):
            tf = Counter(t)[term]
            scores[d] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avgdl))
    return scores


def test_tokenize():
    assert tokenize("The crew's Sci-Fi ship, 1979!") == ["the", "crews", "sci", "fi", "ship", "1979"]


@pytest.mark.parametrize("query", ["sci-fi", "comedy", "a comedy in space", "matrix matrix", "zzz"])
def test_bm25_inverted_index_equals_textbook_bm25(query):
    model = BM25(CORPUS)
    expected = textbook_bm25(query, CORPUS)
    every_item = np.arange(len(CORPUS))[None, :]
    got = model.score({"query": [query]}, every_item)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert model.tasks == ("search",)

    # retrieval: the textbook ranking (equal scores in the model's tie-break order), the
    # excluded item skipped, the items no query term reaches after the matching ones
    excluded = np.array([int(np.argmax(expected))])
    top = model.retrieve({"query": [query]}, len(CORPUS), [excluded])[0]
    ranked = [i for i in np.lexsort((model.tie_rank, -expected.round(5))) if i not in excluded]
    assert top[:len(ranked)].tolist() == ranked and top[len(ranked):].tolist() == [-1]


def test_bm25_memory_follows_the_text_not_items_times_vocabulary():
    # 20,000 items with 3 distinct words each out of a 60,000-word vocabulary: a dense
    # items x vocabulary table would be 1.2e9 cells; the index holds the 60,000 pairs
    texts = [f"w{3 * i} w{3 * i + 1} w{3 * i + 2}" for i in range(20_000)]
    model = BM25(texts)
    assert len(model.vocab) == 60_000
    assert model._items.size == model._weights.size == 60_000
    top = model.retrieve({"query": ["w30001 w7"]}, 3, [np.zeros(0, dtype=np.int64)])[0]
    # the two matches (equal scores), then the first unmatched item in tie-break order
    assert set(top[:2].tolist()) == {2, 10000}
    assert top[2] == next(i for i in np.argsort(model.tie_rank) if i not in (2, 10000))


def test_popularity_and_lightgcn_vectors():
    pop = Popularity(np.array([3, 0, 10]))
    batch = {"user_id": np.array([1, 0]), "query": [None, None], "target": np.array([0, 2])}
    scores = pop.query_vectors(batch) @ pop.item_vectors().T
    assert (np.argsort(-scores, axis=1) == [2, 0, 1]).all()

    rng = np.random.default_rng(0)
    cf = CFTables(rng.normal(size=(2, 4)).astype(np.float32),
                  rng.normal(size=(3, 4)).astype(np.float32), LightGCNConfig(dim=4))
    scorer = DenseScorer(LightGCNBaseline(cf))
    candidates = np.array([[0, 1, 2], [2, 2, 0]])
    expected = np.stack([cf.item_emb[c] @ cf.user_emb[u] for u, c in zip([1, 0], candidates)])
    np.testing.assert_allclose(scorer.score(batch, candidates), expected, rtol=1e-5)


def popular_target_dataset(root):
    """Item 0 is the train split's most popular item and the target of every test example.

    Fillers (users 0-5) make item 0 popular; users 6-9 are evaluated: 6 and 7 on rec, 8 and 9 on
    search with a query that only item 0's text matches.
    """
    items = ["popular thing"] + [f"other{i} stuff" for i in range(1, 12)]
    rows = []
    for u in range(6):
        rows += [(u, 0, "rec", None, 0, "train"), (u, 1 if u < 3 else 2, "rec", None, 1, "train")]
    for u in range(6, 10):
        task, query = ("rec", None) if u < 8 else ("search", "popular thing")
        for ts, i in enumerate([3, 4, 5, u]):
            rows.append((u, i, task, None if task == "rec" else f"other{i}", ts, "train"))
        rows.append((u, 10 if task == "rec" else 11, task, None if task == "rec" else "other11",
                     4, "valid"))
        rows.append((u, 0, task, query, 5, "test"))
    return write_dataset(root, items, 10, rows,
                         num_negatives={"train": 1, "valid": 4, "test": 4})


def test_eval_examples_and_exclusions(tmp_path):
    root = popular_target_dataset(tmp_path)
    batches = load_eval_examples(root, "test")
    assert set(batches) == {"rec", "search"}
    assert batches["rec"]["user_id"].tolist() == [6, 7]
    assert batches["search"]["query"] == ["popular thing", "popular thing"]
    assert batches["rec"]["negatives"].shape == (2, 4)
    assert exclusions(root, "valid")[6].tolist() == [3, 4, 5, 6]
    assert exclusions(root, "test")[6].tolist() == [3, 4, 5, 6, 10]
    with pytest.raises(ValueError, match="valid"):
        exclusions(root, "train")


def test_evaluate_baselines_structure_and_popularity_is_perfect(tmp_path, caplog):
    from gensr_ray.eval.sasrec import SASRecConfig, pretrain_sasrec

    root = popular_target_dataset(tmp_path)
    pretrain_sasrec(root, SASRecConfig(dim=8, epochs=2))
    with caplog.at_level(logging.INFO):
        scorers = build_baselines(root)
    assert "training them now" in caplog.text
    assert contract.cf_path(root).is_file()
    assert set(scorers) == {"popularity", "lightgcn", "sasrec", "bm25"}

    results = evaluate(root, "test", scorers, ks=(1, 5, 10, 20))
    assert results["split"] == "test"
    assert results["num_examples"] == {"search": 2, "rec": 2}
    assert set(results["models"]) == {"popularity", "lightgcn", "sasrec", "bm25"}
    assert set(results["models"]["bm25"]) == {"search"}
    assert set(results["models"]["lightgcn"]) == {"search", "rec"}
    assert set(results["models"]["sasrec"]) == {"search", "rec"}
    for per_task in results["models"].values():
        for protocols in per_task.values():
            assert set(protocols) == {"sampled", "full"}
            assert set(protocols["sampled"]) == {f"{m}@{k}" for m in ("HR", "NDCG") for k in (1, 5, 10, 20)}
            assert set(protocols["full"]) == {f"{m}@{k}" for m in ("Recall", "NDCG") for k in (1, 5, 10, 20)}
            values = list(protocols["sampled"].values()) + list(protocols["full"].values())
            assert all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 1 for v in values)
    for task in ("search", "rec"):
        assert results["models"]["popularity"][task]["sampled"]["HR@1"] == 1.0
        assert results["models"]["popularity"][task]["full"]["Recall@1"] == 1.0
    assert results["models"]["bm25"]["search"]["sampled"]["HR@1"] == 1.0

    table = format_table(results)
    assert "split test" in table and "search 2" in table
    assert "search/sampled/HR@10" in table and "rec/full/Recall@20" in table
    bm25_row = next(line for line in table.splitlines() if line.startswith("bm25"))
    assert "-" in bm25_row.split()

    path = tmp_path / "out" / "results.json"
    write_results(results, path)
    assert json.loads(path.read_text()) == results

    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_baselines(root)  # second time the saved tables are reused
    assert "training them now" not in caplog.text


def test_full_protocol_never_excludes_the_example_s_own_target(tmp_path):
    # User 3 met item 0 in train and meets it again in test: excluding it would make the example
    # unanswerable, so only the user's other earlier items are excluded.
    rows = [(u, 0, "rec", None, 0, "train") for u in range(3)]
    rows += [(u, 1, "rec", None, 1, "train") for u in range(3)]
    rows += [(3, 0, "rec", None, 0, "train"), (3, 2, "rec", None, 1, "valid"),
             (3, 0, "rec", None, 2, "test")]
    root = write_dataset(tmp_path, [f"item{i}" for i in range(8)], 4, rows,
                         num_negatives={"train": 1, "valid": 3, "test": 3})
    pop = DenseScorer(Popularity(np.bincount([0, 0, 0, 0, 1, 1, 1], minlength=8)))
    results = evaluate(root, "test", {"popularity": pop}, ks=(1,))
    assert results["models"]["popularity"]["rec"]["full"]["Recall@1"] == 1.0


def test_an_unknown_or_search_only_first_stage_is_a_config_error():
    from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides

    for overrides, message in (({"eval.first_stage": "nope"}, "eval.first_stage='nope'"),
                               ({"eval.first_stage": "bm25"},
                                "eval.first_stage='bm25' .* lightgcn, sasrec, popularity$"),
                               ({"eval.first_stage_search": "nope"},
                                "eval.first_stage_search='nope'")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(GenSRConfig(), overrides)
    cfg = apply_overrides(GenSRConfig(), {"eval.first_stage_search": "bm25"})
    assert cfg.eval.first_stage_search == "bm25"


def test_a_sasrec_first_stage_without_a_trained_model_names_the_command(tmp_path):
    from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides
    from gensr_ray.eval.gensr_scorer import first_stages

    baselines = build_baselines(popular_target_dataset(tmp_path))
    assert "sasrec" not in baselines
    cfg = apply_overrides(GenSRConfig(), {"eval.first_stage": "sasrec"})
    with pytest.raises(ConfigError, match=r"eval.first_stage='sasrec': this dataset has no "
                                          r"SASRec model; `gensr pretrain-sasrec"):
        first_stages(cfg, baselines)
