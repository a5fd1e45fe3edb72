"""Content-addressed embedding store on diskcache (store format 2: checksummed segments).

Layout: one diskcache `Cache` directory. Vectors live in immutable *segment* files under
`segments/` (`evalkit.embed._segments`: sorted keys, a compact 8-byte key index, and records of
key | vector | xxh3-64 checksum); diskcache's SQLite table (`cache.db`, WAL mode) is the
catalogue (`evalkit.embed._catalog`): one row per segment, as a diskcache file value, so plain
`diskcache.Cache(dir)` still opens, reads and checks the directory.

- key   = BLAKE2b-128 of (model fingerprint, text) (`make_keys`);
- every read verifies each row's checksum over key | vector: a row that fails is a miss (the
  encoder re-encodes it, and the write that follows rewrites the damaged segment without it),
  logged once per segment; a damaged segment header makes the whole segment a miss;
- format-1 rows (one vector per row, no checksum) are never served: they are misses.

Algorithm:

1. `get_many(keys)`: sort the keys' 8-byte prefixes; list the segments (one indexed SELECT);
   for each segment, oldest first, `np.searchsorted` the keys still missing, gather their
   records with one `np.take` from the memory-mapped file, verify them, and copy the vectors
   out -> (vectors float32 [n, dim], found mask [n]); with `dim` given, the keys are cut into
   one part per CPU (`READ_PART_KEYS` at least), each looked up on a thread of its own.
2. `put_many(keys, vectors, model=fp)`: refuse non-finite vectors; take the write lock
   (`BEGIN IMMEDIATE`, bounded wait); drop keys that already have a verified row; write the
   rest as one new segment (exclusive create, fsync) and add its catalogue row; COMMIT. A
   process killed before COMMIT leaves the store as it was (plus an unreferenced file that the
   next write removes); concurrent writers queue on the lock.
3. compaction, after each write, one transaction per merge: `plan_merge` (size-tiered, fanout
   4, at most 2 GiB per merged segment) picks same-tier segments of the model; their verified
   rows are merged into one new segment (oldest copy of a key wins) and the inputs are deleted
   after COMMIT (readers that still map them keep reading them). So a store keeps O(log n)
   segments per model and a lookup stays a handful of `searchsorted` calls.

Nothing is evicted (diskcache's culling is off: `eviction_policy="none"`); free space with
`clear(model=...)` / `evalkit cache clear`. A read-only directory is opened read-only: reads are
served, writes raise "store is read-only". Network and FUSE filesystems are refused
(`evalkit.embed._mounts`) unless `allow_network_fs=True` or $EVALKIT_STORE_ALLOW_NETWORK_FS=1.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._threads import parallel, row_parts
from evalkit.embed import _catalog as cat
from evalkit.embed._maintenance import wipe  # noqa: F401 - `evalkit cache clear` on a damaged store
from evalkit.embed._mounts import refuse_network_fs
from evalkit.embed._segments import (
    CODES,
    DTYPE_OF,
    KEY_BYTES,
    Segment,
    SegmentError,
    huge_pages_fit,
    key_matrix,
    parse_header,
    prefixes,
    write_segment,
)
from evalkit.errors import StoreError

DTYPES = {name: (code, DTYPE_OF[code]) for name, code in CODES.items()}
SIZE_LIMIT = 2**62
FORMAT = 2
READ_PART_KEYS = 1024  # batch reads cut into parts of at least this many keys, one per CPU
SEGMENT_DIR = cat.SEGMENT_DIR
logger = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()  # (directory, segment) already reported in this process


def default_cache_dir() -> Path:
    """$EVALKIT_CACHE if set, else ./cache (relative to the working directory)."""
    env = os.environ.get("EVALKIT_CACHE")
    return Path(env).expanduser() if env else Path("cache")


def open_store(cache: Any, dtype: str | None = None) -> EmbeddingStore | None:
    """The jobs' `cache` argument -> a store: False = none, None = the default store
    (`$EVALKIT_CACHE` or ./cache), a folder, or an EmbeddingStore as it is."""
    if cache is False:
        return None
    if isinstance(cache, EmbeddingStore):
        return cache
    return EmbeddingStore(cache, dtype=dtype or "float32")


def _check_dtype(dtype: Any) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise StoreError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return name


def make_keys(fingerprint: str, texts: Iterable[str]) -> list[bytes]:
    """Store keys: BLAKE2b-128 of the model fingerprint, a separator and the UTF-8 text."""
    base = hashlib.blake2b(digest_size=KEY_BYTES)
    base.update(fingerprint.encode() + b"\x00")
    keys = []
    for text in texts:
        h = base.copy()
        h.update(text.encode("utf-8", "surrogatepass"))
        keys.append(h.digest())
    return keys


class EmbeddingStore:
    """A directory of embeddings keyed by `make_keys(model_fingerprint, text)`.

    `dtype` is the precision vectors are stored in ("float32" or "float16"); reads always return
    float32. `timeout`: the longest wait (s) for another process's write lock before a
    StoreError. `allow_network_fs`: open a store on NFS/SMB/FUSE anyway (default: refuse, unless
    $EVALKIT_STORE_ALLOW_NETWORK_FS=1).
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        dtype: str = "float32",
        timeout: float = 60.0,
        create: bool = True,
        allow_network_fs: bool | None = None,
    ) -> None:
        self.directory = Path(
            directory if directory is not None else default_cache_dir()
        ).expanduser()
        self.dtype = _check_dtype(dtype)
        self._np_dtype = DTYPES[self.dtype][1]
        self.timeout, self._allow_network_fs = float(timeout), allow_network_fs
        self._cache: Any = None  # the diskcache.Cache, opened on the first write
        self._local = threading.local()
        self._segments_open: dict[str, tuple[str, Segment]] = {}  # filename -> (tag, map)
        self._lock = threading.Lock()
        db = self.directory / "cache.db"
        if not create and not db.exists():
            raise StoreError(f"no embedding store at {self.directory} (no cache.db there)")
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(f"cache path {self.directory} is a file; give a directory")
        refuse_network_fs(self.directory, allow_network_fs)
        self.readonly = db.exists() and not (
            os.access(self.directory, os.W_OK) and os.access(db, os.W_OK)
        )
        if not db.exists():
            self.cache  # noqa: B018 - creates the directory and diskcache's tables
        with cat.sqlite_errors(self.directory):  # a readable diskcache directory?
            try:
                self._con.execute("SELECT COUNT(*) FROM Settings").fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc) or self.readonly:
                    raise
                self.cache  # noqa: B018 - a cache.db still being created: diskcache finishes it

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def cache(self) -> Any:
        """The directory's diskcache.Cache, opened on first use (opening writes its settings,
        so readers never open it)."""
        if self._cache is None:
            import diskcache

            self.require_writable()
            try:
                self._cache = diskcache.Cache(
                    str(self.directory),
                    timeout=self.timeout,
                    eviction_policy="none",
                    size_limit=SIZE_LIMIT,
                    cull_limit=0,
                    tag_index=True,
                    statistics=False,
                )
            except sqlite3.Error as exc:
                raise cat.translate(self.directory, exc) from exc
            except OSError as exc:
                raise StoreError(f"cannot open embedding store {self.directory}: {exc}") from exc
            except (AttributeError, TypeError, ValueError, KeyError) as exc:  # damaged Settings
                raise cat.damaged(self.directory, f"unreadable settings: {exc!r}") from exc
        return self._cache

    @property
    def _con(self) -> sqlite3.Connection:
        """This thread's reading connection (read-only when the directory is not writable)."""
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            path = (self.directory / "cache.db").resolve()
            if not self.readonly:
                con = sqlite3.connect(str(path), timeout=self.timeout, isolation_level=None)
            else:
                try:
                    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=self.timeout)
                    con.execute("SELECT 1 FROM Settings LIMIT 1")
                except sqlite3.OperationalError:  # WAL without -shm in a read-only directory
                    con = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
                con.isolation_level = None
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def require_writable(self) -> None:
        """StoreError "store is read-only" unless this store can take writes."""
        if self.readonly:
            raise StoreError(
                f"store is read-only ({self.directory}: reads are served, new vectors cannot be "
                f"saved); use --no-cache, or a writable --cache DIR"
            )

    def _transaction(self):
        """A write transaction (bounded wait for the lock) on this thread's diskcache connection."""
        return cat.transaction(self.cache._con, self.directory)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
        with self._lock:
            self._segments_open.clear()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {
            "directory": str(self.directory),
            "dtype": self.dtype,
            "timeout": self.timeout,
            "allow_network_fs": self._allow_network_fs,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            state["directory"],
            dtype=state["dtype"],
            timeout=state["timeout"],
            allow_network_fs=state.get("allow_network_fs"),
        )

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.directory)!r}, dtype={self.dtype!r})"

    # -- segments ---------------------------------------------------------------------------
    def _warn_once(self, name: str, message: str) -> None:
        if (str(self.directory), name) not in _WARNED:
            _WARNED.add((str(self.directory), name))
            logger.warning(
                "embedding store %s: %s; served as misses (re-encoded). "
                "Run `evalkit cache check --fix --cache %s`",
                self.directory,
                message,
                self.directory,
            )

    def _segments(self, model: str | None, con: sqlite3.Connection | None = None) -> list[Segment]:
        """The model's (or every) segment, oldest first, opened and memory-mapped. Maps of
        segments merged away are dropped (their disk space is freed once nothing uses them)."""
        for _attempt in range(3):
            with cat.sqlite_errors(self.directory):
                rows = cat.segment_rows(con or self._con, model)
            out, opened, vanished = [], [], False
            for row in rows:
                tag, seg = self._segments_open.get(row.filename, (None, None))
                if seg is None or seg.header != row.header:
                    try:
                        seg = Segment(self.directory / row.filename, row.header)
                    except FileNotFoundError:
                        vanished = True  # merged away since the SELECT: list again
                        continue
                    except SegmentError as exc:
                        self._warn_once(row.filename, f"segment {row.filename}: {exc}")
                        continue
                    with self._lock:
                        self._segments_open[row.filename] = (row.tag, seg)
                    opened.append(seg)
                out.append(seg)
            if opened and huge_pages_fit(sum(s.file_size for s in out)):
                for seg in opened:
                    seg.hint_huge_pages()
            if not vanished:
                break
        else:
            self._warn_once("missing", "a segment listed in the catalogue has no file")
        live = {row.filename for row in rows}
        with self._lock:
            for name, (tag, _) in list(self._segments_open.items()):
                if name not in live and (model is None or tag == model):
                    del self._segments_open[name]
        return out

    def _find(
        self, segments: list[Segment], kmat: np.ndarray, on_hit: Any = None
    ) -> tuple[np.ndarray, list[Segment]]:
        """Verified lookup of keys `kmat` (uint8 [n, 16]) in `segments` (the first verified copy
        wins). Calls `on_hit(segment, query indices, rows)`; returns (found mask, segments in
        which a candidate row failed verification)."""
        n = len(kmat)
        pre = prefixes(kmat)
        order = np.argsort(pre, kind="stable")
        spre, skeys = pre[order], kmat[order]
        found = np.zeros(n, dtype=bool)
        left = np.arange(n)
        damaged = []
        for seg in segments:
            if not len(left):
                break
            everything = len(left) == n  # no copy of the queries for the first segment
            q_pre, q_keys = (spre, skeys) if everything else (spre[left], skeys[left])
            idx, rows, hit, bad = seg.find(q_pre, q_keys)
            if bad:
                damaged.append(seg)
                self._warn_once(seg.path.name, f"{bad} row(s) of segment {seg.path.name} fail "
                                "their checksum")  # fmt: skip
            if len(idx):
                dst = order[left[idx]]
                found[dst] = True
                if on_hit is not None:
                    on_hit(seg, dst, rows)
                left = left[~hit]
        return found, damaged

    # -- batch API --------------------------------------------------------------------------
    def get_many(
        self, keys: Sequence[bytes], *, dim: int | None = None, model: str | None = None, out=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Look up `keys`; every row served has passed its checksum.

        Returns (vectors float32 [n, dim], found bool [n]); rows not found are zeros. `dim`, when
        given, is checked against what is stored (and sets the shape when nothing is found).
        `model` (the fingerprint the keys were made with) limits the search to its segments.
        `out` (float32 [n, dim], `dim` given): filled and returned instead of a new array.
        """
        n = len(keys)
        if out is not None and (dim is None or out.shape != (n, dim) or out.dtype != np.float32):
            raise StoreError(f"get_many: out must be float32 of shape ({n}, dim) with dim given")
        if n == 0:
            return np.zeros((0, dim or 0), dtype=np.float32), np.zeros(0, dtype=bool)
        kmat = self._key_matrix(keys)
        into: list[np.ndarray] = [] if out is None else [out]

        def take(seg: Segment, dst: np.ndarray, rows: np.ndarray) -> None:
            if seg.dtype != self.dtype:
                raise StoreError(
                    f"store {self.directory}: stored vectors are {seg.dtype}, this store reads "
                    f"{self.dtype}"
                )
            if dim is not None and seg.dim != dim:
                raise StoreError(
                    f"store {self.directory}: stored vectors have dim {seg.dim}, expected {dim}"
                )
            if not into:  # rows not found are zeroed at the end
                into.append(np.empty((n, seg.dim), dtype=np.float32))
            elif into[0].shape[1] != seg.dim:
                raise StoreError(f"store {self.directory}: vectors of different sizes found")
            into[0][dst] = seg.vectors(rows)

        segments = self._segments(model)  # listed once: the parts below only read them
        spans = row_parts(n, min_rows=READ_PART_KEYS) if dim is not None else [(0, n)]
        if len(spans) > 1 and not into:
            into.append(np.empty((n, dim), dtype=np.float32))
        found = np.zeros(n, dtype=bool)

        def part(a: int, b: int) -> None:  # keys [a, b), on a thread of its own (numpy: no GIL)
            found[a:b] = self._find(segments, kmat[a:b], lambda g, d, r: take(g, d + a, r))[0]

        parallel(part, spans)
        if not into:
            return np.zeros((n, dim or 0), dtype=np.float32), found
        if not found.all():
            into[0][~found] = 0.0
        return into[0], found

    def _key_matrix(self, keys: Sequence[bytes]) -> np.ndarray:
        try:
            return key_matrix(keys)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"store {self.directory}: {exc}") from exc

    def put_many(
        self, keys: Sequence[bytes], vectors: np.ndarray, *, model: str, meta: dict | None = None
    ) -> int:
        """Store `vectors[i]` under `keys[i]` (tagged with fingerprint `model`) in ONE transaction.

        Keys that already have a verified row are left as they are. Non-finite vectors are
        refused (StoreError) and nothing is written. `meta` (JSON-able: library versions, device)
        is recorded for `model` on its first write. Returns the number of keys given."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise StoreError(
                f"put_many: need vectors of shape ({len(keys)}, dim); got {vectors.shape}"
            )
        if not isinstance(model, str) or not model:
            raise StoreError("put_many: model= must be the model fingerprint (a non-empty string)")
        if len(keys) == 0:
            return 0
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is refused below
            data = np.asarray(vectors, dtype=self._np_dtype)
        bad = ~np.isfinite(data).all(axis=1)
        if bad.any():
            raise StoreError(
                f"refusing to store {int(bad.sum())} non-finite vector(s) (NaN/inf in {self.dtype}, "
                f"first at row {int(np.argmax(bad))}); nothing was written"
            )
        self.require_writable()
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        pick = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        kmat, data = self._key_matrix(list(first)), data[pick]
        with cat.sqlite_errors(self.directory), self._transaction() as txn:
            segs = self._segments(model, txn.con)
            for seg in segs:
                if (seg.dtype, seg.dim) != (self.dtype, data.shape[1]):
                    raise StoreError(
                        f"store {self.directory} holds {seg.dtype} vectors of dim {seg.dim} for "
                        f"this model; got {self.dtype} of dim {data.shape[1]}"
                    )
            have, damaged = self._find(segs, kmat)
            if not have.all():
                self._add_segment(txn, model, kmat[~have], data[~have])
            if meta is not None:
                cat.put_meta(txn.con, model, meta)
        self._compact(model, repair={f"{SEGMENT_DIR}/{seg.path.name}" for seg in damaged})
        return len(keys)

    def _add_segment(self, txn: cat.Transaction, model: str, kmat, data) -> None:
        name = f"{SEGMENT_DIR}/{uuid.uuid4().hex}.eks"
        path = self.directory / name
        try:
            size = write_segment(path, kmat, data, self.dtype, model)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        seg = Segment(path)
        cat.insert_segment(txn.con, cat.SEG + uuid.uuid4().bytes, model, name, size, seg.header)

    def _compact(self, model: str, repair: set[str] = frozenset()) -> None:
        """Compaction after a committed write; a lock held elsewhere for longer than the timeout
        only postpones it to the next write (the vectors are stored already)."""
        from evalkit.embed._maintenance import compact

        try:
            with cat.sqlite_errors(self.directory):
                compact(self, model, set(repair))
        except cat.StoreLockedError as exc:
            logger.debug("compaction of %s postponed: %s", self.directory, exc)

    # -- statistics and maintenance ---------------------------------------------------------
    def _headers(self, model: str | None = None) -> list[tuple[cat.SegmentRow, tuple | None]]:
        with cat.sqlite_errors(self.directory):
            rows = cat.segment_rows(self._con, model)
        out = []
        for row in rows:
            try:
                out.append((row, parse_header(row.header)))
            except SegmentError:
                out.append((row, None))
        return out

    def count(self, model: str | None = None) -> int:
        """Entries stored in segments (for one model fingerprint when `model` is given)."""
        return sum(h[2] for _, h in self._headers(model) if h is not None)

    def has_model(self, model: str) -> bool:
        """True when at least one segment is stored for fingerprint `model` (one index probe)."""
        return bool(self._headers(model))

    def info(self) -> dict:
        from evalkit.embed._maintenance import store_info

        with cat.sqlite_errors(self.directory):
            return store_info(self)

    def clear(self, model: str | None = None) -> int:
        """Delete every entry (or only those of fingerprint `model`); returns how many vectors."""
        from evalkit.embed._maintenance import clear

        with cat.sqlite_errors(self.directory):
            return clear(self, model)

    def check(self, fix: bool = False) -> list[str]:
        """Consistency check: SQLite integrity and diskcache's counters/files, then every
        segment's header, key index and row checksums, format-1 rows and unknown rows.
        `fix=True` rewrites damaged segments without their bad rows and deletes what cannot be
        served. Returns the problems found (an empty list means healthy)."""
        from evalkit.embed._maintenance import check

        with cat.sqlite_errors(self.directory):
            return check(self, fix)
