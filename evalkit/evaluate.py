"""The post-training evaluation job: streaming, exact metrics that match sentence-transformers.

Pairs (`evaluate_pairs`):
1) stream record batches of (left, right, label) from any source evalkit.arrow reads;
2) encode each side through the embedding store (hits are read, only misses are encoded);
3) turn each batch into cosine/dot/euclidean/manhattan pair scores and feed the streaming
   metric (similarity: Pearson/Spearman; classification: accuracy/F1/AP/MCC, spilled to disk);
4) count scores per label into fixed-size histograms for the plots; write the report.

Retrieval (`evaluate_retrieval`):
1) read qrels and queries (small), check that every judged query exists;
2) read the corpus ids once (ids only) and rank them in byte order, so ties break by id exactly
   as the dialect wants while the search works on integer ranks;
3) encode the judged queries; then stream the corpus in blocks of `corpus_block` documents:
   encode through the store and fold the block into an exact top-k (`exact_search` step, kept in
   its own function so an ANN index can replace it) — O(queries x k) state, never the corpus;
4) map ranks back to ids, update the retrieval metrics and the recall@k curve; write the report.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.errors import DataError, EvalkitError

logger = logging.getLogger(__name__)

DIALECTS = ("sentence-transformers", "trec_eval")
DEFAULT_K_VALUES = (1, 3, 5, 10, 100)
PAIR_TASKS = ("similarity", "classification")
_PAIR_HEADLINE = {
    "similarity": ["spearman_cosine", "pearson_cosine"],
    "classification": ["cosine_accuracy", "cosine_f1", "cosine_ap", "cosine_mcc"],
}


# ------------------------------------------------------------------------------------ helpers


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("evalkit", "sentence-transformers", "transformers", "torch", "numpy", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _open_store(cache: Any):
    """cache=None: default store dir; False: no store; a path: that store; a store object: itself."""
    if cache is False:
        return None
    from evalkit.store import EmbeddingStore

    if isinstance(cache, EmbeddingStore):
        return cache
    return EmbeddingStore(cache)


class _Encoder:
    """Encodes text lists through the store and keeps the hit/miss/time tallies of one job."""

    def __init__(self, model: Any, *, cache: Any, device: str, batch_size: int, progress: bool):
        from evalkit.models import load_model, resolve_model_path

        if isinstance(model, (str, os.PathLike)) or model is None:
            self.path = resolve_model_path(model)
            t = time.perf_counter()
            self.model = load_model(model, device=device)
            self.load_s = time.perf_counter() - t
        else:
            self.model = model
            self.path = str(getattr(model, "_evalkit_path", None) or type(model).__name__)
            self.load_s = 0.0
        self.store = _open_store(cache)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.hits = 0  # merge: add
        self.misses = 0  # merge: add
        self.encode_s = 0.0  # merge: add
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from evalkit.fingerprint import model_fingerprint

            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def similarity(self) -> str:
        return str(getattr(self.model, "similarity_fn_name", None) or "cosine")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        from evalkit.encode import encode_texts

        t = time.perf_counter()
        result = encode_texts(
            list(texts), self.model, store=self.store, batch_size=self.batch_size, progress=False
        )
        self.encode_s += time.perf_counter() - t
        self.hits += int(result.hits)
        self.misses += int(result.misses)
        if self._fingerprint is None and getattr(result, "fingerprint", None):
            self._fingerprint = result.fingerprint
        return np.asarray(result.embeddings, dtype=np.float32)

    def cache_info(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "enabled": self.store is not None,
            "dir": str(getattr(self.store, "directory", "")) if self.store is not None else None,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / total if total else 0.0,
        }

    def model_info(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint, "similarity": self.similarity}


def _progress(total: int | None, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True
    )


def _finish(result: dict[str, Any], out: Any, plots_fn, *, plots: bool) -> dict[str, Any]:
    """Draw plots (if asked and an output dir is given), then write metrics.json and summary.md."""
    from evalkit.report import write_report

    if out is None:
        return result
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in (plots_fn(out) if plots else []) if p is not None]
    return write_report(result, out)


# -------------------------------------------------------------------------------------- pairs


def _pair_batches(
    data: Any, columns: list[str], batch_size: int, source_options: dict
) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    from evalkit.arrow import iter_batches

    left, right, label = columns
    row = 0
    for batch in iter_batches(data, columns=columns, batch_size=batch_size, **source_options):
        if batch.num_rows == 0:
            continue
        for col in (left, right, label):
            nulls = batch.column(col).null_count
            if nulls:
                first = int(pc.index(pc.is_null(batch.column(col)), True).as_py())
                raise DataError(
                    f"{data}: row {row + first} has a null {col!r}; drop or fill it first"
                )
        try:
            gold = batch.column(label).cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(
                f"{data}: label column {label!r} is {batch.column(label).type}, not numeric"
            ) from None
        texts_l = [str(t) for t in batch.column(left).to_pylist()]
        texts_r = [str(t) for t in batch.column(right).to_pylist()]
        row += batch.num_rows
        yield texts_l, texts_r, gold


def evaluate_pairs(
    data: Any,
    *,
    left: str,
    right: str,
    label: str,
    task: str = "similarity",
    model: Any = None,
    cache: Any = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 64,
    read_batch_size: int = 8192,
    plots: bool = True,
    progress: bool = True,
    **source_options: Any,
) -> dict[str, Any]:
    """Evaluate `model` on sentence pairs; the same numbers as sentence-transformers'
    EmbeddingSimilarityEvaluator (task="similarity") or BinaryClassificationEvaluator
    (task="classification"), computed in bounded memory.

    `data` is anything evalkit.arrow reads (`source_options`: format, column_names, delimiter,
    quoting, filesystem). `model` is a path, None (packaged all-MiniLM-L6-v2) or a loaded
    SentenceTransformer; `cache` a store directory, None (default store) or False (no store).
    Returns {"metrics": {...}, "model", "data", "cache", "timings", "versions", ...} and, when `out`
    is given, writes out/metrics.json, out/summary.md and PNG plots there.
    """
    if task not in PAIR_TASKS:
        raise EvalkitError(f"task must be one of {', '.join(PAIR_TASKS)}; got {task!r}")
    if batch_size <= 0:
        raise EvalkitError(f"batch_size must be a positive integer; got {batch_size!r}")
    t0 = time.perf_counter()
    columns = [left, right, label]
    batches = _pair_batches(data, columns, read_batch_size, source_options)
    first = next(batches, None)  # validates columns/format before the model loads
    if first is None:
        raise DataError(f"{data} has no rows to evaluate")

    from evalkit.metrics.pairs import ClassificationMetrics, SimilarityMetrics, pair_scores
    from evalkit.report import ScoreHistogram

    enc = _Encoder(model, cache=cache, device=device, batch_size=batch_size, progress=progress)
    metric = SimilarityMetrics() if task == "similarity" else ClassificationMetrics()
    hist = ScoreHistogram()
    rows = 0
    with _progress(None, f"evaluate {task}", "pairs", progress) as bar:
        for texts_l, texts_r, gold in _chain(first, batches):
            if task == "classification":
                _check_binary(gold, data, label, rows)
            emb = enc.encode(texts_l + texts_r)
            n = len(texts_l)
            scores = pair_scores(emb[:n], emb[n:])
            metric.update(scores, gold)
            hist.update(scores["cosine"], gold)
            rows += n
            bar.update(n)
    metrics = _floats(metric.compute())
    total_s = time.perf_counter() - t0
    result = {
        "task": f"pairs-{task}",
        "metrics": metrics,
        "primary_metric": "spearman_cosine" if task == "similarity" else "cosine_ap",
        "headline": _PAIR_HEADLINE[task],
        "model": enc.model_info(),
        "data": {
            "paths": {"data": str(data)},
            "columns": {"left": left, "right": right, "label": label},
            "rows": rows,
            "fingerprint": _data_fp([data]),
        },
        "cache": enc.cache_info(),
        "timings": {
            "model_load_s": enc.load_s,
            "encode_s": enc.encode_s,
            "total_s": total_s,
            "pairs_per_s": rows / total_s if total_s else None,
        },
        "versions": _versions(),
    }

    def draw(folder: Path) -> list:
        from evalkit.report import plot_precision_recall, plot_score_distribution

        name = Path(str(data)).name
        paths = [
            plot_score_distribution(
                hist, folder / "score_distribution.png", title=f"cosine by label: {name}"
            )
        ]
        if task == "classification":
            paths.append(
                plot_precision_recall(
                    hist,
                    folder / "precision_recall.png",
                    title=f"precision-recall: {name}",
                    ap=metrics.get("cosine_ap"),
                )
            )
        return paths

    return _finish(result, out, draw, plots=plots)


def _chain(first, rest):
    yield first
    yield from rest


def _check_binary(gold: np.ndarray, data: Any, label: str, offset: int) -> None:
    bad = ~np.isin(gold, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{data}: --task classification needs 0/1 labels; row {offset + i} has {label}={gold[i]!r} "
            "(use --task similarity for graded scores)"
        )


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _data_fp(paths: Iterable[Any]) -> str | None:
    from evalkit.fingerprint import data_fingerprint

    try:
        return data_fingerprint([str(p) for p in paths])
    except (EvalkitError, TypeError, OSError) as exc:
        logger.debug("no data fingerprint: %s", exc)
        return None


# ---------------------------------------------------------------------------------- retrieval


def exact_search(
    query_emb: np.ndarray,
    corpus_blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    *,
    score: str = "cosine",
    dialect: str = "sentence-transformers",
) -> tuple[np.ndarray, np.ndarray]:
    """The search step of evaluate_retrieval: exact top-k over streamed (ids, vectors) blocks.

    ids are integer sort keys (a document's rank in id order), so ties break by id as the dialect
    asks. Returns (scores[nq, k], ids[nq, k]); ids are -1 where the corpus has fewer than k docs.
    An ANN index replaces this function (see `index=` of evaluate_retrieval).
    """
    from evalkit.search import exact_search as _search

    return _search(query_emb, corpus_blocks, k, score=score, dialect=dialect)


def _check_k_values(k_values: Any) -> list[int]:
    try:
        ks = sorted({int(k) for k in k_values})
    except (TypeError, ValueError):
        raise EvalkitError(f"k_values must be positive integers; got {k_values!r}") from None
    if not ks or ks[0] <= 0:
        raise EvalkitError(f"k_values must be positive integers; got {k_values!r}")
    return ks


def evaluate_retrieval(
    corpus: Any,
    queries: Any,
    qrels: Any,
    *,
    dialect: str = "sentence-transformers",
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    model: Any = None,
    cache: Any = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 64,
    corpus_block: int = 16_384,
    ignore_identical_ids: bool = False,
    index: Any = None,
    plots: bool = True,
    progress: bool = True,
    **source_options: Any,
) -> dict[str, Any]:
    """Evaluate `model` on a BEIR-layout retrieval set with exact search over a streamed corpus.

    dialect="sentence-transformers" gives InformationRetrievalEvaluator's numbers; "trec_eval"
    gives pytrec_eval's (as BEIR and MTEB report them). Metrics are accuracy/precision/recall/MRR/
    nDCG/MAP at every k in `k_values`, keyed like `cosine_ndcg@10`. Memory is O(queries x max k +
    corpus_block x dim + 16 bytes per corpus id). `index` (reserved for an ANN index) replaces the
    exact search step. See evaluate_pairs for model/cache/out.
    """
    from evalkit import beir

    if dialect not in DIALECTS:
        raise EvalkitError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
    ks = _check_k_values(k_values)
    if corpus_block <= 0:
        raise EvalkitError(f"corpus_block must be a positive integer; got {corpus_block!r}")
    t0 = time.perf_counter()
    judged = beir.load_qrels(qrels)
    query_ids_all, query_texts_all = beir.load_queries(queries)
    known = set(query_ids_all)
    unknown = [q for q in judged if q not in known]
    if unknown:
        raise DataError(
            f"qrels {qrels} judge {len(unknown)} query id(s) not in {queries}, e.g. {unknown[0]!r}; "
            "are the qrels and queries from the same dataset?"
        )
    keep = [i for i, q in enumerate(query_ids_all) if q in judged]
    qids = [query_ids_all[i] for i in keep]
    qtexts = [query_texts_all[i] for i in keep]
    ids = beir.corpus_ids(corpus, **source_options)
    n_docs = len(ids)
    if n_docs == 0:
        raise DataError(f"corpus {corpus} has no documents")
    ranks = beir.id_ranks(ids)
    sorted_ids = ids.take(np.argsort(ranks, kind="stable"))  # sorted_ids[rank] -> id
    del ids
    t_read = time.perf_counter() - t0

    enc = _Encoder(model, cache=cache, device=device, batch_size=batch_size, progress=progress)
    score_name = enc.similarity
    k_max = max(ks) + (1 if ignore_identical_ids else 0)
    t = time.perf_counter()
    query_emb = enc.encode(qtexts)
    t_queries = time.perf_counter() - t

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start = 0
        with _progress(n_docs, "corpus", "docs", progress) as bar:
            for doc_ids, texts in beir.iter_corpus(
                corpus, batch_size=corpus_block, **source_options
            ):
                vectors = enc.encode(texts)
                yield ranks[start : start + len(doc_ids)], vectors
                start += len(doc_ids)
                bar.update(len(doc_ids))

    t = time.perf_counter()
    if index is None:
        top_scores, top_ranks = exact_search(
            query_emb, blocks(), k_max, score=score_name, dialect=dialect
        )
    else:  # pragma: no cover - filled in by the ANN integration
        top_scores, top_ranks = index.search(query_emb, k_max)
    t_search = time.perf_counter() - t

    ranked = _ranked_ids(top_ranks, sorted_ids)
    if ignore_identical_ids:
        top_scores, ranked = _drop_identical(qids, ranked, top_scores, max(ks))
    metrics, curve = _retrieval_metrics(judged, qids, ranked, top_scores, ks, dialect, score_name)
    total_s = time.perf_counter() - t0
    headline = [
        f"{score_name}_{m}" for m in ("ndcg@10", "mrr@10", "map@100", "recall@10", "recall@100")
    ]
    result = {
        "task": "retrieval",
        "dialect": dialect,
        "metrics": metrics,
        "primary_metric": f"{score_name}_ndcg@{10 if 10 in ks else max(ks)}",
        "headline": [h for h in headline if h in metrics] or list(metrics)[:6],
        "k_values": ks,
        "model": enc.model_info(),
        "data": {
            "paths": {"corpus": str(corpus), "queries": str(queries), "qrels": str(qrels)},
            "rows": n_docs,
            "corpus_docs": n_docs,
            "queries": len(qids),
            "qrels": sum(len(v) for v in judged.values()),
            "fingerprint": _data_fp([corpus, queries, qrels]),
        },
        "cache": enc.cache_info(),
        "timings": {
            "read_s": t_read,
            "model_load_s": enc.load_s,
            "encode_queries_s": t_queries,
            "corpus_encode_and_search_s": t_search,
            "total_s": total_s,
            "docs_per_s": n_docs / t_search if t_search else None,
        },
        "versions": _versions(),
    }

    def draw(folder: Path) -> list:
        from evalkit.report import plot_recall_at_k

        marks = {
            k: metrics[f"{score_name}_recall@{k}"]
            for k in ks
            if f"{score_name}_recall@{k}" in metrics
        }
        return [
            plot_recall_at_k(
                curve, folder / "recall_at_k.png", title=f"recall@k ({dialect})", marks=marks
            )
        ]

    return _finish(result, out, draw, plots=plots)


def _ranked_ids(top_ranks: np.ndarray, sorted_ids) -> list[list[str]]:
    """Integer ranks (-1 = no result) -> per-query lists of corpus ids."""
    flat = np.asarray(top_ranks).reshape(-1)
    valid = flat >= 0
    names = np.empty(flat.shape[0], dtype=object)
    if valid.any():
        names[valid] = sorted_ids.take(flat[valid]).to_pylist()
    rows = names.reshape(np.asarray(top_ranks).shape)
    return [[d for d in row if d is not None] for row in rows]


def _drop_identical(qids, ranked, scores, k):
    """BEIR/MTEB ignore_identical_ids: drop a result whose id equals its query id, keep k."""
    new_ranked, new_scores = [], np.full((len(qids), k), -np.inf, dtype=np.float64)
    for i, (q, docs) in enumerate(zip(qids, ranked, strict=True)):
        keep = [j for j, d in enumerate(docs) if d != q][:k]
        new_ranked.append([docs[j] for j in keep])
        new_scores[i, : len(keep)] = np.asarray(scores[i])[keep]
    return new_scores, new_ranked


def _retrieval_metrics(judged, qids, ranked, scores, ks, dialect, score_name):
    from evalkit.metrics.retrieval import RetrievalMetrics
    from evalkit.report import RecallCurve

    metric = RetrievalMetrics(judged, k_values=ks, dialect=dialect)
    ranked_scores = [
        np.asarray(scores[i][: len(docs)], dtype=np.float64) for i, docs in enumerate(ranked)
    ]
    metric.update(qids, ranked, ranked_scores)
    values = metric.compute()
    metrics = {}
    for key, value in values.items():
        name = (
            key
            if key.startswith(f"{score_name}_")
            else f"{score_name}_{key.removeprefix('cosine_')}"
        )
        metrics[name] = float(value)
    curve = RecallCurve(max(ks))
    rel = [(i, {d for d, g in judged[q].items() if g > 0}) for i, q in enumerate(qids)]
    rel = [(i, r) for i, r in rel if r]
    if rel:
        hits = np.zeros((len(rel), max(ks)))
        for row, (i, r) in enumerate(rel):
            for j, d in enumerate(ranked[i][: max(ks)]):
                hits[row, j] = d in r
        curve.update(hits, np.array([len(r) for _, r in rel]))
    return metrics, curve.compute()
