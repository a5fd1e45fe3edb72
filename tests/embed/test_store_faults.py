"""Fault injection on the embedding store: damaged vector bytes at every part of a record, a
damaged segment header and key index, damaged pages of the SQLite catalogue, format-1 rows, a
read-only directory, network filesystems, non-finite vectors, a held write lock, and the encoder
repairing a damaged row. The store's promise under test: a vector is served only if it is the
one written under its key; anything else is a miss (re-encoded) or one clear StoreError line."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from evalkit.embed import _mounts
from evalkit.embed._segments import HEADER_BYTES, KEY_BYTES, Segment
from evalkit.embed.store import EmbeddingStore, make_keys
from evalkit.errors import EvalkitError, StoreError

DIM = 24


def _vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _store_with(tmp_path: Path, n: int = 50) -> tuple[EmbeddingStore, list[bytes], np.ndarray]:
    store = EmbeddingStore(tmp_path / "s")
    keys = make_keys("fp", [f"text {i}" for i in range(n)])
    vecs = _vectors(n)
    store.put_many(keys, vecs, model="fp", meta={"device": "cpu"})
    return store, keys, vecs


def _segment_file(store: EmbeddingStore) -> Path:
    (row,) = [row for row, _ in store._headers("fp")]
    return store.directory / row.filename


def _record_offset(path: Path, key: bytes) -> tuple[int, int]:
    """(byte offset of `key`'s record in the segment file, record size)."""
    seg = Segment(path)
    keys = seg.rows(np.arange(seg.count))[:, :KEY_BYTES]
    (row,) = np.flatnonzero((keys == np.frombuffer(key, np.uint8)).all(axis=1))
    return HEADER_BYTES + 8 * seg.count + int(row) * seg.row_bytes, seg.row_bytes


def _flip(path: Path, offset: int, width: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + width):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _served_exactly(store, keys, vecs, damaged: set[int]) -> None:
    got, found = store.get_many(keys, dim=DIM)
    for i in range(len(keys)):
        if i in damaged:
            assert not found[i] and not got[i].any(), f"row {i} was served after damage"
        else:
            assert found[i], f"undamaged row {i} not served"
            np.testing.assert_array_equal(got[i], vecs[i])


# part of record 7 -> (offset within the record, bytes flipped); the record is key 16 B | 24
# float32 | 8-byte checksum
RECORD_PARTS = {
    "key first byte": (0, 1),
    "key last byte": (KEY_BYTES - 1, 1),
    "vector first byte": (KEY_BYTES, 1),
    "vector middle": (KEY_BYTES + DIM * 2, 3),
    "vector last byte": (KEY_BYTES + DIM * 4 - 1, 1),
    "checksum bytes": (KEY_BYTES + DIM * 4, 8),
    "whole record random": (0, KEY_BYTES + DIM * 4 + 8),
}


@pytest.mark.parametrize("part", list(RECORD_PARTS))
def test_damaged_record_is_a_miss_never_a_vector(tmp_path, part, caplog):
    """Guards against: random bytes over a stored vector (its header intact) being served as the
    vector of its text (measured before checksums: spearman 0.93 -> 0.20 with exit 0), and a
    damaged row passing `cache check`."""
    store, keys, vecs = _store_with(tmp_path)
    path = _segment_file(store)
    start, size = _record_offset(path, keys[7])
    at, width = RECORD_PARTS[part]
    _flip(path, start + at, width)
    store = EmbeddingStore(tmp_path / "s")  # a fresh process's view: nothing mapped yet
    with caplog.at_level(logging.WARNING, logger="evalkit.embed.store"):
        _served_exactly(store, keys, vecs, damaged={7})
        _served_exactly(store, keys, vecs, damaged={7})
    warned = [r for r in caplog.records if "fail their checksum" in r.getMessage()]
    assert len(warned) == 1, "one warning per damaged segment, not one per row or per read"
    problems = store.check()
    assert any("1 of 50 rows fail their checksum" in p for p in problems), problems
    store.check(fix=True)
    assert store.check() == []
    assert store.count("fp") == 49
    _served_exactly(store, keys, vecs, damaged={7})


@pytest.mark.parametrize("cpus", [2, 3, 8])
def test_reads_cut_into_threaded_parts_serve_what_one_part_serves(tmp_path, monkeypatch, cpus):
    """Guards the threaded batch read (keys cut into parts looked up on threads): every part
    must serve exactly the verified rows of its own keys into the right output rows, damaged
    and missing ones as zero misses, whichever part (and segment) a key falls in."""
    import evalkit._threads as threads
    import evalkit.embed.store as store_mod

    store, keys, vecs = _store_with(tmp_path, n=300)
    more = make_keys("fp", [f"text {i}" for i in range(300, 450)])
    store.put_many(more, _vectors(150, seed=1), model="fp")  # a second segment
    keys, vecs = keys + more, np.concatenate([vecs, _vectors(150, seed=1)])
    path = _segment_holding(store, keys[7])
    start, _ = _record_offset(path, keys[7])
    _flip(path, start + KEY_BYTES + 5)
    absent = make_keys("fp", [f"absent {i}" for i in range(40)])
    order = np.random.default_rng(5).permutation(len(keys) + len(absent))
    asked = [(keys + absent)[i] for i in order]
    monkeypatch.setattr(store_mod, "READ_PART_KEYS", 1_000_000)
    one, one_found = EmbeddingStore(tmp_path / "s").get_many(asked, dim=DIM)
    monkeypatch.setattr(store_mod, "READ_PART_KEYS", 7)
    monkeypatch.setattr(threads, "cpus", lambda: cpus)
    assert len(threads.row_parts(len(asked), min_rows=7)) == cpus
    fresh = EmbeddingStore(tmp_path / "s")
    out = np.full((len(asked), DIM), np.nan, dtype=np.float32)
    got, found = fresh.get_many(asked, dim=DIM, out=out)
    assert got is out
    np.testing.assert_array_equal(found, one_found)
    np.testing.assert_array_equal(got, one)
    want = {k: v for i, (k, v) in enumerate(zip(keys, vecs, strict=True)) if i != 7}
    for i, key in enumerate(asked):
        if key in want:
            assert found[i]
            np.testing.assert_array_equal(got[i], want[key])
        else:  # the damaged row and the absent keys: zeros, not found
            assert not found[i] and not got[i].any()


def _segment_holding(store: EmbeddingStore, key: bytes) -> Path:
    for row, _ in store._headers("fp"):
        path = store.directory / row.filename
        seg = Segment(path)
        if (
            (seg.rows(np.arange(seg.count))[:, :KEY_BYTES] == np.frombuffer(key, np.uint8))
            .all(axis=1)
            .any()
        ):
            return path
    raise AssertionError("key in no segment")


def test_damaged_key_index_is_never_a_wrong_vector(tmp_path):
    """Guards against: a damaged 8-byte key index entry pointing a key at another key's vector."""
    store, keys, vecs = _store_with(tmp_path)
    path = _segment_file(store)
    seg = Segment(path)
    index = np.array(seg.index)
    del seg
    data = bytearray(path.read_bytes())  # index entry 10 := index entry 11 (another key's row)
    data[HEADER_BYTES + 8 * 10 : HEADER_BYTES + 8 * 11] = index[11].astype("<u8").tobytes()
    path.write_bytes(bytes(data))
    store = EmbeddingStore(tmp_path / "s")
    got, found = store.get_many(keys, dim=DIM)
    for i in np.flatnonzero(found):
        np.testing.assert_array_equal(got[i], vecs[i])
    assert any("key index damaged" in p for p in store.check())
    store.check(fix=True)
    assert store.check() == []
    _served_exactly(store, keys, vecs, damaged=set())


@pytest.mark.parametrize("offset", [0, 9, 12, 17, 40, 57, 63])
def test_damaged_segment_header_makes_the_segment_a_miss(tmp_path, offset, caplog):
    """Guards against: a damaged dtype/dim/count in a segment header being read as another
    layout (shifted vectors served as real ones)."""
    store, keys, vecs = _store_with(tmp_path)
    _flip(_segment_file(store), offset)
    store = EmbeddingStore(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="evalkit.embed.store"):
        _served_exactly(store, keys, vecs, damaged=set(range(50)))
        store.get_many(keys)
    assert len([r for r in caplog.records if "segment" in r.getMessage()]) == 1
    assert any("segment" in p for p in store.check())
    store.check(fix=True)
    assert store.check() == [] and store.count() == 0
    store.put_many(keys, vecs, model="fp")  # re-encoded vectors go back in
    _served_exactly(store, keys, vecs, damaged=set())


def _quiet_copy(store: EmbeddingStore) -> Path:
    """Checkpoint the WAL into cache.db and close, so damage to cache.db is what readers see."""
    con = store.cache._con
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return store.directory / "cache.db"


def _page_offset(db: Path, target: str) -> int:
    """Byte offset in cache.db of `target`: "file header", or "<table or index>:<header|cells>"
    (the b-tree page's header, or the cell content at its end, where the rows are)."""
    if target == "file header":
        return 16
    name, part = target.split(":")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    (page,) = con.execute("PRAGMA page_size").fetchone()
    con.close()
    return (root - 1) * page + (8 if part == "header" else page - 200)


PAGES = ["file header"] + [
    f"{name}:{part}"
    for name in ("Settings", "Cache", "Cache_key_raw", "Cache_tag_rowid")
    for part in ("header", "cells")
]


@pytest.mark.parametrize("target", PAGES)
def test_damaged_sqlite_pages_give_one_line_or_verified_reads(tmp_path, target, capsys):
    """Guards against: damage to cache.db pages (the catalogue: segment rows, indexes, settings)
    surfacing as a sqlite3 traceback from `cache check`, `check --fix`, `info` or a read, or as
    wrong vectors served."""
    from evalkit.cli import main

    store, keys, vecs = _store_with(tmp_path)
    store.put_many(make_keys("fp", ["more"]), _vectors(1, seed=3), model="fp")
    db = _quiet_copy(store)
    offset = _page_offset(db, target)
    data = bytearray(db.read_bytes())
    data[offset : offset + 64] = np.random.default_rng(offset).bytes(64)
    db.write_bytes(bytes(data))
    for argv in (["info"], ["check"], ["check", "--fix"], ["info", "--json"]):
        code = main(["cache", *argv, "--cache", str(tmp_path / "s")])  # raises = traceback
        err = capsys.readouterr().err
        assert code in (0, 1) and len(err.strip().splitlines()) <= 1, err
    try:
        reader = EmbeddingStore(tmp_path / "s")
        got, found = reader.get_many(keys, dim=DIM)
    except StoreError as exc:
        assert "\n" not in str(exc)
        return
    for i in np.flatnonzero(found):
        np.testing.assert_array_equal(got[i], vecs[i])


def test_malformed_database_check_fix_says_what_to_do(tmp_path, capsys):
    """Guards against: `cache check --fix` on a malformed database crashing or leaving the user
    without a next step; `cache clear` then starts the store afresh."""
    from evalkit.cli import main

    store, keys, vecs = _store_with(tmp_path)
    db = _quiet_copy(store)
    db.write_bytes(b"this is not a database" * 300)
    assert main(["cache", "check", "--fix", "--cache", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cache clear" in err and "move it aside" in err
    with pytest.raises(StoreError, match="damaged"):
        EmbeddingStore(tmp_path / "s").get_many(keys)
    assert main(["cache", "clear", "--cache", str(tmp_path / "s")]) == 0
    assert "starts empty" in capsys.readouterr().out
    fresh = EmbeddingStore(tmp_path / "s")
    assert fresh.count() == 0 and not fresh.get_many(keys)[1].any()


def test_format_1_rows_are_never_served(tmp_path):
    """Guards against: rows of the store format without checksums (written before format 2)
    being served as if verified."""
    store = EmbeddingStore(tmp_path / "s")
    keys = make_keys("fp", ["old text"])
    old = b"EKf\x00" + DIM.to_bytes(4, "little") + _vectors(1).tobytes()
    store.cache._con.execute(
        "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
        " size, mode, filename, value) VALUES (?, 1, 0, NULL, 0, 0, 'fp', 0, 1, NULL, ?)",
        (keys[0], old),
    )
    assert not store.get_many(keys, dim=DIM)[1].any()
    assert store.info()["legacy_entries"] == 1
    assert any("format 1" in p for p in store.check())
    store.check(fix=True)
    assert store.check() == [] and store.info()["legacy_entries"] == 0


def _read_only(path: Path):
    """Make `path` (a folder) and its files unwritable, even for root (chattr +i); returns an
    undo function, or skips when neither works here."""
    files = [path, *path.rglob("*")]
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("root without chattr: cannot make a folder read-only")
        res = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"chattr +i not supported here: {res.stderr.decode().strip()}")
        return lambda: subprocess.run(["chattr", "-i", *map(str, files)], check=True)
    for f in files:
        f.chmod(0o555 if f.is_dir() else 0o444)
    return lambda: [f.chmod(0o755 if f.is_dir() else 0o644) for f in files]


def test_read_only_store_serves_reads(tmp_path):
    """Guards against: a read-only store (a shared, provisioned cache) failing every run with a
    sqlite3 traceback, or retrying a write forever."""
    store, keys, vecs = _store_with(tmp_path)
    _quiet_copy(store)
    undo = _read_only(tmp_path / "s")
    try:
        ro = EmbeddingStore(tmp_path / "s")
        assert ro.readonly
        _served_exactly(ro, keys, vecs, damaged=set())
        assert ro.count() == 50 and ro.check() == []
        with pytest.raises(StoreError, match="store is read-only.*--no-cache"):
            ro.put_many(make_keys("fp", ["new"]), _vectors(1), model="fp")
    finally:
        undo()


MOUNTS = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/shared rw,relatime shared:5 - nfs4 filer:/export rw,vers=4.2
31 30 8:2 / /mnt/shared/local rw shared:6 - ext4 /dev/sdb1 rw
32 22 0:41 / /home/u/remote rw,nosuid - fuse.sshfs u@host:/data rw
33 22 0:42 / /home/u/my\\040disk rw - cifs //nas/share rw
34 22 0:43 / /var/lib/containers rw - fuse.fuse-overlayfs fuse-overlayfs rw
"""


def test_network_filesystems_are_detected_from_the_mount_table():
    """Guards against: a store on NFS/SMB/FUSE (where SQLite's WAL locking is unsafe) being used
    silently, and a local mount inside a network mount being refused."""
    where = lambda p: _mounts.network_mount(p, MOUNTS)  # noqa: E731
    assert "nfs4" in where("/mnt/shared/team/cache")
    assert where("/mnt/shared/local/cache") is None  # the longest mount prefix wins
    assert "fuse.sshfs" in where("/home/u/remote/x")
    assert "cifs" in where("/home/u/my disk/cache")  # escaped space in the mount point
    assert where("/home/u/remote-not/x") is None  # a prefix of the name is not a parent
    assert where("/var/lib/containers/c") is None  # local FUSE overlay
    assert where("/tmp/x") is None


def test_store_on_network_fs_is_refused_with_advice(tmp_path, monkeypatch):
    """Guards against: opening a store on NFS and corrupting it through broken WAL locking."""
    table = tmp_path / "mountinfo"
    table.write_text(
        f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n30 22 0:40 / {tmp_path} rw - nfs4 f:/e rw\n"
    )
    monkeypatch.setattr(_mounts, "MOUNTINFO", str(table))
    monkeypatch.delenv(_mounts.ALLOW_ENV, raising=False)
    with pytest.raises(StoreError, match="one store per host.*EVALKIT_STORE_ALLOW_NETWORK_FS"):
        EmbeddingStore(tmp_path / "s")
    assert not (tmp_path / "s").exists()  # refused before anything was created
    assert EmbeddingStore(tmp_path / "s", allow_network_fs=True).count() == 0
    monkeypatch.setenv(_mounts.ALLOW_ENV, "1")
    assert EmbeddingStore(tmp_path / "s").count() == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors_are_refused(tmp_path, bad):
    """Guards against: a NaN/inf vector stored once and served forever (NaN metrics, or inf
    turning a cosine into NaN) - nothing of the call is written."""
    store = EmbeddingStore(tmp_path / "s")
    vecs = _vectors(5)
    vecs[3, 7] = bad
    with pytest.raises(StoreError, match="1 non-finite vector"):
        store.put_many(make_keys("fp", list("abcde")), vecs, model="fp")
    assert store.count() == 0 and not list((tmp_path / "s").rglob("*.eks"))


def test_float16_overflow_is_refused(tmp_path):
    """Guards against: a float32 value beyond float16's range stored as inf in a float16 store."""
    store = EmbeddingStore(tmp_path / "s", dtype="float16")
    vecs = _vectors(2)
    vecs[1, 0] = 1e6
    with pytest.raises(StoreError, match="non-finite"):
        store.put_many(make_keys("fp", ["a", "b"]), vecs, model="fp")


def test_write_lock_wait_is_bounded(tmp_path):
    """Guards against: a writer retrying forever while another process holds the write lock."""
    store = EmbeddingStore(tmp_path / "s", timeout=0.3)
    holder = sqlite3.connect(str(tmp_path / "s" / "cache.db"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    outcome: list = []

    def write() -> None:
        try:
            store.put_many(make_keys("fp", ["a"]), _vectors(1), model="fp")
            outcome.append("written")
        except StoreError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(timeout=30)
    holder.execute("ROLLBACK")
    assert not thread.is_alive(), "put_many kept retrying"
    assert isinstance(outcome[0], StoreError) and "locked" in str(outcome[0])
    assert time.monotonic() - start < 30
    store.put_many(make_keys("fp", ["a"]), _vectors(1), model="fp")  # and works once free
    assert store.count() == 1


def test_encoder_re_encodes_and_repairs_a_damaged_row(tmp_path, tiny_model):
    """Guards against: the encoder serving a damaged stored vector, or leaving the damage in
    place so every later run pays for (and warns about) it again."""
    from evalkit.embed.oneshot import encode_texts

    texts = [f"sentence number {i} about store repair" for i in range(40)]
    store = EmbeddingStore(tmp_path / "s")
    fresh = encode_texts(texts, tiny_model).embeddings  # no store
    first = encode_texts(texts, tiny_model, store=store)
    np.testing.assert_array_equal(first.embeddings, fresh)
    path = _segment_file_of(store, first.fingerprint)
    key = make_keys(first.fingerprint, [texts[3]])[0]
    start, _ = _record_offset(path, key)
    _flip(path, start + KEY_BYTES + 5, 4)
    again = encode_texts(texts, tiny_model, store=EmbeddingStore(tmp_path / "s"))
    np.testing.assert_array_equal(again.embeddings, fresh)
    assert (again.hits, again.misses) == (39, 1)
    repaired = EmbeddingStore(tmp_path / "s")
    assert repaired.check() == []
    got, found = repaired.get_many(make_keys(first.fingerprint, texts))
    assert found.all()
    np.testing.assert_array_equal(got, fresh)
    meta = repaired.info()["models"][first.fingerprint]["meta"]
    assert meta["device"] == "cpu" and meta["torch"] and meta["sentence-transformers"]


def _segment_file_of(store: EmbeddingStore, fp: str) -> Path:
    (row,) = [row for row, _ in store._headers(fp)]
    return store.directory / row.filename


def test_encoder_refuses_non_finite_embeddings(tmp_path, tiny_model, monkeypatch):
    """Guards against: a model that emits NaN (broken weights, float16 overflow) having its
    vectors stored and served on every later run."""
    from evalkit.embed.encoder import StreamingEncoder
    from evalkit.embed.oneshot import encode_texts

    real = StreamingEncoder._encode_slice

    def broken(self, *args):
        out = real(self, *args)
        out[0, 0] = np.nan
        return out

    monkeypatch.setattr(StreamingEncoder, "_encode_slice", broken)
    store = EmbeddingStore(tmp_path / "s")
    with pytest.raises(EvalkitError, match="non-finite"):
        encode_texts(["a", "b", "c"], tiny_model, store=store)
    assert store.count() == 0


def test_encoder_over_a_read_only_store(tmp_path, tiny_model):
    """Guards against: a provisioned read-only store making every run fail (or retry forever),
    and a miss against it being silently dropped instead of reported."""
    from evalkit.embed.oneshot import encode_texts

    texts = ["one text", "two texts", "three texts"]
    store = EmbeddingStore(tmp_path / "s")
    first = encode_texts(texts, tiny_model, store=store)
    _quiet_copy(store)
    undo = _read_only(tmp_path / "s")
    try:
        again = encode_texts(texts, tiny_model, store=EmbeddingStore(tmp_path / "s"))
        assert again.hits == 3
        np.testing.assert_array_equal(again.embeddings, first.embeddings)
        with pytest.raises(StoreError, match="store is read-only"):
            encode_texts(texts + ["new"], tiny_model, store=EmbeddingStore(tmp_path / "s"))
    finally:
        undo()


def test_disk_full_while_writing_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    """Guards against: an OSError (disk full) mid-write surfacing as a traceback, or leaving a
    half-written segment that is later served."""
    import errno

    from evalkit.embed import _segments

    store, keys, vecs = _store_with(tmp_path)
    real = _segments.write_rows

    def full(path, *args):
        real(path, *args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_segments, "write_rows", full)
    with pytest.raises(StoreError, match="No space left on device"):
        store.put_many(make_keys("fp", ["x", "y"]), _vectors(2, seed=4), model="fp")
    monkeypatch.undo()
    assert store.count() == 50 and store.check() == []
    assert len(list((tmp_path / "s" / "segments").glob("*.eks"))) == 1
    _served_exactly(store, keys, vecs, damaged=set())


def test_missing_segment_file_is_misses_then_fixed(tmp_path, caplog):
    """Guards against: a deleted segment file crashing reads, or `check` passing a catalogue
    that names a file which is gone."""
    store, keys, vecs = _store_with(tmp_path)
    _segment_file(store).unlink()
    reader = EmbeddingStore(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="evalkit.embed.store"):
        _served_exactly(reader, keys, vecs, damaged=set(range(50)))
    assert any("no file" in r.getMessage() for r in caplog.records)
    assert any("file not found" in p for p in reader.check())
    reader.check(fix=True)
    assert reader.check() == [] and reader.count() == 0
