#!/usr/bin/env python
"""Benchmark: exact top-k search (evalkit.search.exact.exact_search) against the float32 GEMM
rate of the same shapes, measured in the same run.

1) data: --queries x 384 queries and --docs x 384 corpus vectors (seeded normal vectors, the
   hard case: near-uniform scores; or --vectors FILE.npy, e.g. bench_ann's MiniLM snapshot,
   whose first --queries rows become the queries), streamed in blocks of --block rows;
2) "float32 GEMM": exactly the matrix products exact_search's candidate step runs, the same
   shapes (QUERY_ROWS queries x CORPUS_ROWS-row slices of every block) into a reused output
   array; nothing else (no normalisation, no selection), in one multi-threaded BLAS call each
   and (with several CPUs) also as exact_search's CPU path runs them, the slice's columns cut
   into one single-threaded part per thread: the faster of the two is the ceiling;
3) "exact search": exact_search(queries, blocks, k) for each --k (cosine, ties by id);
4) --runs (>= 5) timed runs of each, interleaved with the order rotated every run, one warm-up
   each; medians; rate = queries x docs / seconds;
5) exactness: for --check queries, the ids and scores must equal a float64 brute force (pair by
   pair, the definition in evalkit.search.exact) exactly.

The last line is `exact_vs_float32_gemm=X` for the first --k (the retrieval evaluation's depth,
100); exit 1 when X < 0.6 or an exactness check fails.

    python scripts/bench_exact.py [--docs 200000] [--queries 1000] [--k 100,10] [--runs 5]
    python scripts/bench_exact.py --device cuda     (both in torch on the GPU; TF32 off)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def brute_force(q: np.ndarray, v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 cosine of every pair, rounded to float32, ranked by (-score, position)."""
    q64 = q.astype(np.float64)
    q64 /= np.maximum(np.sqrt(np.einsum("ij,ij->i", q64, q64)), 1e-12)[:, None]
    scores, ids = [], []
    for row in q64:
        s = np.empty(len(v))
        for c in range(0, len(v), 4096):
            part = v[c : c + 4096].astype(np.float64)
            inv = 1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", part, part)), 1e-12)
            s[c : c + len(part)] = np.einsum("ij,j->i", part, row) * inv
        s32 = s.astype(np.float32)
        order = np.lexsort((np.arange(len(v)), -s32))[:k]
        scores.append(s32[order])
        ids.append(order)
    return np.array(scores), np.array(ids)


def threaded_gemm(q32: np.ndarray, blocks, out: np.ndarray):
    """The same products as exact_search's CPU path runs them when it has several CPUs: each
    query chunk x slice with the slice's columns cut into one part per thread, single-threaded
    BLAS in each (evalkit.search._bounded.QueryParts). None with one CPU (no such path)."""
    from threadpoolctl import ThreadpoolController

    import evalkit.search.exact as ex
    from evalkit.search import _bounded

    parts = _bounded.QueryParts(q32, np.ones(len(q32)), None, ex.CORPUS_ROWS, ex.QUERY_ROWS)
    if parts.threads == 1:
        return None
    blas = ThreadpoolController()
    chunks = [(parts.spans[c[0]][0], parts.spans[c[-1]][1]) for c in parts.chunks]

    def run():
        with blas.limit(limits=1, user_api="blas"):
            for _, block in blocks():
                for c in range(0, len(block), ex.CORPUS_ROWS):
                    part = block[c : c + ex.CORPUS_ROWS]
                    for lo, hi in chunks:

                        def cols(a, b, rows=q32[lo:hi], part=part, n=hi - lo):
                            np.matmul(rows, part[a:b].T, out=out[:n, a:b])

                        _bounded.parallel(cols, _bounded.row_parts(len(part), parts.threads))

    return run


def torch_gemm(q32: np.ndarray, blocks, device: str, query_rows: int, corpus_rows: int):
    """The same products in torch on `device` at full float32 (TF32 off), each slice copied
    there as exact_search copies it, synchronised at the end: the GPU ceiling."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(device)
    qt = torch.from_numpy(q32).to(dev)

    def run():
        for _, block in blocks():
            for c in range(0, len(block), corpus_rows):
                part = torch.from_numpy(np.ascontiguousarray(block[c : c + corpus_rows])).to(dev)
                for lo in range(0, len(qt), query_rows):
                    torch.mm(qt[lo : lo + query_rows], part.T)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", default="100,10", help="depths, comma-separated; the first is headline")
    p.add_argument("--block", type=int, default=16_384, help="corpus rows per streamed block")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--check", type=int, default=20, help="queries checked against brute force")
    p.add_argument("--vectors", type=Path, default=None, help=".npy of real vectors instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default=None, help="a torch device (cuda): both GEMMs run in torch there"
    )
    args = p.parse_args(argv)
    if args.runs < 5:
        p.error("--runs must be >= 5")
    from _bench_common import machine_line, median, timed_runs

    import evalkit.search.exact as ex

    ks = [int(k) for k in args.k.split(",")]
    if args.vectors is not None:
        data = np.load(args.vectors, mmap_mode="r")
        q = np.array(data[: args.queries], dtype=np.float32)
        v = np.array(data[args.queries : args.queries + args.docs], dtype=np.float32)
        what = f"real vectors from {args.vectors}"
    else:
        rng = np.random.default_rng(args.seed)
        q = rng.standard_normal((args.queries, 384), dtype=np.float32)
        v = rng.standard_normal((args.docs, 384), dtype=np.float32)
        what = "seeded normal vectors"
    n, nq = len(v), len(q)
    print(f"{nq:,} queries x {n:,} docs x {v.shape[1]} ({what}), blocks of {args.block:,}, "
          f"QUERY_ROWS {ex.QUERY_ROWS}, CORPUS_ROWS {ex.CORPUS_ROWS}; {machine_line()}")  # fmt: skip

    def blocks():
        for s in range(0, n, args.block):
            yield np.arange(s, min(n, s + args.block)), v[s : s + args.block]

    q32 = np.ascontiguousarray(q)
    out = np.empty((ex.QUERY_ROWS, ex.CORPUS_ROWS), dtype=np.float32)

    def gemm():
        for _, block in blocks():
            for c in range(0, len(block), ex.CORPUS_ROWS):
                part = block[c : c + ex.CORPUS_ROWS]
                for lo in range(0, nq, ex.QUERY_ROWS):
                    rows = q32[lo : lo + ex.QUERY_ROWS]
                    np.matmul(rows, part.T, out=out[: len(rows), : len(part)])

    contenders = {"float32 GEMM": gemm}
    if args.device not in (None, "cpu"):
        contenders["float32 GEMM"] = torch_gemm(
            q32, blocks, args.device, ex.QUERY_ROWS, ex.CORPUS_ROWS
        )
    else:
        threaded = threaded_gemm(q32, blocks, out)
        if threaded is not None:
            contenders["float32 GEMM, threads"] = threaded
    for k in ks:
        contenders[f"exact k={k}"] = lambda k=k: ex.exact_search(q, blocks(), k, device=args.device)
    times = timed_runs(contenders, args.runs)
    rate = {name: nq * n / median(secs) for name, secs in times.items()}
    for name, secs in times.items():
        print(f"  {name:<21} {median(secs):8.3f} s (median of {args.runs}) "
              f"{rate[name] / 1e6:9.1f} M scores/s")  # fmt: skip
    ok = True
    for k in ks:
        scores, ids = ex.exact_search(q[: args.check], blocks(), k, device=args.device)
        want_s, want_i = brute_force(q[: args.check], v, k)
        same = np.array_equal(ids, want_i) and np.array_equal(scores, want_s)
        ok = ok and same
        print(f"  k={k}: {args.check} queries equal to the float64 brute force: {same}")
    ceiling = max(r for name, r in rate.items() if name.startswith("float32 GEMM"))
    ratios = {k: rate[f"exact k={k}"] / ceiling for k in ks}
    for k, r in ratios.items():
        print(f"  exact search at k={k}: {r:.2f} of the float32 GEMM rate")
    ok = ok and ratios[ks[0]] >= 0.6
    print(f"target: >= 0.60 of the GEMM rate at k={ks[0]}, exact: {'PASS' if ok else 'FAIL'}")
    print(f"exact_vs_float32_gemm={ratios[ks[0]]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
