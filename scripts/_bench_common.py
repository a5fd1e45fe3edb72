"""Shared helpers of the scripts/bench_*.py benchmarks (not part of the evalkit package).

1) `PeakRss`: samples this process's RssAnon (/proc/self/status) in a thread; `.peak` in bytes;
2) `timed_runs`: a fixed number of timed runs of several contenders, interleaved (the order
   rotates every run so drift on a shared machine hits all alike), one untimed warm-up each;
   returns every run's seconds, so the caller reports medians;
3) `machine_line`: CPU count, load average and thread settings, printed by every benchmark;
4) `minilm_embeddings`: texts -> all-MiniLM-L6-v2 vectors through the embedding store, with a
   .npy snapshot keyed by the model fingerprint and a hash of the texts, so a rerun (or a run on
   a subset whose texts were encoded before) does not encode again.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def rss_anon() -> int:
    """This process's anonymous resident memory, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples RssAnon every `interval` seconds in a thread; `peak` is the maximum seen, `start`
    the value on entry."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = self.start = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> PeakRss:
        self.peak = self.start = rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def timed_runs(
    contenders: dict[str, Callable[[], object]], runs: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """Seconds of `runs` timed calls of every contender, interleaved: run r calls them in an
    order rotated by r (A B C, B C A, ...), so no contender always goes first or last."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine_line() -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
        f"(1 min) / {os.getloadavg()[1]:.2f} (5 min), OMP_NUM_THREADS={threads}"
    )


def texts_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def minilm_embeddings(
    texts: list[str], cache: str | os.PathLike, *, batch_size: int = 128, progress: bool = True
) -> tuple[np.ndarray, str, dict]:
    """float32 [len(texts), 384] MiniLM vectors, the model fingerprint and how they were got.

    `cache/minilm-<fingerprint>-<texts digest>.npy` is read when present (memory-mapped);
    otherwise the texts go through evalkit's encoder with the store in `cache/store` (texts
    encoded by an earlier run are read from it) and the snapshot is written."""
    from evalkit.embed.fingerprint import model_fingerprint
    from evalkit.embed.models import load_model
    from evalkit.embed.oneshot import encode_texts
    from evalkit.embed.store import EmbeddingStore

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = load_model(None, device="cpu")
    fingerprint = model_fingerprint(model)
    snap = cache / f"minilm-{fingerprint[:16]}-{texts_digest(texts)}.npy"
    if snap.is_file():
        emb = np.load(snap, mmap_mode="r")
        if emb.shape == (len(texts), 384):
            return emb, fingerprint, {"snapshot": str(snap)}
    t = time.perf_counter()
    store = EmbeddingStore(cache / "store")
    result = encode_texts(texts, model, store=store, batch_size=batch_size, progress=progress)
    emb = np.asarray(result.embeddings, dtype=np.float32)
    tmp = snap.with_name(snap.name + f".{os.getpid()}.tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, snap)
    info = {"hits": result.hits, "misses": result.misses, "seconds": time.perf_counter() - t}
    return emb, fingerprint, info
