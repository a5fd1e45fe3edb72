"""EmbeddingStore: batch round trips, checks on read, no eviction, info/clear/check, compaction,
two writer processes at once, and a writer killed with SIGKILL in the middle of put_many.
(Damage to the store's bytes: tests/embed/test_store_faults.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from evalkit.embed._segments import MAGIC, plan_merge
from evalkit.embed.store import SIZE_LIMIT, EmbeddingStore, default_cache_dir, make_keys
from evalkit.errors import StoreError

ROOT = Path(__file__).resolve().parents[2]


def segment_path(store: EmbeddingStore, model: str, which: int = 0) -> Path:
    """The file of the model's `which`-th segment (oldest first)."""
    rows = [row for row, _ in store._headers(model)]
    return store.directory / rows[which].filename


def _vectors(n: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_round_trip_found_mask_and_order(tmp_path):
    store = EmbeddingStore(tmp_path)
    keys = make_keys("fp", [f"text {i}" for i in range(100)])
    vecs = _vectors(100)
    store.put_many(keys[:60], vecs[:60], model="fp")
    query = keys[90:] + keys[:10][::-1] + [keys[3], keys[3]]
    got, found = store.get_many(query, dim=24)
    assert got.dtype == np.float32 and got.shape == (len(query), 24)
    assert found.tolist() == [False] * 10 + [True] * 12
    np.testing.assert_array_equal(got[10:20], vecs[:10][::-1])
    np.testing.assert_array_equal(got[20], vecs[3])
    assert not got[:10].any()
    # nothing found: the shape still has dim
    got, found = store.get_many(keys[70:72], dim=24)
    assert got.shape == (2, 24) and not found.any()
    assert store.get_many([])[0].shape == (0, 0)


def test_float16_store_and_checks_on_read(tmp_path):
    half = EmbeddingStore(tmp_path, dtype="float16")
    keys = make_keys("fp16", ["a", "b"])
    vecs = _vectors(2)
    half.put_many(keys, vecs, model="fp16")
    got, found = half.get_many(keys)
    assert found.all() and got.dtype == np.float32
    np.testing.assert_array_equal(got, vecs.astype(np.float16).astype(np.float32))
    with pytest.raises(StoreError, match="dim 24, expected 12"):
        half.get_many(keys, dim=12)
    with pytest.raises(StoreError, match="float16, this store reads float32"):
        EmbeddingStore(tmp_path).get_many(keys)
    with pytest.raises(StoreError, match="dtype must be one of"):
        EmbeddingStore(tmp_path, dtype="int8")
    with pytest.raises(StoreError, match="shape"):
        half.put_many(keys, vecs[:1], model="fp16")


def test_nothing_is_evicted_and_diskcache_can_read_it(tmp_path):
    import diskcache

    store = EmbeddingStore(tmp_path)
    assert store.cache.eviction_policy == "none"
    assert store.cache.size_limit == SIZE_LIMIT
    keys = make_keys("fp", ["x"])
    store.put_many(keys, _vectors(1), model="fp")
    plain = diskcache.Cache(str(tmp_path))
    (segment_key,) = list(plain)  # one row: the segment holding the vector
    value = plain.get(segment_key)
    assert isinstance(value, bytes) and value[:8] == MAGIC and keys[0] in value
    assert len(plain) == 1
    assert plain.check() == []  # diskcache's own check: files and counters agree


def test_info_clear_and_check(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.put_many(make_keys("m1", ["a", "b", "c"]), _vectors(3), model="m1")
    store.put_many(make_keys("m2", ["a"]), _vectors(1, dim=8), model="m2")
    store.put_many(make_keys("m1", ["a"]), _vectors(1, seed=5), model="m1")  # already there
    info = store.info()
    assert info["entries"] == 4 and info["format"] == 2
    m1 = info["models"]["m1"]
    assert (m1["entries"], m1["dim"], m1["dtype"], m1["segments"]) == (3, 24, "float32", 1)
    assert m1["bytes"] == 64 + 3 * (8 + 16 + 24 * 4 + 8)
    assert info["models"]["m2"]["dim"] == 8
    assert store.count("m1") == 3 and store.count() == 4
    assert store.has_model("m1") and not store.has_model("m3")
    assert store.check() == []
    # damage one vector behind the store's back: check() names it, fix removes it
    seg = segment_path(store, "m1")
    data = bytearray(seg.read_bytes())
    data[-20] ^= 0xFF
    seg.write_bytes(bytes(data))
    problems = store.check()
    assert any("1 of 3 rows fail their checksum" in p for p in problems), problems
    store.check(fix=True)
    assert store.check() == [] and store.count("m1") == 2
    assert store.clear(model="m2") == 1
    assert set(store.info()["models"]) == {"m1"}
    store.clear()
    assert store.count() == 0


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EVALKIT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EVALKIT_CACHE")
    assert default_cache_dir() == Path("cache")


def test_open_missing_or_file(tmp_path):
    with pytest.raises(StoreError, match="no embedding store"):
        EmbeddingStore(tmp_path / "none", create=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        EmbeddingStore(tmp_path / "f")


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from evalkit.embed.store import EmbeddingStore, make_keys
    directory, name, n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = EmbeddingStore(directory)
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    for start in range(0, n, batch):
        texts = [f"{name} {i}" for i in range(start, start + batch)] + [f"shared {start}"]
        vecs = np.tile(np.arange(start, start + batch + 1, dtype=np.float32)[:, None], (1, 16))
        vecs[-1] = -1.0
        store.put_many(make_keys("fp", texts), vecs, model="fp")
        print("committed", start + batch, flush=True)
    print("done", flush=True)
    """
)


def _spawn(tmp_path, *args) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_writer_processes_at_once(tmp_path):
    store_dir = tmp_path / "store"
    EmbeddingStore(store_dir).close()
    procs = [_spawn(tmp_path, store_dir, name, 3000, 100) for name in ("left", "right")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip().endswith("done")
    store = EmbeddingStore(store_dir)
    for name in ("left", "right"):
        got, found = store.get_many(make_keys("fp", [f"{name} {i}" for i in range(3000)]))
        assert found.all()
        np.testing.assert_array_equal(got[:, 0], np.arange(3000, dtype=np.float32))
    assert store.count("fp") == 6000 + 30
    assert store.check() == []


def test_killed_in_the_middle_of_put_many(tmp_path):
    store_dir = tmp_path / "store"
    batch = 20000  # big transactions, so the kill lands inside one
    proc = _spawn(tmp_path, store_dir, "k", 10**7, batch)
    try:
        first = proc.stdout.readline()
        assert first.startswith("committed"), proc.stderr.read()
        time.sleep(0.15)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = EmbeddingStore(store_dir)
    assert store.check() == []
    count = store.count("fp")
    assert count >= batch + 1 and count % (batch + 1) == 0  # whole transactions only
    got, found = store.get_many(make_keys("fp", [f"k {i}" for i in range(batch)]), dim=16)
    assert found.all()
    np.testing.assert_array_equal(got[:, 5], np.arange(batch, dtype=np.float32))
    # and it still takes writes
    store.put_many(make_keys("fp", ["after"]), np.ones((1, 16), np.float32), model="fp")
    assert store.get_many(make_keys("fp", ["after"]))[1].all()


def test_plan_merge_is_size_tiered_and_bounded():
    """Guards against: compaction that never merges (lookups slow down with every write) or that
    rewrites without bound (one merge bigger than the limit, holding the write lock for long)."""
    mib = 1 << 20
    assert plan_merge([mib] * 3) == []
    assert plan_merge([mib] * 4) == [0, 1, 2, 3]
    assert plan_merge([5 * mib, mib, 6 * mib, mib, mib, 7 * mib, 8 * mib]) == [0, 2, 5, 6]
    assert plan_merge([mib, 100 * mib, mib, mib, mib]) == [0, 2, 3, 4]  # lowest tier first
    big = (1 << 31) // 4 + 1  # final: over limit / fanout
    assert plan_merge([big] * 8) == []


def test_compaction_keeps_few_segments_and_every_vector(tmp_path):
    """Guards against: a write pattern of many small puts leaving one segment per put, and a
    merge losing, duplicating or altering a vector."""
    store = EmbeddingStore(tmp_path)
    texts = [f"t{i}" for i in range(2000)]
    keys = make_keys("fp", texts)
    vecs = _vectors(2000, dim=8)
    for start in range(0, 2000, 50):
        store.put_many(keys[start : start + 50], vecs[start : start + 50], model="fp")
        store.put_many(keys[:3], _vectors(3, dim=8, seed=9), model="fp")  # present: ignored
    assert len(store._headers("fp")) <= 3
    assert store.count("fp") == 2000 and store.check() == []
    got, found = store.get_many(keys, dim=8)
    assert found.all()
    np.testing.assert_array_equal(got, vecs)
    assert sorted(p.name for p in (tmp_path / "segments").iterdir()) == sorted(
        Path(row.filename).name for row, _ in store._headers()
    )  # inputs of merges are deleted


def test_model_meta_first_write_wins_and_dims_stay_consistent(tmp_path):
    """Guards against: the recorded library versions/device being overwritten by a later run, and
    vectors of another dim written under a fingerprint that already has some."""
    store = EmbeddingStore(tmp_path)
    store.put_many(
        make_keys("fp", ["a"]), _vectors(1), model="fp", meta={"torch": "1", "device": "cpu"}
    )
    store.put_many(
        make_keys("fp", ["b"]), _vectors(1), model="fp", meta={"torch": "2", "device": "cuda"}
    )
    assert store.info()["models"]["fp"]["meta"] == {"torch": "1", "device": "cpu"}
    with pytest.raises(StoreError, match="dim 24 for this model; got float32 of dim 8"):
        store.put_many(make_keys("fp", ["c"]), _vectors(1, dim=8), model="fp")
    with pytest.raises(StoreError, match="16-byte digests"):
        store.get_many([b"short"])


def test_pickles_as_its_path(tmp_path):
    import pickle

    store = EmbeddingStore(tmp_path, dtype="float16")
    keys = make_keys("fp", ["a", "b"])
    store.put_many(keys, _vectors(2), model="fp")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.dtype == "float16" and len(pickle.dumps(store)) < 500
    np.testing.assert_array_equal(clone.get_many(keys)[0], store.get_many(keys)[0])


def test_reader_during_writes_and_merges(tmp_path):
    """Guards against: a reader in another process seeing a half-written or merged-away segment
    (missing or wrong vectors) while a writer commits and compacts."""
    store_dir = tmp_path / "store"
    EmbeddingStore(store_dir).close()
    proc = _spawn(tmp_path, store_dir, "w", 4000, 100)
    reader = EmbeddingStore(store_dir)
    checked = 0
    try:
        for line in proc.stdout:
            if not line.startswith("committed"):
                continue
            n = int(line.split()[1])
            got, found = reader.get_many(make_keys("fp", [f"w {i}" for i in range(n)]), dim=16)
            assert found.all()
            np.testing.assert_array_equal(got[:, 3], np.arange(n, dtype=np.float32))
            checked += 1
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read()
    assert checked == 40 and len(reader._headers("fp")) <= 6


def test_opening_a_store_another_process_is_creating(tmp_path):
    """Guards against: a reader that opens cache.db between its creation and diskcache's tables
    (another process starting a job on a new store) failing with "no such table"."""
    (tmp_path / "cache.db").touch()
    store = EmbeddingStore(tmp_path)
    assert store.count() == 0
    store.put_many(make_keys("fp", ["a"]), _vectors(1), model="fp")
    assert store.get_many(make_keys("fp", ["a"]))[1].all()


def test_huge_page_hint_only_when_the_store_fits_in_half_the_memory(tmp_path, monkeypatch):
    """Guards the 2 MiB page-cache hint (MADV_HUGEPAGE): given to segments a read opens when the
    store fits in half the memory, never to a larger one (a random read of it would pull 2 MiB per
    vector), and never changing a vector served, even when the kernel refuses it."""
    from evalkit.embed import _segments

    assert _segments.huge_pages_fit(1 << 20) and not _segments.huge_pages_fit(0)
    memory = _segments.memory_bytes()
    assert 0 < memory <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert _segments.huge_pages_fit(memory // 2) and not _segments.huge_pages_fit(memory // 2 + 1)
    # a container's cgroup limit (v2 "max" = none; v1 a number) caps it; unreadable files don't
    (tmp_path / "v2").write_text("max\n")
    (tmp_path / "v1").write_text("1073741824\n")
    limits = [str(tmp_path / "v2"), str(tmp_path / "v1"), str(tmp_path / "absent")]
    assert _segments.memory_bytes(limits) == min(memory, 1 << 30)
    assert _segments.memory_bytes(limits[:1]) == _segments.memory_bytes(limits[2:])

    keys = make_keys("m", [f"t{i}" for i in range(2000)])
    vecs = _vectors(2000, dim=384)  # 3.1 MB of records: more than one 2 MiB folio
    with EmbeddingStore(tmp_path / "s") as store:
        store.put_many(keys, vecs, model="m")
    hinted: list[str] = []
    real = _segments.Segment.hint_huge_pages

    def spy(seg):
        hinted.append(seg.path.name)
        return real(seg)

    monkeypatch.setattr(_segments.Segment, "hint_huge_pages", spy)
    for fits in (True, False):
        hinted.clear()
        monkeypatch.setattr("evalkit.embed.store.huge_pages_fit", lambda total, f=fits: f)
        with EmbeddingStore(tmp_path / "s") as store:
            got, found = store.get_many(keys, dim=384)
            store.get_many(keys[:5], dim=384)  # segments already open: no second hint
        assert found.all() and np.array_equal(got, vecs)
        assert len(hinted) == (1 if fits else 0), hinted

    class Refusing:  # a kernel without THP for files: madvise fails with EINVAL
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def madvise(self, advice):
            raise OSError(22, "Invalid argument")

    with EmbeddingStore(tmp_path / "s") as store:
        path = segment_path(store, "m")
    seg = _segments.Segment(path)
    assert isinstance(real(seg), bool)
    seg._map = Refusing(seg._map)
    assert real(seg) is False  # refused: no error, and the rows read as before
    rows = seg.rows(np.arange(seg.count))
    by_key = dict(zip(keys, vecs, strict=True))
    stored = seg.vectors(rows)
    assert seg.verify(rows).all() and seg.count == len(keys)
    assert all(np.array_equal(stored[i], by_key[bytes(rows[i, :16])]) for i in range(seg.count))
