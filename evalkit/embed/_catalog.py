"""The store's catalogue: the rows of diskcache's own `Cache` table (in `cache.db`), read and
written with plain SQL inside the store's transactions.

Row kinds, told apart by key (all `raw = 1`, so plain `diskcache.Cache(dir)` reads every row):

- segment:  key b"EKS2:" + 16 random bytes, `mode` 2 (a diskcache file value), `filename` the
            segment file (relative), `size` its bytes, `value` a copy of its 64-byte header,
            `tag` the model fingerprint;
- model:    key b"EKM2:" + BLAKE2b-128(fingerprint), `mode` 1, `value` JSON: library versions and
            device of the first write of that fingerprint, `tag` the fingerprint;
- format 1: 16-byte keys with the vector in `value` (stores written before checksums); never
            served, counted by `info()` and removed by `check(fix=True)` / `clear()`.

1. `segment_rows` lists segments (oldest first) by a key-range scan of diskcache's key index;
2. `transaction` takes SQLite's write lock with `BEGIN IMMEDIATE`, waiting at most the
   connection's busy timeout (one attempt: never an endless retry), and runs the file deletions
   queued by the body only after COMMIT;
3. `sqlite_errors` turns sqlite3 errors into one-line StoreErrors that say what to do.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evalkit.errors import StoreError

SEGMENT_DIR = "segments"  # segment files, relative to the store directory
SEG = b"EKS2:"
META = b"EKM2:"
MODE_RAW, MODE_BINARY = 1, 2
_SCAN = " NOT INDEXED"  # maintenance reads: the table itself, never a (possibly damaged) index
_INSERT = (
    "INSERT OR IGNORE INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
    " tag, size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, ?, ?, ?, ?, ?)"
)


class StoreLockedError(StoreError):
    """Another process held the write lock for longer than the store's timeout."""


class DamagedStoreError(StoreError):
    """The store's database cannot be read as it is (`why` says how)."""

    why = ""


def _range(prefix: bytes) -> tuple[bytes, bytes]:
    return prefix, prefix[:-1] + bytes([prefix[-1] + 1])


@dataclass
class SegmentRow:
    rowid: int
    key: bytes
    tag: str
    filename: str
    size: int
    header: bytes


def segment_rows(
    con: sqlite3.Connection, model: str | None = None, *, scan: bool = False
) -> list[SegmentRow]:
    """Segment rows, oldest first (for one fingerprint when `model` is given). `scan`: read the
    table itself, not through its indexes (for `check`: works with a damaged index)."""
    sql = (
        f"SELECT rowid, key, tag, filename, size, value FROM Cache{_SCAN if scan else ''}"
        " WHERE key >= ? AND key < ? AND raw = 1 AND mode = 2 AND filename IS NOT NULL"
    )
    args: tuple = _range(SEG)
    if model is not None:
        sql, args = sql + " AND tag = ?", (*args, model)
    rows = con.execute(sql + " ORDER BY rowid", args).fetchall()
    return [SegmentRow(r[0], bytes(r[1]), str(r[2]), str(r[3]), int(r[4] or 0), bytes(r[5] or b""))
            for r in rows]  # fmt: skip


def insert_segment(con, key: bytes, tag: str, filename: str, size: int, header: bytes) -> None:
    now = time.time()
    con.execute(_INSERT, (key, now, now, tag, size, MODE_BINARY, filename, header))


def delete_rowids(con: sqlite3.Connection, rowids: list[int]) -> None:
    for start in range(0, len(rowids), 500):
        chunk = rowids[start : start + 500]
        con.execute(f"DELETE FROM Cache WHERE rowid IN ({','.join('?' * len(chunk))})", chunk)


def meta_key(fingerprint: str) -> bytes:
    import hashlib

    return META + hashlib.blake2b(fingerprint.encode(), digest_size=16).digest()


def put_meta(con: sqlite3.Connection, fingerprint: str, meta: dict) -> None:
    """Record `meta` for `fingerprint` unless a record is there already (the first write wins)."""
    body = json.dumps(meta, sort_keys=True).encode()
    now = time.time()
    con.execute(_INSERT, (meta_key(fingerprint), now, now, fingerprint, 0, MODE_RAW, None, body))


def meta_rows(con: sqlite3.Connection) -> list[tuple[int, str, bytes]]:
    sql = f"SELECT rowid, tag, value FROM Cache{_SCAN} WHERE key >= ? AND key < ? AND raw = 1"
    return [(r[0], str(r[1]), r[2]) for r in con.execute(sql, _range(META))]


def legacy_counts(con: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Format-1 rows per tag: {tag: (rows, value bytes)} (a full scan: maintenance only)."""
    sql = (
        f"SELECT tag, COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM Cache{_SCAN}"
        " WHERE LENGTH(key) = 16 AND mode = 1 GROUP BY tag"
    )
    return {str(t): (int(n), int(b)) for t, n, b in con.execute(sql)}


def delete_legacy(con: sqlite3.Connection, model: str | None = None) -> int:
    sql = "DELETE FROM Cache WHERE LENGTH(key) = 16 AND mode = 1"
    if model is None:
        return con.execute(sql).rowcount
    return con.execute(sql + " AND tag = ?", (model,)).rowcount


def other_rows(con: sqlite3.Connection) -> list[tuple[int, bytes]]:
    """Rows that are none of the three kinds (damage, or another program's entries)."""
    seg, meta = _range(SEG), _range(META)
    sql = (
        f"SELECT rowid, key FROM Cache{_SCAN} WHERE NOT (LENGTH(key) = 16 AND mode = 1)"
        " AND NOT (key >= ? AND key < ? AND mode = 2) AND NOT (key >= ? AND key < ? AND mode = 1)"
    )
    return [(r[0], r[1]) for r in con.execute(sql, (*seg, *meta))]


def advice(directory: Path | str, fix_tried: bool = False) -> str:
    first = (
        "" if fix_tried else f"run `evalkit cache check --fix --cache {directory}`; if that fails, "
    )
    return (
        f"{first}move it aside (mv {directory} {directory}.damaged) or run "
        f"`evalkit cache clear --cache {directory}` to start it afresh; --no-cache meanwhile"
    )


def translate(directory: Path, exc: sqlite3.Error) -> StoreError:
    """sqlite3 error -> a one-line StoreError naming the store and what to do."""
    text = str(exc)
    low = text.lower()
    if "locked" in low or "busy" in low:
        return StoreLockedError(
            f"embedding store {directory} is locked by another process ({text}) for longer than "
            f"the store timeout; try again when it is done, or use another --cache DIR"
        )
    if "readonly" in low or "read-only" in low:
        return StoreError(f"store is read-only ({directory}); use --no-cache or a writable --cache")
    if isinstance(exc, sqlite3.OperationalError) and "malformed" not in low:
        return StoreError(f"embedding store {directory}: {text}")
    return damaged(directory, text)


def damaged(directory: Path, why: str, fix_tried: bool = False) -> DamagedStoreError:
    exc = DamagedStoreError(
        f"embedding store {directory} is damaged ({why}); {advice(directory, fix_tried)}"
    )
    exc.why = why
    return exc


@contextlib.contextmanager
def sqlite_errors(directory: Path) -> Iterator[None]:
    """sqlite3 errors -> `translate`; OSErrors (disk full, permissions) -> a one-line StoreError."""
    try:
        yield
    except sqlite3.Error as exc:
        raise translate(directory, exc) from exc
    except OSError as exc:
        raise StoreError(f"embedding store {directory}: {exc.strerror or exc}") from exc


class Transaction:
    """The body's handle: the connection and a queue of files to delete after COMMIT."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        self.unlink_after: list[Path] = []


@contextlib.contextmanager
def transaction(con: sqlite3.Connection, directory: Path) -> Iterator[Transaction]:
    """One write transaction. Waiting for the lock is bounded by the connection's busy timeout;
    an exception rolls everything back; queued files are deleted only after COMMIT."""
    with sqlite_errors(directory):
        con.execute("BEGIN IMMEDIATE")
    txn = Transaction(con)
    try:
        yield txn
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        raise
    with sqlite_errors(directory):
        con.execute("COMMIT")
    for path in txn.unlink_after:
        with contextlib.suppress(OSError):
            path.unlink()
