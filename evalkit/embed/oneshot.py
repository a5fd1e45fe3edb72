"""One-call encoding: `iter_encode` and `encode_texts` run one `StreamingEncoder` over one input.

1. check the settings and the texts' type (`_settings`), before any model is loaded;
2. load the model when given by name or folder, and build the encoder;
3. `iter_encode`: yield the encoder's blocks; `encode_texts`: when the input is a flat list of
   strings, a store is used and the model declares its dimension (which the store enforces),
   allocate the output array once and have each window written into its slice (the store fills
   it directly: no concatenation, no second copy of the output in memory); otherwise
   concatenate the blocks;
4. wait for the last store write, and record the fingerprint and dimension in the stats.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from evalkit.embed._window import EncodeResult, EncodeStats, check_sizes
from evalkit.embed.encoder import DEFAULT_WINDOW, StreamingEncoder
from evalkit.errors import EvalkitError


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
    `store`: an EmbeddingStore or its directory (None: no caching). Counts go into `stats`.
    See StreamingEncoder for the other settings.
    """
    settings = _settings(
        texts, store=store, batch_size=batch_size, window=window, prompt=prompt,
        prompt_name=prompt_name, normalize=normalize, truncate_dim=truncate_dim, device=device,
        amp=amp,
    )  # fmt: skip
    return _iter_encode(texts, model, settings, progress, total, stats)


_DEFAULTS: dict[str, Any] = dict(
    store=None, batch_size=64, window=DEFAULT_WINDOW, prompt=None, prompt_name=None,
    normalize=False, truncate_dim=None, device="auto", amp="auto",
)  # fmt: skip


def _settings(texts: Any, **given: Any) -> dict[str, Any]:
    """StreamingEncoder's keyword arguments (iter_encode's defaults), checked with the texts'
    type."""
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    settings = {**_DEFAULTS, **given}
    check_sizes(settings["batch_size"], settings["window"])
    if isinstance(texts, str):
        raise EvalkitError("texts must be an iterable of strings, not a single string")
    return settings


def _iter_encode(
    texts, model, settings, progress, total, stats, sink: list | None = None
) -> Iterator[np.ndarray]:
    """One encoder over `texts`. With `sink` (a list) and a flat list of strings, the output
    array is allocated once, appended to `sink`, and the blocks are its slices."""
    if model is None or isinstance(model, (str, os.PathLike)):
        from evalkit.embed.models import load_model

        model = load_model(model, device=settings["device"])
    encoder = StreamingEncoder(model, **settings)
    stats = stats if stats is not None else EncodeStats()
    out = None
    flat = isinstance(texts, (list, tuple)) and set(map(type, texts)) <= {str}
    if sink is not None and flat and len(texts) and encoder.store is not None and encoder._dim:
        out = np.empty((len(texts), encoder._dim), dtype=np.float32)
        sink.append(out)
    try:
        yield from encoder.iter_encode(texts, stats=stats, progress=progress, total=total, out=out)
        t0 = time.perf_counter()
        encoder.close()
        stats.seconds += time.perf_counter() - t0
        stats.fingerprint, stats.dim = encoder.fingerprint, encoder.dim
    finally:
        encoder.close()


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
    total = kwargs.pop("total", None)
    settings = _settings(
        texts, store=store, batch_size=batch_size, prompt=prompt, normalize=normalize, **kwargs
    )
    sink: list[np.ndarray] = []  # the output array, when it can be allocated up front
    blocks = list(_iter_encode(texts, model, settings, progress, total, stats, sink))
    if sink:
        embeddings = sink[0]  # the blocks are its slices
    elif blocks:
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
