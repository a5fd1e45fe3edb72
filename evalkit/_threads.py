"""Row-wise work cut into parts run on a shared thread pool (numpy releases the GIL).

1) `cpus`: the CPUs this process may run on;
2) `row_parts`: [lo, hi) spans cutting n rows into one near-equal part per CPU, none smaller
   than `min_rows` (a thread hand-off costs ~50 us);
3) `parallel`: fn(lo, hi) for every span, the first in the calling thread and the others on
   one pool per process (a forked child makes its own), waiting for every part even when one
   raises, then raising the first error.
Used by exact search (evalkit.search._bounded) and the embedding store's batch reads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

MAX_THREADS = 8  # parts a pass is cut into, at most
MIN_PART_ROWS = 128  # below this many rows a part is not worth a thread hand-off

_pool: tuple[int, Any] | None = None  # (pid that made it, ThreadPoolExecutor)
_pool_lock = threading.Lock()


def cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup quotas are not read)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def row_parts(
    n: int, parts: int | None = None, min_rows: int = MIN_PART_ROWS
) -> list[tuple[int, int]]:
    """[lo, hi) spans cutting n rows into up to `parts` (default: the CPUs) near-equal parts of
    at least `min_rows` rows each."""
    want = min(parts or cpus(), MAX_THREADS, max(1, n // max(1, min_rows)))
    cuts = [n * i // want for i in range(want + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a] or [(0, n)]


def parallel(fn: Callable[[int, int], Any], spans: list[tuple[int, int]]) -> list:
    """[fn(lo, hi) for each span], the first in this thread and the others on the shared pool."""
    global _pool
    if len(spans) <= 1:
        return [fn(*span) for span in spans]
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor  # lazy: CLI start-up

            _pool = (os.getpid(), ThreadPoolExecutor(MAX_THREADS - 1, "evalkit-part"))
        pool = _pool[1]
    futures = [pool.submit(fn, *span) for span in spans[1:]]
    try:
        first = fn(*spans[0])
    finally:
        rest = [f.result() for f in futures]  # waits for every part, even when one raised
    return [first, *rest]
