"""ANN-vs-exact sanity checks: how much an index loses against exact search, on your queries.

`check_index` (embeddings in, results out):
1) queries: given, or --queries rows sampled from the corpus and held out (removed from both the
   index and the ground truth, so a query never finds itself);
2) exact ground truth out of core: `evalkit.search.exact.exact_search` over the corpus blocks, ties
   by corpus position, keeping a few extra ranks so tied neighbours count as found;
3) build the index over the same blocks (or load a built one and check it matches);
4) sweep the search parameter (nprobe for IVF, efSearch for HNSW), cheapest first: for each
   setting, k-recall@k and 1-recall@k against the ground truth, QPS (all queries in one batch)
   and per-query latency p50/p99; stop once recall reaches 1;
5) the chosen setting is the cheapest reaching `min_recall`; with qrels, nDCG@10, MRR@10 and
   Recall@100 under exact and ANN search, their change (ANN minus exact) and the queries hurt most;
6) evalkit.jobs.ann_check writes ann.json, summary.md and the recall-QPS curve (recall_qps.png).

`evalkit.jobs.ann_check.ann_check` wraps it for files (a BEIR corpus encoded through the store, or a
precompute output directory). `ann_search` is the drop-in for exact_search that
`evaluate_retrieval(index=...)` can call.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._imports import require
from evalkit.errors import DataError, EvalkitError
from evalkit.search.build import build_index
from evalkit.search.index import (
    EmbeddingIndex,
    check_k,
    load_index,
    parameter_grid,
    set_search_params,
)
from evalkit.search.tune import recall_at_k

log = logging.getLogger(__name__)

TIE_MARGIN = 16  # extra exact ranks kept so neighbours tied with the k-th count as found
DEFAULT_TARGET = 0.95  # chosen setting when no --min-recall is given
QRELS_K = 100
_SCORES = {"cosine": "cosine", "dot": "dot", "l2": "euclidean"}

Blocks = Callable[[], Iterator[tuple[Any, np.ndarray]]]


def check_min_recall(min_recall: float | None) -> float | None:
    """A recall target must lie in (0, 1]."""
    if min_recall is None:
        return None
    try:
        value = float(min_recall)
    except (TypeError, ValueError):
        raise EvalkitError(f"min_recall must be a number in (0, 1]; got {min_recall!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise EvalkitError(
            f"min_recall must be in (0, 1] (a fraction of the exact top-k, e.g. 0.9); got {min_recall!r}"
        )
    return value


# ----------------------------------------------------------------------------- ground truth


def exact_ground_truth(
    queries: np.ndarray, blocks: Iterable[tuple[Any, np.ndarray]], k: int, *, metric: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, ids) over streamed (ids, vectors) blocks, ties by ascending id."""
    from evalkit.search.exact import exact_search

    return exact_search(np.asarray(queries, dtype=np.float32), blocks, k, score=_SCORES[metric])


# ----------------------------------------------------------------------------- timing


def time_search(
    index: EmbeddingIndex,
    queries: np.ndarray,
    k: int,
    params: dict[str, int] | None,
    *,
    min_seconds: float = 0.5,
    max_repeats: int = 5,
    latency_queries: int = 200,
) -> dict[str, Any]:
    """Batch QPS (all queries in one call on all threads; best of repeats until min_seconds) and
    single-query latency percentiles (one thread, first `latency_queries` queries)."""
    index.set_params(params)
    index.search(queries[: min(len(queries), 16)], k)  # warm-up: page in a memory-mapped index
    best, spent, repeats, result = math.inf, 0.0, 0, None
    while repeats < max_repeats and (repeats == 0 or spent < min_seconds):
        t = time.perf_counter()
        result = index.search(queries, k)
        elapsed = time.perf_counter() - t
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    lat = []
    faiss = require("faiss", extra="faiss", package="faiss-cpu")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query, one thread: as a serving process would run it
    try:
        for i in range(min(latency_queries, len(queries))):
            t = time.perf_counter()
            index.search(queries[i : i + 1], k)
            lat.append(time.perf_counter() - t)
    finally:
        faiss.omp_set_num_threads(threads)
    lat_ms = np.array(lat) * 1e3
    return {
        "scores": result[0],
        "positions": result[1],
        "qps": len(queries) / best if best > 0 else math.inf,
        "batch_seconds": best,
        "latency_ms_p50": float(np.percentile(lat_ms, 50)) if len(lat_ms) else None,
        "latency_ms_p99": float(np.percentile(lat_ms, 99)) if len(lat_ms) else None,
    }


# ----------------------------------------------------------------------------- the check


def _held_out(blocks: Blocks, holdout: np.ndarray | None) -> tuple[Blocks, Blocks]:
    """Two views of the corpus without the held-out rows: (data ids, vectors) for the index and
    (position, vectors) for the ground truth, positions counting the kept rows in order."""
    drop = np.sort(holdout) if holdout is not None and len(holdout) else None

    def kept() -> Iterator[tuple[Any, np.ndarray, int]]:
        row = 0
        for ids, vectors in blocks():
            v = np.asarray(vectors)
            if drop is not None:
                keep = ~np.isin(np.arange(row, row + len(v)), drop)
                row += len(v)
                if not keep.all():
                    v = v[keep]
                    ids = np.asarray(ids, dtype=object if not _is_int(ids) else np.int64)[keep]
            else:
                row += len(v)
            yield ids, v

    def with_positions() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pos = 0
        for _, v in kept():
            yield np.arange(pos, pos + len(v), dtype=np.int64), v
            pos += len(v)

    return (lambda: iter(kept())), with_positions


def _is_int(ids: Any) -> bool:
    arr = np.asarray(ids[:1]) if len(ids) else np.asarray([0])
    return np.issubdtype(arr.dtype, np.integer)


def check_index(
    blocks: Blocks,
    queries: np.ndarray,
    *,
    query_ids: Sequence[Any] | None = None,
    qrels: dict[str, dict[str, int]] | None = None,
    holdout: np.ndarray | None = None,
    index: str | os.PathLike | EmbeddingIndex | None = None,
    k: int = 10,
    min_recall: float | None = None,
    metric: str = "cosine",
    memory_budget: str | int = "4G",
    model_fingerprint: str | None = None,
    force: bool = False,
    grid: list[dict[str, int]] | None = None,
    latency_queries: int = 200,
    progress: bool = False,
) -> dict[str, Any]:
    """Compare an ANN index with exact search on `queries` over the corpus `blocks`.

    `blocks()` yields (data ids, vectors); `holdout`: corpus row numbers the queries were drawn
    from (excluded from the index and the ground truth). `index`: a FAISS factory string, None
    for the auto choice, a built index directory, or an EmbeddingIndex. Returns the ann.json dict.
    """
    target = check_min_recall(min_recall)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or not len(q):
        raise DataError(f"queries must be a non-empty 2-D array [n, dim]; got shape {q.shape}")
    if qrels is not None and query_ids is None:
        raise EvalkitError("qrels need query ids; pass query_ids")
    index_blocks, gt_blocks = _held_out(blocks, holdout)

    t = time.perf_counter()
    idx = _open_index(
        index, index_blocks, holdout, metric, memory_budget, model_fingerprint, force, progress
    )
    build_s = time.perf_counter() - t
    metric = _check_against(idx, q, metric)
    check_k(k, idx.rows)
    k_eval = min(QRELS_K, idx.rows) if qrels is not None else k
    k_gt = min(idx.rows, max(k, k_eval) + TIE_MARGIN)

    t = time.perf_counter()
    gt_scores, gt_pos = _ground_truth(idx, q, gt_blocks, k_gt, metric)
    exact_s = time.perf_counter() - t

    sweep = _sweep(idx, q, k, grid, gt_scores, gt_pos, target, latency_queries)
    chosen, reached = _choose(sweep, k, target)
    set_search_params(idx.index, chosen["params"])

    result = _result(idx, q, chosen, reached, sweep, k, target, metric, holdout, model_fingerprint)
    result["timings"] = {
        "build_s": build_s,
        "exact_s": exact_s,
        "exact_qps": len(q) / exact_s if exact_s else None,
    }
    result["index_meta"] = {key: v for key, v in idx.meta.items() if key not in ("spec",)}
    if qrels is not None:
        result.update(_metric_deltas(idx, q, list(query_ids), qrels, gt_scores, gt_pos, k_eval))
    return result


def _open_index(
    index, index_blocks, holdout, metric, memory_budget, model_fingerprint, force, progress
) -> EmbeddingIndex:
    """Step 3: the given EmbeddingIndex, a built index directory loaded, or a new index built over
    the (held-out) corpus blocks from a factory string or the auto choice."""
    if isinstance(index, EmbeddingIndex):
        return index
    if index is not None and Path(str(index)).is_dir():
        idx = load_index(index, model_fingerprint=model_fingerprint, force=force)
        if holdout is not None:
            raise EvalkitError(
                "a built index contains every corpus row; give queries, not sampled ones"
            )
        return idx
    return build_index(
        index_blocks,
        spec=None if index is None else str(index),
        metric=metric,
        memory_budget=memory_budget,
        model_fingerprint=model_fingerprint,
        progress=progress,
    )


def _check_against(idx: EmbeddingIndex, q: np.ndarray, metric: str) -> str:
    """The queries' dimension must be the index's; returns the metric to compare under (the
    index's own when it differs from the one asked for)."""
    if idx.dim != q.shape[1]:
        raise DataError(
            f"query embeddings have dimension {q.shape[1]} but the index ({idx.spec}) has "
            f"dimension {idx.dim}; encode queries with the model the index was built from"
        )
    if idx.metric != metric:
        log.warning("index metric is %s; comparing against exact %s search", idx.metric, idx.metric)
    return idx.metric


def _ground_truth(
    idx: EmbeddingIndex, q: np.ndarray, gt_blocks: Blocks, k_gt: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: exact top-k_gt (scores, corpus positions); the corpus must not outgrow the index."""
    gt_scores, gt_pos = exact_ground_truth(q, gt_blocks(), k_gt, metric=metric)
    gt_rows = int(np.max(gt_pos)) + 1 if gt_pos.size else 0
    if gt_rows > idx.rows:
        raise DataError(
            f"the corpus has more rows ({gt_rows:,}+) than the index ({idx.rows:,}); rebuild it"
        )
    return gt_scores, gt_pos


def _sweep(
    idx: EmbeddingIndex,
    q: np.ndarray,
    k: int,
    grid: list[dict[str, int]] | None,
    gt_scores: np.ndarray,
    gt_pos: np.ndarray,
    target: float | None,
    latency_queries: int,
) -> list[dict[str, Any]]:
    """Step 4: time and score each setting of the grid, cheapest first; stop at recall 1 or two
    settings past the first one reaching the target (they show the curve's shape)."""
    sweep, reached, after = [], False, 0
    for params in grid or parameter_grid(idx.index, k):
        timing = time_search(idx, q, k, params, latency_queries=latency_queries)
        kr, one = recall_at_k(timing["positions"], gt_pos, gt_scores, k)
        row = {
            "params": dict(params),
            f"recall@{k}": float(kr.mean()),
            f"1-recall@{k}": float(one.mean()),
            **{
                key: timing[key]
                for key in ("qps", "batch_seconds", "latency_ms_p50", "latency_ms_p99")
            },
        }
        sweep.append(row)
        log.info(
            "%s %s: recall@%d=%.4f qps=%.0f",
            idx.spec,
            params or "",
            k,
            row[f"recall@{k}"],
            row["qps"],
        )
        if reached:
            after += 1
        elif row[f"recall@{k}"] >= (target or DEFAULT_TARGET):
            reached = True
        if row[f"recall@{k}"] >= 1.0 - 1e-9 or after >= 2:
            break
    return sweep


def _choose(
    sweep: list[dict[str, Any]], k: int, target: float | None
) -> tuple[dict[str, Any], bool]:
    """Step 5: the first (cheapest) setting reaching the target, else the most accurate one."""
    for row in sweep:
        if row[f"recall@{k}"] >= (target or DEFAULT_TARGET):
            return row, True
    return max(sweep, key=lambda r: (r[f"recall@{k}"], r["qps"])), False


def _result(idx, q, chosen, reached, sweep, k, target, metric, holdout, model_fingerprint):
    """The ann.json dict for the chosen setting (timings and deltas are added by the caller)."""
    return {
        "index": idx.spec,
        "index_auto": bool(idx.meta.get("auto")),
        "index_reason": idx.meta.get("choice_reason"),
        "params": chosen["params"],
        "k": k,
        f"recall@{k}": chosen[f"recall@{k}"],
        f"1-recall@{k}": chosen[f"1-recall@{k}"],
        "qps": chosen["qps"],
        "latency_ms_p50": chosen["latency_ms_p50"],
        "latency_ms_p99": chosen["latency_ms_p99"],
        "min_recall": target,
        "target_recall": target or DEFAULT_TARGET,
        "reached": reached,
        "passed": reached if target is not None else None,
        "metric": metric,
        "rows": idx.rows,
        "dim": idx.dim,
        "queries": len(q),
        "queries_sampled": holdout is not None,
        "model_fingerprint": model_fingerprint or idx.meta.get("model_fingerprint"),
        "sweep": sweep,
    }


def _metric_deltas(idx, q, query_ids, qrels, gt_scores, gt_pos, k_eval) -> dict[str, Any]:
    """Retrieval metrics with exact and with ANN rankings, their difference, the worst queries."""
    from evalkit.metrics.retrieval import RetrievalMetrics

    judged = [i for i, qid in enumerate(query_ids) if str(qid) in qrels]
    if not judged:
        raise DataError("none of the queries has relevance judgements in the qrels")
    sub = np.array(judged)
    ann_scores, ann_pos = idx.search(q[sub], k_eval)
    runs = {"exact": (gt_scores[sub, :k_eval], gt_pos[sub, :k_eval]), "ann": (ann_scores, ann_pos)}
    qids = [str(query_ids[i]) for i in judged]
    values, per_query = {}, {}
    for name, (scores, pos) in runs.items():
        metric = RetrievalMetrics(qrels, k_values=(10, k_eval), score_name=idx.metric)
        ranked = idx.ids_of(pos)
        ranked_ids = [[str(d) for d in row if d is not None and d != -1] for row in ranked]
        ranked_scores = [
            np.asarray(s[: len(r)], dtype=np.float64)
            for s, r in zip(scores, ranked_ids, strict=True)
        ]
        metric.update(qids, ranked_ids, ranked_scores)
        values[name] = {key: float(v) for key, v in metric.compute().items()}
        per_query[name] = metric.compute_per_query()
    wanted = ["ndcg@10", "mrr@10", f"recall@{k_eval}"]
    keys = [key for key in values["exact"] if key.split("_", 1)[-1] in wanted]
    deltas = {key: values["ann"][key] - values["exact"][key] for key in keys}
    ndcg_key = next((key for key in keys if key.endswith("ndcg@10")), None)
    worst = []
    if ndcg_key is not None:
        e, a = (
            _per_query_values(per_query["exact"], ndcg_key),
            _per_query_values(per_query["ann"], ndcg_key),
        )
        rows = sorted(
            ((a.get(qid, 0.0) - v, qid, v) for qid, v in e.items()), key=lambda r: (r[0], r[1])
        )
        worst = [
            {"query_id": qid, f"exact_{ndcg_key}": v, f"ann_{ndcg_key}": v + d, "delta": d}
            for d, qid, v in rows[:10]
            if d < 0
        ]
    return {
        "metrics_exact": {key: values["exact"][key] for key in keys},
        "metrics_ann": {key: values["ann"][key] for key in keys},
        "metric_deltas": deltas,
        "worst_queries": worst,
        "judged_queries": len(judged),
    }


def _per_query_values(per_query: Any, key: str) -> dict[str, float]:
    """{query id: value} of one metric from RetrievalMetrics.compute_per_query()."""
    short = key.split("_", 1)[-1]
    if isinstance(per_query, dict) and (key in per_query or short in per_query):
        col = per_query.get(key, per_query.get(short))
        return {str(qid): float(v) for qid, v in col.items()}
    out = {}
    for qid, vals in dict(per_query).items():
        v = vals.get(key, vals.get(short))
        if v is not None:
            out[str(qid)] = float(v)
    return out


def ann_search(
    query_emb: np.ndarray,
    corpus_blocks: Blocks | Iterable[tuple[Any, np.ndarray]],
    k: int,
    *,
    index: str | os.PathLike | EmbeddingIndex | None = None,
    score: str = "cosine",
    params: dict[str, int] | None = None,
    memory_budget: str | int = "4G",
    model_fingerprint: str | None = None,
    force: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Drop-in for `exact_search` that searches an ANN index instead: (scores [nq, k], ids [nq, k]).

    `index`: a FAISS factory string or None (auto) — built over `corpus_blocks` (a callable that
    reopens the (ids, vectors) stream is read twice when the index needs training; an iterator
    once) with the blocks' ids —, or a built index directory / EmbeddingIndex, whose stored ids
    are returned. Missing results (fewer than k found) have id -1 (integer ids) or "" (strings).
    Hook for evaluate_retrieval: `ann_search(query_emb, blocks(), depth, index=SPEC_OR_DIR,
    score=score_name, model_fingerprint=encoder.fingerprint)` in place of exact_search.
    """
    metric = {"cosine": "cosine", "dot": "dot", "euclidean": "l2", "l2": "l2"}.get(score)
    if metric is None:
        raise EvalkitError(f"an ANN index supports cosine, dot and euclidean scores; got {score!r}")
    if isinstance(index, EmbeddingIndex):
        idx = index
    elif index is not None and Path(str(index)).is_dir():
        idx = load_index(index, model_fingerprint=model_fingerprint, force=force)
    else:
        idx = build_index(
            corpus_blocks,
            spec=None if index is None else str(index),
            metric=metric,
            memory_budget=memory_budget,
            model_fingerprint=model_fingerprint,
        )
    scores, positions = idx.search(query_emb, k, params=params)
    ids = idx.ids_of(positions)
    if ids.dtype == object:
        ids[positions < 0] = ""  # as exact_search's string ids: "" is no document
    return scores, ids
