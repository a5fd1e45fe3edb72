"""Exact top-k search over a corpus that streams through in blocks.

Algorithm (``exact_search``): float32 GEMM for candidates, float64 for the answer.
1) normalise the queries once (cosine), in float64; keep a float32 copy for the GEMM;
2) for each corpus slice: a float32 copy of the rows normalised (cosine) with float32 norms;
   approximate scores A = queries32 @ slice32.T with one float32 GEMM (numpy, or torch on a GPU);
3) a bound M >= |A - S| for every pair, from the float32 error analysis of a dot product
   (|fl(a.b) - a.b| <= gamma_d sum|a_i b_i|, gamma_d = d u / (1 - d u), u = 2^-24, plus the
   float32 rounding of both operands and of the final score): M = C(d) |q| max|v|;
4) candidates: a pair can belong to the final top-k only if its exact score S reaches the row's
   current k-th exact score (once k are held), or the k-th largest (A - M) of the slice (before):
   keep the pairs with A >= that bound - M, then those whose A + M reaches the k-th largest of
   the held scores and the candidates' A - M; everything else is provably outside the top-k;
5) rescore the candidates exactly: S = fl(einsum(q64, v64)) / |v| in float64, one fixed-order
   dot product per (query, document) pair, rounded to the embeddings' dtype; so a score is the
   same function of the two vectors whatever the block, slice or chunk it was computed in;
6) ``TopK`` folds the candidates in under the total order (-score, id), ties broken by id;
7) return (scores, ids), each [n_queries, min(k, corpus size)], best first.
Queries are scored QUERY_ROWS at a time against CORPUS_ROWS-row slices of each block, so RAM is
O(n_queries x k + QUERY_ROWS x CORPUS_ROWS) whatever the corpus and block sizes. On the CPU with
several cores, steps 2-6 run in threads (`_bounded.QueryParts`): the GEMM with the slice's
columns cut into one part per thread, then steps 3-6 with the chunk's queries cut likewise, each
part folding into its own TopK; the answer is the same bits as with one thread.

Because candidates are a superset of the true top-k and every kept score is exact, the result
is the float64 answer and identical for any block size. Dialects: ``sentence-transformers`` ranks
by (-score, id ascending) on the scores as computed; ``trec_eval`` (pytrec_eval, BEIR, MTEB)
casts scores to float32 and breaks ties by id descending, comparing ids as strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.metrics._rank import TIES, id_key, order_rows, take_rows

DIALECTS = ("sentence-transformers", "trec_eval")
# queries scored together: 1,024 x 16,384 float32 work arrays (64 MiB, + a 16 MiB mask) cost 22% less
# CPU than 256-row chunks for 1,000 queries x 100,000 docs (fewer, larger GEMMs and candidate passes;
# measured with scripts/bench_evaluate.py's data); a smaller query set allocates only its rows
QUERY_ROWS = 1024
CORPUS_ROWS = 16384  # corpus rows scored together
SCORES = ("cosine", "dot")


def dialect_ties(dialect: str) -> str:
    if dialect not in DIALECTS:
        raise EvalkitError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
    return "id_desc" if dialect == "trec_eval" else "id_asc"


class TopK:
    """Exact running top-k per query, merged block by block. State: O(n_queries x k).

    ``update(block_scores[nq, nb], block_ids[nb])`` folds one corpus block in; ``result()``
    returns (scores, ids) sorted best first by (-score, id) with ``ties`` deciding the id order.
    """

    def __init__(self, n_queries: int, k: int, *, ties: str = "id_asc") -> None:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise EvalkitError(f"k must be a positive integer; got {k!r}")
        if ties not in TIES:
            raise EvalkitError(f"ties must be one of {', '.join(TIES)}; got {ties!r}")
        self.n_queries, self.k, self.ties = int(n_queries), int(k), ties
        self.scores: np.ndarray | None = None  # [nq, <=k] merge: union, keep best k
        self.ids: np.ndarray | None = None  # [nq, <=k] merge: as scores

    def update(self, block_scores: np.ndarray, block_ids: Iterable) -> None:
        scores = np.asarray(block_scores)
        ids = np.asarray(block_ids)
        if scores.ndim != 2 or scores.shape[0] != self.n_queries or ids.shape != (scores.shape[1],):
            raise EvalkitError(
                f"block scores must be [{self.n_queries}, n_block] with n_block ids; "
                f"got scores {scores.shape} and ids {ids.shape}"
            )
        if scores.shape[1] == 0:
            return
        if self.scores is not None and self.scores.shape[1] == self.k:
            # only scores >= each row's current k-th best can enter (ties may still win by id);
            # late in a corpus that is a handful per row, gathered without a full partition
            mask = scores >= self.scores[:, -1:]
            counts = mask.sum(axis=1)
            most = int(counts.max())
            if most == 0:
                return
            if most <= self.k:
                rows, cols = np.nonzero(mask)
                slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
                cand_scores = np.full((self.n_queries, most), -np.inf, dtype=scores.dtype)
                cand_ids = np.full((self.n_queries, most), ids[0], dtype=ids.dtype)
                cand_scores[rows, slot] = scores[rows, cols]
                cand_ids[rows, slot] = ids[cols]
                self._fold(cand_scores, cand_ids)  # -inf padding sorts below the k kept hits
                return
        cand_scores, cand_ids = self._block_top(scores, ids)
        self._fold(cand_scores, cand_ids)

    def merge(self, other: TopK) -> None:
        """Fold in another TopK over a disjoint part of the corpus (same queries, same k)."""
        if (other.n_queries, other.k, other.ties) != (self.n_queries, self.k, self.ties):
            raise EvalkitError("can only merge TopK states with the same n_queries, k and ties")
        if other.scores is not None:
            self._fold(other.scores, other.ids)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.scores is None:
            return np.zeros((self.n_queries, 0), np.float32), np.zeros(
                (self.n_queries, 0), np.int64
            )
        return self.scores, self.ids

    def _block_top(self, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The block's best k per row, exact under (-score, id); ties at the k-th score by id."""
        nb, k = scores.shape[1], self.k
        if nb <= k:
            return scores, np.broadcast_to(ids, scores.shape)
        part = np.argpartition(scores, nb - k, axis=1)[:, nb - k :]
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
        tied = np.flatnonzero((scores >= kth).sum(axis=1) > k)
        if len(tied):
            # rows with more candidates than places at the k-th score: all scores above it, then
            # the tied ones with the best ids (an integer key, so one argpartition decides)
            rank = np.empty(nb, dtype=np.int64)
            rank[np.argsort(id_key(ids, self.ties), kind="stable")] = np.arange(nb)
            s, t = scores[tied], kth[tied]
            key = np.where(s > t, -1, np.where(s == t, rank[None, :], nb))
            part[tied] = np.argpartition(key, k - 1, axis=1)[:, :k]
        return np.take_along_axis(scores, part, axis=1), ids[part]

    def add_candidates(self, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold in candidate hits given as parallel arrays (query row ascending, score, id).

        While fewer than k are held every row must have candidates (the bounded search gives
        each row at least k, or the whole slice); once k are held only the rows with candidates
        are re-sorted."""
        counts = np.bincount(rows, minlength=self.n_queries)
        sel = np.flatnonzero(counts)
        if not len(sel):
            return
        most = int(counts.max())
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = np.cumsum(counts > 0)[rows] - 1  # index of each hit's row among `sel`
        cand_scores = np.full((len(sel), most), -np.inf, dtype=scores.dtype)
        cand_ids = np.full((len(sel), most), ids[0], dtype=ids.dtype)
        cand_scores[pos, slot] = scores
        cand_ids[pos, slot] = ids
        if self.scores is None or len(sel) == self.n_queries:
            self._fold(cand_scores, cand_ids)  # -inf padding sorts below every real hit
            return
        merged_s = np.concatenate([self.scores[sel], cand_scores], axis=1)
        merged_i = np.concatenate([self.ids[sel], cand_ids], axis=1)
        order = self._order(merged_s, merged_i)
        if self.ids.dtype != merged_i.dtype:  # e.g. longer strings: widen before assigning
            self.ids = self.ids.astype(np.result_type(self.ids, merged_i))
        self.scores[sel] = take_rows(merged_s, order)
        self.ids[sel] = take_rows(merged_i, order)

    def _fold(self, scores: np.ndarray, ids: np.ndarray) -> None:
        if self.scores is not None:
            scores = np.concatenate([self.scores, scores], axis=1)
            ids = np.concatenate([self.ids, ids], axis=1)
        order = self._order(scores, ids)
        self.scores = take_rows(scores, order)
        self.ids = take_rows(ids, order)

    def _order(self, scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The first min(k, width) columns of `order_rows(scores, ids, ties)`, computed by score
        alone where no two of a row's first k+1 sorted scores are equal (the id key, costly for
        strings, then cannot change the kept order); rows with ties take the full order."""
        k = min(self.k, scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")
        head = take_rows(scores, order[:, : k + 1])
        tied = np.flatnonzero((head[:, 1:] == head[:, :-1]).any(axis=1))
        order = order[:, :k]
        if len(tied):
            order[tied] = order_rows(scores[tied], ids[tied], self.ties)[:, :k]
        return order


def exact_search(
    query_emb: np.ndarray,
    corpus_blocks: Iterable[tuple[Iterable, np.ndarray]],
    k: int,
    *,
    score: str = "cosine",
    dialect: str = "sentence-transformers",
    progress: bool = False,
    device: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k corpus ids per query, streaming the corpus as (ids, vectors) blocks.

    Returns (scores, ids) of shape [n_queries, min(k, corpus size)], best first. ``score`` is
    "cosine" (vectors normalised, clamped at 1e-12 as torch does) or "dot". Scores are exact
    float64 dot products rounded to the embeddings' dtype (float32 by default); a float32 GEMM
    only chooses which pairs to score (module docstring). ``device``: None or "cpu" runs the GEMM
    in numpy; a torch device ("cuda", torch.device(...)) runs it in torch there, same answer.
    With ``dialect="trec_eval"`` scores are cast to float32 and ids to str, ties broken by id
    descending, as pytrec_eval ranks a run. NaN or infinite vectors raise DataError.
    """
    from evalkit.search import _bounded

    if score not in SCORES:
        raise EvalkitError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
    ties = dialect_ties(dialect)
    q_in = np.asarray(query_emb)
    if q_in.ndim != 2:
        raise EvalkitError(
            f"query_emb must be a 2-D array [n_queries, dim]; got shape {q_in.shape}"
        )
    cosine = score == "cosine"
    q64, q_norms, q32 = _bounded.prepare_queries(q_in, cosine)
    parts = _bounded.QueryParts(q32, q_norms, device, CORPUS_ROWS, QUERY_ROWS)
    factor = _bounded.margin_factor(q64.shape[1])
    tops = [TopK(hi - lo, k, ties=ties) for lo, hi in parts.spans]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="search", unit="doc")
    row = 0
    for ids, vectors in corpus_blocks:
        v_in = np.asarray(vectors)
        ids = np.asarray(ids)
        if v_in.ndim != 2 or v_in.shape[1] != q64.shape[1] or len(ids) != len(v_in):
            raise EvalkitError(
                f"corpus block must be (ids[n], vectors[n, {q64.shape[1]}]); "
                f"got {len(ids)} ids and vectors {v_in.shape}"
            )
        out_dtype = (
            np.float32
            if dialect == "trec_eval"
            else np.result_type(q_in.dtype, v_in.dtype, np.float32)
        )
        if dialect == "trec_eval":
            ids = ids.astype(str)
        for c0 in range(0, len(v_in), CORPUS_ROWS):
            sl = _bounded.CorpusSlice(v_in[c0 : c0 + CORPUS_ROWS], cosine, parts.work, row + c0)
            slice_ids = ids[c0 : c0 + CORPUS_ROWS]

            def fold(i: int, gemm, scratch) -> None:  # one query part of this slice
                lo, hi = parts.spans[i]
                _fold_slice(tops[i], sl, slice_ids, (q64[lo:hi], q_norms[lo:hi], lo, hi),  # noqa: B023
                            (gemm, factor, scratch), out_dtype)  # fmt: skip  # noqa: B023

            parts.run(sl, fold)  # returns once every part is folded: the loop variables hold
        row += len(v_in)
        if bar is not None:
            bar.update(len(v_in))
        vectors = v_in = sl = fold = None  # freed before the next block is made: one block alive
    if bar is not None:
        bar.close()
    if not tops:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    results = [top.result() for top in tops]
    width = min(r[0].shape[1] for r in results)
    return (
        np.concatenate([r[0][:, :width] for r in results]),
        np.concatenate([r[1][:, :width] for r in results]),
    )


def _fold_slice(top: TopK, sl: Any, slice_ids: np.ndarray, queries, engine, out_dtype) -> None:
    """One query chunk x one corpus slice: float32 candidates within the error margin of the
    held k-th score, rescored exactly in float64, folded into `top`."""
    from evalkit.search import _bounded

    q64, q_norms, lo, hi = queries
    gemm, factor, work = engine
    margin = factor * q_norms * sl.vmax
    held = top.scores is not None and top.scores.shape[1] == top.k
    if gemm.dense(lo, hi, sl):
        rows, cols = _bounded.all_pairs(hi - lo, len(sl))  # float32 could overflow
    else:
        kth = top.scores[:, -1].astype(np.float64) if held else None
        rows, cols, approx = gemm.candidates(lo, hi, sl, margin, kth, top.k)
        if held:
            rows, cols = _bounded.prune(rows, cols, approx, margin, top.scores, top.k)
    exact = _bounded.exact_scores(q64, sl, rows, cols, work).astype(out_dtype)
    top.add_candidates(rows, exact, slice_ids[cols])
