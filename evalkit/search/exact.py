"""Exact top-k search over a corpus that streams through in blocks.

Algorithm (``exact_search``):
1) normalise the queries once (cosine), in float64;
2) for each corpus block (ids, vectors): normalise (cosine), score = queries @ block.T computed
   in float64 and rounded to the embeddings' dtype (float32 unless float64 is given), so a score
   does not depend on which BLAS kernel a block's shape selects;
3) ``TopK.update``: once k hits are held, only scores >= a row's k-th best are gathered;
   otherwise keep the block's best k per query under the total order (-score, id), found with
   ``argpartition``, rows whose k-th score is tied re-selected by id, so the choice never depends
   on where the block boundaries fall; merge with the running k and re-sort;
4) return (scores, ids), each [n_queries, min(k, corpus size)], best first.
Queries are scored QUERY_ROWS at a time against CORPUS_ROWS-row slices of each block, so RAM is
O(n_queries x k + QUERY_ROWS x CORPUS_ROWS) whatever the corpus and block sizes.

Because every step selects by one total order, the result is identical for any block size.
Dialects: ``sentence-transformers`` ranks by (-score, id ascending) on the scores as computed;
``trec_eval`` (pytrec_eval, BEIR, MTEB) casts scores to float32 and breaks ties by id descending,
comparing ids as strings.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.metrics._rank import TIES, id_key, order_rows, take_rows

DIALECTS = ("sentence-transformers", "trec_eval")
QUERY_ROWS = 512  # queries scored together
CORPUS_ROWS = 8192  # corpus rows scored together: work arrays stay ~ 512 x 8192 float64 (32 MiB)
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

    def _fold(self, scores: np.ndarray, ids: np.ndarray) -> None:
        if self.scores is not None:
            scores = np.concatenate([self.scores, scores], axis=1)
            ids = np.concatenate([self.ids, ids], axis=1)
        order = order_rows(scores, ids, self.ties)[:, : self.k]
        self.scores = take_rows(scores, order)
        self.ids = take_rows(ids, order)


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, x.dtype.type(1e-12))


def exact_search(
    query_emb: np.ndarray,
    corpus_blocks: Iterable[tuple[Iterable, np.ndarray]],
    k: int,
    *,
    score: str = "cosine",
    dialect: str = "sentence-transformers",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k corpus ids per query, streaming the corpus as (ids, vectors) blocks.

    Returns (scores, ids) of shape [n_queries, min(k, corpus size)], best first. ``score`` is
    "cosine" (vectors normalised, clamped at 1e-12 as torch does) or "dot". Scores accumulate in
    float64 and come back in the embeddings' dtype (float32 by default). With ``dialect="trec_eval"`` scores are cast
    to float32 and ids to str, ties broken by id descending, as pytrec_eval ranks a run.
    """
    if score not in SCORES:
        raise EvalkitError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
    ties = dialect_ties(dialect)
    q_in = np.asarray(query_emb)
    if q_in.ndim != 2:
        raise EvalkitError(
            f"query_emb must be a 2-D array [n_queries, dim]; got shape {q_in.shape}"
        )
    q = q_in.astype(np.float64)
    if score == "cosine":
        q = _normalise(q)
    # bounded work arrays: query chunks x corpus slices of at most QUERY_ROWS x CORPUS_ROWS scores
    spans = [(i, min(i + QUERY_ROWS, len(q))) for i in range(0, len(q), QUERY_ROWS)]
    tops = [TopK(hi - lo, k, ties=ties) for lo, hi in spans]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="search", unit="doc")
    for ids, vectors in corpus_blocks:
        v_in = np.asarray(vectors)
        ids = np.asarray(ids)
        if v_in.ndim != 2 or v_in.shape[1] != q.shape[1] or len(ids) != len(v_in):
            raise EvalkitError(
                f"corpus block must be (ids[n], vectors[n, {q.shape[1]}]); "
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
            v = v_in[c0 : c0 + CORPUS_ROWS].astype(np.float64)
            if score == "cosine":
                v = _normalise(v)
            for (lo, hi), top in zip(spans, tops, strict=True):
                # float64 accumulation, then rounding to the embeddings' dtype: the float32 score is
                # the correctly rounded exact value, whatever BLAS kernel the shapes pick
                top.update((q[lo:hi] @ v.T).astype(out_dtype), ids[c0 : c0 + CORPUS_ROWS])
        if bar is not None:
            bar.update(len(v_in))
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
