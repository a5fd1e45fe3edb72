"""The store's upkeep: compaction and repair, info, clear and check (see evalkit.embed.store).

1. `compact(store, model, repair)`: in one write transaction per step, first delete segment
   files no catalogue row refers to (left by writers killed before COMMIT: only writers holding
   the lock create files, so under the lock an unreferenced file is never in use), then rewrite
   each segment in `repair` without its bad rows, then merge what `plan_merge` picks; inputs are
   deleted after COMMIT. Merges never copy a row that fails verification.
2. `store_info`: entries, bytes, dim/dtype, segments, the recorded model meta and format-1 rows,
   per model fingerprint, from the catalogue alone (no vector is read).
3. `clear`: delete catalogue rows (all, or one fingerprint's) in one transaction, then their
   files after COMMIT.
4. `check`: diskcache's own check (SQLite integrity, counters, files), then every segment's
   header, key index and row checksums, format-1 rows, model records and unknown rows; `fix`
   rewrites or deletes what cannot be served.
5. `wipe`: delete a store's own files, for a store too damaged to open.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from evalkit.embed import _catalog as cat
from evalkit.embed._segments import (
    MergedRows,
    Segment,
    SegmentError,
    fp_digest,
    plan_merge,
    write_rows,
)

logger = logging.getLogger("evalkit.embed.store")
_MAX_STEPS = 64


def drop_orphans(store: Any, txn: cat.Transaction) -> int:
    """Delete segment files that no catalogue row refers to (call holding the write lock)."""
    folder = store.directory / cat.SEGMENT_DIR
    if not folder.is_dir():
        return 0
    live = {row.filename for row in cat.segment_rows(txn.con)}
    removed = 0
    for entry in os.scandir(folder):
        if entry.name.endswith(".eks") and f"{cat.SEGMENT_DIR}/{entry.name}" not in live:
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def _open_valid(store: Any, rows: list[cat.SegmentRow]) -> list[tuple[cat.SegmentRow, Segment]]:
    out = []
    for row in rows:
        try:
            out.append((row, Segment(store.directory / row.filename, row.header)))
        except (OSError, SegmentError):
            continue  # left for `check`
    return out


def rewrite(store: Any, txn: cat.Transaction, model: str, group: list[Segment], rows) -> int:
    """Replace the segments `group` (catalogue rows `rows`) by one segment of their verified,
    de-duplicated rows; returns the number of rows dropped as bad."""
    merged = MergedRows(group)
    if merged.count:
        first = group[0]
        name = f"{cat.SEGMENT_DIR}/{uuid.uuid4().hex}.eks"
        path = store.directory / name
        try:
            size = write_rows(path, merged.chunks(), merged.count, first.dtype, first.dim, model)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        header = Segment(path).header
        cat.insert_segment(txn.con, cat.SEG + uuid.uuid4().bytes, model, name, size, header)
    cat.delete_rowids(txn.con, [row.rowid for row in rows])
    txn.unlink_after.extend(store.directory / row.filename for row in rows)
    if merged.dropped:
        logger.warning(
            "embedding store %s: dropped %d row(s) that fail their checksum while rewriting %d "
            "segment(s); they are re-encoded on use",
            store.directory,
            merged.dropped,
            len(group),
        )
    return merged.dropped


def compact(store: Any, model: str, repair: set[str]) -> None:
    """Repair, then merge, the segments of fingerprint `model` (step 1 of the module docstring)."""
    for step in range(_MAX_STEPS):
        with store._transaction() as txn:
            if step == 0:
                drop_orphans(store, txn)
            pairs = _open_valid(store, cat.segment_rows(txn.con, model))
            group = [p for p in pairs if p[0].filename in repair][:1]
            if not group:
                group = [pairs[i] for i in plan_merge([row.size for row, _ in pairs])]
            if not group:
                return
            repair -= {row.filename for row, _ in group}
            rewrite(store, txn, model, [s for _, s in group], [row for row, _ in group])


def store_info(store: Any) -> dict:
    models: dict[str, dict] = {}

    def entry(tag: str) -> dict:
        blank = {"entries": 0, "bytes": 0, "dim": None, "dtype": None, "segments": 0,
                 "legacy_entries": 0, "meta": None}  # fmt: skip
        return models.setdefault(tag, blank)

    for row, head in store._headers():
        m = entry(row.tag)
        m["segments"] += 1
        m["bytes"] += row.size
        if head is not None:
            m["entries"] += head[2]
            m["dtype"], m["dim"] = head[0], head[1]
    con = store._con
    for _, tag, value in cat.meta_rows(con):
        try:
            entry(tag)["meta"] = json.loads(bytes(value))
        except (TypeError, ValueError):
            entry(tag)["meta"] = None
    for tag, (n, _) in cat.legacy_counts(con).items():
        entry(tag)["legacy_entries"] = n
    disk = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(store.directory)
        for f in files
    )
    return {
        "directory": str(store.directory),
        "format": 2,
        "entries": sum(m["entries"] for m in models.values()),
        "bytes": sum(m["bytes"] for m in models.values()),
        "legacy_entries": sum(m["legacy_entries"] for m in models.values()),
        "disk_bytes": disk,
        "models": models,
    }


def clear(store: Any, model: str | None) -> int:
    with store._transaction() as txn:
        con = txn.con
        rows = cat.segment_rows(con, model)
        removed = sum(h[2] for _, h in store._headers(model) if h is not None)
        removed += cat.delete_legacy(con, model)
        if model is None:
            drop_orphans(store, txn)  # before the DELETE: only files no committed row names
            con.execute("DELETE FROM Cache")
        else:
            cat.delete_rowids(con, [row.rowid for row in rows])
            con.execute("DELETE FROM Cache WHERE key = ?", (cat.meta_key(model),))
        txn.unlink_after.extend(store.directory / row.filename for row in rows)
    if model is None:
        store.cache._con.execute("VACUUM")
    return removed


_DISKCACHE_NOTES = ("wrong file size", "file not found", "unknown file", "empty directory",
                    "Settings.")  # fmt: skip


def _diskcache_check(store: Any, fix: bool) -> tuple[list[str], bool]:
    """diskcache's check -> (problems, whether SQLite's integrity check failed). Left out:
    segment files nobody refers to (leftovers of writers killed before COMMIT, deleted by fix and
    by the next write), missing segment files (reported per segment) and empty folders."""
    import sqlite3

    import diskcache

    if store.readonly:
        rows = store._con.execute("PRAGMA quick_check").fetchall()
        return ([], False) if rows == [("ok",)] else ([str(r[0]) for r in rows], True)
    cache, rebuilt = store.cache, []
    if fix:
        rows = cache._con.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:  # damaged indexes are rebuilt from their tables
            rebuilt = [str(r[0]) for r in rows] + ["(indexes rebuilt with REINDEX)"]
            cache._con.execute("REINDEX")
    try:
        caught = cache.check(fix=fix, retry=False)  # its warnings, recorded
    except diskcache.Timeout as exc:
        raise cat.translate(
            store.directory, sqlite3.OperationalError("database is locked")
        ) from exc
    except (AttributeError, TypeError, ValueError, KeyError) as exc:  # rows it cannot parse
        raise cat.damaged(store.directory, f"diskcache check failed: {exc!r}") from exc
    seg_dir = str(store.directory / "segments")
    messages = [str(w.message) for w in caught]
    skip = ("unknown file", "file not found")
    problems = [
        m for m in messages
        if not (m.startswith(skip) and seg_dir in m) and not m.startswith("empty directory")
    ]  # fmt: skip
    return rebuilt + problems, bool(rebuilt) or any(
        not m.startswith(_DISKCACHE_NOTES) for m in messages
    )


def check(store: Any, fix: bool) -> list[str]:
    if not fix:
        return _check(store, False)
    store.require_writable()
    try:
        return _check(store, True)
    except cat.DamagedStoreError as exc:  # even --fix could not read it: say what is left to do
        raise cat.damaged(store.directory, exc.why, fix_tried=True) from exc


def _check(store: Any, fix: bool) -> list[str]:
    problems, damaged = _diskcache_check(store, fix)
    if damaged and fix:
        problems.append(
            "the SQLite catalogue failed its integrity check: rebuilt (REINDEX, VACUUM)"
        )
    elif damaged:
        problems.append(
            "the SQLite catalogue failed its integrity check: `cache check --fix` rebuilds it; "
            f"if that fails, {cat.advice(store.directory, fix_tried=True)}"
        )
    drop, mend = [], []
    for row in cat.segment_rows(store._con, scan=True):
        try:
            seg = Segment(store.directory / row.filename, row.header)
        except (OSError, SegmentError) as exc:
            why = "file not found" if isinstance(exc, FileNotFoundError) else str(exc)
            problems.append(f"segment {row.filename}: {why}")
            drop.append(row)
            continue
        if seg.digest != fp_digest(row.tag):
            problems.append(f"segment {row.filename}: written for another model than its tag")
            drop.append(row)
            continue
        bad, index_ok = seg.bad_rows()
        if len(bad):
            problems.append(
                f"segment {row.filename}: {len(bad)} of {seg.count} rows fail their checksum "
                f"(first at row {int(bad[0])})"
            )
        if not index_ok:
            problems.append(f"segment {row.filename}: key index damaged")
        if len(bad) or not index_ok:
            mend.append((row, seg))
    con = store._con
    legacy = sum(n for n, _ in cat.legacy_counts(con).values())
    if legacy:
        problems.append(
            f"{legacy} entries in store format 1 (no checksums): never served, re-encoded on use"
        )
    bad_meta = [rowid for rowid, _, value in cat.meta_rows(con) if not _json_ok(value)]
    problems += [f"row {rowid}: unreadable model record" for rowid in bad_meta]
    others = cat.other_rows(con)
    problems += [f"row {rowid}: not an evalkit store entry" for rowid, _ in others]
    if fix and (drop or mend or legacy or bad_meta or others):
        _fix(store, {r.key for r in drop}, {r.key: s for r, s in mend}, bad_meta, others)
    return problems


def _fix(store: Any, drop: set[bytes], mend: dict[bytes, Segment], bad_meta, others) -> None:
    """Apply check's findings in one transaction, to the rows that are still there."""
    with store._transaction() as txn:
        drop_orphans(store, txn)
        rows = {row.key: row for row in cat.segment_rows(txn.con)}  # listed again, under the lock
        gone = [rows[k] for k in drop if k in rows]
        cat.delete_rowids(txn.con, [r.rowid for r in gone])
        txn.unlink_after.extend(store.directory / r.filename for r in gone)
        for key, seg in mend.items():
            if key in rows:
                rewrite(store, txn, rows[key].tag, [seg], [rows[key]])
        for rowid, key in others + [(r, None) for r in bad_meta]:
            sql = "DELETE FROM Cache WHERE rowid = ?" + (" AND key = ?" if key else "")
            txn.con.execute(sql, (rowid, key) if key else (rowid,))
        cat.delete_legacy(txn.con)


def _json_ok(value: Any) -> bool:
    try:
        return isinstance(json.loads(bytes(value)), dict)
    except (TypeError, ValueError):
        return False


def wipe(directory: str | os.PathLike) -> int:
    """Delete a store's own files (cache.db and its WAL files, segment files), for a store too
    damaged to open: `evalkit cache clear` on it. Returns the number of files removed."""
    folder = Path(directory)
    names = [folder / f"cache.db{suffix}" for suffix in ("", "-wal", "-shm", "-journal")]
    names += sorted((folder / cat.SEGMENT_DIR).glob("*.eks"))
    removed = 0
    for path in names:
        if path.exists():
            path.unlink()
            removed += 1
    if (folder / cat.SEGMENT_DIR).is_dir() and not any((folder / cat.SEGMENT_DIR).iterdir()):
        (folder / cat.SEGMENT_DIR).rmdir()
    return removed
