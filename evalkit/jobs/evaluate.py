"""The post-training evaluation job: streaming, exact metrics that match sentence-transformers.

Files in, report out; the streaming core lives in evalkit.evaluation.engine (shared with the
evaluators that run inside training loops), what is evaluated in evalkit.jobs.tasks (parsed once,
reusable across models), remembered results in evalkit.jobs.results.

`evaluate_task(task, model=...)` (behind `evaluate_pairs` and `evaluate_retrieval`):
1) results store lookup (unless `recompute`): the key needs the model fingerprint, known without
   loading the model when the fingerprint memo has the folder; a hit returns the stored result
   (and its per-item file) without parsing the data or loading the model: "from results store";
2) otherwise check the data (`task.check()`: columns, qrels, queries, corpus ids) before any
   model loads, then look up once more with the fingerprint of the loaded model;
3) pairs (`engine.pairs_pass`): stream (left, right, label) batches, encode both sides through the
   embedding store, score, feed the streaming metric, spill per-pair scores to Parquet;
   retrieval (`engine.retrieval_pass`): encode the judged queries, stream the corpus in blocks
   into exact top-k (or `index=`: FAISS), score the rankings, write per-query values to Parquet;
4) store the result and its per-item file (results store), write OUT/metrics.json, summary.md,
   per_query.parquet and the plots.

Both encode through one `evalkit.embed.encoder.StreamingEncoder` (hits read, misses encoded and
written back, tallies kept); given a model folder it loads the model only on a store miss.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evalkit._io import out_dir_problem
from evalkit.embed.encoder import StreamingEncoder
from evalkit.errors import EvalkitError
from evalkit.evaluation.engine import DEFAULT_K_VALUES, PRIMARY, pairs_pass, retrieval_pass
from evalkit.jobs import corpus_embeddings as ce
from evalkit.jobs import results as rs
from evalkit.jobs.tasks import PairsTask, RetrievalTask

__all__ = ["evaluate_pairs", "evaluate_retrieval", "evaluate_task"]

logger = logging.getLogger(__name__)
_PAIR_HEADLINE = {
    "similarity": ["spearman_cosine", "pearson_cosine"],
    "classification": ["cosine_accuracy", "cosine_f1", "cosine_ap", "cosine_mcc"],
}


def evaluate_pairs(
    data: Any,
    *,
    left: str,
    right: str,
    label: str,
    task: str = "similarity",
    model: Any = None,
    cache: Any = None,
    results: Any = None,
    recompute: bool = False,
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
    `results`: results store folder, None (beside the embedding store) or False (none);
    `recompute=True` evaluates even when the results store has the answer.
    Returns {"metrics", "model", "data", "cache", "timings", "versions", "per_query", ...}; with
    `out`, also writes out/metrics.json, out/summary.md, out/per_query.parquet and PNG plots.
    """
    spec = PairsTask(
        data, left=left, right=right, label=label, task=task, read_batch_size=read_batch_size,
        **source_options,
    )  # fmt: skip
    return evaluate_task(
        spec, model=model, cache=cache, results=results, recompute=recompute, out=out,
        device=device, batch_size=batch_size, plots=plots, progress=progress,
    )  # fmt: skip


def evaluate_retrieval(
    corpus: Any,
    queries: Any,
    qrels: Any,
    *,
    dialect: str = "sentence-transformers",
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    model: Any = None,
    cache: Any = None,
    results: Any = None,
    recompute: bool = False,
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
    x dim + 8 bytes per corpus id). `index`: search with a FAISS index instead
    (evalkit.search.ann.ann_search): a factory string, "auto", a built index folder or an
    EmbeddingIndex (such results are not kept in the results store). `ignore_identical_ids` drops
    a result whose id equals the query id (BEIR/MTEB option). `corpus_embeddings`: a checked
    `evalkit encode` output of this corpus used instead of encoding it
    (evalkit.jobs.corpus_embeddings; not kept in the results store either). See evaluate_pairs for
    model/cache/results/recompute/out.
    """
    spec = RetrievalTask(
        corpus, queries, qrels, dialect=dialect, k_values=k_values,
        ignore_identical_ids=ignore_identical_ids, corpus_block=corpus_block, **source_options,
    )  # fmt: skip
    spec.corpus_embeddings = corpus_embeddings
    return evaluate_task(
        spec, model=model, cache=cache, results=results, recompute=recompute, out=out,
        device=device, batch_size=batch_size, index=index, plots=plots, progress=progress,
    )  # fmt: skip


def evaluate_task(
    task: PairsTask | RetrievalTask,
    *,
    model: Any = None,
    cache: Any = None,
    results: Any = None,
    recompute: bool = False,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 64,
    index: Any = None,
    plots: bool = True,
    progress: bool = True,
    encoder: StreamingEncoder | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on a prepared task (see the module docstring); the sweep and compare jobs
    call this once per model with one task, so the data is parsed once. `encoder`: a
    StreamingEncoder to use instead of building one from model/cache/device/batch_size (it is
    closed at the end)."""
    from evalkit.embed.store import open_store
    from evalkit.jobs import report

    if out is not None and (problem := out_dir_problem(out)):
        raise EvalkitError(problem)
    t0 = time.perf_counter()
    store = _results_store(results, cache, task, index)
    if encoder is None:
        encoder = StreamingEncoder(
            model, store=open_store(cache), device=device, batch_size=batch_size
        )
    with encoder:
        identity = None
        if store is not None and not recompute:
            identity = _identity(task, encoder, load=False)
            record = store.get(identity) if identity is not None else None
            if record is not None:
                return _served(record, task, encoder, store, out, plots, t0)
        task.check()  # fails fast, before the model loads
        if store is not None and not recompute and identity is None:
            identity = _identity(task, encoder, load=True)
            record = store.get(identity) if identity is not None else None
            if record is not None:
                return _served(record, task, encoder, store, out, plots, t0)
        scratch = store.scratch() if store is not None else None
        try:
            target = scratch if scratch is not None else (Path(out) if out is not None else None)
            run = _run_pairs if task.kind == "pairs" else _run_retrieval
            result, per_item, hist, curve = run(task, encoder, target, index, progress, t0)
        except BaseException:
            rs.remove_tree(scratch)
            raise
        if store is not None:
            # key the result by the fingerprint its vectors were made with: a memoised one is
            # confirmed (and replaced if stale) when the model loads
            identity = _identity(task, encoder, load=True)
    result["versions"] = report.versions()
    if store is not None and identity is None:
        rs.remove_tree(scratch)
        store = None
    if store is not None:
        extra = {"recall_curve": curve} if curve is not None else {}
        record = store.put(identity, result, per_item, extra)
        rs.remove_tree(scratch)
        per_item = record["per_query"]
        if out is not None:
            per_item = rs.copy_verified(per_item, Path(out) / rs.PER_ITEM_FILE)
        result["results_store"] = {"hit": False, "key": record["key"], "dir": str(store.directory)}
    result["per_query"] = per_item
    if out is not None and plots:
        result["plots"] = _plots(task, result, hist, curve, out, encoder.store)
    return report.finish(result, out)


def _results_store(results: Any, cache: Any, task: Any, index: Any) -> rs.ResultsStore | None:
    folder = rs.results_dir(results, cache)
    if folder is None:
        return None
    if (
        index is not None
        or getattr(task, "corpus_embeddings", None)
        or task.fingerprint is None
        or task.settings() is None
    ):
        logger.debug("results store not used for this evaluation (ANN index or unhashable data)")
        return None
    return rs.ResultsStore(folder)


def _identity(task: Any, encoder: StreamingEncoder, *, load: bool) -> dict[str, Any] | None:
    """The results store identity of (model, data, settings); None if it needs the model loaded
    and `load` is False."""
    from evalkit import __version__

    try:
        fingerprint = encoder.fingerprint if load else encoder.known_fingerprint
    except EvalkitError as exc:  # weights that cannot be fingerprinted: nothing to key a result on
        logger.info("results store not used: %s", exc)
        return None
    if fingerprint is None:
        return None
    return {
        "format": rs.RESULTS_FORMAT, "evalkit": __version__, "model": fingerprint,
        "similarity": encoder.similarity, "data": task.fingerprint, "task": task.name,
        "dialect": getattr(task, "dialect", None), "k_values": getattr(task, "k_values", None),
        "settings": task.settings(),
    }  # fmt: skip


def _served(record, task, encoder, store, out, plots, t0) -> dict[str, Any]:
    """A result from the results store, re-labelled with this call's paths (never recomputed)."""
    from evalkit.jobs import report

    result = dict(record["result"])
    result["model"] = {**result["model"], "path": encoder.path}
    result["data"] = {**result["data"], **task.describe()}
    result["results_store"] = {"hit": True, "key": record["key"], "dir": str(store.directory)}
    result["cache"] = {**result.get("cache", {}), "hits": 0, "misses": 0, "hit_rate": 0.0,
                       "model_loaded": encoder.loaded}  # fmt: skip
    result["timings"] = {"total_s": time.perf_counter() - t0, "computed": result.get("timings")}
    per_item = record["per_query"]
    if out is not None:
        per_item = rs.copy_verified(per_item, Path(out) / rs.PER_ITEM_FILE)
    result["per_query"] = per_item
    logger.info("%s: from results store (key %s)", task.name, record["key"])
    curve = record.get("extra", {}).get("recall_curve")
    if out is not None and plots and (task.kind == "pairs" or curve is not None):
        result["plots"] = _plots(task, result, None, curve, out, encoder.store)
    return report.finish(result, out)


def _plots(task, result, hist, curve, out, embeddings) -> list[str]:
    """The PNG plots of a result; a served pairs result redraws its histogram from per-pair rows.
    Plots drawn before are copied from the plot cache of the `embeddings` store."""
    import numpy as np

    from evalkit.jobs import plotcache, report

    cache = plotcache.folder_of(embeddings)

    metrics = result["metrics"]
    if task.kind == "pairs":
        if hist is None:
            from evalkit.metrics.curves import ScoreHistogram

            table = rs.read_table(result["per_query"])
            hist = ScoreHistogram()
            hist.update(table.column("cosine").to_numpy(), table.column("label").to_numpy())
        name = Path(str(task.data)).name
        ap = metrics.get("cosine_ap")
        return report.pair_plots(hist, out, task=task.task, name=name, ap=ap, cache=cache)
    score = result["model"]["similarity"]
    ks = result["k_values"]
    marks = {k: metrics[f"{score}_recall@{k}"] for k in ks if f"{score}_recall@{k}" in metrics}
    curve = np.asarray(curve)
    return report.retrieval_plots(curve, out, dialect=task.dialect, marks=marks, cache=cache)


def _run_pairs(task: PairsTask, encoder, target, index, progress, t0):
    """One pairs pass -> (result, per-item file info or None, histogram, None)."""
    writer = rs.PairsWriter(Path(target) / rs.PER_ITEM_FILE) if target is not None else None
    try:
        metrics, hist, rows = pairs_pass(
            task.batches(), encoder, task.task, progress=progress, where=str(task.data),
            sink=writer,
        )  # fmt: skip
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    per_item = writer.close() if writer is not None else None
    total_s = time.perf_counter() - t0
    result = {
        "task": task.name,
        "metrics": metrics,
        "primary_metric": PRIMARY[task.task],
        "headline": _PAIR_HEADLINE[task.task],
        "model": encoder.model_info(),
        "data": {**task.describe(), "rows": rows, "fingerprint": task.fingerprint},
        "cache": encoder.cache_info(),
        "timings": {
            "model_load_s": encoder.load_s,
            "encode_s": encoder.stats.seconds,
            "total_s": total_s,
            "pairs_per_s": rows / total_s if total_s else None,
        },
    }
    return result, per_item, hist, None


def _run_retrieval(task: RetrievalTask, encoder, target, index, progress, t0):
    """One retrieval pass -> (result, per-item file info or None, None, recall curve)."""
    per_item: dict[str, Any] = {}

    def keep(ids, keys, values):
        if target is not None:
            per_item.update(rs.write_queries(Path(target) / rs.PER_ITEM_FILE, ids, keys, values))

    batches, precomputed = task.corpus_batches(), getattr(task, "corpus_embeddings", None)
    if precomputed:
        opened = ce.open_checked(precomputed, task.n_docs)
        batches = ce.checked_blocks(encoder, precomputed, opened, batches)
    metrics, curve, timings = retrieval_pass(
        task.query_ids, task.query_texts, task.judged, batches, encoder,
        k_values=task.k_values, dialect=task.dialect, n_docs=task.n_docs,
        ignore_identical_ids=task.ignore_identical_ids, index=index, progress=progress,
        per_query=keep, precomputed=bool(precomputed),
    )  # fmt: skip
    score, ks = encoder.similarity, task.k_values
    headline = [f"{score}_{m}" for m in ("ndcg@10", "mrr@10", "map@100", "recall@10", "recall@100")]
    result = {
        "task": "retrieval",
        "dialect": task.dialect,
        "metrics": metrics,
        "primary_metric": f"{score}_ndcg@{10 if 10 in ks else max(ks)}",
        "headline": [h for h in headline if h in metrics] or list(metrics)[:6],
        "k_values": ks,
        "search": "exact" if index is None else f"ann:{getattr(index, 'spec', index)}",
        "corpus_embeddings": str(precomputed) if precomputed else None,
        "model": encoder.model_info(),
        "data": {
            **task.describe(),
            "rows": task.n_docs,
            "queries": len(task.query_ids),
            "judgements": sum(len(v) for v in task.judged.values()),
            "fingerprint": task.fingerprint,
        },  # fmt: skip
        "cache": encoder.cache_info(),
        "timings": {
            "read_s": task.read_s,
            "model_load_s": encoder.load_s,
            **timings,
            "total_s": time.perf_counter() - t0,
            "docs_per_s": task.n_docs / timings["corpus_encode_and_search_s"],
        },
    }
    return result, (per_item or None), None, [float(v) for v in curve]
