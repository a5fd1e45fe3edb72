"""Streaming evaluation engine and sentence-transformers evaluators built on it.

The engine (used by the `evalkit evaluate` job and by the evaluators below):
1) an encoder (evalkit.evaluate.Encoder: texts -> embeddings through the store, with tallies)
   turns text batches into vectors;
2) `pairs_pass` streams (left, right, label) batches: encode both sides, pair scores, update the
   streaming similarity/classification metric and a score histogram.
3) `retrieval_pass` encodes the queries, streams (ids, texts) corpus blocks through the encoder
   into `exact_search` (O(queries x k) state), and scores the ranked lists with the dialect's
   retrieval metrics and a recall@k curve.

The evaluators (`PairEvaluator`, `SimilarityEvaluator`, `BinaryClassificationEvaluator`,
`RetrievalEvaluator`) subclass sentence-transformers' SentenceEvaluator, so the same streaming
evaluation runs inside sentence-transformers' trainer and evalkit's fit loop:
`evaluator(model, output_path=None, epoch=-1, steps=-1) -> dict` with `primary_metric` and
`greater_is_better`. sentence-transformers is imported when one of these classes is first
accessed (module `__getattr__`), not when this module is imported.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.errors import DataError, EvalkitError
from evalkit.search import exact_search

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
):
    """Stream pair batches through `encoder` into the task's metric. -> (metrics, histogram, rows)."""
    from evalkit.metrics.pairs import ClassificationMetrics, SimilarityMetrics, pair_scores
    from evalkit.report import ScoreHistogram

    if task not in PAIR_TASKS:
        raise EvalkitError(f"task must be one of {', '.join(PAIR_TASKS)}; got {task!r}")
    metric = SimilarityMetrics() if task == "similarity" else ClassificationMetrics()
    hist = ScoreHistogram()
    rows = 0
    with _progress(None, f"evaluate {task}", "pairs", progress) as bar:
        for texts_l, texts_r, gold in batches:
            gold = np.asarray(gold, dtype=np.float64)
            if task == "classification":
                _check_binary(gold, where, rows)
            n = len(texts_l)
            emb = encoder.encode(list(texts_l) + list(texts_r))
            scores = pair_scores(emb[:n], emb[n:])
            metric.update(scores, gold)
            hist.update(scores["cosine"], gold)
            rows += n
            bar.update(n)
    if rows == 0:
        raise DataError(f"{where} has no pairs to evaluate")
    return {k: float(v) for k, v in metric.compute().items()}, hist, rows


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
) -> tuple[dict[str, float], np.ndarray, dict[str, float]]:
    """Encode queries, stream (ids, texts) corpus batches into top-k, score the rankings.

    -> (metrics keyed like cosine_ndcg@10, mean recall@k for k = 1..max k, timings)
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
                yield np.asarray(doc_ids, dtype=str), encoder.encode(texts)
                bar.update(len(doc_ids))

    t = time.perf_counter()
    if index is None:
        top_scores, top_ids = exact_search(
            query_emb, blocks(), metric.depth, score=score_name, dialect=dialect
        )
    else:  # a FAISS factory string, "auto", a folder from `evalkit index build`, an EmbeddingIndex
        from evalkit.ann import ann_search

        top_scores, top_ids = ann_search(
            query_emb,
            blocks(),
            metric.depth,
            index=index,
            score=score_name,
            model_fingerprint=encoder.fingerprint,
        )
    t_search = time.perf_counter() - t
    ranked = [[str(d) for d in row if str(d) != ""] for row in np.asarray(top_ids)]
    scores = [np.asarray(top_scores[i][: len(r)], dtype=np.float64) for i, r in enumerate(ranked)]
    metric.update(list(query_ids), ranked, scores)
    metrics = _average(metric, dialect)
    if ignore_identical_ids:
        ranked = [[d for d in r if d != q] for q, r in zip(query_ids, ranked, strict=True)]
    curve = _recall_curve(qrels, query_ids, ranked, metric.max_k)
    timings = {"encode_queries_s": t_queries, "corpus_encode_and_search_s": t_search}
    return metrics, curve, timings


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
    from evalkit.report import RecallCurve

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


def _sentence_evaluator_base() -> type:
    try:  # sentence-transformers >= 6
        from sentence_transformers.base.evaluation import BaseEvaluator

        return BaseEvaluator
    except ImportError:  # 3.x - 5.x
        from sentence_transformers.evaluation import SentenceEvaluator

        return SentenceEvaluator


class _Reporting:
    """What every evaluator does after computing its metrics: CSV row, name prefix, model card."""

    csv_kind = "evalkit"

    def _report(
        self, model: Any, metrics: dict[str, float], output_path, epoch: int, steps: int
    ) -> dict:
        if output_path is not None and self.write_csv:
            os.makedirs(output_path, exist_ok=True)
            name = f"_{self.name}" if self.name else ""
            path = Path(output_path) / f"{self.csv_kind}{name}_results.csv"
            new = not path.exists()
            with open(path, "a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["epoch", "steps", *metrics])
                writer.writerow([epoch, steps, *metrics.values()])
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        if hasattr(model, "model_card_data"):
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    @staticmethod
    def _when(epoch: int, steps: int) -> str:
        if epoch == -1:
            return ""
        return f" after epoch {epoch}" if steps == -1 else f" in epoch {epoch} after {steps} steps"


class _PairEvaluator(_Reporting):
    """Streaming pair evaluation (similarity or binary classification) as a SentenceEvaluator.

    Pairs come from `data` (a file/URI/table evalkit.arrow reads, streamed on every call, with
    columns `left`, `right`, `label` and `source_options`) or from in-memory `sentences1`,
    `sentences2`, `labels` as in sentence-transformers' evaluators. Returns the same keys as
    EmbeddingSimilarityEvaluator / BinaryClassificationEvaluator (prefixed with `name_` if named).
    `cache`: False (default: weights change during training), or a store directory.
    """

    csv_kind = "pairs_evaluation"

    def __init__(
        self,
        data: Any = None,
        *,
        sentences1: Sequence[str] | None = None,
        sentences2: Sequence[str] | None = None,
        labels: Sequence[float] | None = None,
        left: str = "sentence1",
        right: str = "sentence2",
        label: str = "score",
        task: str = "similarity",
        name: str = "",
        batch_size: int = 64,
        cache: Any = False,
        read_batch_size: int = 8192,
        show_progress_bar: bool = False,
        write_csv: bool = True,
        **source_options: Any,
    ) -> None:
        super().__init__()
        if task not in PAIR_TASKS:
            raise EvalkitError(f"task must be one of {', '.join(PAIR_TASKS)}; got {task!r}")
        in_memory = sentences1 is not None or sentences2 is not None or labels is not None
        if (data is None) == (not in_memory) or (
            in_memory and None in (sentences1, sentences2, labels)
        ):
            raise EvalkitError(
                "give either data=SOURCE or all of sentences1=, sentences2=, labels="
            )
        if in_memory and not (len(sentences1) == len(sentences2) == len(labels)):
            raise EvalkitError(
                f"sentences1, sentences2 and labels must have one length; got "
                f"{len(sentences1)}, {len(sentences2)}, {len(labels)}"
            )
        self.data, self.columns, self.source_options = data, (left, right, label), source_options
        self.pairs = (
            (list(sentences1), list(sentences2), np.asarray(labels, np.float64))
            if in_memory
            else None
        )
        self.task, self.name, self.batch_size, self.cache = task, name, batch_size, cache
        self.read_batch_size, self.show_progress_bar, self.write_csv = (
            read_batch_size,
            show_progress_bar,
            write_csv,
        )
        self.greater_is_better = True
        self.primary_metric = PRIMARY[task]
        if data is not None:
            next(self._batches(), None)  # check the source and its columns now, not mid-training

    def _batches(self) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
        if self.pairs is not None:
            s1, s2, gold = self.pairs
            for start in range(0, len(s1), self.read_batch_size):
                end = start + self.read_batch_size
                yield s1[start:end], s2[start:end], gold[start:end]
            return
        from evalkit.evaluate import iter_pair_batches

        left, right, label = self.columns
        yield from iter_pair_batches(
            self.data,
            left=left,
            right=right,
            label=label,
            batch_size=self.read_batch_size,
            **self.source_options,
        )

    def __call__(
        self,
        model: Any,
        output_path: str | None = None,
        epoch: int = -1,
        steps: int = -1,
        *args,
        **kwargs,
    ) -> dict[str, float]:
        logger.info("evalkit %s evaluation%s", self.task, self._when(epoch, steps))
        from evalkit.evaluate import Encoder

        encoder = Encoder(model, cache=self.cache, batch_size=self.batch_size)
        where = str(self.data) if self.data is not None else "sentences1/sentences2/labels"
        metrics, _, _ = pairs_pass(
            self._batches(), encoder, self.task, progress=self.show_progress_bar, where=where
        )
        self.primary_metric = PRIMARY[self.task]
        return self._report(model, metrics, output_path, epoch, steps)

    def get_config_dict(self) -> dict[str, Any]:
        return {"task": self.task}


class _SimilarityEvaluator(_PairEvaluator):
    """Streaming EmbeddingSimilarityEvaluator: Pearson/Spearman of pair scores with gold scores."""

    def __init__(self, data: Any = None, **kwargs: Any) -> None:
        kwargs.pop("task", None)
        super().__init__(data, task="similarity", **kwargs)


class _BinaryClassificationEvaluator(_PairEvaluator):
    """Streaming BinaryClassificationEvaluator: accuracy/F1/AP/MCC at the best threshold."""

    def __init__(self, data: Any = None, **kwargs: Any) -> None:
        kwargs.pop("task", None)
        kwargs.setdefault("label", "label")
        super().__init__(data, task="classification", **kwargs)


class _RetrievalEvaluator(_Reporting):
    """Streaming InformationRetrievalEvaluator (or pytrec_eval with dialect="trec_eval").

    `queries`: {qid: text} or a BEIR queries.jsonl; `corpus`: {doc id: text} or a BEIR corpus
    (streamed from disk on every call, in blocks of `corpus_block`); `relevant_docs`: {qid: set
    of doc ids} / {qid: {doc id: grade}} or a qrels TSV. Keys like `cosine_ndcg@10`, prefixed
    with `name_` if named; primary metric nDCG at 10 (or the largest k).
    """

    csv_kind = "retrieval_evaluation"

    def __init__(
        self,
        queries: Mapping[str, str] | str | os.PathLike,
        corpus: Mapping[str, str] | str | os.PathLike,
        relevant_docs: Mapping[str, Any] | str | os.PathLike,
        *,
        dialect: str = "sentence-transformers",
        k_values: Sequence[int] = DEFAULT_K_VALUES,
        name: str = "",
        batch_size: int = 64,
        corpus_block: int = 16_384,
        cache: Any = False,
        ignore_identical_ids: bool = False,
        show_progress_bar: bool = False,
        write_csv: bool = True,
        **source_options: Any,
    ) -> None:
        from evalkit import beir

        super().__init__()
        if dialect not in DIALECTS:
            raise EvalkitError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
        self.k_values = check_k_values(k_values)
        if corpus_block <= 0:
            raise EvalkitError(f"corpus_block must be a positive integer; got {corpus_block!r}")
        self.qrels = (
            normalize_qrels(relevant_docs)
            if isinstance(relevant_docs, Mapping)
            else beir.load_qrels(relevant_docs)
        )
        if isinstance(queries, Mapping):
            qids, qtexts = [str(q) for q in queries], [str(t) for t in queries.values()]
        else:
            qids, qtexts = beir.load_queries(queries)
        self.query_ids, self.query_texts = judged_queries(self.qrels, qids, qtexts)
        self.corpus = corpus
        if isinstance(corpus, Mapping):
            self.n_docs = len(corpus)
        else:
            self.n_docs = len(beir.corpus_ids(corpus, **source_options))  # checks ids once
        if self.n_docs == 0:
            raise DataError("the corpus has no documents")
        self.dialect, self.name, self.batch_size, self.cache = dialect, name, batch_size, cache
        self.corpus_block, self.ignore_identical_ids = corpus_block, ignore_identical_ids
        self.show_progress_bar, self.write_csv, self.source_options = (
            show_progress_bar,
            write_csv,
            source_options,
        )
        self.greater_is_better = True
        self.primary_metric = f"cosine_ndcg@{self._primary_k}"

    @property
    def _primary_k(self) -> int:
        return 10 if 10 in self.k_values else max(self.k_values)

    def _corpus_batches(self) -> Iterator[tuple[list[str], list[str]]]:
        if isinstance(self.corpus, Mapping):
            ids = list(self.corpus)
            for start in range(0, len(ids), self.corpus_block):
                chunk = ids[start : start + self.corpus_block]
                yield [str(i) for i in chunk], [str(self.corpus[i]) for i in chunk]
            return
        from evalkit import beir

        yield from beir.iter_corpus(
            self.corpus, batch_size=self.corpus_block, **self.source_options
        )

    def __call__(
        self,
        model: Any,
        output_path: str | None = None,
        epoch: int = -1,
        steps: int = -1,
        *args,
        **kwargs,
    ) -> dict[str, float]:
        logger.info("evalkit retrieval evaluation%s", self._when(epoch, steps))
        from evalkit.evaluate import Encoder

        encoder = Encoder(model, cache=self.cache, batch_size=self.batch_size)
        metrics, _, _ = retrieval_pass(
            self.query_ids,
            self.query_texts,
            self.qrels,
            self._corpus_batches(),
            encoder,
            k_values=self.k_values,
            dialect=self.dialect,
            n_docs=self.n_docs,
            ignore_identical_ids=self.ignore_identical_ids,
            progress=self.show_progress_bar,
        )
        self.primary_metric = f"{encoder.similarity}_ndcg@{self._primary_k}"
        return self._report(model, metrics, output_path, epoch, steps)

    def get_config_dict(self) -> dict[str, Any]:
        return {"dialect": self.dialect, "k_values": self.k_values}


_IMPLS: dict[str, type] = {
    "StreamingPairEvaluator": _PairEvaluator,
    "StreamingSimilarityEvaluator": _SimilarityEvaluator,
    "StreamingBinaryClassificationEvaluator": _BinaryClassificationEvaluator,
    "StreamingRetrievalEvaluator": _RetrievalEvaluator,
}
__all__ = sorted([*_IMPLS, "pairs_pass", "retrieval_pass"])


def __getattr__(name: str) -> type:
    """Build an evaluator class on first access, subclassing sentence-transformers' SentenceEvaluator
    (imported here, so `import evalkit.evaluator` stays cheap)."""
    impl = _IMPLS.get(name)
    if impl is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = type(
        name, (impl, _sentence_evaluator_base()), {"__module__": __name__, "__doc__": impl.__doc__}
    )
    globals()[name] = cls
    return cls
