"""Exact streaming top-k: identical to a full in-memory sort whatever the block size, ties by id."""

from __future__ import annotations

import warnings

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


@pytest.mark.parametrize("cpus", [2, 3, 8])
@pytest.mark.parametrize("query_rows", [5, 1024])
def test_threaded_query_parts_give_the_one_thread_answer(monkeypatch, cpus, query_rows):
    """Guards the threaded CPU path (column parts of the GEMM, query parts scored in threads):
    the answer must be bit-identical to one thread and to the float64 definition, at every
    corpus slicing, and numpy's BLAS must get its thread count back afterwards."""
    from threadpoolctl import threadpool_info

    import evalkit.search.exact as search
    from evalkit.search import _bounded

    rng = np.random.default_rng(7)
    queries = rng.standard_normal((23, 16)).astype(np.float32)
    vectors = rng.standard_normal((700, 16)).astype(np.float32)
    vectors[::9] = vectors[4]  # exact ties: broken by id, whichever thread holds the query
    ids = np.arange(len(vectors))
    monkeypatch.setattr(search, "QUERY_ROWS", query_rows)
    monkeypatch.setattr(search, "CORPUS_ROWS", 97)
    monkeypatch.setattr(_bounded, "MIN_PART_ROWS", 1)
    monkeypatch.setattr(_bounded, "cpus", lambda: 1)
    one = exact_search(queries, _blocks(ids, vectors, 250), 20)
    before = [(lib["internal_api"], lib["num_threads"]) for lib in threadpool_info()]
    monkeypatch.setattr(_bounded, "cpus", lambda: cpus)
    parts = _bounded.QueryParts(queries, np.ones(len(queries)), None, 97, query_rows)
    assert parts.threads == cpus and len(parts.spans) > 1
    many = exact_search(queries, _blocks(ids, vectors, 250), 20)
    assert [(lib["internal_api"], lib["num_threads"]) for lib in threadpool_info()] == before
    want_s, want_i = _float64_answer(queries, vectors, ids, 20)
    for got in (one, many):
        np.testing.assert_array_equal(got[1], want_i)
        np.testing.assert_array_equal(got[0], want_s)


def test_parallel_waits_for_every_part_and_raises_the_first_error():
    from evalkit.search import _bounded

    done = []

    def part(lo, hi):
        if lo == 0:
            raise ValueError("part 0 failed")
        done.append(lo)
        return lo

    with pytest.raises(ValueError, match="part 0 failed"):
        _bounded.parallel(part, [(0, 1), (1, 2), (2, 3)])
    assert sorted(done) == [1, 2]
    assert _bounded.parallel(lambda lo, hi: hi - lo, [(0, 3), (3, 10)]) == [3, 7]
    assert _bounded.row_parts(10, 4) == [(0, 10)]  # under MIN_PART_ROWS a part: not cut
    assert _bounded.row_parts(1000, 3) == [(0, 333), (333, 666), (666, 1000)]


def test_empty_corpus_and_no_queries():
    scores, ids = exact_search(np.ones((3, 4), np.float32), [], 5)
    assert scores.shape == (3, 0) and ids.shape == (3, 0)
    scores, ids = exact_search(np.ones((0, 4), np.float32), [(np.arange(2), np.ones((2, 4)))], 5)
    assert scores.shape[0] == 0


# ------------------------------------------------------------- float32 candidates, float64 answer


def _near_ties(n=400, dim=384, dtype=np.float32, seed=3):
    """Documents whose exact scores differ by far less than the float32 GEMM error (~1e-5):
    one base vector with a single coordinate nudged by a few ulps, so a float32 dot product
    cannot order them, plus exact duplicates and ids not in corpus order."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim).astype(dtype)
    vectors = np.repeat(base[None, :], n, axis=0)
    steps = rng.permutation(n).astype(dtype)
    m = int(np.argmax(np.abs(base)))
    vectors[:, m] = base[m] + steps * np.spacing(np.float32(base[m])) * 3  # float32 ulps
    vectors[n // 2 :: 7] = vectors[n // 2]  # exact duplicates: true ties, broken by id
    queries = (base[None, :] + rng.normal(scale=0.05, size=(6, dim))).astype(dtype)
    queries[:, m] = np.abs(queries[:, m]) * np.sign(base[m])  # nudges matter in every query
    ids = rng.permutation(10 * n)[:n]
    return queries, vectors, ids


def _float64_answer(queries, vectors, ids, k, score="cosine", out=np.float32, descending=False):
    """The definition: float64 dot products (of float64-normalised rows for cosine), rounded to
    the output dtype, ranked by (-score, id)."""
    q = queries.astype(np.float64)
    v = vectors.astype(np.float64)
    if score == "cosine":
        q = q / np.maximum(np.sqrt(np.einsum("ij,ij->i", q, q)), 1e-12)[:, None]
    full = np.array([[np.einsum("i,i->", a, b) for b in v] for a in q])
    if score == "cosine":
        full = full * (1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", v, v)), 1e-12))[None, :]
    return _reference(full.astype(out), ids, k, descending_ids=descending)


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_near_ties_below_float32_resolution_are_ranked_exactly(block, score, dtype, monkeypatch):
    """Guards against a float32 GEMM deciding the ranking: these scores differ by ~1e-8, far
    below its error, so any pair chosen or ordered by float32 alone comes out in the wrong place
    (and the answer would change with the block size)."""
    import evalkit.search.exact as search

    monkeypatch.setattr(search, "CORPUS_ROWS", 50)  # many slices: held-k cuts are exercised
    queries, vectors, ids = _near_ties(dtype=dtype)
    for k in (1, 10, 60):
        got_s, got_i = exact_search(queries, _blocks(ids, vectors, block), k, score=score)
        want_s, want_i = _float64_answer(queries, vectors, ids, k, score, out=dtype)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_s, want_s)
        assert got_s.dtype == dtype


def test_trec_eval_dialect_near_ties_break_by_id_descending():
    """Guards against the tie-break direction being lost on the candidate path."""
    queries, vectors, ids = _near_ties()
    sids = np.array([f"d{i}" for i in ids])
    got_s, got_i = exact_search(queries, _blocks(sids, vectors, 33), 25, dialect="trec_eval")
    want_s, want_i = _float64_answer(queries, vectors, sids, 25, descending=True)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)


def test_float32_gemm_error_stays_inside_the_margin():
    """Guards the proof's constant: on vectors built for cancellation (large terms of both
    signs summing to a small score), |float32 GEMM - exact| must stay below C(d) |q| |v|."""
    from evalkit.search import _bounded

    rng = np.random.default_rng(5)
    for dim in (8, 384, 1024):
        q = rng.normal(size=(64, dim)).astype(np.float32) * 1e3
        v = rng.normal(size=(512, dim)).astype(np.float32)
        v[:, 1::2] = -v[:, 0::2][:, : v[:, 1::2].shape[1]]  # pairs that cancel
        v += rng.normal(scale=1e-3, size=v.shape).astype(np.float32)
        approx = (q @ v.T).astype(np.float64)
        exact = q.astype(np.float64) @ v.astype(np.float64).T
        bound = (
            _bounded.margin_factor(dim)
            * np.linalg.norm(q.astype(np.float64), axis=1)[:, None]
            * np.linalg.norm(v.astype(np.float64), axis=1)[None, :]
        )
        assert (np.abs(approx - exact) <= bound).all()


def test_a_pair_score_does_not_depend_on_its_batch():
    """Guards block-size independence at the bit level: the same (query, document) pair scored
    among different neighbours (other chunks, other slices) must give the same float64."""
    from evalkit.search import _bounded

    rng = np.random.default_rng(7)
    q = rng.normal(size=(40, 384))
    v = rng.normal(size=(300, 384)).astype(np.float32)
    work = _bounded.Workspace(384, 40, 300)
    sl = _bounded.CorpusSlice(v, True, work)
    rows, cols = np.divmod(np.arange(40 * 300), 300)
    whole = _bounded.exact_scores(q, sl, rows, cols, work)
    pick = rng.choice(len(rows), 333, replace=False)
    part = _bounded.exact_scores(q, sl, rows[pick], cols[pick], work)
    np.testing.assert_array_equal(part, whole[pick])
    sub = _bounded.CorpusSlice(v[100:200], True, _bounded.Workspace(384, 40, 100))
    r2, c2 = np.divmod(np.arange(40 * 100), 100)
    alone = _bounded.exact_scores(q, sub, r2, c2, work)
    np.testing.assert_array_equal(alone, whole.reshape(40, 300)[:, 100:200].ravel())


def test_torch_gemm_path_gives_the_numpy_answer():
    """Guards the CUDA path's exactness rules, run here on torch's CPU device: candidates from a
    torch GEMM, rescored exactly, must equal the numpy path bit for bit."""
    torch = pytest.importorskip("torch")
    queries, vectors, ids = _near_ties()
    for k in (1, 10, 60):
        want = exact_search(queries, _blocks(ids, vectors, 64), k)
        got = exact_search(queries, _blocks(ids, vectors, 64), k, device=torch.device("cpu"))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_torch_path_restores_the_matmul_precision_setting():
    """Guards against the search leaving the caller's TF32 / bf16 matmul setting changed, and
    against it running its GEMM at reduced precision (the error bound assumes IEEE float32)."""
    torch = pytest.importorskip("torch")
    matmul = torch.backends.mkldnn.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without per-backend fp32_precision flags")
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"  # a caller's choice: bf16 GEMMs would break the bound
    try:
        queries, vectors, ids = _near_ties()
        got = exact_search(queries, _blocks(ids, vectors, 64), 10, device=torch.device("cpu"))
        want = exact_search(queries, _blocks(ids, vectors, 64), 10)
        np.testing.assert_array_equal(got[1], want[1])
        assert matmul.fp32_precision == "bf16"
    finally:
        matmul.fp32_precision = before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_vectors_are_refused(bad):
    """Guards against ranking NaN/inf scores (a garbage metric printed with exit 0)."""
    from evalkit.errors import DataError

    queries, vectors = _corpus()
    vectors[123, 4] = bad
    with pytest.raises(DataError, match="row 123 has a NaN or infinite"):
        exact_search(queries, _blocks(np.arange(300), vectors, 100), 5)
    queries[1, 0] = bad
    with pytest.raises(DataError, match="query_emb row 1"):
        exact_search(queries, [], 5)


def test_huge_dot_products_fall_back_to_exact_scoring():
    """Guards the overflow guard: vectors whose float32 products could overflow are scored
    exactly for every pair instead of trusting a float32 GEMM."""
    queries, vectors = _corpus(n=50)
    queries = queries.astype(np.float64) * 1e20
    vectors = vectors.astype(np.float64) * 1e20
    ids = np.arange(50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no float32 GEMM is run on them: no overflow warning
        got_s, got_i = exact_search(queries, _blocks(ids, vectors, 16), 7, score="dot")
    want_s, want_i = _float64_answer(queries, vectors, ids, 7, "dot", out=np.float64)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-12)


@pytest.mark.parametrize("block", [1, 7, 64, 500])
def test_only_one_corpus_block_is_alive_at_a_time(block):
    """Guards the bounded memory of the search loop: when the next corpus block is requested,
    the previous block's vectors must already be unreferenced (the loop kept them alive while
    the next block was encoded: two blocks of vectors in memory, +25 MB at 16,384 x 384); and
    the answer must equal the in-memory search over the whole corpus at every block size."""
    import weakref

    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    ids = np.array([f"d{i:03d}" for i in range(500)])
    alive: list[weakref.ref] = []
    leaked = []

    def blocks():
        for s in range(0, len(corpus), block):
            # no gc.collect(): a block must be freed by its last reference going, not by a
            # collection (a full one per block also took minutes inside a long test session)
            leaked.append(sum(r() is not None for r in alive))
            vectors = corpus[s : s + block].copy()  # a fresh array per block, as an encoder makes
            alive.append(weakref.ref(vectors))
            yield ids[s : s + block], vectors
            vectors = None

    scores, got = exact_search(queries, blocks(), 10)
    assert max(leaked) == 0, leaked
    ref_scores, ref_ids = exact_search(queries, [(ids, corpus)], 10)
    assert (got == ref_ids).all() and (scores == ref_scores).all()


@pytest.mark.parametrize("shape", [(1000, 16384), (17, 3392), (5, 65), (3, 7), (1, 1), (0, 5)])
@pytest.mark.parametrize("density", [0.0, 0.0005, 0.05, 1.0])
def test_the_candidate_mask_scan_equals_numpys_nonzero(shape, density):
    """Guards the word-at-a-time scan that finds candidate pairs: a missed or extra position
    would drop a true top-k hit or rescore a wrong pair. It must equal np.nonzero in content
    and order, for sparse and dense masks and lengths that are not a multiple of 64."""
    from evalkit.search import _bounded

    rng = np.random.default_rng(shape[0] * 7 + int(density * 1e4))
    mask = rng.random(shape) < density
    if mask.size:
        mask.flat[-1] = True  # a hit in the tail past the last whole 64-byte group
    got = _bounded._nonzero(mask)
    want = np.nonzero(mask)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    view = mask[:, : max(1, shape[1] // 2)]  # a non-contiguous view is scanned as its copy
    got, want = _bounded._nonzero(view), np.nonzero(view)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
