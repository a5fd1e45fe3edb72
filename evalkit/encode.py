"""Streaming encoder over the embedding store.

For each window of `window` input texts (read ahead by a background thread):

1. validate and de-duplicate the window's texts; key each unique text with
   `store.make_keys(model fingerprint, text)`;
2. look the keys up: first among the vectors of the write still in flight, then in the store.
   A cold run does not pay for the cache: when the store held nothing for this fingerprint at
   the start, only keys this run itself wrote can hit, so only those are looked up (a set of
   written keys, capped at 1M; past the cap every key is looked up, ~200k keys/s);
3. encode the misses with `SentenceTransformer.encode`, longest first, in slices of ~1,024
   texts cut at whole batches of `batch_size` (so progress is reported within a big window); on
   CUDA under autocast (bfloat16 where supported, else float16), on CPU in float32;
4. hand the new vectors to a background writer thread (one `put_many` transaction per window,
   overlapping the next window's encoding);
5. yield the window's embeddings (float32 [len(window), dim]) in input order.

`StreamingEncoder` holds one model + store + settings across inputs (the precompute job uses
one for all its shards); `iter_encode`/`encode_texts` wrap one for a single input.

Whether a text hits depends only on the texts before it, not on timing, so an interrupted run
resumed over the same store reproduces the uninterrupted run's bytes. Tokenisation is not moved
to a thread: it costs < 1% of MiniLM's CPU forward pass and would compete for the same cores.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evalkit.errors import DataError, EvalkitError

DEFAULT_WINDOW = 16384
_SLICE = 1024  # texts per SentenceTransformer.encode call (rounded to whole batches)
COLD_SET_LIMIT = 1_000_000


@dataclass
class EncodeStats:
    """Running counts of one encode call. Hits/misses count unique texts per window."""

    rows: int = 0  # merge: add
    hits: int = 0  # merge: add
    misses: int = 0  # merge: add
    duplicates: int = 0  # merge: add (rows served by an equal text earlier in the same window)
    seconds: float = 0.0  # merge: add
    fingerprint: str = ""
    dim: int | None = None

    def merge(self, other: EncodeStats) -> EncodeStats:
        self.rows += other.rows
        self.hits += other.hits
        self.misses += other.misses
        self.duplicates += other.duplicates
        self.seconds += other.seconds
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


def _resolve_model(model: Any, device: str | None) -> Any:
    from evalkit.models import load_model, resolve_device

    if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
        return load_model(model, device=device)
    if device not in (None, "", "auto"):
        target = resolve_device(device)
        if str(model.device) != target and not str(model.device).startswith(target):
            model.to(target)
    return model


def _resolve_prompt(model: Any, prompt: str | None, prompt_name: str | None) -> str | None:
    if prompt is not None:
        return prompt
    prompts = getattr(model, "prompts", None) or {}
    name = prompt_name if prompt_name is not None else getattr(model, "default_prompt_name", None)
    if name is None:
        return None
    if name not in prompts:
        raise EvalkitError(
            f"prompt_name {name!r} is not one of the model's prompts: {', '.join(prompts) or '(none)'}"
        )
    return prompts[name] or None


def _amp_dtype(model: Any, amp: str | bool | None) -> Any:
    import torch

    if (
        amp in (None, False, "off", "none", "float32")
        or getattr(model.device, "type", "cpu") != "cuda"
    ):
        return None
    if amp in (True, "auto"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in ("float16", "fp16"):
        return torch.float16
    if amp in ("bfloat16", "bf16"):
        return torch.bfloat16
    raise EvalkitError(f"amp must be auto, off, float16 or bfloat16; got {amp!r}")


def _rows(texts: Any) -> Iterator[Any]:
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
            yield from _rows(item)
        else:
            yield item


def _windows(texts: Any, window: int) -> Iterator[list]:
    buf: list = []
    for text in _rows(texts):
        buf.append(text)
        if len(buf) == window:
            yield buf
            buf = []
    if buf:
        yield buf


def _prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
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


class _Lookup:
    """Which keys can be served, and from where (see steps 2 and 4 of the module docstring)."""

    def __init__(self, store: Any, fingerprint: str, dim: int | None) -> None:
        self.store = store
        self.fp = fingerprint
        self.dim = dim
        self.cold = store is not None and not store.has_model(fingerprint)
        self.written: set[bytes] = set()
        self.pending: dict[bytes, np.ndarray] = {}
        self._writer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="evalkit-write") if store else None
        )
        self._future: Future | None = None

    def get(self, keys: list[bytes]) -> tuple[np.ndarray | None, np.ndarray]:
        n = len(keys)
        found = np.zeros(n, dtype=bool)
        if self.store is None or n == 0:
            return None, found
        vecs: np.ndarray | None = None
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
        if ask:
            got, ok = self.store.get_many([keys[i] for i in ask], dim=self.dim)
            if ok.any():
                if vecs is None:
                    vecs = np.zeros((n, got.shape[1]), dtype=np.float32)
                idx = np.asarray(ask)[ok]
                vecs[idx] = got[ok]
                found[idx] = True
        return vecs, found

    def put(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if self.store is None or not keys:
            return
        self.wait()
        self.pending = dict(zip(keys, vectors, strict=True))
        if self.cold:
            self.written.update(keys)
            if len(self.written) > COLD_SET_LIMIT:
                self.cold, self.written = False, set()
        self._future = self._writer.submit(self.store.put_many, keys, vectors, model=self.fp)

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


def _open_store(store: Any, dtype: str | None) -> Any:
    from evalkit.store import EmbeddingStore

    if store is None or isinstance(store, EmbeddingStore):
        return store
    return EmbeddingStore(store, dtype=dtype or "float32")


class StreamingEncoder:
    """One model + store + settings, reusable over several inputs (the precompute job encodes
    shard after shard with one instance, so a cold run stays cold across shards).

    Arguments are those of iter_encode(). Close it (or use `with`) to finish the last write.
    """

    def __init__(
        self,
        model: Any,
        *,
        store: Any = None,
        batch_size: int = 64,
        window: int = DEFAULT_WINDOW,
        prompt: str | None = None,
        prompt_name: str | None = None,
        normalize: bool = False,
        truncate_dim: int | None = None,
        device: str | None = "auto",
        amp: str | bool | None = "auto",
        dtype: str | None = None,
    ) -> None:
        from evalkit.fingerprint import model_fingerprint

        _check_sizes(batch_size, window)
        self.model = _resolve_model(model, device)
        self.store = _open_store(store, dtype)
        self.batch_size, self.window = batch_size, window
        self.normalize, self.truncate_dim = normalize, truncate_dim
        self.prompt = _resolve_prompt(self.model, prompt, prompt_name)
        self.amp_dtype = _amp_dtype(self.model, amp)
        self.precision = self.store.dtype if self.store is not None else (dtype or "float32")
        compute = None
        if self.amp_dtype is not None:
            compute = "autocast-" + str(self.amp_dtype).replace("torch.", "")
        self.fingerprint = model_fingerprint(
            self.model,
            prompt=self.prompt,
            precision=self.precision,
            normalize=normalize,
            truncate_dim=truncate_dim,
            compute=compute,
        )
        get_dim = getattr(self.model, "get_embedding_dimension", None)
        dim = (get_dim or self.model.get_sentence_embedding_dimension)()
        self.dim = min(dim, truncate_dim) if (truncate_dim and dim) else dim
        self._lookup = _Lookup(self.store, self.fingerprint, self.dim)

    def __enter__(self) -> StreamingEncoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the last write to the store."""
        self._lookup.close()

    def iter_encode(
        self,
        texts: Iterable[str] | Any,
        *,
        stats: EncodeStats | None = None,
        progress: bool = False,
        total: int | None = None,
        first_row: int = 0,
        on_progress: Any = None,
    ) -> Iterator[np.ndarray]:
        """Yield float32 blocks ([<= window, dim]) for `texts` in input order; windows start at
        the first text. `first_row` offsets the row numbers in error messages; `on_progress(n)`
        is called as rows are done (at least once per ~1,000 encoded texts)."""
        stats = stats if stats is not None else EncodeStats()
        stats.fingerprint, stats.dim = self.fingerprint, self.dim
        bar = None
        if progress:
            from tqdm.auto import tqdm

            if total is None and hasattr(texts, "__len__") and not hasattr(texts, "chunks"):
                total = len(texts)
            bar = tqdm(total=total, unit="rows", desc="encode", dynamic_ncols=True)
            on_progress = bar.update
        row = first_row
        try:
            for texts_w in _prefetch(_windows(texts, self.window)):
                t0 = time.perf_counter()
                misses_before = stats.misses
                out = self._encode_window(texts_w, row, stats, on_progress)
                row += len(texts_w)
                stats.seconds += time.perf_counter() - t0
                if on_progress is not None:  # the rest: hits and duplicates
                    on_progress(len(texts_w) - (stats.misses - misses_before))
                if bar is not None:
                    bar.set_postfix(hits=stats.hits, misses=stats.misses, refresh=False)
                yield out
        finally:
            if bar is not None:
                bar.close()

    def _encode_misses(self, texts: list[str], on_progress: Any) -> np.ndarray:
        """Encode in length order (longest first, like SentenceTransformer.encode), in slices of
        whole batches so progress can be reported while a big window is being encoded."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        step = max(1, _SLICE // self.batch_size) * self.batch_size
        out: np.ndarray | None = None
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            args = (
                self.model,
                [texts[i] for i in idx],
                self.batch_size,
                self.prompt,
                self.normalize,
                self.truncate_dim,
            )
            if self.amp_dtype is not None:
                with torch.autocast("cuda", dtype=self.amp_dtype):
                    emb = _encode(*args)
            else:
                emb = _encode(*args)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
            if on_progress is not None:
                on_progress(len(idx))
        return out

    def _encode_window(
        self, texts_w: list, first_row: int, stats: EncodeStats, on_progress: Any = None
    ) -> np.ndarray:
        from evalkit.store import make_keys

        for i, text in enumerate(texts_w):
            if not isinstance(text, str):
                kind = "null" if text is None else f"a {type(text).__name__}, not a string"
                raise DataError(f"text at row {first_row + i} is {kind}")
        index: dict[str, int] = {}
        inverse = np.fromiter(
            (index.setdefault(t, len(index)) for t in texts_w), dtype=np.int64, count=len(texts_w)
        )
        uniq = list(index)
        keys = make_keys(self.fingerprint, uniq) if self.store is not None else []
        vecs, found = self._lookup.get(keys)
        if self.store is None:
            found = np.zeros(len(uniq), dtype=bool)
        miss = np.flatnonzero(~found)
        if len(miss):
            new = self._encode_misses([uniq[i] for i in miss], on_progress)
            if self.precision == "float16":  # serve exactly what the store serves later
                new = new.astype(np.float16).astype(np.float32)
            if vecs is None:
                vecs = np.zeros((len(uniq), new.shape[1]), dtype=np.float32)
            vecs[miss] = new
            if self.store is not None:
                self._lookup.put([keys[i] for i in miss], new)
        if vecs is None:  # empty window
            vecs = np.zeros((0, self.dim or 0), dtype=np.float32)
        stats.rows += len(texts_w)
        stats.hits += int(found.sum())
        stats.misses += len(miss)
        stats.duplicates += len(texts_w) - len(uniq)
        return vecs[inverse]


def _check_sizes(batch_size: Any, window: Any) -> None:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise EvalkitError(f"batch_size must be a positive integer; got {batch_size!r}")
    if not isinstance(window, int) or window <= 0:
        raise EvalkitError(f"window must be a positive integer; got {window!r}")


def iter_encode(
    texts: Iterable[str] | Any,
    model: Any,
    *,
    store: Any = None,
    batch_size: int = 64,
    window: int = DEFAULT_WINDOW,
    prompt: str | None = None,
    prompt_name: str | None = None,
    normalize: bool = False,
    truncate_dim: int | None = None,
    device: str | None = "auto",
    amp: str | bool | None = "auto",
    progress: bool = False,
    total: int | None = None,
    stats: EncodeStats | None = None,
) -> Iterator[np.ndarray]:
    """Yield float32 embedding blocks ([<= window, dim]) for `texts` in input order.

    `texts`: any iterable of strings, or of batches of strings (lists, numpy/pyarrow arrays), or a
    pyarrow (Chunked)Array. `model`: a SentenceTransformer, or a name/path for load_model().
    `store`: an EmbeddingStore or its directory (None: no caching). `amp`: CUDA autocast dtype
    ("auto": bfloat16 where supported, else float16; "off": float32). Counts go into `stats`.
    """
    _check_sizes(batch_size, window)
    if isinstance(texts, str):
        raise EvalkitError("texts must be an iterable of strings, not a single string")
    settings = dict(
        store=store, batch_size=batch_size, window=window, prompt=prompt, prompt_name=prompt_name,
        normalize=normalize, truncate_dim=truncate_dim, device=device, amp=amp,
    )  # fmt: skip
    return _iter_encode(texts, model, settings, progress, total, stats)


def _iter_encode(texts, model, settings, progress, total, stats) -> Iterator[np.ndarray]:
    encoder = StreamingEncoder(model, **settings)
    stats = stats if stats is not None else EncodeStats()
    try:
        yield from encoder.iter_encode(texts, stats=stats, progress=progress, total=total)
        t0 = time.perf_counter()
        encoder.close()
        stats.seconds += time.perf_counter() - t0
    finally:
        encoder.close()


def _encode(
    model: Any,
    texts: list[str],
    batch_size: int,
    prompt: str | None,
    normalize: bool,
    truncate_dim: int | None,
) -> np.ndarray:
    emb = model.encode(
        texts,
        batch_size=batch_size,
        prompt=prompt,
        normalize_embeddings=normalize,
        truncate_dim=truncate_dim,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(emb, dtype=np.float32).reshape(len(texts), -1)


def encode_texts(
    texts: Iterable[str] | Any,
    model: Any,
    *,
    store: Any = None,
    batch_size: int = 64,
    prompt: str | None = None,
    normalize: bool = False,
    progress: bool = False,
    **kwargs: Any,
) -> EncodeResult:
    """Encode `texts` (see iter_encode) into one float32 array, serving what the store has.

    Extra keyword arguments (window, prompt_name, truncate_dim, device, amp, total) go to iter_encode.
    """
    stats = EncodeStats()
    t0 = time.perf_counter()
    blocks = list(
        iter_encode(
            texts,
            model,
            store=store,
            batch_size=batch_size,
            prompt=prompt,
            normalize=normalize,
            progress=progress,
            stats=stats,
            **kwargs,
        )
    )
    if blocks:
        embeddings = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    else:
        embeddings = np.zeros((0, stats.dim or 0), dtype=np.float32)
    return EncodeResult(
        embeddings=embeddings,
        hits=stats.hits,
        misses=stats.misses,
        seconds=time.perf_counter() - t0,
        fingerprint=stats.fingerprint,
        stats=stats,
    )
