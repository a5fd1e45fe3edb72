"""The encoder's plumbing: windows of input texts, read-ahead, and where a key can be served from.

1) `windows` flattens the accepted inputs (strings, lists, numpy/pyarrow arrays of strings) and
   cuts them into windows of a fixed number of texts;
2) `prefetch` runs an iterator in a daemon thread a few items ahead (exceptions re-raise in the
   consumer);
3) `Lookup` answers "which of these keys can be served": first from the vectors of the write
   still in flight, then from the store; on a cold store (nothing for this fingerprint at the
   start) only keys this run wrote can hit, so only those are looked up; it hands new vectors to
   one background writer thread (one `put_many` transaction per window), unless it is read-only
   (`write=False`: nothing is written, so nothing this run encoded can hit);
4) `EncodeStats` counts rows, hits, misses, duplicates, seconds and resumed rows (merge: add).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evalkit.errors import DataError, EvalkitError

COLD_SET_LIMIT = 1_000_000


def rows(texts: Any) -> Iterator[Any]:
    """Flatten the accepted inputs to single texts: strings, or batches (lists, numpy arrays,
    pyarrow arrays/chunked arrays/record-batch columns) of strings."""
    import pyarrow as pa

    if isinstance(texts, str):
        raise EvalkitError("texts must be an iterable of strings, not a single string")
    if isinstance(texts, pa.ChunkedArray):
        for chunk in texts.chunks:
            yield from chunk.to_pylist()
        return
    if isinstance(texts, pa.Array):
        yield from texts.to_pylist()
        return
    for item in texts:
        if isinstance(item, (list, tuple)):
            yield from item
        elif isinstance(item, np.ndarray):
            yield from item.tolist()
        elif isinstance(item, (pa.Array, pa.ChunkedArray)):
            yield from rows(item)
        else:
            yield item


def windows(texts: Any, window: int) -> Iterator[list]:
    if isinstance(texts, (list, tuple)) and set(map(type, texts)) <= {str}:  # flat: slice it
        for start in range(0, len(texts), window):
            yield list(texts[start : start + window])
        return
    buf: list = []
    for text in rows(texts):
        buf.append(text)
        if len(buf) == window:
            yield buf
            buf = []
    if buf:
        yield buf


def prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run `it` in a daemon thread, `depth` items ahead; exceptions re-raise in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, done))
        except BaseException as exc:  # handed to the consumer
            q.put((False, exc))

    thread = threading.Thread(target=work, name="evalkit-read", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()


class Lookup:
    """Which keys can be served, and from where (see steps 2 and 4 of the module docstring)."""

    def __init__(
        self,
        store: Any,
        fingerprint: str,
        dim: int | None,
        meta: dict | None = None,
        write: bool = True,
    ) -> None:
        self.store = store
        self.write = write
        self.fp = fingerprint
        self.dim = dim
        self.meta = meta  # library versions and device, recorded with the first write
        self.cold = store is not None and not store.has_model(fingerprint)
        self.written: set[bytes] = set()
        self.pending: dict[bytes, np.ndarray] = {}
        self._writer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="evalkit-write")
            if store and write
            else None
        )
        self._future: Future | None = None

    def get(
        self, keys: list[bytes], out: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(vectors or None when none was found, found mask) for `keys`. `out` (float32 [n, dim]):
        when every key is asked of the store, the store fills it and it is the vectors."""
        n = len(keys)
        found = np.zeros(n, dtype=bool)
        if self.store is None or n == 0:
            return None, found
        vecs: np.ndarray | None = None
        if not self.pending:  # the common case: no window in flight, no per-key loop
            ask = (
                range(n) if not self.cold else [i for i, k in enumerate(keys) if k in self.written]
            )
            return self._ask(keys, ask, vecs, found, out)
        ask = []
        for i, key in enumerate(keys):
            vec = self.pending.get(key)
            if vec is not None:
                if vecs is None:
                    vecs = np.zeros((n, vec.shape[0]), dtype=np.float32)
                vecs[i] = vec
                found[i] = True
            elif not self.cold or key in self.written:
                ask.append(i)
        return self._ask(keys, ask, vecs, found)

    def _ask(self, keys: list[bytes], ask: Sequence[int], vecs, found, out=None):
        """Look the keys at positions `ask` up in the store; fill `vecs` and `found`."""
        if not len(ask):
            return vecs, found
        whole = len(ask) == len(keys)
        into = out if whole and vecs is None and self.dim is not None else None
        got, ok = self.store.get_many(
            keys if whole else [keys[i] for i in ask], dim=self.dim, model=self.fp, out=into
        )
        if whole and vecs is None:  # every key asked: the store's array is the answer
            found[:] = ok
            return (got if ok.any() else None), found
        if ok.any():
            if vecs is None:
                vecs = np.zeros((len(keys), got.shape[1]), dtype=np.float32)
            idx = np.asarray(ask)[ok]
            vecs[idx] = got[ok]
            found[idx] = True
        return vecs, found

    def put(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if self.store is None or not keys or not self.write:
            return
        self.store.require_writable()  # before the window is served, not in the writer thread
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise EvalkitError(
                f"the model produced {int(bad.sum())} non-finite embedding(s) (NaN/inf) in this "
                f"window; nothing of it was stored. Check the model's weights and precision"
            )
        self.wait()
        self.pending = dict(zip(keys, vectors, strict=True))
        if self.cold:
            self.written.update(keys)
            if len(self.written) > COLD_SET_LIMIT:
                self.cold, self.written = False, set()
        self._future = self._writer.submit(
            self.store.put_many, keys, vectors, model=self.fp, meta=self.meta
        )

    def wait(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            future.result()
        self.pending = {}

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)


def check_texts(texts: Sequence[Any], first_row: int) -> None:
    if set(map(type, texts)) <= {str}:  # the common case, checked at C speed
        return
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            kind = "null" if text is None else f"a {type(text).__name__}, not a string"
            raise DataError(f"text at row {first_row + i} is {kind}")


def dedupe(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique texts in first-seen order, and each input's index into them."""
    unique = dict.fromkeys(texts)
    if len(unique) == len(texts):  # no duplicate (the common case): the identity, at C speed
        return list(unique), np.arange(len(texts), dtype=np.int64)
    index: dict[str, int] = {}
    inverse = np.fromiter(
        (index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts)
    )
    return list(index), inverse


def open_store_arg(store: Any, dtype: str | None) -> Any:
    from evalkit.embed.store import EmbeddingStore

    if store is None or isinstance(store, EmbeddingStore):
        return store
    return EmbeddingStore(store, dtype=dtype or "float32")


def check_sizes(batch_size: Any, window: Any) -> None:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise EvalkitError(f"batch_size must be a positive integer; got {batch_size!r}")
    if not isinstance(window, int) or window <= 0:
        raise EvalkitError(f"window must be a positive integer; got {window!r}")


@dataclass
class EncodeStats:
    """Running counts of encoding. Hits/misses count unique texts per window."""

    rows: int = 0  # merge: add
    hits: int = 0  # merge: add
    misses: int = 0  # merge: add
    duplicates: int = 0  # merge: add (rows served by an equal text earlier in the same window)
    seconds: float = 0.0  # merge: add
    resumed: int = 0  # merge: add (rows a precompute job recovered from a killed run's partial)
    fingerprint: str = ""
    dim: int | None = None

    def merge(self, other: EncodeStats) -> EncodeStats:
        self.rows += other.rows
        self.hits += other.hits
        self.misses += other.misses
        self.duplicates += other.duplicates
        self.seconds += other.seconds
        self.resumed += other.resumed
        self.fingerprint = self.fingerprint or other.fingerprint
        self.dim = self.dim or other.dim
        return self

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class EncodeResult:
    embeddings: np.ndarray
    hits: int
    misses: int
    seconds: float
    fingerprint: str
    stats: EncodeStats = field(default_factory=EncodeStats)
