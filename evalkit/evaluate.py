"""The post-training evaluation job: streaming, exact metrics that match sentence-transformers.

Files in, report out; the streaming core lives in evalkit.evaluator (shared with the evaluators
that run inside training loops).

Pairs (`evaluate_pairs`, core `evaluator.pairs_pass`):
1) stream record batches of (left, right, label) from any source evalkit.arrow reads;
2) encode both sides of a batch through the embedding store (hits read, only misses encoded);
3) turn the batch into cosine/dot/euclidean/manhattan pair scores and feed the streaming metric
   (similarity: Pearson/Spearman; classification: accuracy/F1/AP/MCC; both spill to disk);
4) count cosine scores per label into a fixed-size histogram for the plots; write the report.

Retrieval (`evaluate_retrieval`, core `evaluator.retrieval_pass`):
1) read qrels and queries (small); every judged query must exist;
2) read the corpus ids once (ids only, no texts) to count documents and reject duplicate ids;
3) encode the judged queries, then stream the corpus in blocks of `corpus_block` documents:
   encode each block through the store and fold it into an exact top-k
   (`evalkit.search.exact_search`; `index=` swaps in `evalkit.ann.ann_search`):
   O(queries x k) state, never the corpus;
4) score the ranked lists with the dialect's retrieval metrics and a recall@k curve; report.

`Encoder` encodes text batches through the embedding store (hits read, misses encoded and
written back) and tallies hits/misses/time. Given a model path it loads the model lazily: the
fingerprint of a model directory is remembered under a digest of the directory's bytes, so a
second run whose texts are all in the store never imports torch or loads the model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.errors import DataError, EvalkitError
from evalkit.evaluator import (
    DEFAULT_K_VALUES,
    DIALECTS,
    PAIR_TASKS,
    PRIMARY,
    check_k_values,
    judged_queries,
    pairs_pass,
    retrieval_pass,
)

__all__ = ["Encoder", "evaluate_pairs", "evaluate_retrieval", "iter_pair_batches"]

logger = logging.getLogger(__name__)
_PAIR_HEADLINE = {
    "similarity": ["spearman_cosine", "pearson_cosine"],
    "classification": ["cosine_accuracy", "cosine_f1", "cosine_ap", "cosine_mcc"],
}


# ------------------------------------------------------------------------------------ encoder


class Encoder:
    """Encodes text batches through the store for one job, keeping hit/miss/time tallies.

    `model`: a loaded SentenceTransformer, or a path/None (loaded on the first store miss).
    `cache`: a store directory, None (default store), False (no store) or an EmbeddingStore.
    """

    def __init__(
        self, model: Any, *, cache: Any = None, device: str = "auto", batch_size: int = 64
    ) -> None:
        if batch_size <= 0:
            raise EvalkitError(f"batch_size must be a positive integer; got {batch_size!r}")
        self.device, self.batch_size = device, int(batch_size)
        self.store = _open_store(cache)
        self._model = None
        self._memo_key = None
        self._fingerprint: str | None = None
        if model is None or isinstance(model, (str, os.PathLike)):
            from evalkit.models import resolve_model_path

            self.path = resolve_model_path(model)
            if self.store is not None and os.path.isdir(self.path):
                self._memo_key = _memo_key(self.path, self.store.dtype, device)
                self._fingerprint = _memo_lookup(self._memo_key)
        else:
            self._model = model
            self.path = type(model).__name__
        self.hits = 0  # merge: add
        self.misses = 0  # merge: add
        self.encode_s = 0.0  # merge: add
        self.load_s = 0.0

    @property
    def model(self) -> Any:
        if self._model is None:
            from evalkit.models import load_model

            t = time.perf_counter()
            self._model = load_model(self.path, device=self.device)
            self.load_s += time.perf_counter() - t
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from evalkit.fingerprint import model_fingerprint

            precision = self.store.dtype if self.store is not None else "float32"
            self._fingerprint = model_fingerprint(self.model, precision=precision)
        return self._fingerprint

    @property
    def similarity(self) -> str:
        if self._model is None:  # only read the name, do not load the model for it
            return _similarity_fn_name(self.path)
        return str(getattr(self._model, "similarity_fn_name", None) or "cosine")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        t = time.perf_counter()
        try:
            if self._model is None and self._fingerprint is not None:
                served = self._from_store(texts)
                if served is not None:
                    return served
            return self._encode(texts)
        finally:
            self.encode_s += time.perf_counter() - t

    def _from_store(self, texts: Sequence[str]) -> np.ndarray | None:
        """All of `texts` from the store (None if any is missing), without the model."""
        from evalkit.store import make_keys

        index: dict[str, int] = {}
        inverse = np.fromiter(
            (index.setdefault(t, len(index)) for t in texts), np.int64, len(texts)
        )
        vectors, found = self.store.get_many(make_keys(self._fingerprint, list(index)))
        if not found.all():
            return None
        self.hits += len(index)
        return vectors[inverse]

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        from evalkit.encode import encode_texts

        result = encode_texts(
            list(texts),
            self.model,
            store=self.store,
            batch_size=self.batch_size,
            device=self.device,
        )
        self.hits += int(result.hits)
        self.misses += int(result.misses)
        if result.fingerprint and self._fingerprint != result.fingerprint:
            self._fingerprint = result.fingerprint
            if self._memo_key is not None:
                _memo_remember(self._memo_key, result.fingerprint)
        return np.asarray(result.embeddings, dtype=np.float32)

    def cache_info(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "enabled": self.store is not None,
            "dir": str(self.store.directory) if self.store is not None else None,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / total if total else 0.0,
            "model_loaded": self.loaded,
        }

    def model_info(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint, "similarity": self.similarity}


# Fingerprint memo: {content digest of a model directory + settings: model fingerprint}, so a
# run served entirely from the store never loads the model. Keyed by the directory's bytes (not
# its path or mtimes), the library versions, the store dtype, the device and the host: anything
# that can change what the loaded model's fingerprint would be. ~0.1 s for MiniLM's 88 MB.


def _memo_path() -> Path:
    env = os.environ.get("EVALKIT_FINGERPRINT_MEMO")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "evalkit" / "model-fingerprints.json"


def _memo_key(path: str, dtype: str, device: str) -> str:
    import hashlib
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from evalkit.fingerprint import FINGERPRINT_VERSION

    h = hashlib.blake2b(digest_size=16)
    h.update(f"{FINGERPRINT_VERSION}\n".encode())  # a new fingerprint scheme invalidates memos
    for pkg in ("sentence-transformers", "transformers", "torch", "tokenizers"):
        try:
            h.update(f"{pkg}={version(pkg)}\n".encode())
        except PackageNotFoundError:
            h.update(f"{pkg}=-\n".encode())
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    h.update(f"{dtype}|{device}|{platform.node()}|{cuda}\n".encode())
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def _memo_read() -> dict[str, str]:
    import json

    try:
        data = json.loads(_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _memo_lookup(key: str) -> str | None:
    value = _memo_read().get(key)
    return value if isinstance(value, str) else None


def _memo_remember(key: str, fingerprint: str) -> None:
    from evalkit.report import write_json_atomic

    memo = _memo_read()
    memo[key] = fingerprint
    try:
        write_json_atomic(_memo_path(), dict(list(memo.items())[-256:]))
    except OSError as exc:  # a read-only home only costs the fast path
        logger.debug("cannot write the fingerprint memo: %s", exc)


def _similarity_fn_name(path: str) -> str:
    """The model's similarity function from its config, without loading it (ST default: cosine)."""
    import json

    try:
        config = json.loads(
            Path(path, "config_sentence_transformers.json").read_text(encoding="utf-8")
        )
    except (OSError, ValueError):
        return "cosine"
    return str(config.get("similarity_fn_name") or "cosine")


def _open_store(cache: Any):
    if cache is False:
        return None
    from evalkit.store import EmbeddingStore

    if isinstance(cache, EmbeddingStore):
        return cache
    return EmbeddingStore(cache)


# -------------------------------------------------------------------------------------- pairs


def iter_pair_batches(
    data: Any, *, left: str, right: str, label: str, batch_size: int = 8192, **source_options: Any
) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    """(left texts, right texts, float64 labels) batches of a pairs source, nulls rejected by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from evalkit.arrow import iter_batches

    columns = [left, right, label]
    row = 0
    for batch in iter_batches(data, columns=columns, batch_size=batch_size, **source_options):
        if batch.num_rows == 0:
            continue
        for col in columns:
            if batch.column(col).null_count:
                first = int(pc.index(pc.is_null(batch.column(col)), True).as_py())
                raise DataError(
                    f"{data}: row {row + first} has a null {col!r}; drop or fill it first"
                )
        try:
            gold = batch.column(label).cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            kind = batch.column(label).type
            raise DataError(f"{data}: label column {label!r} is {kind}, not numeric") from None
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
    """Evaluate `model` on sentence pairs with the numbers of sentence-transformers'
    EmbeddingSimilarityEvaluator (task="similarity": pearson_/spearman_ cosine, dot, euclidean,
    manhattan) or BinaryClassificationEvaluator (task="classification": cosine_accuracy, cosine_f1,
    cosine_ap, cosine_mcc, ...), in bounded memory.

    `data`: anything evalkit.arrow reads; `source_options`: format, column_names, delimiter,
    quoting, filesystem. `model`: a path, None (packaged all-MiniLM-L6-v2) or a loaded
    SentenceTransformer. `cache`: store directory, None (default store) or False (no store).
    Returns {"metrics", "model", "data", "cache", "timings", "versions", ...}; with `out`, also
    writes out/metrics.json, out/summary.md and PNG plots.
    """
    from evalkit import report

    if task not in PAIR_TASKS:
        raise EvalkitError(f"task must be one of {', '.join(PAIR_TASKS)}; got {task!r}")
    t0 = time.perf_counter()
    batches = iter_pair_batches(
        data, left=left, right=right, label=label, batch_size=read_batch_size, **source_options
    )
    first = next(batches, None)  # validates path, format and columns before any model work
    if first is None:
        raise DataError(f"{data} has no rows to evaluate")
    encoder = Encoder(model, cache=cache, device=device, batch_size=batch_size)
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
            "encode_s": encoder.encode_s,
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


def _chain(first, rest):
    yield first
    yield from rest


def _data_fp(paths: Iterable[Any]) -> str | None:
    from evalkit.fingerprint import data_fingerprint

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
    **source_options: Any,
) -> dict[str, Any]:
    """Evaluate `model` on a BEIR-layout retrieval set (corpus.jsonl, queries.jsonl, qrels TSV)
    with exact search over a streamed corpus.

    dialect="sentence-transformers" gives InformationRetrievalEvaluator's numbers; "trec_eval"
    pytrec_eval's (as BEIR and MTEB report them). Metrics: accuracy/precision/recall/MRR/nDCG/MAP
    at every k in `k_values`, keyed like `cosine_ndcg@10`. Memory: O(queries x max k + corpus_block
    x dim + ~20 bytes per corpus id). `index`: search with a FAISS index instead
    (evalkit.ann.ann_search): a factory string, "auto", a built index folder or an EmbeddingIndex. `ignore_identical_ids` drops a result whose id equals the
    query id (BEIR/MTEB option). See evaluate_pairs for model/cache/out.
    """
    from evalkit import beir, report

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
    t_read = time.perf_counter() - t0

    encoder = Encoder(model, cache=cache, device=device, batch_size=batch_size)
    metrics, curve, timings = retrieval_pass(
        qids,
        qtexts,
        judged,
        beir.iter_corpus(corpus, batch_size=corpus_block, **source_options),
        encoder,
        k_values=ks,
        dialect=dialect,
        n_docs=n_docs,
        ignore_identical_ids=ignore_identical_ids,
        index=index,
        progress=progress,
    )
    total_s = time.perf_counter() - t0
    score = encoder.similarity
    headline = [f"{score}_{m}" for m in ("ndcg@10", "mrr@10", "map@100", "recall@10", "recall@100")]
    result = {
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
            "read_s": t_read,
            "model_load_s": encoder.load_s,
            **timings,
            "total_s": total_s,
            "docs_per_s": n_docs / timings["corpus_encode_and_search_s"],
        },
        "versions": report.versions(),
    }
    if out is not None and plots:
        marks = {k: metrics[f"{score}_recall@{k}"] for k in ks if f"{score}_recall@{k}" in metrics}
        result["plots"] = report.retrieval_plots(curve, out, dialect=dialect, marks=marks)
    return report.finish(result, out)
