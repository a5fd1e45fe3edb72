"""Streaming retrieval metrics over ranked lists: Accuracy, Precision, Recall, MRR, nDCG, MAP @k.

Algorithm:
1) ``__init__`` turns the qrels into per-query gains (relevant = grade > 0) and ideal gains;
2) ``update`` takes each query's retrieved (ids, scores) (e.g. from ``search.TopK``), re-ranks
   them under the dialect's total order, cuts at max k and computes that query's metrics at
   every k, then forgets the list: state is O(queries x metrics);
3) ``merge`` unions per-query values of disjoint query sets; ``compute`` averages over the
   counted queries, ``compute_per_query`` returns the values per query (for ANN deltas) and
   ``per_query_arrays`` the same as one (queries x metrics) array (for paired significance tests).

Dialects:
- ``sentence-transformers`` (InformationRetrievalEvaluator v6): counts only queries with >= 1
  relevant doc; ranks by (-score, id ascending); P@k = hits/k; R@k = hits/|relevant|;
  MRR@k = 1/rank of the first hit within k; nDCG@k with binary gains (ideal = min(k, |relevant|)
  ones); MAP@k = sum of precision at each hit within k / min(k, |relevant|).
- ``trec_eval`` (pytrec_eval, as BEIR and MTEB report): counts every query in the qrels (a query
  with no relevant doc scores 0); scores cast to float32, ties by id descending (ids as strings);
  nDCG@k with graded linear gains (ideal from all judged grades); MAP@k divides by all relevant
  docs (``map_cut``); R@k by all relevant; MRR@k = ``recip_rank`` of the run cut at k;
  ``ignore_identical_ids`` drops a hit whose id equals the query id (BEIR/MTEB) before cutting.
In both, |relevant| counts relevant ids missing from the corpus. All sums are float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.metrics._rank import order_rows, take_rows

DIALECTS = ("sentence-transformers", "trec_eval")
FAMILIES = ("accuracy", "precision", "recall", "ndcg", "mrr", "map")


def _check_k_values(k_values: Iterable[int]) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in k_values}))
    except (TypeError, ValueError):
        raise EvalkitError(f"k_values must be positive integers; got {k_values!r}") from None
    if not ks or ks[0] < 1:
        raise EvalkitError(f"k_values must be positive integers; got {k_values!r}")
    return ks


class RetrievalMetrics:
    """Retrieval metrics at several cut-offs, exact and streaming over queries.

    ``qrels``: {query id: {doc id: grade}} (grade > 0 is relevant) or {query id: iterable of
    relevant doc ids}. ``compute()`` keys: ``<score_name>_<family>@<k>`` for family in accuracy,
    precision, recall, ndcg, mrr, map and each k, e.g. ``cosine_ndcg@10``, ``cosine_map@100``,
    ``cosine_recall@100``, ``cosine_mrr@10``, ``cosine_accuracy@1`` (sentence-transformers' names,
    used for both dialects). ``depth`` is how many hits per query ``update`` needs.
    """

    def __init__(
        self,
        qrels: Mapping[str, Mapping[str, int] | Iterable[str]],
        k_values: Iterable[int] = (1, 3, 5, 10, 100),
        dialect: str = "sentence-transformers",
        *,
        score_name: str = "cosine",
        ignore_identical_ids: bool = False,
    ) -> None:
        if dialect not in DIALECTS:
            raise EvalkitError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
        if not isinstance(qrels, Mapping):
            raise EvalkitError(
                f"qrels must be a dict of query id -> {{doc id: grade}}; got {type(qrels).__name__}"
            )
        self.dialect = dialect
        self.k_values = _check_k_values(k_values)
        self.score_name = score_name
        self.ignore_identical_ids = bool(ignore_identical_ids)
        self.max_k = self.k_values[-1]
        self.depth = self.max_k + (1 if self.ignore_identical_ids else 0)
        self.keys = [f"{score_name}_{fam}@{k}" for fam in FAMILIES for k in self.k_values]
        trec = dialect == "trec_eval"
        self._gains: dict = {}  # query id -> {doc id: gain > 0}
        self._ideal: dict = {}  # query id -> ideal DCG at each k (np.ndarray)
        disc = 1.0 / np.log2(np.arange(2, self.max_k + 2))
        for qid, judged in qrels.items():
            if not isinstance(judged, Mapping):
                judged = dict.fromkeys(judged, 1)
            key = str(qid) if trec else qid
            gains = {(str(d) if trec else d): float(g) for d, g in judged.items() if g > 0}
            if not gains and not trec:
                continue  # sentence-transformers skips queries without a relevant doc
            ideal = (
                np.ones(len(gains)) if not trec else np.sort(np.array(list(gains.values())))[::-1]
            )
            ideal_cum = np.cumsum(ideal[: self.max_k] * disc[: min(len(ideal), self.max_k)])
            self._gains[key] = gains
            self._ideal[key] = np.array(
                [
                    ideal_cum[min(k, len(ideal_cum)) - 1] if len(ideal_cum) else 0.0
                    for k in self.k_values
                ]
            )
        self._disc = disc
        self._values: dict = {}  # query id -> metric vector (order of self.keys); merge: union

    @property
    def n_queries(self) -> int:
        """Queries counted so far."""
        return len(self._values)

    def counts(self, query_id) -> bool:
        """Whether this dialect counts ``query_id`` (it has qrels; under ST: a relevant doc)."""
        return (str(query_id) if self.dialect == "trec_eval" else query_id) in self._gains

    def update(
        self,
        query_ids: Sequence,
        ranked_ids: np.ndarray | Sequence[Sequence],
        ranked_scores: np.ndarray | Sequence[Sequence[float]],
    ) -> None:
        """Score one batch of queries from their retrieved ids and scores (any order; re-ranked)."""
        trec = self.dialect == "trec_eval"
        if len(query_ids) != len(ranked_ids) or len(ranked_ids) != len(ranked_scores):
            raise EvalkitError(
                f"query_ids, ranked_ids and ranked_scores must have one row per query; got "
                f"{len(query_ids)}, {len(ranked_ids)}, {len(ranked_scores)}"
            )
        rows = [i for i, q in enumerate(query_ids) if self.counts(q)]
        if not rows:
            return
        if isinstance(ranked_ids, np.ndarray) and ranked_ids.ndim == 2:
            ids = ranked_ids[rows]
            scores = np.asarray(ranked_scores)[rows]
            if trec:
                ids, scores = ids.astype(str), scores.astype(np.float32)
            order = order_rows(scores, ids, "id_desc" if trec else "id_asc")
            lists = list(take_rows(ids, order))
        else:
            lists = []
            for i in rows:
                ids_i = np.asarray(ranked_ids[i])
                s_i = np.asarray(ranked_scores[i])
                if trec:
                    ids_i, s_i = ids_i.astype(str), s_i.astype(np.float32)
                if len(ids_i) != len(s_i):
                    raise EvalkitError(
                        f"query {query_ids[i]!r}: {len(ids_i)} ids but {len(s_i)} scores"
                    )
                order = order_rows(s_i[None, :], ids_i[None, :], "id_desc" if trec else "id_asc")[0]
                lists.append(ids_i[order])
        for i, ranked in zip(rows, lists, strict=True):
            qid = str(query_ids[i]) if trec else query_ids[i]
            if qid in self._values:
                raise EvalkitError(
                    f"query {qid!r} was updated twice; each query must be scored once"
                )
            if self.ignore_identical_ids:
                ranked = ranked[ranked != qid]
            self._values[qid] = self._query_values(qid, ranked[: self.max_k])

    def _query_values(self, qid, ranked: np.ndarray) -> np.ndarray:
        trec = self.dialect == "trec_eval"
        gains_of = self._gains[qid]
        gains = np.array([gains_of.get(d, 0.0) for d in ranked.tolist()], dtype=np.float64)
        hit = gains > 0
        if not trec:
            gains = hit.astype(np.float64)
        n_rel = len(gains_of)
        n = len(gains)
        cum_hits = np.cumsum(hit)
        ranks = np.arange(1, n + 1)
        prec_at_hit = np.where(hit, cum_hits / ranks, 0.0)
        cum_prec = np.cumsum(prec_at_hit)
        cum_dcg = np.cumsum(gains * self._disc[:n])
        first = int(np.argmax(hit)) if hit.any() else n
        out = np.zeros((len(FAMILIES), len(self.k_values)))
        for j, k in enumerate(self.k_values):
            c = min(k, n)
            hits = int(cum_hits[c - 1]) if c else 0
            out[0, j] = 1.0 if hits else 0.0
            out[1, j] = hits / k
            out[2, j] = hits / n_rel if n_rel else 0.0
            ideal = self._ideal[qid][j]
            out[3, j] = (cum_dcg[c - 1] if c else 0.0) / ideal if ideal > 0 else 0.0
            out[4, j] = 1.0 / (first + 1) if first < k and first < n else 0.0
            denom = n_rel if trec else min(k, n_rel)
            out[5, j] = (cum_prec[c - 1] if c else 0.0) / denom if denom else 0.0
        return out.ravel()

    def merge(self, other: RetrievalMetrics) -> None:
        if (other.dialect, other.k_values, other.score_name) != (
            self.dialect,
            self.k_values,
            self.score_name,
        ):
            raise EvalkitError(
                "can only merge RetrievalMetrics with the same dialect, k_values and score_name"
            )
        both = self._values.keys() & other._values.keys()
        if both:
            raise EvalkitError(f"cannot merge: query {next(iter(both))!r} is in both states")
        self._values.update(other._values)

    def compute(self) -> dict[str, float]:
        """Mean of each metric over the counted queries."""
        if not self._values:
            raise EvalkitError(
                "no query to average: none of the updated queries has "
                + ("qrels" if self.dialect == "trec_eval" else "a relevant document in the qrels")
            )
        mean = np.mean(np.stack(list(self._values.values())), axis=0)
        return {key: float(v) for key, v in zip(self.keys, mean, strict=True)}

    def compute_per_query(self) -> dict[str, dict[str, float]]:
        """{query id: {metric key: value}} for every counted query (pytrec_eval's shape)."""
        return {
            qid: {key: float(v) for key, v in zip(self.keys, values, strict=True)}
            for qid, values in self._values.items()
        }

    def per_query_arrays(self) -> tuple[list, list[str], np.ndarray]:
        """(query ids, metric keys, float64 values [queries, keys]) for every counted query, in the
        order the queries were scored: the values whose column means `compute()` returns."""
        ids = list(self._values)
        if not ids:
            return [], list(self.keys), np.zeros((0, len(self.keys)))
        return ids, list(self.keys), np.stack([self._values[q] for q in ids])
