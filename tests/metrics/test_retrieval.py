"""Retrieval metrics: equal to sentence-transformers' InformationRetrievalEvaluator and to
pytrec_eval (trec_eval dialect) on SciFact and on adversarial cases, for any corpus block size."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from evalkit.errors import EvalkitError
from evalkit.metrics import RetrievalMetrics
from evalkit.search.exact import exact_search

K_VALUES = (1, 3, 5, 10, 100)
FAMILIES = ("accuracy", "precision", "recall", "ndcg", "mrr", "map")


class StubModel:
    """Stands in for a SentenceTransformer: encode_* return fixed, precomputed vectors."""

    similarity_fn_name = "cosine"

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.model_card_data = SimpleNamespace(set_evaluation_metrics=lambda *a, **k: None)

    def encode(self, sentences, convert_to_tensor=False, **kwargs):
        import torch

        vectors = np.stack([self.table[s] for s in sentences])
        return torch.from_numpy(vectors) if convert_to_tensor else vectors

    encode_query = encode_document = encode


def st_reference(queries, corpus, qrels, table, score="cosine", chunk=1000):
    """Run sentence-transformers' own evaluator on fixed vectors; keys like cosine_ndcg@10."""
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    fn = util.cos_sim if score == "cosine" else util.dot_score
    relevant = {q: {d for d, g in docs.items() if g > 0} for q, docs in qrels.items()}
    ks = list(K_VALUES)
    evaluator = InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        corpus_chunk_size=chunk,
        mrr_at_k=ks,
        ndcg_at_k=ks,
        accuracy_at_k=ks,
        precision_recall_at_k=ks,
        map_at_k=ks,
        score_functions={score: fn},
        write_csv=False,
    )
    return evaluator(StubModel(table))


def trec_reference(scores, query_ids, doc_ids, qrels, ignore_identical_ids=False):
    """pytrec_eval on the full run (every doc scored); MRR@k = recip_rank of the run cut at k."""
    import pytrec_eval

    run = {}
    for qi, q in enumerate(query_ids):
        run[q] = {d: float(s) for d, s in zip(doc_ids, scores[qi].tolist(), strict=True)}
        if ignore_identical_ids:
            run[q].pop(q, None)
    measures = {f"{m}.{k}" for m in ("ndcg_cut", "map_cut", "recall", "P") for k in K_VALUES}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    out = {}
    for q, values in per_query.items():
        row = {}
        ranked = sorted(run[q].items(), key=lambda p: p[0], reverse=True)  # id descending
        ranked.sort(key=lambda p: -np.float32(p[1]))  # then float32 score descending (stable)
        for k in K_VALUES:
            row[f"cosine_accuracy@{k}"] = float(values[f"P_{k}"] > 0)
            row[f"cosine_precision@{k}"] = values[f"P_{k}"]
            row[f"cosine_recall@{k}"] = values[f"recall_{k}"]
            row[f"cosine_ndcg@{k}"] = values[f"ndcg_cut_{k}"]
            row[f"cosine_map@{k}"] = values[f"map_cut_{k}"]
            cut = {q: dict(ranked[:k])}
            row[f"cosine_mrr@{k}"] = rr.evaluate(cut).get(q, {"recip_rank": 0.0})["recip_rank"]
        out[q] = row
    return out


def assert_metrics_equal(got: dict, want: dict, tol=1e-6):
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), abs=tol), (key, got[key], value)


def ours(query_ids, query_emb, doc_ids, doc_emb, qrels, *, dialect, block, score="cosine", **kw):
    metric = RetrievalMetrics(qrels, K_VALUES, dialect, score_name=score, **kw)
    blocks = (
        (doc_ids[i : i + block], doc_emb[i : i + block]) for i in range(0, len(doc_ids), block)
    )
    top_scores, top_ids = exact_search(
        query_emb, blocks, metric.depth, score=score, dialect=dialect
    )
    half = len(query_ids) // 2
    # two states over disjoint query halves, merged: the same as one pass
    other = RetrievalMetrics(qrels, K_VALUES, dialect, score_name=score, **kw)
    metric.update(query_ids[:half], top_ids[:half], top_scores[:half])
    other.update(query_ids[half:], top_ids[half:], top_scores[half:])
    metric.merge(other)
    return metric


# ---------------------------------------------------------------- adversarial, hand-built


def adversarial():
    """Integer vectors + dot scores: exact arithmetic, so ties are real ties on every side."""
    rng = np.random.default_rng(7)
    doc_ids = [f"d{i}" for i in range(30)] + ["7", "10", "q3"]  # "10" < "7" < "d..." as strings
    docs = rng.integers(-2, 3, size=(len(doc_ids), 6)).astype(np.float64)
    docs[5:15] = docs[4]  # eleven identical docs: one big tie group
    docs[20] = 0.0
    queries = rng.integers(-2, 3, size=(8, 6)).astype(np.float64)
    queries[2] = 0.0  # constant scores: every doc ties at 0
    queries[4] = docs[4]
    query_ids = [f"q{i}" for i in range(8)]
    qrels = {
        "q0": {"d3": 1, "d9": 2, "missing-doc": 1},  # a relevant id not in the corpus
        "q1": {"d12": 1, "d6": 1},
        "q2": {"d1": 1, "d29": 1, "10": 1},
        "q3": {"q3": 1, "d0": 2, "7": 1},  # a doc whose id equals the query id
        "q4": {"d10": 1, "d14": 3, "d2": 0},
        "q5": {"d8": 0},  # judged, but nothing relevant: ST skips it, trec_eval scores it 0
        "q6": {"gone-1": 1, "gone-2": 1},  # only missing relevant docs
        # q7 has no qrels at all: no dialect counts it
    }
    return query_ids, queries, doc_ids, docs, qrels


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_adversarial_matches_information_retrieval_evaluator(block):
    query_ids, queries, doc_ids, docs, qrels = adversarial()
    texts = {f"Q{q}": v for q, v in zip(query_ids, queries, strict=True)}
    texts.update({f"D{d}": v for d, v in zip(doc_ids, docs, strict=True)})
    want = st_reference(
        {q: f"Q{q}" for q in query_ids}, {d: f"D{d}" for d in doc_ids}, qrels, texts, "dot", chunk=7
    )
    metric = ours(
        query_ids,
        queries,
        np.array(doc_ids),
        docs,
        qrels,
        dialect="sentence-transformers",
        block=block,
        score="dot",
    )
    assert metric.n_queries == 6  # q5 (nothing relevant) and q7 (no qrels) are not counted
    assert_metrics_equal(metric.compute(), want, tol=1e-12)


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
@pytest.mark.parametrize("ignore_identical_ids", [False, True])
def test_adversarial_matches_pytrec_eval(block, ignore_identical_ids):
    query_ids, queries, doc_ids, docs, qrels = adversarial()
    scores = queries @ docs.T
    want = trec_reference(scores, query_ids, doc_ids, qrels, ignore_identical_ids)
    metric = ours(
        query_ids,
        queries,
        np.array(doc_ids),
        docs,
        qrels,
        dialect="trec_eval",
        block=block,
        score="dot",
        ignore_identical_ids=ignore_identical_ids,
    )
    assert metric.n_queries == 7  # every query with qrels, q5 included
    per_query = metric.compute_per_query()
    want = {q: {k.replace("cosine_", "dot_"): v for k, v in row.items()} for q, row in want.items()}
    assert set(per_query) == set(want)
    for q in want:
        assert_metrics_equal(per_query[q], want[q], tol=1e-12)
    mean = {key: np.mean([row[key] for row in want.values()]) for key in next(iter(want.values()))}
    assert_metrics_equal(metric.compute(), mean, tol=1e-12)


def test_trec_ties_use_float32_and_descending_string_ids():
    # 0.5 and 0.5 + 1e-12 are one float32 value: the tie goes to the larger id string "b" > "a"
    metric = RetrievalMetrics({"q": {"a": 1}}, (1,), "trec_eval")
    metric.update(["q"], [["a", "b"]], [[0.5 + 1e-12, 0.5]])
    assert metric.compute()["cosine_precision@1"] == 0.0
    st = RetrievalMetrics({"q": {"a": 1}}, (1,), "sentence-transformers")
    st.update(["q"], [["a", "b"]], [[0.5 + 1e-12, 0.5]])
    assert st.compute()["cosine_precision@1"] == 1.0


def test_hand_computed_values():
    # ranked: r1 (relevant), x, r2 (relevant); 3 relevant docs in all (r3 never retrieved)
    metric = RetrievalMetrics({"q": {"r1": 1, "r2": 1, "r3": 1}}, (1, 3), "sentence-transformers")
    metric.update(["q"], [["r1", "x", "r2"]], [[0.9, 0.8, 0.7]])
    got = metric.compute()
    idcg3 = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert got["cosine_ndcg@3"] == pytest.approx((1 + 1 / np.log2(4)) / idcg3)
    assert got["cosine_map@3"] == pytest.approx((1 + 2 / 3) / 3)
    assert got["cosine_precision@3"] == pytest.approx(2 / 3)
    assert got["cosine_recall@1"] == pytest.approx(1 / 3)
    assert got["cosine_mrr@1"] == 1.0 and got["cosine_accuracy@3"] == 1.0


def test_bad_input_is_one_clear_error():
    with pytest.raises(EvalkitError, match="k_values must be positive integers"):
        RetrievalMetrics({}, (0, 5))
    with pytest.raises(EvalkitError, match="dialect must be one of"):
        RetrievalMetrics({}, dialect="beir")
    metric = RetrievalMetrics({"q": {"a": 1}}, (1,))
    metric.update(["q"], [["a"]], [[1.0]])
    with pytest.raises(EvalkitError, match="updated twice"):
        metric.update(["q"], [["a"]], [[1.0]])
    with pytest.raises(EvalkitError, match="no query to average"):
        RetrievalMetrics({"q": {"a": 1}}, (1,)).compute()


# ---------------------------------------------------------------- SciFact (real data)


@pytest.fixture(scope="module")
def scifact(shared_data, tiny_model):
    root = shared_data / "beir-scifact"
    with open(root / "qrels" / "test.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    qrels: dict[str, dict[str, int]] = {}
    for q, d, g in rows:
        qrels.setdefault(q, {})[d] = int(g)
    queries = {}
    with open(root / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    relevant = {d for docs in qrels.values() for d in docs}
    corpus = {}
    with open(root / "corpus.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            if i < 1200 or row["_id"] in relevant:  # a subset, for speed; every relevant doc kept
                corpus[row["_id"]] = (row["title"] + " " + row["text"]).strip()
    texts = sorted(set(queries.values()) | set(corpus.values()))
    vectors = tiny_model.encode(texts, batch_size=128, convert_to_numpy=True)
    # float64 copies of the float32 vectors: torch and numpy then agree on every near tie
    table = dict(zip(texts, vectors.astype(np.float64), strict=True))
    return queries, corpus, qrels, table


def test_scifact_matches_information_retrieval_evaluator(scifact):
    queries, corpus, qrels, table = scifact
    want = st_reference(queries, corpus, qrels, table, chunk=500)
    query_ids = list(queries)
    q_emb = np.stack([table[queries[q]] for q in query_ids])
    doc_ids = np.array(list(corpus))
    d_emb = np.stack([table[corpus[d]] for d in doc_ids])
    metric = ours(
        query_ids, q_emb, doc_ids, d_emb, qrels, dialect="sentence-transformers", block=333
    )
    assert metric.n_queries == 300
    assert_metrics_equal(metric.compute(), want, tol=1e-6)


def test_scifact_matches_pytrec_eval(scifact):
    queries, corpus, qrels, table = scifact
    query_ids = list(queries)
    q_emb = np.stack([table[queries[q]] for q in query_ids])
    doc_ids = list(corpus)
    d_emb = np.stack([table[corpus[d]] for d in doc_ids])
    qn = q_emb / np.linalg.norm(q_emb, axis=1, keepdims=True)
    dn = d_emb / np.linalg.norm(d_emb, axis=1, keepdims=True)
    tested = [q for q in query_ids if q in qrels]
    want = trec_reference(qn[[query_ids.index(q) for q in tested]] @ dn.T, tested, doc_ids, qrels)
    metric = ours(query_ids, q_emb, np.array(doc_ids), d_emb, qrels, dialect="trec_eval", block=500)
    per_query = metric.compute_per_query()
    assert set(per_query) == set(want) and len(want) == 300
    mean = {key: np.mean([row[key] for row in want.values()]) for key in next(iter(want.values()))}
    assert_metrics_equal(metric.compute(), mean, tol=1e-6)
    worst = max(abs(per_query[q][k] - want[q][k]) for q in want for k in want[q])
    assert worst < 1e-9


def test_per_query_arrays_are_the_values_behind_compute():
    """The per-query matrix a significance test uses must average to exactly what compute() says."""
    from evalkit.metrics.retrieval import RetrievalMetrics

    rng = np.random.default_rng(0)
    qrels = {f"q{i}": {f"d{j}": int(rng.integers(0, 3)) for j in range(8)} for i in range(12)}
    for dialect in ("sentence-transformers", "trec_eval"):
        metric = RetrievalMetrics(qrels, k_values=[1, 5], dialect=dialect)
        ids = list(qrels)
        ranked = [[f"d{j}" for j in rng.permutation(8)] for _ in ids]
        scores = [np.sort(rng.uniform(size=8))[::-1] for _ in ids]
        metric.update(ids, ranked, scores)
        qids, keys, values = metric.per_query_arrays()
        assert keys == metric.keys and values.shape == (metric.n_queries, len(keys))
        per_query = metric.compute_per_query()
        assert qids == list(per_query)
        for i, q in enumerate(qids):
            assert dict(zip(keys, values[i], strict=True)) == per_query[q]
        np.testing.assert_array_equal(values.mean(axis=0), list(metric.compute().values()))
