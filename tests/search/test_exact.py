"""Exact streaming top-k: identical to a full in-memory sort whatever the block size, ties by id."""

from __future__ import annotations

import numpy as np
import pytest

from evalkit.errors import EvalkitError
from evalkit.search.exact import TopK, exact_search


def _blocks(ids, vectors, size):
    for start in range(0, len(ids), size):
        yield ids[start : start + size], vectors[start : start + size]


def _reference(scores, ids, k, descending_ids=False):
    """Plain Python: sort every (score, id) of each query, keep k."""
    out_s, out_i = [], []
    for row in scores:
        pairs = list(zip(row.tolist(), ids.tolist(), strict=True))
        pairs.sort(key=lambda p: p[1], reverse=descending_ids)
        pairs.sort(key=lambda p: -p[0])
        out_s.append([p[0] for p in pairs[:k]])
        out_i.append([p[1] for p in pairs[:k]])
    return np.array(out_s), np.array(out_i)


def _corpus(n=300, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors[::5] = vectors[1]  # many exact duplicates: tied scores everywhere
    vectors[7] = 0.0  # a zero vector scores 0 under cosine (norm clamped)
    queries = rng.normal(size=(12, dim)).astype(np.float32)
    queries[3] = vectors[1]
    return queries, vectors


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
@pytest.mark.parametrize("ties", ["id_asc", "id_desc"])
def test_topk_matches_full_sort_for_any_block_size(block, ties):
    queries, vectors = _corpus()
    rng = np.random.default_rng(1)
    ids = rng.permutation(10_000)[: len(vectors)]  # ids not in corpus order
    scores = np.round(queries @ vectors.T, 1)  # coarse scores: ties at every cut
    top = TopK(len(queries), 25, ties=ties)
    for start in range(0, len(ids), block):
        top.update(scores[:, start : start + block], ids[start : start + block])
    got_s, got_i = top.result()
    want_s, want_i = _reference(scores, ids, 25, descending_ids=ties == "id_desc")
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
@pytest.mark.parametrize("dialect", ["sentence-transformers", "trec_eval"])
def test_exact_search_block_independent_with_string_ids(block, dialect):
    queries, vectors = _corpus()
    ids = np.array([f"doc{i}" for i in range(len(vectors))])  # "doc10" < "doc2" as strings
    got_s, got_i = exact_search(queries, _blocks(ids, vectors, block), 10, dialect=dialect)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    vn = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    full = (qn @ vn.T).astype(np.float32)
    want_s, want_i = _reference(full, ids, 10, descending_ids=dialect == "trec_eval")
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-6)
    # the same answer however the corpus is cut
    s1, i1 = exact_search(queries, _blocks(ids, vectors, 10_000), 10, dialect=dialect)
    np.testing.assert_array_equal(i1, got_i)
    np.testing.assert_array_equal(s1, got_s)


def test_dot_score_and_k_larger_than_corpus():
    queries, vectors = _corpus(n=10)
    ids = np.arange(10)
    scores, got = exact_search(queries, _blocks(ids, vectors, 3), 100, score="dot")
    assert got.shape == (len(queries), 10)
    want_s, want_i = _reference(queries @ vectors.T, ids, 100)
    np.testing.assert_array_equal(got, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-6)


def test_merge_of_split_states_equals_one_pass():
    queries, vectors = _corpus()
    ids = np.arange(len(vectors))
    scores = np.round(queries @ vectors.T, 1)
    whole = TopK(len(queries), 9)
    whole.update(scores, ids)
    left, right = TopK(len(queries), 9), TopK(len(queries), 9)
    left.update(scores[:, 150:], ids[150:])  # order of parts does not matter
    right.update(scores[:, :150], ids[:150])
    left.merge(right)
    for a, b in zip(left.result(), whole.result(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_float64_embeddings_stay_float64():
    queries, vectors = _corpus()
    scores, _ = exact_search(queries.astype(np.float64), [(np.arange(300), vectors)], 3)
    assert scores.dtype == np.float64


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(EvalkitError, match="k must be a positive integer"):
        TopK(2, 0)
    with pytest.raises(EvalkitError, match="score must be one of"):
        exact_search(np.ones((1, 2)), [], 1, score="l2")
    with pytest.raises(EvalkitError, match="dialect must be one of"):
        exact_search(np.ones((1, 2)), [], 1, dialect="beir")
    with pytest.raises(EvalkitError, match="corpus block"):
        exact_search(np.ones((1, 2)), [(np.arange(2), np.ones((2, 3)))], 1)


def test_query_chunks_and_corpus_slices_do_not_change_the_answer(monkeypatch):
    import evalkit.search.exact as search

    queries, vectors = _corpus()
    ids = np.arange(len(vectors))
    want = exact_search(queries, [(ids, vectors)], 15)
    monkeypatch.setattr(search, "QUERY_ROWS", 5)  # 12 queries -> 3 chunks
    monkeypatch.setattr(search, "CORPUS_ROWS", 3)
    got = exact_search(queries, _blocks(ids, vectors, 64), 15)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_empty_corpus_and_no_queries():
    scores, ids = exact_search(np.ones((3, 4), np.float32), [], 5)
    assert scores.shape == (3, 0) and ids.shape == (3, 0)
    scores, ids = exact_search(np.ones((0, 4), np.float32), [(np.arange(2), np.ones((2, 4)))], 5)
    assert scores.shape[0] == 0
