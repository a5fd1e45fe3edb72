"""What one evaluation is run on, parsed once and reusable across models (evaluate, sweep, compare).

`PairsTask` (pairs: left, right, label columns; similarity or classification) and `RetrievalTask`
(BEIR corpus, queries, qrels; dialect, k values) each:
1) check their arguments at construction (no file is read);
2) give the data's identity, `fingerprint`: a digest of every byte of every input file
   (`data_fingerprint(content=True)`; a sampled digest would miss a same-size edit between its
   blocks), computed once, plus the settings that change a result (`settings()`), which together
   key the results store;
3) parse on first use only (`check()`): pairs read their first batch (columns, labels), retrieval
   reads qrels and queries and makes one ids-only pass over the corpus, so a result served from the
   results store never parses anything;
4) stream their rows to each model (`batches()` / `corpus_batches()`). `PairsTask.materialise(dir)`
   converts the pairs once to a memory-mapped Arrow file, so a sweep over many checkpoints reads
   the source once; queries, qrels and the corpus ids stay parsed in memory for every model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from evalkit.errors import DataError, EvalkitError
from evalkit.evaluation.engine import (
    DEFAULT_K_VALUES,
    DIALECTS,
    PAIR_TASKS,
    check_k_values,
    judged_queries,
    warn_missing_documents,
)

logger = logging.getLogger(__name__)
_SOURCE_KEYS = ("format", "column_names", "delimiter", "quoting")


def _content_fingerprint(paths: list[Any]) -> str | None:
    """Digest of every byte of the inputs; None when they cannot be hashed (e.g. an HF Dataset
    object), which turns the results store off for that evaluation."""
    from evalkit.data.fingerprint import data_fingerprint

    try:
        return data_fingerprint(paths if len(paths) > 1 else paths[0], content=True)
    except (TypeError, OSError, EvalkitError) as exc:
        logger.debug("no data fingerprint (results store off): %s", exc)
        return None


def _source_settings(source_options: dict[str, Any]) -> dict[str, Any] | None:
    """The parsing options as JSON (None when one is not plain data, e.g. a filesystem object)."""
    unknown = set(source_options) - set(_SOURCE_KEYS) - {"filesystem"}
    if source_options.get("filesystem") is not None or unknown:
        return None
    settings = {k: source_options.get(k) for k in _SOURCE_KEYS}
    settings["quoting"] = source_options.get("quoting", True)  # the readers' default
    return settings


class PairsTask:
    """Pairs with a gold score (task="similarity") or a 0/1 label (task="classification")."""

    kind = "pairs"

    def __init__(
        self,
        data: Any,
        *,
        left: str,
        right: str,
        label: str,
        task: str = "similarity",
        read_batch_size: int = 8192,
        **source_options: Any,
    ) -> None:
        if task not in PAIR_TASKS:
            raise EvalkitError(f"task must be one of {', '.join(PAIR_TASKS)}; got {task!r}")
        if not isinstance(read_batch_size, int) or read_batch_size <= 0:
            raise EvalkitError(
                f"read_batch_size must be a positive integer; got {read_batch_size!r}"
            )
        self.data, self.task = data, task
        self.left, self.right, self.label = left, right, label
        self.read_batch_size = read_batch_size
        self.source_options = source_options
        self.name = f"pairs-{task}"
        self._source, self._options = data, source_options
        self._fingerprint: str | None | bool = False
        self._checked = False
        self._materialise_into: Path | None = None

    @property
    def fingerprint(self) -> str | None:
        if self._fingerprint is False:
            self._fingerprint = _content_fingerprint([self.data])
        return self._fingerprint

    def settings(self) -> dict[str, Any] | None:
        """What else changes a result: columns and parsing options (None: not storable)."""
        source = _source_settings(self.source_options)
        if source is None:
            return None
        columns = {"left": self.left, "right": self.right, "label": self.label}
        return {"columns": columns, "source": source}

    def describe(self) -> dict[str, Any]:
        return {
            "paths": {"data": str(self.data)},
            "columns": {"left": self.left, "right": self.right, "label": self.label},
        }

    def batches(self) -> Iterator[tuple[list[str], list[str], Any]]:
        from evalkit.data.pairs import iter_pair_batches

        return iter_pair_batches(
            self._source, left=self.left, right=self.right, label=self.label,
            batch_size=self.read_batch_size, **self._options,
        )  # fmt: skip

    def check(self) -> None:
        """Read the first batch once: path, format, columns and labels fail here, before any model;
        then convert the pairs if `materialise` asked for it."""
        if self._checked:
            return
        if next(self.batches(), None) is None:
            raise DataError(f"{self.data} has no rows to evaluate")
        self._checked = True
        if self._materialise_into is not None:
            from evalkit.data.convert import convert

            dest = self._materialise_into / "pairs.arrow"
            columns = [self.left, self.right, self.label]
            convert(self.data, dest, columns=columns, on_null="error", progress=False,
                    **self.source_options)  # fmt: skip
            self._source, self._options = dest, {}

    def materialise(self, directory: str | os.PathLike) -> None:
        """Convert the three columns into DIR/pairs.arrow at the first `check()` (i.e. before the
        first evaluation that is not served from the results store) and stream from it after."""
        self._materialise_into = Path(directory)


class RetrievalTask:
    """Queries against a corpus with relevance judgements (BEIR layout), exact search."""

    kind = "retrieval"
    name = "retrieval"

    def __init__(
        self,
        corpus: Any,
        queries: Any,
        qrels: Any,
        *,
        dialect: str = "sentence-transformers",
        k_values: Sequence[int] = DEFAULT_K_VALUES,
        ignore_identical_ids: bool = False,
        corpus_block: int = 16_384,
        **source_options: Any,
    ) -> None:
        if dialect not in DIALECTS:
            raise EvalkitError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
        self.k_values = check_k_values(k_values)
        if not isinstance(corpus_block, int) or corpus_block <= 0:
            raise EvalkitError(f"corpus_block must be a positive integer; got {corpus_block!r}")
        self.corpus, self.queries, self.qrels = corpus, queries, qrels
        self.dialect, self.ignore_identical_ids = dialect, bool(ignore_identical_ids)
        self.corpus_embeddings: Any = None  # an `evalkit encode` output used instead of encoding
        self.corpus_block, self.source_options = corpus_block, source_options
        self._fingerprint: str | None | bool = False
        self.judged: dict[str, dict[str, int]] | None = None
        self.query_ids: list[str] = []
        self.query_texts: list[str] = []
        self.n_docs = 0
        self.read_s = 0.0

    @property
    def fingerprint(self) -> str | None:
        if self._fingerprint is False:
            self._fingerprint = _content_fingerprint([self.corpus, self.queries, self.qrels])
        return self._fingerprint

    def settings(self) -> dict[str, Any] | None:
        source = _source_settings(self.source_options)
        if source is None:
            return None
        return {"ignore_identical_ids": self.ignore_identical_ids, "source": source}

    def describe(self) -> dict[str, Any]:
        return {
            "paths": {
                "corpus": str(self.corpus), "queries": str(self.queries), "qrels": str(self.qrels)
            }
        }  # fmt: skip

    def check(self) -> None:
        """Parse qrels and queries and count the corpus (ids only), once."""
        from evalkit.data import beir

        if self.judged is not None:
            return
        t0 = time.perf_counter()
        judged = beir.load_qrels(self.qrels)
        all_ids, all_texts = beir.load_queries(self.queries)
        self.query_ids, self.query_texts = judged_queries(
            judged, all_ids, all_texts, where=str(self.queries)
        )
        doc_ids = beir.count_corpus(self.corpus, **self.source_options)  # 8 bytes per document
        self.n_docs = len(doc_ids)
        if self.n_docs == 0:
            raise DataError(f"corpus {self.corpus} has no documents")
        warn_missing_documents(judged, doc_ids, where=str(self.corpus))
        del doc_ids
        beir.check_corpus(
            self.corpus, **self.source_options
        )  # its first document, before any model
        self.judged = judged
        self.read_s = time.perf_counter() - t0

    def corpus_batches(self) -> Iterator[tuple[list[str], list[str]]]:
        from evalkit.data import beir

        return beir.iter_corpus(self.corpus, batch_size=self.corpus_block, **self.source_options)
