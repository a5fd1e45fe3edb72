"""The post-training evaluation job: streaming, exact metrics that match sentence-transformers.

Files in, report out; the streaming core lives in evalkit.evaluation.engine (shared with the evaluators
that run inside training loops).

Pairs (`evaluate_pairs`, core `evaluator.pairs_pass`):
1) stream record batches of (left, right, label) from any source evalkit.data.readers reads;
2) encode both sides of a batch through the embedding store (hits read, only misses encoded);
3) turn the batch into cosine/dot/euclidean/manhattan pair scores and feed the streaming metric
   (similarity: Pearson/Spearman; classification: accuracy/F1/AP/MCC; both spill to disk);
4) count cosine scores per label into a fixed-size histogram for the plots; write the report.

Retrieval (`evaluate_retrieval`, core `evaluator.retrieval_pass`):
1) read qrels and queries (small); every judged query must exist;
2) read the corpus ids once (ids only, no texts) to count documents and reject duplicate ids;
3) encode the judged queries, then stream the corpus in blocks of `corpus_block` documents:
   encode each block through the store and fold it into an exact top-k
   (`evalkit.search.exact.exact_search`; `index=` swaps in `evalkit.search.ann.ann_search`):
   O(queries x k) state, never the corpus;
4) score the ranked lists with the dialect's retrieval metrics and a recall@k curve; report.

Both encode through one `evalkit.embed.encoder.StreamingEncoder` (hits read, misses encoded and
written back, tallies kept); given a model folder it loads the model only on a store miss, so a
second run whose texts are all in the store never imports torch or loads the model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from evalkit.data.pairs import iter_pair_batches
from evalkit.embed.encoder import StreamingEncoder
from evalkit.errors import DataError, EvalkitError
from evalkit.evaluation.engine import (
    DEFAULT_K_VALUES,
    DIALECTS,
    PAIR_TASKS,
    PRIMARY,
    check_k_values,
    judged_queries,
    pairs_pass,
    retrieval_pass,
)
from evalkit.jobs import corpus_embeddings as ce

__all__ = ["evaluate_pairs", "evaluate_retrieval"]

logger = logging.getLogger(__name__)
_PAIR_HEADLINE = {
    "similarity": ["spearman_cosine", "pearson_cosine"],
    "classification": ["cosine_accuracy", "cosine_f1", "cosine_ap", "cosine_mcc"],
}


# -------------------------------------------------------------------------------------- pairs


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
    """Evaluate `model` on sentence pairs with the numbers of sentence-transformers'
    EmbeddingSimilarityEvaluator (task="similarity": pearson_/spearman_ cosine, dot, euclidean,
    manhattan) or BinaryClassificationEvaluator (task="classification": cosine_accuracy, cosine_f1,
    cosine_ap, cosine_mcc, ...), in bounded memory.

    `data`: anything evalkit.data.readers reads; `source_options`: format, column_names, delimiter,
    quoting, filesystem. `model`: a path, None (packaged all-MiniLM-L6-v2) or a loaded
    SentenceTransformer. `cache`: store directory, None (default store) or False (no store).
    Returns {"metrics", "model", "data", "cache", "timings", "versions", ...}; with `out`, also
    writes out/metrics.json, out/summary.md and PNG plots.
    """
    from evalkit.jobs import report

    if task not in PAIR_TASKS:
        raise EvalkitError(f"task must be one of {', '.join(PAIR_TASKS)}; got {task!r}")
    t0 = time.perf_counter()
    batches = iter_pair_batches(
        data, left=left, right=right, label=label, batch_size=read_batch_size, **source_options
    )
    first = next(batches, None)  # validates path, format and columns before any model work
    if first is None:
        raise DataError(f"{data} has no rows to evaluate")
    with _encoder(model, cache, device, batch_size) as encoder:
        metrics, hist, rows = pairs_pass(
            _chain(first, batches), encoder, task, progress=progress, where=str(data)
        )
    total_s = time.perf_counter() - t0
    result = {
        "task": f"pairs-{task}",
        "metrics": metrics,
        "primary_metric": PRIMARY[task],
        "headline": _PAIR_HEADLINE[task],
        "model": encoder.model_info(),
        "data": {
            "paths": {"data": str(data)},
            "columns": {"left": left, "right": right, "label": label},
            "rows": rows,
            "fingerprint": _data_fp([data]),
        },
        "cache": encoder.cache_info(),
        "timings": {
            "model_load_s": encoder.load_s,
            "encode_s": encoder.stats.seconds,
            "total_s": total_s,
            "pairs_per_s": rows / total_s if total_s else None,
        },
        "versions": report.versions(),
    }
    if out is not None and plots:
        name = Path(str(data)).name
        result["plots"] = report.pair_plots(
            hist, out, task=task, name=name, ap=metrics.get("cosine_ap")
        )
    return report.finish(result, out)


def _encoder(model: Any, cache: Any, device: str, batch_size: int) -> StreamingEncoder:
    from evalkit.embed.store import open_store

    return StreamingEncoder(model, store=open_store(cache), device=device, batch_size=batch_size)


def _chain(first, rest):
    yield first
    yield from rest


def _data_fp(paths: Iterable[Any]) -> str | None:
    from evalkit.data.fingerprint import data_fingerprint

    try:
        return data_fingerprint([str(p) for p in paths])
    except (EvalkitError, TypeError, OSError) as exc:
        logger.debug("no data fingerprint: %s", exc)
        return None


# ---------------------------------------------------------------------------------- retrieval


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
    corpus_embeddings: str | os.PathLike | None = None,
    **source_options: Any,
) -> dict[str, Any]:
    """Evaluate `model` on a BEIR-layout retrieval set (corpus.jsonl, queries.jsonl, qrels TSV)
    with exact search over a streamed corpus.

    dialect="sentence-transformers" gives InformationRetrievalEvaluator's numbers; "trec_eval"
    pytrec_eval's (as BEIR and MTEB report them). Metrics: accuracy/precision/recall/MRR/nDCG/MAP
    at every k in `k_values`, keyed like `cosine_ndcg@10`. Memory: O(queries x max k + corpus_block
    x dim + ~20 bytes per corpus id). `index`: search with a FAISS index instead
    (evalkit.search.ann.ann_search): a factory string, "auto", a built index folder or an EmbeddingIndex. `ignore_identical_ids` drops a result whose id equals the
    query id (BEIR/MTEB option). `corpus_embeddings`: a checked `evalkit encode` output of this
    corpus used instead of encoding it (evalkit.jobs.corpus_embeddings). See evaluate_pairs for
    model/cache/out.
    """
    from evalkit.data import beir
    from evalkit.jobs import report

    if dialect not in DIALECTS:
        raise EvalkitError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
    ks = check_k_values(k_values)
    if corpus_block <= 0:
        raise EvalkitError(f"corpus_block must be a positive integer; got {corpus_block!r}")
    t0 = time.perf_counter()
    judged = beir.load_qrels(qrels)
    all_ids, all_texts = beir.load_queries(queries)
    qids, qtexts = judged_queries(judged, all_ids, all_texts, where=str(queries))
    n_docs = len(beir.corpus_ids(corpus, **source_options))
    if n_docs == 0:
        raise DataError(f"corpus {corpus} has no documents")
    precomputed = ce.open_checked(corpus_embeddings, n_docs) if corpus_embeddings else None
    t_read = time.perf_counter() - t0

    with _encoder(model, cache, device, batch_size) as encoder:
        corpus_batches = beir.iter_corpus(corpus, batch_size=corpus_block, **source_options)
        if precomputed is not None:
            corpus_batches = ce.checked_blocks(
                encoder, corpus_embeddings, precomputed, corpus_batches
            )
        metrics, curve, timings = retrieval_pass(
            qids,
            qtexts,
            judged,
            corpus_batches,
            encoder,
            k_values=ks,
            dialect=dialect,
            n_docs=n_docs,
            ignore_identical_ids=ignore_identical_ids,
            index=index,
            progress=progress,
            precomputed=precomputed is not None,
        )
    result = _retrieval_result(
        metrics, encoder, ks, dialect, index, (corpus, queries, qrels), n_docs, qids, judged,
        {"read_s": t_read, **timings, "total_s": time.perf_counter() - t0},
    )  # fmt: skip
    result["corpus_embeddings"] = str(corpus_embeddings) if precomputed is not None else None
    score = encoder.similarity
    if out is not None and plots:
        marks = {k: metrics[f"{score}_recall@{k}"] for k in ks if f"{score}_recall@{k}" in metrics}
        result["plots"] = report.retrieval_plots(curve, out, dialect=dialect, marks=marks)
    return report.finish(result, out)


def _retrieval_result(metrics, encoder, ks, dialect, index, paths, n_docs, qids, judged, timings):
    """The result dict of a retrieval evaluation (metrics.json's content)."""
    from evalkit.jobs import report

    corpus, queries, qrels = paths
    score = encoder.similarity
    headline = [f"{score}_{m}" for m in ("ndcg@10", "mrr@10", "map@100", "recall@10", "recall@100")]
    return {
        "task": "retrieval",
        "dialect": dialect,
        "metrics": metrics,
        "primary_metric": f"{score}_ndcg@{10 if 10 in ks else max(ks)}",
        "headline": [h for h in headline if h in metrics] or list(metrics)[:6],
        "k_values": ks,
        "search": "exact" if index is None else f"ann:{getattr(index, 'spec', index)}",
        "model": encoder.model_info(),
        "data": {
            "paths": {"corpus": str(corpus), "queries": str(queries), "qrels": str(qrels)},
            "rows": n_docs,
            "queries": len(qids),
            "judgements": sum(len(v) for v in judged.values()),
            "fingerprint": _data_fp([corpus, queries, qrels]),
        },
        "cache": encoder.cache_info(),
        "timings": {
            "read_s": timings["read_s"],
            "model_load_s": encoder.load_s,
            **{k: v for k, v in timings.items() if k != "read_s"},
            "docs_per_s": n_docs / timings["corpus_encode_and_search_s"],
        },
        "versions": report.versions(),
    }
