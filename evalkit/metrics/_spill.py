"""Disk-backed record store and external sort, so rank-based metrics stay bounded in RAM.

Algorithm:
1) ``Spill.append`` buffers numpy structured records in RAM up to ``run_rows`` rows, then writes
   the buffer as one ``.npy`` file in a private temporary directory (arrival order is kept);
2) ``Spill.merge`` adopts another spill's files (no copy) and its small buffer;
3) ``external_sort`` cuts a record stream into runs of ``run_rows``, sorts each run by one key
   field and writes it to disk, then merges runs pairwise on disk (memory-mapped, ``chunk_rows``
   at a time) until one sorted file remains, which it returns memory-mapped;
4) ``iter_groups`` walks a sorted key column chunk by chunk and says where each group of equal
   keys starts, so callers can give tied values one shared (average) rank or one shared cut.

Peak anonymous memory is O(run_rows + chunk_rows) records whatever the number of records.
Records must not hold NaN keys (callers validate at the door).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

RUN_ROWS = 1 << 20
CHUNK_ROWS = 1 << 16


class Spill:
    """Append-only store of structured records: a few files on disk plus one small RAM buffer."""

    def __init__(
        self,
        dtype: np.dtype,
        *,
        directory: str | os.PathLike | None = None,
        run_rows: int = RUN_ROWS,
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.run_rows = int(run_rows)
        self._tmp = tempfile.TemporaryDirectory(prefix="evalkit-spill-", dir=directory)
        self.directory = Path(self._tmp.name)
        self._files: list[Path] = []  # merge: concatenate (the other's files are adopted)
        self._keep: list[tempfile.TemporaryDirectory] = []  # merge: concatenate (keeps files alive)
        self._buffer: list[np.ndarray] = []  # merge: concatenate
        self._buffered = 0  # merge: add
        self.rows = 0  # merge: add
        self._counter = itertools.count()

    def append(self, records: np.ndarray) -> None:
        records = np.asarray(records, dtype=self.dtype)
        if records.size == 0:
            return
        self._buffer.append(records.copy())
        self._buffered += len(records)
        self.rows += len(records)
        if self._buffered >= self.run_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        data = np.concatenate(self._buffer)
        path = self.directory / f"raw-{next(self._counter):06d}.npy"
        np.save(path, data)
        self._files.append(path)
        self._buffer, self._buffered = [], 0

    def merge(self, other: Spill) -> None:
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge spills of dtypes {self.dtype} and {other.dtype}")
        self._flush()
        self._files.extend(other._files)
        self._keep.extend([other._tmp, *other._keep])
        self.rows += other.rows - other._buffered  # rows in adopted files; append counts the rest
        for part in other._buffer:
            self.append(part)

    def iter_chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """Records in arrival order (file order, then the buffer), ``chunk_rows`` at a time."""
        for path in self._files:
            data = np.load(path, mmap_mode="r")
            for start in range(0, len(data), chunk_rows):
                yield np.array(data[start : start + chunk_rows])
        yield from self._buffer

    def tempdir(self) -> Path:
        """A fresh scratch folder inside this spill's temporary directory."""
        return Path(tempfile.mkdtemp(dir=self.directory))


def external_sort(
    chunks: Iterable[np.ndarray],
    key: str,
    directory: Path,
    *,
    run_rows: int = RUN_ROWS,
    chunk_rows: int = CHUNK_ROWS,
) -> np.ndarray:
    """Sort a stream of structured record chunks by ``key`` on disk; return the result memory-mapped."""
    counter = itertools.count()
    runs: list[Path] = []
    buffer: list[np.ndarray] = []
    buffered = 0
    dtype = None

    def write_run() -> None:
        nonlocal buffer, buffered
        data = np.concatenate(buffer)
        data = data[np.argsort(data[key], kind="stable")]
        path = directory / f"run-{next(counter):06d}.npy"
        np.save(path, data)
        runs.append(path)
        buffer, buffered = [], 0

    for chunk in chunks:
        dtype = chunk.dtype
        buffer.append(chunk)
        buffered += len(chunk)
        if buffered >= run_rows:
            write_run()
    if buffered:
        write_run()
    if not runs:
        return np.zeros(0, dtype=dtype) if dtype is not None else np.zeros(0)
    while len(runs) > 1:
        merged: list[Path] = []
        for i in range(0, len(runs) - 1, 2):
            out = directory / f"run-{next(counter):06d}.npy"
            _merge_two(runs[i], runs[i + 1], out, key, chunk_rows)
            runs[i].unlink()
            runs[i + 1].unlink()
            merged.append(out)
        if len(runs) % 2:
            merged.append(runs[-1])
        runs = merged
    return np.load(runs[0], mmap_mode="r")


def _merge_two(a_path: Path, b_path: Path, out_path: Path, key: str, chunk_rows: int) -> None:
    """Merge two sorted runs into one, holding at most 2 x chunk_rows records in RAM."""
    a_all = np.load(a_path, mmap_mode="r")
    b_all = np.load(b_path, mmap_mode="r")
    out = np.lib.format.open_memmap(
        out_path, mode="w+", dtype=a_all.dtype, shape=(len(a_all) + len(b_all),)
    )
    i = j = o = 0
    while i < len(a_all) and j < len(b_all):
        a = np.array(a_all[i : i + chunk_rows])
        b = np.array(b_all[j : j + chunk_rows])
        # everything <= the smaller of the two chunk maxima is final: no later record can precede it
        bound = min(a[key][-1], b[key][-1])
        na = int(np.searchsorted(a[key], bound, side="right"))
        nb = int(np.searchsorted(b[key], bound, side="right"))
        merged = np.concatenate([a[:na], b[:nb]])
        merged = merged[np.argsort(merged[key], kind="stable")]
        out[o : o + len(merged)] = merged
        i, j, o = i + na, j + nb, o + len(merged)
    for rest, start in ((a_all, i), (b_all, j)):
        for s in range(start, len(rest), chunk_rows):
            part = rest[s : s + chunk_rows]
            out[o : o + len(part)] = part
            o += len(part)
    out.flush()
    del out


def iter_groups(
    keys: np.ndarray, chunk_rows: int = CHUNK_ROWS
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Walk a sorted key column; yield ``(start, keys_chunk, group_end)`` per chunk.

    ``group_end[i]`` is True when row ``start + i`` is the last row of its group of equal keys
    (looking one row past the chunk, so groups spanning chunks end in the right chunk).
    """
    n = len(keys)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        block = np.asarray(keys[start : min(stop + 1, n)])
        cur = block[: stop - start]
        end = np.ones(len(cur), dtype=bool)
        if stop < n:
            end[:] = cur != block[1:]
        else:
            end[:-1] = cur[:-1] != cur[1:]
        yield start, cur, end


def average_ranks(
    keys: np.ndarray, directory: Path, chunk_rows: int = CHUNK_ROWS
) -> Iterator[tuple[int, np.ndarray]]:
    """Average 1-based ranks (scipy ``rankdata(method='average')``) of a sorted key column.

    Yields ``(start, ranks_chunk)``. Pass 1 records where each group ends (on disk); pass 2 gives
    every row its group's mean position, so a group larger than a chunk still shares one rank.
    """
    n = len(keys)
    ends = np.lib.format.open_memmap(directory / "ends.npy", mode="w+", dtype=np.int64, shape=(n,))
    groups = 0
    for start, _, end in iter_groups(keys, chunk_rows):
        idx = start + np.flatnonzero(end)
        ends[groups : groups + len(idx)] = idx
        groups += len(idx)
    group = 0  # index of the group the next row belongs to
    for start, _, end in iter_groups(keys, chunk_rows):
        gid = group + np.concatenate([[0], np.cumsum(end[:-1])])
        hi = ends[gid]
        lo = np.where(gid > 0, ends[np.maximum(gid - 1, 0)] + 1, 0)
        yield start, (lo + hi) / 2.0 + 1.0
        group += int(end.sum())
    del ends
