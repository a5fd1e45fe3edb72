#!/usr/bin/env python
"""Benchmark: embedding store batch reads on a large store, evalkit (format 2) vs its peer.

The peer is the same diskcache engine with one row per vector (evalkit's store format 1: the
vector in diskcache's `value` column) read the best way that layout allows: sorted keys, one
`SELECT key, value ... WHERE key IN (...)` per 2,000 keys inside one read transaction, the
database memory-mapped whole and a 256 MiB page cache.

1. build, once (reused with --dir): N entries of D-dim float32 random vectors, keyed like the
   encoder keys texts (`make_keys(fp, ["text i"])`), written as the encoder writes them
   (`put_many` per window of 16,384); the peer gets the same keys and vectors;
2. measure: --repeats rounds; in each, evalkit and the peer alternate (ABBA), each in a FRESH
   process (cold: no mapped pages, no SQLite page cache, nothing read before) that reads
   --reads keys never read before by any earlier round (disjoint random samples of the N keys),
   --batch keys per call, consuming each batch as a streaming reader does (nothing kept but the
   rows checked afterwards against the vectors written: every key of two windows). The time
   counted runs from opening the store to the last batch; interpreter start and the keys'
   computation are not counted. Both stores sit in a warm OS page cache, put there the same way
   for both before the rounds (--page-cache): `sequential` (default) evicts every file of both
   stores (posix_fadvise DONTNEED) and reads it back in order, as a copy or `cache check` would;
   `faulted` evicts them and has each system read ALL N keys in random order through its own
   read path (untimed), so its pages enter the cache the way that system's reads bring them in
   (evalkit asks for 2 MiB folios, MADV_HUGEPAGE; SQLite's map does not). Left to whatever ran
   before, the same code measured 273k-660k/s here: how the kernel cached the files (4 KiB pages
   or 2 MiB folios, which it maps with one TLB entry) decides the rate. evalkit verifies every
   row's checksum as it always does;
3. report the median vectors/s of each side, their ratio, and what the checksum check alone
   costs per vector (its share of evalkit's read time).

The last line is machine-readable; the exit code is 1 when evalkit's median is below --target:

    store_read_per_s=X peer_read_per_s=Y ratio=Z
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FP = "bench-store-fingerprint"
WINDOW = 16384
PEER_INSERT = (
    "INSERT OR IGNORE INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
    " tag, size, mode, filename, value) VALUES (?, 1, 0, NULL, 0, 0, ?, 0, 1, NULL, ?)"
)


def vectors(start: int, stop: int, dim: int) -> np.ndarray:
    """The vectors of entries start..stop-1 (a pure function of the window, so any process can
    recompute what was written)."""
    out = []
    for w in range(start // WINDOW, (stop - 1) // WINDOW + 1):
        rng = np.random.default_rng(w)
        block = rng.standard_normal((WINDOW, dim), dtype=np.float32)
        lo, hi = max(start, w * WINDOW) - w * WINDOW, min(stop, (w + 1) * WINDOW) - w * WINDOW
        out.append(block[lo:hi])
    return np.concatenate(out)


def build(folder: Path, n: int, dim: int, peer: bool) -> None:
    import diskcache

    from evalkit.embed.store import EmbeddingStore, make_keys

    done = folder / "built.json"
    if done.exists() and json.loads(done.read_text()) == {"n": n, "dim": dim, "peer": peer}:
        print(f"reusing the stores in {folder}")
        return
    shutil.rmtree(folder / "evalkit", ignore_errors=True)
    shutil.rmtree(folder / "peer", ignore_errors=True)
    t0 = time.perf_counter()
    store = EmbeddingStore(folder / "evalkit")
    plain = (
        diskcache.Cache(str(folder / "peer"), eviction_policy="none", size_limit=2**62)
        if peer
        else None
    )
    head = b"EKf\x00" + dim.to_bytes(4, "little")  # format 1's 8-byte header
    for start in range(0, n, WINDOW):
        stop = min(n, start + WINDOW)
        keys = make_keys(FP, [f"text {i}" for i in range(start, stop)])
        vecs = vectors(start, stop, dim)
        store.put_many(keys, vecs, model=FP)
        if plain is not None:
            rows = [(k, FP, head + v.tobytes()) for k, v in zip(keys, vecs, strict=True)]
            con = plain._con
            con.execute("BEGIN IMMEDIATE")
            con.executemany(PEER_INSERT, rows)
            con.execute("COMMIT")
    info = store.info()["models"][FP]
    print(f"built {n} entries in {time.perf_counter() - t0:.0f} s: evalkit {info['segments']} "
          f"segments, {info['bytes'] / 1e9:.2f} GB")  # fmt: skip
    done.write_text(json.dumps({"n": n, "dim": dim, "peer": peer}))


def peer_get_many(con, keys: list[bytes], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Format 1's batched read: sorted keys, SELECT ... IN per 2,000, one read transaction."""
    unique = sorted(set(keys))
    rows: dict[bytes, bytes] = {}
    con.execute("BEGIN")
    for s in range(0, len(unique), 2000):
        chunk = unique[s : s + 2000]
        sql = (
            f"SELECT key, value FROM Cache WHERE raw = 1 AND key IN ({','.join('?' * len(chunk))})"
        )
        rows.update(con.execute(sql, chunk).fetchall())
    con.execute("COMMIT")
    width = 8 + 4 * dim
    table = np.frombuffer(b"".join(rows.values()), dtype=np.uint8).reshape(len(rows), width)
    vecs = table[:, 8:].copy().view("<f4")
    index = {k: i for i, k in enumerate(rows)}
    pos = np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
    found = pos >= 0
    out = np.zeros((len(keys), dim), dtype=np.float32)
    out[found] = vecs[pos[found]]
    return out, found


def page_cache(args: argparse.Namespace, systems: list[str]) -> None:
    """Put both stores in the page cache the same way (see the module docstring)."""
    files = [p for s in systems for p in sorted((args.dir / s).rglob("*")) if p.is_file()]
    if not hasattr(os, "posix_fadvise"):  # not Linux: the OS keeps its own page-cache state
        print("page cache: left as it is (no posix_fadvise here)", flush=True)
        return
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    t0 = time.perf_counter()
    if args.page_cache == "sequential":
        for path in files:
            with open(path, "rb", buffering=0) as fh:
                while fh.read(8 << 20):
                    pass
    else:
        for system in systems:
            run_child(system, -1, args)  # every key, random order, untimed
    print(f"page cache: {len(files)} files evicted, then loaded {args.page_cache} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """One cold process: read one disjoint sample of keys (round -1: all of them, in random
    order), print vectors/s as JSON."""
    from evalkit.embed.store import EmbeddingStore, make_keys

    if args.round < 0:
        sample = np.random.default_rng(999).permutation(args.n)
    else:
        perm = np.random.default_rng(12345).permutation(args.n)
        sample = perm[args.round * args.reads : (args.round + 1) * args.reads]
    keys = make_keys(FP, [f"text {i}" for i in sample])
    batches = [keys[s : s + args.batch] for s in range(0, len(keys), args.batch)]
    watch = [np.flatnonzero(sample // WINDOW == w) for w in (0, (args.n - 1) // WINDOW)]
    kept: dict[int, np.ndarray] = {}  # the vectors of entries in two windows, to check below
    found = np.zeros(len(keys), dtype=bool)

    def consume(start: int, got: np.ndarray, ok: np.ndarray) -> None:
        """What a streaming consumer does: use the batch, keep nothing (the checked rows aside)."""
        found[start : start + len(ok)] = ok
        for rows in watch:
            mine = rows[(rows >= start) & (rows < start + len(ok))]
            kept.update(zip(mine.tolist(), got[mine - start].copy(), strict=True))

    t0, c0 = time.perf_counter(), time.process_time()
    if args.child == "evalkit":
        store = EmbeddingStore(args.dir / "evalkit")
        for i, batch in enumerate(batches):
            consume(i * args.batch, *store.get_many(batch, dim=args.dim))
    else:
        import sqlite3

        con = sqlite3.connect(str(args.dir / "peer" / "cache.db"), isolation_level=None)
        con.execute("PRAGMA mmap_size = 17179869184")  # its fastest setting: the file mapped
        con.execute("PRAGMA cache_size = -262144")  # (2x faster than diskcache's defaults)
        for i, batch in enumerate(batches):
            consume(i * args.batch, *peer_get_many(con, batch, args.dim))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ok = bool(found.all())
    for w, rows in zip((0, (args.n - 1) // WINDOW), watch, strict=True):
        block = vectors(w * WINDOW, min(args.n, (w + 1) * WINDOW), args.dim)
        for r in rows.tolist():  # the vectors served equal the ones written
            ok &= bool(np.array_equal(kept[r], block[sample[r] - w * WINDOW]))
    res = {"rate": len(keys) / seconds, "cpu_rate": len(keys) / cpu, "ok": ok}
    if args.child == "evalkit":
        res["checksum_ns"] = checksum_cost(store, args.batch)
    print(json.dumps(res))


def checksum_cost(store, batch: int) -> float:
    """ns per vector of the checksum check alone (xxh3-64 over key | vector, one batch of rows
    gathered from the largest segment, median of 7) - the verification's share of a read."""
    from evalkit.embed._segments import checksums

    seg = max(store._segments(None), key=lambda s: s.count)
    rows = seg.rows(np.random.default_rng(0).integers(0, seg.count, batch))
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        checksums(rows, seg.row_bytes)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / len(rows) * 1e9


def run_child(system: str, r: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--round", str(r), "--dir", str(args.dir),
           "--n", str(args.n), "--dim", str(args.dim), "--reads", str(args.reads),
           "--batch", str(args.batch)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{system} reader failed:\n{out.stderr}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["ok"]:
        sys.exit(f"{system} served wrong or missing vectors in round {r}")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="entries (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=384, help="(default: %(default)s)")
    parser.add_argument("--reads", type=int, default=100_000, help="keys per round and side")
    parser.add_argument("--batch", type=int, default=4096, help="keys per get_many call")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (default: %(default)s)")
    parser.add_argument("--dir", type=Path, default=None, help="keep/reuse the stores here")
    parser.add_argument("--no-peer", action="store_true", help="skip the format-1 peer")
    parser.add_argument("--target", type=float, default=500_000, help="vectors/s to reach")
    parser.add_argument(
        "--page-cache",
        choices=["sequential", "faulted"],
        default="sequential",
        help="how both stores enter the page cache (default: %(default)s)",
    )
    parser.add_argument("--child", choices=["evalkit", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.reads * args.repeats > args.n:
        sys.exit(f"--reads x --repeats ({args.reads * args.repeats}) exceeds --n ({args.n})")
    temp = args.dir is None
    args.dir = args.dir or Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        print(f"n={args.n} dim={args.dim} reads={args.reads} batch={args.batch} "
              f"repeats={args.repeats} load_avg={os.getloadavg()[0]:.1f} dir={args.dir}")  # fmt: skip
        build(args.dir, args.n, args.dim, peer=not args.no_peer)
        systems = ["evalkit"] + ([] if args.no_peer else ["peer"])
        page_cache(args, systems)
        rates: dict[str, list[float]] = {s: [] for s in systems}
        cpu_rates: dict[str, list[float]] = {s: [] for s in systems}
        checks = []
        for r in range(args.repeats):
            for system in systems if r % 2 == 0 else systems[::-1]:
                res = run_child(system, r, args)
                rates[system].append(res["rate"])
                cpu_rates[system].append(res["cpu_rate"])
                checks += [res["checksum_ns"]] if "checksum_ns" in res else []
                print(f"round {r} {system:7s}: {res['rate']:>12,.0f} vectors/s "
                      f"({res['cpu_rate']:,.0f} per CPU-second)", flush=True)  # fmt: skip
        med = {s: float(np.median(v)) for s, v in rates.items()}
        check_ns = float(np.median(checks))
        print("per CPU-second of the reader (user + sys; the wall figure is the one that counts): "
              + ", ".join(f"{s} {np.median(v):,.0f}" for s, v in cpu_rates.items()))  # fmt: skip
        print(f"checksum verification: {check_ns:.0f} ns/vector = "
              f"{check_ns * med['evalkit'] / 1e9:.0%} of evalkit's read time")  # fmt: skip
        peer = med.get("peer", float("nan"))
        print(f"store_read_per_s={med['evalkit']:.0f} peer_read_per_s={peer:.0f} "
              f"ratio={med['evalkit'] / peer:.2f}")  # fmt: skip
        if med["evalkit"] < args.target:
            sys.exit(1)
    finally:
        if temp:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
