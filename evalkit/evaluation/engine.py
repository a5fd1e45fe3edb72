"""The streaming evaluation engine, shared by the evaluate job and the evaluators.

1) an encoder (evalkit.embed.encoder.StreamingEncoder: texts -> embeddings through the store,
   with tallies) turns text batches into vectors;
2) `pairs_pass` streams (left, right, label) batches: reject non-finite labels (and non-0/1 ones
   for classification), encode both sides, pair scores, update the streaming
   similarity/classification metric and a score histogram; `sink(scores, gold)`, when given,
   receives every batch's per-pair scores (the evaluate job spills them to Parquet). A set whose
   metric is undefined or trivial (one class, one gold value) is refused; any other undefined
   metric (constant scores) is logged as a warning and written as null.
3) `retrieval_pass` encodes the queries, streams (ids, texts) corpus blocks through the encoder
   into `exact_search` (O(queries x k) state; its GEMM on the model's GPU when it has one), and
   scores the ranked lists with the dialect's retrieval metrics and a recall@k curve; the search
   runs in a thread while the next block is encoded (`search_behind`: two blocks of vectors
   alive at most);
   `per_query(ids, keys, values)`, when given, receives every counted query's metric values.
   `warn_missing_documents` warns (count, example id) when the qrels judge documents that are not
   in the corpus: they can never be retrieved, so they lower recall.

The SentenceEvaluator classes built on it live in `evalkit.evaluation.evaluators`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from evalkit.errors import DataError, EvalkitError
from evalkit.search.exact import exact_search

logger = logging.getLogger(__name__)

DIALECTS = ("sentence-transformers", "trec_eval")
DEFAULT_K_VALUES = (1, 3, 5, 10, 100)
PAIR_TASKS = ("similarity", "classification")
PRIMARY = {"similarity": "spearman_cosine", "classification": "cosine_ap"}


def _progress(total: int | None, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True
    )


def pairs_pass(
    batches: Iterable[tuple[Sequence[str], Sequence[str], np.ndarray]],
    encoder: Any,
    task: str,
    *,
    progress: bool = False,
    where: str = "data",
    sink: Any = None,
):
    """Stream pair batches through `encoder` into the task's metric. -> (metrics, histogram, rows).

    `sink(scores, gold)` is called with each batch's pair scores ({name: array}) and labels."""
    from evalkit.data.pairs import check_finite_labels  # lazily: it imports pyarrow.dataset
    from evalkit.metrics.curves import ScoreHistogram
    from evalkit.metrics.pairs import ClassificationMetrics, SimilarityMetrics, pair_scores

    if task not in PAIR_TASKS:
        raise EvalkitError(f"task must be one of {', '.join(PAIR_TASKS)}; got {task!r}")
    metric = SimilarityMetrics() if task == "similarity" else ClassificationMetrics()
    hist = ScoreHistogram()
    rows = 0
    seen = _GoldRange()
    with _progress(None, f"evaluate {task}", "pairs", progress) as bar:
        for texts_l, texts_r, gold in batches:
            gold = np.asarray(gold, dtype=np.float64)
            check_finite_labels(gold, where, "label", rows)
            if task == "classification":
                _check_binary(gold, where, rows)
            seen.update(gold)
            n = len(texts_l)
            emb = encoder.encode(list(texts_l) + list(texts_r))
            scores = pair_scores(emb[:n], emb[n:])
            metric.update(scores, gold)
            hist.update(scores["cosine"], gold)
            if sink is not None:
                sink(scores, gold)
            rows += n
            bar.update(n)
    if rows == 0:
        raise DataError(f"{where} has no pairs to evaluate")
    seen.check(task, where, rows)
    metrics = {k: float(v) for k, v in metric.compute().items()}
    undefined = [k for k, v in metrics.items() if not np.isfinite(v)]
    if undefined:
        logger.warning(
            "%s: %d metric(s) are undefined (written as null): %s; the model gives every pair "
            "the same score",
            where, len(undefined), ", ".join(undefined[:4]) + (" ..." if len(undefined) > 4 else ""),
        )  # fmt: skip
    return metrics, hist, rows


class _GoldRange:
    """Smallest and largest gold label seen (merge: min / max)."""

    def __init__(self) -> None:
        self.low, self.high = np.inf, -np.inf

    def update(self, gold: np.ndarray) -> None:
        if len(gold):
            self.low, self.high = min(self.low, gold.min()), max(self.high, gold.max())

    def check(self, task: str, where: str, rows: int) -> None:
        """One class or one gold value: the metrics are trivial (accuracy 1.0) or undefined."""
        if self.low != self.high:
            return
        if task == "classification":
            raise DataError(
                f"{where}: all {rows} pairs have label {self.low:g}; classification metrics need "
                "both classes (accuracy and AP would be trivially perfect, ROC-AUC undefined)"
            )
        raise DataError(
            f"{where}: all {rows} pairs have gold score {self.low:g}; a correlation with a "
            "constant is undefined"
        )


def _check_binary(gold: np.ndarray, where: str, offset: int) -> None:
    bad = ~np.isin(gold, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where}: task 'classification' needs 0/1 labels; row {offset + i} has {gold[i]!r} "
            "(use task 'similarity' for graded scores)"
        )


def check_k_values(k_values: Any) -> list[int]:
    try:
        ks = sorted({int(k) for k in k_values})
    except (TypeError, ValueError):
        raise EvalkitError(f"k_values must be positive integers; got {k_values!r}") from None
    if not ks or ks[0] <= 0:
        raise EvalkitError(f"k_values must be positive integers; got {k_values!r}")
    return ks


def retrieval_pass(
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    qrels: dict[str, dict[str, int]],
    corpus_batches: Iterable[tuple[Sequence[str], Sequence[str]]],
    encoder: Any,
    *,
    k_values: Sequence[int],
    dialect: str,
    n_docs: int | None = None,
    ignore_identical_ids: bool = False,
    index: Any = None,
    progress: bool = False,
    per_query: Any = None,
    precomputed: bool = False,
) -> tuple[dict[str, float], np.ndarray, dict[str, float]]:
    """Encode queries, stream (ids, texts) corpus batches into top-k, score the rankings.
    `precomputed=True`: the batches are (ids, vectors) already, served as they are.

    -> (metrics keyed like cosine_ndcg@10, mean recall@k for k = 1..max k, timings).
    `per_query(ids, keys, values)` receives every counted query's values (see
    RetrievalMetrics.per_query_arrays).
    """
    from evalkit.metrics.retrieval import RetrievalMetrics

    score_name = encoder.similarity
    metric = RetrievalMetrics(
        qrels,
        k_values=check_k_values(k_values),
        dialect=dialect,
        score_name=score_name,
        ignore_identical_ids=ignore_identical_ids,
    )
    t = time.perf_counter()
    query_emb = encoder.encode(query_texts)
    t_queries = time.perf_counter() - t

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with _progress(n_docs, "corpus", "docs", progress) as bar:
            for doc_ids, texts in corpus_batches:
                vectors = texts if precomputed else encoder.encode(texts)
                yield np.asarray(doc_ids, dtype=str), vectors
                vectors = None  # held by the search alone: with search_behind, two blocks alive
                bar.update(len(doc_ids))
                trim_heap()

    t = time.perf_counter()
    if index is None:
        search = functools.partial(exact_search, query_emb, k=metric.depth, score=score_name,
                                   dialect=dialect, device=_gpu_of(encoder))  # fmt: skip
        top_scores, top_ids = search(blocks()) if precomputed else search_behind(search, blocks())
    else:  # a FAISS factory string, "auto", a folder from `evalkit index build`, an EmbeddingIndex
        from evalkit.search.ann import ann_search

        top_scores, top_ids = ann_search(
            query_emb,
            blocks(),
            metric.depth,
            index=index,
            score=score_name,
            model_fingerprint=encoder.fingerprint,
        )
    t_search = time.perf_counter() - t
    top_ids = np.asarray(top_ids).astype(str)
    ranked = [[d for d in row if d != ""] for row in top_ids.tolist()]
    if top_ids.ndim == 2 and (top_ids != "").all():  # full rows: re-ranked in one 2-D sort
        metric.update(list(query_ids), top_ids, np.asarray(top_scores, dtype=np.float64))
    else:
        scores = [np.asarray(top_scores[i][: len(r)], np.float64) for i, r in enumerate(ranked)]
        metric.update(list(query_ids), ranked, scores)
    metrics = _average(metric, dialect)
    if per_query is not None:
        per_query(*metric.per_query_arrays())
    if ignore_identical_ids:
        ranked = [[d for d in r if d != q] for q, r in zip(query_ids, ranked, strict=True)]
    curve = _recall_curve(qrels, query_ids, ranked, metric.max_k)
    timings = {"encode_queries_s": t_queries, "corpus_encode_and_search_s": t_search}
    return metrics, curve, timings


def search_behind(search: Callable[[Iterator], Any], items: Iterable) -> Any:
    """`search(stream)` run in a thread while this thread makes `items` one ahead of it.

    Encoding block j+1 (the model's Python and forward pass, here) overlaps searching block j
    (numpy/BLAS, which release the GIL, there). At most two items are alive: the one searched
    and the next. The encoder stays in the caller's thread: encoding in a thread instead grew
    peak RssAnon ~+29 MB more from 100k to 400k documents (its allocations churned in a second
    malloc arena). An error on either side is raised here, once the thread has ended."""
    import queue

    box: queue.Queue = queue.Queue(maxsize=1)
    wanted = threading.Semaphore(0)  # one release each time the search asks for an item
    end = object()
    state: dict[str, Any] = {}

    def stream() -> Iterator:
        while True:
            wanted.release()
            item = box.get()
            if item is end:
                return
            yield item
            item = None  # the search dropped it: not kept alive here

    def run() -> None:
        try:
            state["value"] = search(stream())
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            state["error"] = e
        finally:
            state["done"] = True
            wanted.release()  # a maker waiting for a request that will not come goes on

    def hand(item: Any) -> bool:
        while "done" not in state:
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    thread = threading.Thread(target=run, name="evalkit-search", daemon=True)
    thread.start()
    try:
        for item in items:
            wanted.acquire()  # the search has let go of the previous item
            if not hand(item):
                break  # the search ended early (its error is raised below)
            item = None
        else:
            wanted.acquire()
    finally:
        hand(end)  # also when making an item failed: the search ends with what it has
        thread.join()
    if "error" in state:
        raise state["error"]
    return state["value"]


def trim_heap() -> None:
    """Give free heap pages back to the OS (glibc's malloc_trim; nothing elsewhere). Called
    once per corpus block: with the search in a thread, its arrays come and go in a second
    malloc arena, whose free pages glibc keeps; peak RssAnon grew +17 MB from 100k to 400k
    documents without this, +2 to +5 MB with it (+6 to +9 MB with no thread)."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError, TypeError):  # not glibc (or Windows)
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _gpu_of(encoder: Any) -> Any:
    """The GPU the encoder's model was loaded on (exact search runs its GEMM there), else None:
    the CPU, and no torch import when every vector came from the store."""
    if not getattr(encoder, "loaded", False):
        return None
    device = getattr(encoder.model, "device", None)
    return device if getattr(device, "type", "cpu") not in ("cpu", "meta") else None


def _average(metric: Any, dialect: str) -> dict[str, float]:
    """Mean over queries of every metric, summed in the order the reference sums it, so results
    equal it bit for bit: InformationRetrievalEvaluator uses numpy's mean for precision, recall,
    nDCG and MAP and a running sum / n for accuracy and MRR; MTEB (trec_eval) a running sum / n."""
    per_query = metric.compute_per_query()
    if not per_query:
        return metric.compute()  # raises the metric's own "no query" error
    n = len(per_query)
    out = {}
    for key in metric.keys:
        values = [v[key] for v in per_query.values()]
        family = key.rsplit("_", 1)[-1].split("@")[0]
        if dialect == "sentence-transformers" and family not in ("accuracy", "mrr"):
            out[key] = float(np.mean(values))
        else:
            total = 0.0
            for value in values:
                total += value
            out[key] = total / n
    return out


def _recall_curve(qrels, query_ids, ranked, max_k: int) -> np.ndarray:
    from evalkit.metrics.curves import RecallCurve

    curve = RecallCurve(max_k)
    rows, sizes = [], []
    for q, docs in zip(query_ids, ranked, strict=True):
        relevant = {d for d, g in qrels.get(q, {}).items() if g > 0}
        if relevant:
            rows.append(
                [d in relevant for d in docs[:max_k]] + [False] * (max_k - len(docs[:max_k]))
            )
            sizes.append(len(relevant))
    if rows:
        curve.update(np.asarray(rows, dtype=np.float64), np.asarray(sizes))
    return curve.compute()


def judged_queries(
    qrels: Mapping[str, Any],
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    *,
    where: str = "queries",
) -> tuple[list[str], list[str]]:
    """The queries that have judgements, in query order; a judged id missing from the queries raises."""
    known = set(query_ids)
    unknown = [q for q in qrels if q not in known]
    if unknown:
        raise DataError(
            f"qrels judge {len(unknown)} query id(s) that are not in {where}, e.g. {unknown[0]!r}; "
            "are the qrels and queries from the same dataset?"
        )
    keep = [i for i, q in enumerate(query_ids) if q in qrels]
    return [query_ids[i] for i in keep], [query_texts[i] for i in keep]


def warn_missing_documents(
    qrels: Mapping[str, Mapping[str, int]], corpus_ids: Any, *, where: str = "the corpus"
) -> int:
    """Log a warning (count and an example id) when relevant documents of the qrels are not in
    the corpus: they can never be retrieved, so recall, nDCG and MAP count them as misses, as
    the reference evaluators do. -> the number of such documents."""
    import pyarrow as pa
    import pyarrow.compute as pc

    relevant = sorted({str(d) for docs in qrels.values() for d, g in docs.items() if g > 0})
    if not relevant:
        return 0
    if hasattr(corpus_ids, "present"):  # beir.count_corpus's hashed id set
        present = corpus_ids.present(relevant)
    else:
        known = (
            corpus_ids
            if isinstance(corpus_ids, pa.Array)
            else pa.array(list(corpus_ids), pa.string())
        )
        present = pc.is_in(pa.array(relevant, known.type), value_set=known).to_numpy(
            zero_copy_only=False
        )
    missing = [d for d, ok in zip(relevant, present, strict=True) if not ok]
    if missing:
        gone = set(missing)
        queries = sum(1 for docs in qrels.values() if any(str(d) in gone for d in docs))
        logger.warning(
            "qrels name %d relevant document(s) that are not in %s, e.g. %r (%d judged queries "
            "affected); they can never be retrieved and count as misses in recall, nDCG and MAP; "
            "are the qrels and corpus from the same dataset?",
            len(missing), where, missing[0], queries,
        )  # fmt: skip
    return len(missing)


def normalize_qrels(relevant: Mapping[Any, Any]) -> dict[str, dict[str, int]]:
    """{qid: {doc: grade}} from that or from sentence-transformers' {qid: set of relevant docs}."""
    if not isinstance(relevant, Mapping):
        raise EvalkitError(
            f"relevant docs must be a dict of query id -> docs; got {type(relevant).__name__}"
        )
    out: dict[str, dict[str, int]] = {}
    for qid, docs in relevant.items():
        if isinstance(docs, Mapping):
            out[str(qid)] = {str(d): int(g) for d, g in docs.items()}
        else:
            out[str(qid)] = {str(d): 1 for d in docs}
    return out


# ------------------------------------------------------------------ sentence-transformers evaluators
