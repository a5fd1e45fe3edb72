"""Streaming evaluation engine and sentence-transformers evaluators built on it.

The engine (used by the `evalkit evaluate` job and by the evaluators below):
1) `Encoder` encodes text batches through the embedding store (hits read, misses encoded and
   written back) and tallies hits/misses/time. Given a model path it loads the model lazily: the
   fingerprint of a model directory is remembered under a digest of the directory's bytes, so a
   run whose texts are all in the store never imports torch or loads the model.
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

import logging
import os
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
PRIMARY = {"similarity": "spearman_cosine", "classification": "cosine_ap"}

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

    h = hashlib.blake2b(digest_size=16)
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


def _progress(total: int | None, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True
    )


def pairs_pass(
    batches: Iterable[tuple[Sequence[str], Sequence[str], np.ndarray]],
    encoder: Encoder,
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


def exact_search(
    query_emb: np.ndarray,
    corpus_blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    *,
    score: str = "cosine",
    dialect: str = "sentence-transformers",
) -> tuple[np.ndarray, np.ndarray]:
    """The search step of retrieval evaluation: exact top-k over streamed (ids, vectors) blocks.

    Returns (scores[nq, <=k], ids[nq, <=k]) best first, ties broken by id as the dialect asks.
    An ANN index stands in for this step through evaluate_retrieval(index=...).
    """
    from evalkit.search import exact_search as _search

    return _search(query_emb, corpus_blocks, k, score=score, dialect=dialect)


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
    encoder: Encoder,
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
    else:
        top_scores, top_ids = index.search(query_emb, metric.depth)
    t_search = time.perf_counter() - t
    ranked = [[str(d) for d in row if str(d) != ""] for row in np.asarray(top_ids)]
    scores = [np.asarray(top_scores[i][: len(r)], dtype=np.float64) for i, r in enumerate(ranked)]
    metric.update(list(query_ids), ranked, scores)
    metrics = metric.compute()
    if ignore_identical_ids:
        ranked = [[d for d in r if d != q] for q, r in zip(query_ids, ranked, strict=True)]
    curve = _recall_curve(qrels, query_ids, ranked, metric.max_k)
    timings = {"encode_queries_s": t_queries, "corpus_encode_and_search_s": t_search}
    return metrics, curve, timings


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
