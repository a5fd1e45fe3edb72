"""The encoder: texts -> vectors through the embedding store, for every job and evaluator.

For each window of `window` input texts (read ahead by a background thread):

1. validate and de-duplicate the window's texts; key each unique text with
   `store.make_keys(model fingerprint, text)`;
2. look the keys up (`_window.Lookup`): first among the vectors of the write still in flight,
   then in the store; a cold store (nothing for this fingerprint at the start) is only asked
   for keys this run wrote itself, so an empty store costs nothing;
3. encode the misses with `SentenceTransformer.encode`, longest first by token count, one call
   per batch (encode() sorts by characters: glosses' batches padded to 1.33x their tokens, vs
   1.04x; no tokenizer: by characters, ~1,024 texts a call); on CUDA under autocast (bfloat16 where
   supported, else float16), on CPU in float32;
4. hand the new vectors to a background writer thread (one `put_many` transaction per window,
   overlapping the next window's encoding);
5. yield the window's embeddings (float32 [len(window), dim]) in input order.

`StreamingEncoder` holds one model + store + settings across inputs and keeps the tallies (hits,
misses, duplicates, seconds, model load time) of everything it encoded. Given a model folder
instead of a loaded model it loads the model only on the first store miss: the fingerprint memo
(`evalkit.embed.memo`) gives the fingerprint of an unchanged folder, so a run whose texts are
all in the store never imports torch. `evalkit.embed.oneshot` (`iter_encode`, `encode_texts`)
runs one encoder over one input.

Whether a text hits depends only on the texts before it, not on timing, so an interrupted run
resumed over the same store reproduces the uninterrupted run's bytes. Tokenisation (once to order,
once inside encode) is not moved to a thread: it costs < 1% of MiniLM's CPU forward pass and
would compete for the same cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from evalkit.embed import memo
from evalkit.embed._window import (  # noqa: F401  (EncodeResult: part of this module's API)
    EncodeResult,
    EncodeStats,
    Lookup,
    check_sizes,
    check_texts,
    dedupe,
    open_store_arg,
    prefetch,
    windows,
)
from evalkit.embed.models import amp_dtype, encode_longest_first, place_model, resolve_prompt
from evalkit.errors import EvalkitError

DEFAULT_WINDOW = 16384


class StreamingEncoder:
    """One model + store + settings, reusable over many inputs; tallies in `.stats`.

    `model`: a loaded SentenceTransformer, or a folder/name/None (the packaged default), loaded on
    the first store miss. `store`: an EmbeddingStore, its folder, or None (no store). `dtype`:
    the store's precision when `store` is a folder. `amp`: CUDA autocast dtype ("auto": bfloat16
    where supported, else float16; "off": float32). `write_store=False` reads the store but
    never writes it (the precompute job: it imports its finished shards at the end, so what a
    window hits never depends on what other workers wrote meanwhile). Close it (or use `with`) to
    finish the last write.
    """

    def __init__(
        self,
        model: Any = None,
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
        write_store: bool = True,
    ) -> None:
        check_sizes(batch_size, window)
        self.store = open_store_arg(store, dtype)
        self.write_store = write_store
        self.batch_size, self.window, self.device = batch_size, window, device
        self.normalize, self.truncate_dim = normalize, truncate_dim
        self._prompt_args, self._amp = (prompt, prompt_name), amp
        self.precision = self.store.dtype if self.store is not None else (dtype or "float32")
        self.stats = EncodeStats()  # everything this encoder served
        self.load_s = 0.0
        self._model = self._fingerprint = self._lookup = self._memo_key = None
        self._dim: int | None = None
        if model is None or isinstance(model, (str, os.PathLike)):
            from evalkit.embed.models import resolve_model_path

            self.path = resolve_model_path(model)
            if self.store is not None and os.path.isdir(self.path):
                self._memo_key = memo.memo_key(self.path, self._memo_settings())
                self._fingerprint = memo.lookup(self._memo_key)
        else:
            self.path = type(model).__name__
            self._set_model(place_model(model, device))

    # ------------------------------------------------------------------- model and settings

    def _memo_settings(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "prompt": self._prompt_args,
            "normalize": self.normalize,
            "truncate_dim": self.truncate_dim,
            "amp": self._amp,
            "device": self.device,
        }

    def _set_model(self, model: Any) -> None:
        self._model = model
        self._prompt = resolve_prompt(model, *self._prompt_args)
        self.amp_dtype = amp_dtype(model, self._amp)
        get_dim = getattr(model, "get_embedding_dimension", None)
        dim = (get_dim or model.get_sentence_embedding_dimension)()
        self._dim = min(dim, self.truncate_dim) if (self.truncate_dim and dim) else dim

    @property
    def model(self) -> Any:
        """The SentenceTransformer, loaded now if it was given as a folder."""
        if self._model is None:
            from evalkit.embed.models import load_model

            t = time.perf_counter()
            self._set_model(load_model(self.path, device=self.device))
            self.load_s += time.perf_counter() - t
            if self._fingerprint is not None:  # from the memo: confirm it on the loaded model
                memoised, self._fingerprint = self._fingerprint, None
                if self.fingerprint != memoised:
                    self._reset_lookup()
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def fingerprint(self) -> str:
        """The model fingerprint of the weights and every setting that changes a vector."""
        if self._fingerprint is None:
            from evalkit.embed.fingerprint import model_fingerprint

            model = self.model
            compute = None
            if self.amp_dtype is not None:
                compute = "autocast-" + str(self.amp_dtype).replace("torch.", "")
            self._fingerprint = model_fingerprint(
                model,
                prompt=self._prompt,
                precision=self.precision,
                normalize=self.normalize,
                truncate_dim=self.truncate_dim,
                compute=compute,
            )
            if self._memo_key is not None:
                memo.remember(self._memo_key, self._fingerprint)
        return self._fingerprint

    @property
    def known_fingerprint(self) -> str | None:
        """The fingerprint when it is known without loading the model (from the memo, or of a
        model already loaded); None when only loading the model would tell."""
        if self._fingerprint is None and self._model is None:
            return None
        return self.fingerprint

    @property
    def dim(self) -> int:
        """The output dimension (loads the model if no vector was served yet)."""
        if self._dim is None:
            self._set_model(self.model)
        return self._dim

    @property
    def prompt(self) -> str | None:
        """The prompt text prepended to every input (resolved from the model's prompts)."""
        self.model  # noqa: B018 - resolved when the model is set
        return self._prompt

    @property
    def similarity(self) -> str:
        """The model's similarity function name, read from its folder when not loaded."""
        if self._model is None:
            from evalkit.embed.models import similarity_fn_name

            return similarity_fn_name(self.path)
        return str(getattr(self._model, "similarity_fn_name", None) or "cosine")

    def _reset_lookup(self) -> None:
        if self._lookup is not None:
            self._lookup.close()
        self._lookup = None

    def _get_lookup(self) -> Lookup:
        if self._lookup is None:
            from evalkit.embed.models import runtime_meta

            meta = runtime_meta(self.model)
            self._lookup = Lookup(
                self.store, self.fingerprint, self._dim, meta, write=self.write_store
            )
        return self._lookup

    # ------------------------------------------------------------------------------ encoding

    def __enter__(self) -> StreamingEncoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the last write to the store."""
        if self._lookup is not None:
            t0 = time.perf_counter()
            self._lookup.close()
            self.stats.seconds += time.perf_counter() - t0

    def encode(self, texts: Sequence[str], *, first_row: int = 0) -> np.ndarray:
        """All of `texts` as one float32 array [len(texts), dim], served from the store where it
        can be (without loading the model when every text is there)."""
        t0 = time.perf_counter()
        try:
            texts = list(texts)
            check_texts(texts, first_row)
            if self._model is None and self._fingerprint is not None:
                served = self._from_store(texts)
                if served is not None:
                    return served
            direct = self._dim and texts and self.store is not None  # the store enforces dim
            out = np.empty((len(texts), self._dim), np.float32) if direct else None
            blocks = []  # written into `out` when the dimension is known: no concatenation
            for s in range(0, len(texts), self.window):
                dst = None if out is None else out[s : s + self.window]
                blocks.append(self._encode_window(texts[s : s + self.window], None, None, dst))
            if out is not None:
                return out
            if not blocks:
                return np.zeros((0, self._dim or 0), dtype=np.float32)
            return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        finally:
            self.stats.seconds += time.perf_counter() - t0

    def iter_encode(
        self,
        texts: Iterable[str] | Any,
        *,
        stats: EncodeStats | None = None,
        progress: bool = False,
        total: int | None = None,
        first_row: int = 0,
        on_progress: Any = None,
        out: np.ndarray | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield float32 blocks ([<= window, dim]) for `texts` in input order; windows start at
        the first text. `first_row` offsets the row numbers in error messages; `on_progress(n)`
        is called as rows are done (at least once per ~1,000 encoded texts); the counts of this
        call are added to `stats` too. `out` (float32 [len(texts), dim]): the blocks are written
        into it, and are its slices (no copy when the store serves a window)."""
        if isinstance(texts, str):
            raise EvalkitError("texts must be an iterable of strings, not a single string")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            if total is None and hasattr(texts, "__len__") and not hasattr(texts, "chunks"):
                total = len(texts)
            bar = tqdm(total=total, unit="rows", desc="encode", dynamic_ncols=True)
            on_progress = bar.update
        row = first_row
        try:
            for texts_w in prefetch(windows(texts, self.window)):
                t0 = time.perf_counter()
                misses = self.stats.misses
                check_texts(texts_w, row)
                at = row - first_row
                dst = None if out is None else out[at : at + len(texts_w)]
                block = self._encode_window(texts_w, on_progress, stats, dst)
                row += len(texts_w)
                elapsed = time.perf_counter() - t0
                self.stats.seconds += elapsed
                if stats is not None:
                    stats.seconds += elapsed
                if on_progress is not None:  # the rest: hits and duplicates
                    on_progress(len(texts_w) - (self.stats.misses - misses))
                if bar is not None:
                    bar.set_postfix(hits=self.stats.hits, misses=self.stats.misses, refresh=False)
                yield block
        finally:
            if bar is not None:
                bar.close()

    def _from_store(self, texts: list[str]) -> np.ndarray | None:
        """All of `texts` from the store (None if any is missing), without the model."""
        from evalkit.embed.store import make_keys

        uniq, inverse = dedupe(texts)
        keys = make_keys(self._fingerprint, uniq)
        vectors, found = self.store.get_many(keys, model=self._fingerprint)
        if not found.all():
            return None
        self._dim = self._dim or (vectors.shape[1] if len(uniq) else None)
        self._tally(len(texts), len(uniq), 0)
        return vectors[inverse]

    def _tally(self, rows_: int, hits: int, misses: int, extra: EncodeStats | None = None) -> None:
        for s in (self.stats, extra) if extra is not None else (self.stats,):
            s.rows += rows_
            s.hits += hits
            s.misses += misses
            s.duplicates += rows_ - hits - misses
            s.fingerprint, s.dim = self._fingerprint or s.fingerprint, self._dim

    def _encode_misses(self, texts: list[str], on_progress: Any) -> np.ndarray:
        """`models.encode_longest_first` through `_encode_slice` (one call per slice)."""
        return encode_longest_first(
            self.model, texts, self.batch_size, self._prompt, self.amp_dtype, self._encode_slice,
            on_progress,
        )  # fmt: skip

    def _encode_slice(self, model: Any, texts: list[str], batch_size: int, prompt: Any):
        emb = model.encode(
            texts,
            batch_size=batch_size,
            prompt=prompt,
            normalize_embeddings=self.normalize,
            truncate_dim=self.truncate_dim,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32).reshape(len(texts), -1)

    def _encode_window(
        self,
        texts_w: list[str],
        on_progress: Any = None,
        extra: EncodeStats | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """One window (already validated) -> float32 [len(texts_w), dim] (steps 1-4), written
        into `out` when given (the store fills it directly when the window has no duplicate).

        The model is loaded first: a fingerprint taken from the memo is confirmed on the loaded
        model before any key of this window is looked up or written."""
        from evalkit.embed.store import make_keys

        self.model  # noqa: B018 - loads the model and confirms a memoised fingerprint
        uniq, inverse = dedupe(texts_w)
        into = out if out is not None and len(uniq) == len(texts_w) else None
        vecs, found = None, np.zeros(len(uniq), dtype=bool)
        if self.store is not None:  # (keys are only needed with a store)
            keys = make_keys(self.fingerprint, uniq)
            vecs, found = self._get_lookup().get(keys, into)
        miss = np.flatnonzero(~found)
        if len(miss):
            todo = uniq if len(miss) == len(uniq) else [uniq[i] for i in miss]
            new = self._encode_misses(todo, on_progress)
            if self.precision == "float16":  # serve exactly what the store serves later
                new = new.astype(np.float16).astype(np.float32)
            width = (vecs if vecs is not None else out if out is not None else new).shape[1]
            if new.shape[1] != width:  # never broadcast, never store what cannot be served
                raise EvalkitError(
                    f"the model returned vectors of dimension {new.shape[1]}, not the "
                    f"{width} it declares (or the store holds for it); nothing was stored"
                )
            if self.store is None:
                vecs = new  # fresh, in order: served as is when no text repeats (no copy)
            else:
                if vecs is None:
                    vecs = into if into is not None else np.zeros((len(uniq), width), np.float32)
                vecs[miss] = new
                self._get_lookup().put([keys[i] for i in miss], new)
        vecs = np.zeros((0, self._dim or 0), np.float32) if vecs is None else vecs  # empty window
        self._tally(len(texts_w), int(found.sum()), len(miss), extra)
        vecs = vecs if len(uniq) == len(texts_w) else vecs[inverse]  # no duplicate: no copy
        if out is not None and vecs is not out:
            out[...] = vecs  # (same shape: checked above, or vectors the store checked)
            return out
        return vecs

    # ------------------------------------------------------------------------------- reports

    def cache_info(self) -> dict[str, Any]:
        return {
            "enabled": self.store is not None,
            "dir": str(self.store.directory) if self.store is not None else None,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "hit_rate": self.stats.hit_rate,
            "model_loaded": self.loaded,
        }

    def model_info(self) -> dict[str, Any]:
        """Path, fingerprint and similarity for reports. Without a store, a model whose weights
        cannot be fingerprinted (see `evalkit.embed.fingerprint`) reports fingerprint None."""
        try:
            fingerprint: str | None = self.fingerprint
        except EvalkitError:
            if self.store is not None:
                raise
            fingerprint = None
        return {"path": self.path, "fingerprint": fingerprint, "similarity": self.similarity}
