"""Segment files: the embedding store's vectors, immutable, sorted by key, every row checksummed.

A segment holds the vectors of one model fingerprint, one dtype and one dim (store format 2):

    header   64 bytes: magic b"EKSEG\\0\\0\\0", format u32 (2), dtype code (b"f" float32 /
             b"h" float16), dim u32, count u64, BLAKE2b-128 of the model fingerprint, and an
             xxh3-64 of the header's first 56 bytes
    index    count x uint64: the first 8 bytes of each key (big-endian, so numeric order is key
             order), ascending - the compact key index `np.searchsorted` runs over
    records  count x (key 16 B | vector dim x itemsize B | xxh3-64(key | vector) 8 B), in key order

Algorithm of a batch lookup (`Segment.find`):

1. `np.searchsorted(index, query_prefixes)` over the sorted query prefixes -> candidate rows;
   a candidate whose prefix differs is a miss;
2. gather the candidate records with one `np.take` (records as fixed-size void items);
3. verify: the record's 16 key bytes equal the query key (vectorised compare) and its xxh3-64
   over key | vector equals the stored one (one C call per row); a row that fails either is
   reported as bad, never as found; a prefix shared by two keys is resolved row by row;
4. return the verified rows' positions and vectors (as stored; the caller casts to float32).

`write_segment` writes a new file (exclusive create, fsync) from sorted unique keys and
vectors; `merge_rows` turns several segments into the rows of one (oldest copy of a key wins,
rows that fail verification dropped) and `write_rows` streams them out in bounded chunks.
`plan_merge` is the size-tiered compaction policy, a pure function.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

MAGIC = b"EKSEG\x00\x00\x00"
FORMAT = 2
HEADER_BYTES = 64
KEY_BYTES = 16
SUM_BYTES = 8
CODES = {"float32": b"f", "float16": b"h"}
DTYPE_OF = {b"f": np.dtype("<f4"), b"h": np.dtype("<f2")}
NAME_OF = {b"f": "float32", b"h": "float16"}
_HEAD = struct.Struct("<8sI1s3xII Q16s")  # magic, format, code, dim, reserved, count, fp digest
_COPY_ROWS = 16384  # rows per chunk when writing merged segments (bounded memory)
HUGE_PAGE = 2 << 20  # bytes of a PMD-sized page cache folio (x86-64, arm64 with 4 KiB pages)


class SegmentError(Exception):
    """A segment file cannot be used (damaged header, wrong size, missing)."""


def fp_digest(fingerprint: str) -> bytes:
    return hashlib.blake2b(fingerprint.encode(), digest_size=16).digest()


def checksums(rows: np.ndarray, row_bytes: int) -> np.ndarray:
    """xxh3-64 of each record's key | vector bytes. `rows`: C-contiguous records, one per row."""
    import xxhash

    flat = memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))
    span = row_bytes - SUM_BYTES
    digest = xxhash.xxh3_64_intdigest
    total = len(flat)
    return np.fromiter(
        [digest(flat[o : o + span]) for o in range(0, total, row_bytes)],
        dtype=np.uint64,
        count=total // row_bytes,
    )


def make_header(dtype: str, dim: int, count: int, fingerprint: str) -> bytes:
    import xxhash

    body = _HEAD.pack(MAGIC, FORMAT, CODES[dtype], dim, 0, count, fp_digest(fingerprint))
    body += bytes(56 - len(body))
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def parse_header(head: bytes) -> tuple[str, int, int, bytes]:
    """(dtype name, dim, count, fingerprint digest); SegmentError when the header is damaged."""
    import xxhash

    if len(head) != HEADER_BYTES:
        raise SegmentError(f"header is {len(head)} bytes, not {HEADER_BYTES}")
    if struct.unpack("<Q", head[56:])[0] != xxhash.xxh3_64_intdigest(head[:56]):
        raise SegmentError("header checksum mismatch")
    magic, fmt, code, dim, _, count, digest = _HEAD.unpack(head[: _HEAD.size])
    if magic != MAGIC or fmt != FORMAT or code not in DTYPE_OF or dim <= 0:
        raise SegmentError(f"not a format-{FORMAT} segment header")
    return NAME_OF[code], dim, count, digest


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_bytes(limits: Sequence[str] = CGROUP_LIMITS) -> int | None:
    """The memory this process may fill: physical memory, or its container's cgroup limit (v2,
    else v1) when lower - the page cache is charged to the cgroup. None when unknown."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf names
        return None
    for path in limits:
        try:
            with open(path, encoding="ascii") as fh:
                text = fh.read().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit():  # "max" (v2) or a huge number (v1) when unlimited
            memory = min(memory, int(text))
    return memory


def huge_pages_fit(total_bytes: int) -> bool:
    """Whether segments of `total_bytes` in all fit in half the memory this process may fill:
    then a 2 MiB read-around per fault is read once and stays cached; a store larger than that,
    read at random, would read (and evict) 2 MiB per vector fetched."""
    memory = memory_bytes()
    return memory is not None and 0 < total_bytes <= memory // 2


def row_bytes(dtype: str, dim: int) -> int:
    return KEY_BYTES + dim * DTYPE_OF[CODES[dtype]].itemsize + SUM_BYTES


def file_bytes(dtype: str, dim: int, count: int) -> int:
    return HEADER_BYTES + count * (8 + row_bytes(dtype, dim))


def key_matrix(keys: Sequence[bytes]) -> np.ndarray:
    """Keys (16-byte digests) -> uint8 [n, 16]."""
    joined = b"".join(keys)
    sizes = set(map(len, keys))
    if sizes and sizes != {KEY_BYTES}:
        raise ValueError(f"store keys must be {KEY_BYTES}-byte digests (see make_keys)")
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(keys), KEY_BYTES)


def prefixes(keys: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] keys -> native uint64 of their first 8 bytes read big-endian."""
    return np.ascontiguousarray(keys[:, :8]).view(">u8")[:, 0].astype(np.uint64)


class Segment:
    """One segment file, memory-mapped read-only (immutable: safe to share between threads)."""

    def __init__(self, path: str | os.PathLike, expect_header: bytes | None = None) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(HEADER_BYTES)
                size = os.fstat(fh.fileno()).st_size
                self.dtype, self.dim, self.count, self.digest = parse_header(head)
                if expect_header is not None and bytes(expect_header) != head:
                    raise SegmentError("header differs from the store's catalogue")
                if size != file_bytes(self.dtype, self.dim, self.count):
                    raise SegmentError(f"file is {size} bytes; its header says otherwise")
                self._map = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise SegmentError(str(exc)) from exc
        self.header = head
        self.row_bytes = row_bytes(self.dtype, self.dim)
        self.np_dtype = DTYPE_OF[CODES[self.dtype]]
        n = self.count
        self.index = np.frombuffer(self._map, dtype="<u8", count=n, offset=HEADER_BYTES)
        self.records = np.frombuffer(
            self._map, dtype=f"V{self.row_bytes}", count=n, offset=HEADER_BYTES + 8 * n
        )

    @property
    def file_size(self) -> int:
        return len(self._map)

    def hint_huge_pages(self) -> bool:
        """Ask Linux to bring this file's pages into the page cache in 2 MiB folios when a read
        faults them in (`MADV_HUGEPAGE`), which it then maps with one TLB entry each instead of
        512: random reads of a 1M-entry store run ~2x faster (docs/design.md). Pages already
        cached keep their folios. Returns whether the kernel took the hint."""
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is None or self.file_size < HUGE_PAGE:
            return False
        try:
            self._map.madvise(advice)
        except (OSError, ValueError):  # no THP support, or a kernel refusing it for files
            return False
        return True

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Records at `positions` as uint8 [k, row_bytes] (one contiguous copy)."""
        return np.take(self.records, positions).view(np.uint8).reshape(-1, self.row_bytes)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The vector part of `rows` (uint8 records) as the stored dtype [k, dim] (a view)."""
        end = KEY_BYTES + self.dim * self.np_dtype.itemsize
        return rows[:, KEY_BYTES:end].view(self.np_dtype)

    def verify(self, rows: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """Which `rows` pass: stored checksum == xxh3-64(key | vector), and (if given) their key
        bytes equal `keys` (uint8 [k, 16])."""
        ok = checksums(rows, self.row_bytes) == rows[:, -SUM_BYTES:].view("<u8")[:, 0]
        if keys is not None:
            ok &= (rows[:, :KEY_BYTES].view("<u8") == keys.view("<u8")).all(axis=1)
        return ok

    def find(
        self, prefix: np.ndarray, keys: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Look up sorted query `prefix` (uint64 [k]) with full `keys` (uint8 [k, 16]).

        Returns (which queries were found (indices into the query), their rows (uint8 records),
        the found mask [k], the number of queries whose candidate row failed verification)."""
        k = len(prefix)
        found = np.zeros(k, dtype=bool)
        if self.count == 0 or k == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.row_bytes), np.uint8), found, 0
        pos = np.searchsorted(self.index, prefix)
        np.minimum(pos, self.count - 1, out=pos)
        cand = np.flatnonzero(self.index[pos] == prefix)
        rows = self.rows(pos[cand])
        good = self.verify(rows, keys[cand])
        bad = 0
        if not good.all():  # rare: damaged rows, or two keys sharing an 8-byte prefix
            for j in np.flatnonzero(~good):
                row = self._scan(int(pos[cand[j]]), int(prefix[cand[j]]), keys[cand[j]])
                if row is None:
                    bad += 1
                else:
                    rows[j], good[j] = row, True
        if not good.all():
            cand, rows = cand[good], rows[good]
        found[cand] = True
        return cand, rows, found, bad

    def _scan(self, start: int, prefix: int, key: np.ndarray) -> np.ndarray | None:
        """The verified record of `key` among the rows from `start` sharing its prefix."""
        i = start
        while i < self.count and int(self.index[i]) == prefix:
            row = self.rows(np.array([i]))
            if self.verify(row, key[None, :])[0]:
                return row[0]
            i += 1
        return None

    def bad_rows(self, chunk: int = _COPY_ROWS) -> tuple[np.ndarray, bool]:
        """(positions of rows failing their checksum, whether the key index is consistent)."""
        bad, index_ok = [], bool(np.all(self.index[1:] >= self.index[:-1]))
        for start in range(0, self.count, chunk):
            stop = min(self.count, start + chunk)
            rows = self.rows(np.arange(start, stop))
            bad.append(start + np.flatnonzero(~self.verify(rows)))
            index_ok &= bool((prefixes(rows[:, :KEY_BYTES]) == self.index[start:stop]).all())
        return (np.concatenate(bad) if bad else np.zeros(0, np.int64)), index_ok


def write_segment(
    path: Path, keys: np.ndarray, vectors: np.ndarray, dtype: str, fingerprint: str
) -> int:
    """A new segment at `path` from unique `keys` (uint8 [n, 16]) and their `vectors` (any order);
    returns the file size. Rows are sorted by key; the file is created exclusively and fsynced."""
    order = np.lexsort((prefixes(keys[:, 8:]), prefixes(keys)))
    data = np.ascontiguousarray(vectors, dtype=DTYPE_OF[CODES[dtype]])
    n, dim = data.shape
    width = row_bytes(dtype, dim)
    rows = np.empty((n, width), dtype=np.uint8)
    rows[:, :KEY_BYTES] = keys[order]
    rows[:, KEY_BYTES:-SUM_BYTES] = data[order].view(np.uint8).reshape(n, -1)
    rows[:, -SUM_BYTES:] = checksums(rows, width).astype("<u8").view(np.uint8).reshape(n, 8)
    return write_rows(path, [rows], n, dtype, dim, fingerprint)


def write_rows(
    path: Path, chunks: Iterable[np.ndarray], count: int, dtype: str, dim: int, fingerprint: str
) -> int:
    """Write `count` verified, key-sorted records, given as chunks (uint8 [k, row_bytes] each), as
    a new segment at `path` (exclusive create, fsync); returns the file size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as fh:
        fh.write(make_header(dtype, dim, count, fingerprint))
        index_at, records_at = HEADER_BYTES, HEADER_BYTES + 8 * count
        written = 0
        for rows in chunks:
            written += len(rows)
            fh.seek(index_at)
            fh.write(prefixes(rows[:, :KEY_BYTES]).astype("<u8").tobytes())
            index_at = fh.tell()
            fh.seek(records_at)
            fh.write(rows.tobytes())
            records_at = fh.tell()
        if written != count:
            raise ValueError(f"segment writer got {written} rows, expected {count}")
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


class MergedRows:
    """The rows of several segments as one sorted, de-duplicated, verified stream: `count` rows,
    iterated in chunks by `chunks()`; `dropped` rows failed verification and are left out."""

    def __init__(self, segments: Sequence[Segment], chunk: int = _COPY_ROWS) -> None:
        self.segments, self.chunk = list(segments), chunk
        his, los, src, pos = [], [], [], []
        self.dropped = 0
        for s, seg in enumerate(self.segments):
            for start in range(0, seg.count, chunk):
                at = np.arange(start, min(seg.count, start + chunk))
                rows = seg.rows(at)
                ok = seg.verify(rows)
                self.dropped += int((~ok).sum())
                his.append(prefixes(rows[ok, :KEY_BYTES]))
                los.append(prefixes(rows[ok, 8:KEY_BYTES]))
                src.append(np.full(int(ok.sum()), s, dtype=np.int32))
                pos.append(at[ok])
        cat = lambda a, t: np.concatenate(a) if a else np.zeros(0, t)  # noqa: E731
        hi, lo = cat(his, np.uint64), cat(los, np.uint64)
        src_all, pos_all = cat(src, np.int32), cat(pos, np.int64)
        order = np.lexsort((src_all, lo, hi))  # key order; the oldest segment first within a key
        hi, lo = hi[order], lo[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        self.src, self.pos = src_all[order][first], pos_all[order][first]
        self.count = int(first.sum())

    def chunks(self) -> Iterator[np.ndarray]:
        width = self.segments[0].row_bytes if self.segments else 0
        for start in range(0, self.count, self.chunk):
            src, pos = self.src[start : start + self.chunk], self.pos[start : start + self.chunk]
            out = np.empty((len(src), width), dtype=np.uint8)
            for s in np.unique(src):
                sel = src == s
                out[sel] = self.segments[s].rows(pos[sel])
            yield out


def plan_merge(
    sizes: Sequence[int], *, fanout: int = 4, base: int = 1 << 22, limit: int = 1 << 31
) -> list[int]:
    """Size-tiered compaction: which segments (indices into `sizes`, bytes, oldest first) to merge
    now, or [] for none. A segment's tier is floor(log_fanout(bytes / base)); the lowest tier
    holding `fanout` segments is merged (its oldest `fanout`). Segments over limit / fanout are
    final, so no merge writes more than `limit` bytes. Keeps O(fanout * log(total)) segments."""
    tiers: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        if size > limit // fanout:
            continue
        tier, cap = 0, base
        while size >= cap:
            tier, cap = tier + 1, cap * fanout
        tiers.setdefault(tier, []).append(i)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= fanout:
            return tiers[tier][:fanout]
    return []
