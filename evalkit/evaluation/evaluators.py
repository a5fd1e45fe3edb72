"""sentence-transformers evaluators built on the streaming engine.

The evaluators (`StreamingPairEvaluator`, `StreamingSimilarityEvaluator`,
`StreamingBinaryClassificationEvaluator`, `StreamingRetrievalEvaluator`) subclass
sentence-transformers' SentenceEvaluator, so the same streaming evaluation runs inside
sentence-transformers' trainer and evalkit's fit loop:
`evaluator(model, output_path=None, epoch=-1, steps=-1) -> dict` with `primary_metric` and
`greater_is_better`.

1) at construction, check the data source, its columns and the arguments once;
2) on each call, open one StreamingEncoder over the model being trained (no store by default:
   its weights change between calls) and run `engine.pairs_pass` / `engine.retrieval_pass`;
3) append a CSV row, prefix the metric names, record them in the model card.

sentence-transformers is imported when one of these classes is first accessed (module
`__getattr__`), not when this module is imported.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.errors import DataError, EvalkitError
from evalkit.evaluation.engine import (
    DEFAULT_K_VALUES,
    DIALECTS,
    PAIR_TASKS,
    PRIMARY,
    check_k_values,
    judged_queries,
    normalize_qrels,
    pairs_pass,
    retrieval_pass,
    warn_missing_documents,
)

logger = logging.getLogger(__name__)


def _check_strings(texts: Mapping[Any, Any], what: str) -> None:
    """Texts given in memory must be str: str(b'...') or str(42) would embed something else."""
    for key, text in texts.items():
        if not isinstance(text, str):
            kind = "null" if text is None else f"a {type(text).__name__}"
            raise DataError(f"{what}[{key!r}] is {kind}, not a string")


def _encoder(model: Any, cache: Any, batch_size: int) -> Any:
    from evalkit.embed.encoder import StreamingEncoder
    from evalkit.embed.store import open_store

    return StreamingEncoder(model, store=open_store(cache), batch_size=batch_size)


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

    Pairs come from `data` (a file/URI/table evalkit.data.readers reads, streamed on every call, with
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
        from evalkit.data.pairs import iter_pair_batches

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
        where = str(self.data) if self.data is not None else "sentences1/sentences2/labels"
        with _encoder(model, self.cache, self.batch_size) as encoder:
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
        from evalkit.data import beir

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
            _check_strings(queries, "queries")
            qids, qtexts = [str(q) for q in queries], list(queries.values())
        else:
            qids, qtexts = beir.load_queries(queries)
        self.query_ids, self.query_texts = judged_queries(self.qrels, qids, qtexts)
        self.corpus = corpus
        if isinstance(corpus, Mapping):
            _check_strings(corpus, "corpus")
            doc_ids = [str(d) for d in corpus]
        else:
            doc_ids = beir.count_corpus(corpus, **source_options)  # checks ids once, 8 B each
            beir.check_corpus(corpus, **source_options)  # and the first document, now
        self.n_docs = len(doc_ids)
        if self.n_docs == 0:
            raise DataError("the corpus has no documents")
        where = "the corpus" if isinstance(corpus, Mapping) else str(corpus)
        warn_missing_documents(self.qrels, doc_ids, where=where)
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
                yield [str(i) for i in chunk], [self.corpus[i] for i in chunk]
            return
        from evalkit.data import beir

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
        with _encoder(model, self.cache, self.batch_size) as encoder:
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
__all__ = sorted(_IMPLS)


def __getattr__(name: str) -> type:
    """Build an evaluator class on first access, subclassing sentence-transformers' SentenceEvaluator
    (imported here, so `import evalkit.evaluation.engine` stays cheap)."""
    impl = _IMPLS.get(name)
    if impl is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = type(
        name, (impl, _sentence_evaluator_base()), {"__module__": __name__, "__doc__": impl.__doc__}
    )
    globals()[name] = cls
    return cls
