"""Content-addressed embedding store on diskcache.

Layout: one diskcache `Cache` directory (SQLite in WAL mode). Each embedding is one row of
diskcache's own `Cache` table, so `diskcache.Cache(dir)` still opens and checks it:

- key   = 16-byte BLAKE2b digest of (model fingerprint, text)  (`make_keys`), stored raw;
- value = 8-byte header (magic b"EK", dtype code, 0, dim as uint32) + the vector's raw bytes
          (float32 by default, float16 on request); dim and dtype are checked on every read;
- tag   = the model fingerprint (indexed), which powers `info()` per model and `clear(model=...)`.

Algorithm of the batch API (the layout decides the speed: per-item diskcache.get() manages
~25k reads/s, one batched SELECT ~100k+ rows/s):

1. `get_many(keys)`: sorted, de-duplicated keys -> `SELECT key, value ... WHERE key IN (...)`
   in chunks, inside ONE read transaction (a consistent snapshot) -> one `np.frombuffer` over
   the joined values, headers checked vectorised -> (vectors float32 [n, dim], found mask [n]).
2. `put_many(keys, vectors, model=fp)`: one `BEGIN IMMEDIATE` transaction with
   `INSERT OR IGNORE` (content addressed: an existing key already holds this value). SQLite's
   WAL makes it atomic: a process killed mid-write leaves the store as it was before that call;
   concurrent writers from several processes wait on the write lock (60 s busy timeout, then retry).

Eviction, deliberately: diskcache's defaults (1 GiB size limit, least-recently-stored culling)
would silently drop embeddings. This store uses `eviction_policy="none"` and a size limit of
2**62 bytes, so nothing is ever evicted behind the user's back; free space explicitly with
`clear(model=...)` / `evalkit cache clear`. Reads therefore never write (no access-time updates).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.errors import StoreError

MAGIC = b"EK"
HEADER = 8
DTYPES = {"float32": (b"f", np.dtype("<f4")), "float16": (b"h", np.dtype("<f2"))}
_CODE_TO_DTYPE = {code: name for name, (code, _) in DTYPES.items()}
SIZE_LIMIT = 2**62
KEY_BYTES = 16
_CHUNK = 2000  # keys per SELECT ... IN (...) (SQLite >= 3.32 allows 32766 host parameters)
_RAW = 1  # diskcache MODE_RAW: value column holds the bytes as they are
_INSERT = (
    "INSERT OR IGNORE INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
    " tag, size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, ?, 0, 1, NULL, ?)"
)


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


def header(dtype: str, dim: int) -> bytes:
    return MAGIC + DTYPES[dtype][0] + b"\x00" + struct.pack("<I", dim)


class EmbeddingStore:
    """A directory of embeddings keyed by `make_keys(model_fingerprint, text)`.

    `dtype` is the precision vectors are stored in ("float32" or "float16"); reads always
    return float32. `timeout` is SQLite's busy timeout when another process holds the write lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        dtype: str = "float32",
        timeout: float = 60.0,
        create: bool = True,
    ) -> None:
        import diskcache

        self.directory = Path(
            directory if directory is not None else default_cache_dir()
        ).expanduser()
        self.dtype = _check_dtype(dtype)
        self._np_dtype = DTYPES[self.dtype][1]
        if not create and not (self.directory / "cache.db").exists():
            raise StoreError(f"no embedding store at {self.directory} (no cache.db there)")
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(f"cache path {self.directory} is a file; give a directory")
        try:
            self.cache = diskcache.Cache(
                str(self.directory),
                timeout=timeout,
                eviction_policy="none",
                size_limit=SIZE_LIMIT,
                cull_limit=0,
                tag_index=True,
                statistics=False,
            )
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreError(f"cannot open embedding store {self.directory}: {exc}") from exc

    # -- plumbing ---------------------------------------------------------------------------
    def _transact(self):
        return self.cache._transact(retry=True)

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {
            "directory": str(self.directory),
            "dtype": self.dtype,
            "timeout": self.cache.timeout,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], dtype=state["dtype"], timeout=state["timeout"])

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.directory)!r}, dtype={self.dtype!r})"

    # -- batch API --------------------------------------------------------------------------
    def get_many(
        self, keys: Sequence[bytes], *, dim: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Look up `keys` in one read transaction.

        Returns (vectors float32 [n, dim], found bool [n]); rows not found are zeros. `dim`, when
        given, is checked against what is stored (and sets the shape when nothing is found).
        """
        n = len(keys)
        found = np.zeros(n, dtype=bool)
        if n == 0:
            return np.zeros((0, dim or 0), dtype=np.float32), found
        unique = sorted(set(keys))
        rows: dict[bytes, bytes] = {}
        con = self.cache._con
        own = not con.in_transaction
        if own:
            con.execute("BEGIN")  # one snapshot for all chunks
        try:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT key, value FROM Cache WHERE raw = 1 AND key IN ({marks})"
                rows.update(con.execute(sql, chunk).fetchall())
        finally:
            if own:
                con.execute("COMMIT")
        if not rows:
            return np.zeros((n, dim or 0), dtype=np.float32), found
        values = list(rows.values())
        first = values[0]
        if len(first) < HEADER or first[:2] != MAGIC:
            raise StoreError(
                f"store {self.directory} holds a value that is not an evalkit embedding; run `evalkit cache check`"
            )
        stored_dim = struct.unpack("<I", first[4:8])[0]
        if dim is not None and stored_dim != dim:
            raise StoreError(
                f"store {self.directory}: stored vectors have dim {stored_dim}, expected {dim}"
            )
        dtype_name = _CODE_TO_DTYPE.get(first[2:3])
        if dtype_name != self.dtype:
            raise StoreError(
                f"store {self.directory}: stored vectors are {dtype_name}, this store reads {self.dtype}"
            )
        row_bytes = HEADER + stored_dim * self._np_dtype.itemsize
        blob = b"".join(values)
        if len(blob) != row_bytes * len(values):
            raise StoreError(
                f"store {self.directory}: vectors of different sizes found; run `evalkit cache check`"
            )
        table = np.frombuffer(blob, dtype=np.uint8).reshape(len(values), row_bytes)
        expected = np.frombuffer(header(self.dtype, stored_dim), dtype=np.uint8)
        if not (table[:, :HEADER] == expected).all():
            raise StoreError(
                f"store {self.directory}: vectors of different dtype/dim found; run `evalkit cache check`"
            )
        vecs = table[:, HEADER:].copy().view(self._np_dtype).astype(np.float32, copy=False)
        index = {key: i for i, key in enumerate(rows)}
        out = np.zeros((n, stored_dim), dtype=np.float32)
        pos = [index.get(k, -1) for k in keys]
        pos_arr = np.fromiter(pos, dtype=np.int64, count=n)
        found = pos_arr >= 0
        out[found] = vecs[pos_arr[found]]
        return out, found

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray, *, model: str) -> int:
        """Store `vectors[i]` under `keys[i]` (tagged with fingerprint `model`) in ONE transaction.

        Existing keys are left as they are. Returns the number of keys given.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise StoreError(
                f"put_many: need vectors of shape ({len(keys)}, dim); got {vectors.shape}"
            )
        if not isinstance(model, str) or not model:
            raise StoreError("put_many: model= must be the model fingerprint (a non-empty string)")
        if len(keys) == 0:
            return 0
        data = np.ascontiguousarray(vectors, dtype=self._np_dtype)
        head = header(self.dtype, data.shape[1])
        raw = data.tobytes()
        step = data.shape[1] * self._np_dtype.itemsize
        now = time.time()
        rows = [
            (sqlite3.Binary(key), now, now, model, head + raw[i * step : (i + 1) * step])
            for i, key in enumerate(keys)
        ]
        with self._transact() as (sql, _):
            sql("SELECT 1 FROM Cache LIMIT 0")  # make sure the schema is there
            self.cache._con.executemany(_INSERT, rows)
        return len(keys)

    # -- statistics and maintenance ---------------------------------------------------------
    def count(self, model: str | None = None) -> int:
        """Entries stored (for one model fingerprint when `model` is given)."""
        con = self.cache._con
        if model is None:
            return con.execute("SELECT COUNT(*) FROM Cache").fetchone()[0]
        return con.execute("SELECT COUNT(*) FROM Cache WHERE tag = ?", (model,)).fetchone()[0]

    def has_model(self, model: str) -> bool:
        """True when at least one entry is stored for fingerprint `model` (one index probe)."""
        row = self.cache._con.execute(
            "SELECT 1 FROM Cache WHERE tag = ? LIMIT 1", (model,)
        ).fetchone()
        return row is not None

    def info(self) -> dict:
        """{"directory", "entries", "bytes" (values), "disk_bytes", "models": {fp: {"entries", "bytes", "dim", "dtype"}}}."""
        con = self.cache._con
        models: dict[str, dict] = {}
        for tag, entries, nbytes in con.execute(
            "SELECT tag, COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM Cache GROUP BY tag"
        ):
            head = con.execute(
                "SELECT substr(value, 1, 8) FROM Cache WHERE tag IS ? LIMIT 1", (tag,)
            ).fetchone()[0]
            dim = dtype = None
            if head is not None and len(head) == HEADER and head[:2] == MAGIC:
                dim = struct.unpack("<I", head[4:8])[0]
                dtype = _CODE_TO_DTYPE.get(head[2:3])
            models[str(tag)] = {"entries": entries, "bytes": nbytes, "dim": dim, "dtype": dtype}
        disk = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
        return {
            "directory": str(self.directory),
            "entries": sum(m["entries"] for m in models.values()),
            "bytes": sum(m["bytes"] for m in models.values()),
            "disk_bytes": disk,
            "models": models,
        }

    def clear(self, model: str | None = None) -> int:
        """Delete every entry (or only those of fingerprint `model`); returns how many."""
        with self._transact() as (sql, _):
            if model is None:
                removed = sql("DELETE FROM Cache").rowcount
            else:
                removed = sql("DELETE FROM Cache WHERE tag = ?", (model,)).rowcount
        if model is None:
            self.cache._con.execute("VACUUM")
        return removed

    def check(self, fix: bool = False) -> list[str]:
        """Consistency check: SQLite integrity and diskcache's own counters/files, then every
        row's key length, header, dtype and value length. `fix=True` deletes bad rows and
        repairs counters. Returns the problems found (an empty list means healthy)."""
        import warnings

        problems: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problems += [str(w.message) for w in self.cache.check(fix=fix, retry=True)]
        bad: list[int] = []
        con = self.cache._con
        for rowid, key, raw, tag, value in con.execute(
            "SELECT rowid, key, raw, tag, value FROM Cache"
        ):
            why = None
            if raw != 1 or not isinstance(key, bytes) or len(key) != KEY_BYTES:
                why = "key is not a 16-byte digest"
            elif not isinstance(value, bytes) or len(value) < HEADER or value[:2] != MAGIC:
                why = "value is not an evalkit embedding"
            elif value[2:3] not in _CODE_TO_DTYPE:
                why = f"unknown dtype code {value[2:3]!r}"
            else:
                dim = struct.unpack("<I", value[4:8])[0]
                itemsize = DTYPES[_CODE_TO_DTYPE[value[2:3]]][1].itemsize
                if len(value) != HEADER + dim * itemsize:
                    why = f"value length {len(value)} does not match dim {dim}"
                elif not tag:
                    why = "no model fingerprint tag"
            if why:
                problems.append(f"row {rowid}: {why}")
                bad.append(rowid)
        if fix and bad:
            with self._transact() as (sql, _):
                for start in range(0, len(bad), _CHUNK):
                    chunk = bad[start : start + _CHUNK]
                    sql(f"DELETE FROM Cache WHERE rowid IN ({','.join('?' * len(chunk))})", chunk)
        return problems
