#!/usr/bin/env python
"""Benchmark: FAISS indexes against exact Flat search on ~164,000 real sentence embeddings.

Steps:
1) texts: every WordNet 3.0 gloss (117,659) and every SciFact abstract sentence (45,952) in
   ../shared/data, in file order, ids "wn:<synset>" / "sf:<doc>:<sent>";
2) embeddings with the packaged all-MiniLM-L6-v2 through the embedding store (--cache; the first
   run encodes for ~20 min on 2 CPU cores, later runs only read the store);
3) hold out --queries random rows as queries (removed from the corpus), exact top-k ground truth
   with evalkit.search.exact.exact_search over corpus blocks (ties by position);
4) for exact Flat (the baseline, same run), the auto-chosen index, HNSW32 and IVF-Flat: build
   time, peak RssAnon during the build, index size on disk, and for every sweep setting
   recall@k and QPS (all queries in one batch, best of --repeats);
5) print a table and, LAST, `best_recall@10=X qps_ratio_vs_flat=Y index=SPEC` for the fastest
   setting with recall@10 >= 0.95.

Run: .venv/bin/python scripts/bench_ann.py --cache /tmp/ek-bench-cache [--encode-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EVALKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def load_texts(data: Path = DATA, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(ids, texts) of every WordNet gloss and SciFact sentence, in file order."""
    ids, texts = [], []
    with open(data / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            synset, _pos, _lemmas, gloss = line.rstrip("\n").split("\t")
            ids.append(f"wn:{synset}")
            texts.append(gloss)
    with open(data / "beir-scifact" / "corpus_sentences.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            doc, sent, sentence = line.rstrip("\n").split("\t")
            ids.append(f"sf:{doc}:{sent}")
            texts.append(sentence)
    if limit:
        ids, texts = ids[:limit], texts[:limit]
    return ids, texts


def embed(texts: list[str], cache: str, batch_size: int = 128) -> tuple[np.ndarray, str, dict]:
    """MiniLM embeddings of `texts` through the store (misses are encoded and written back)."""
    from evalkit.embed.encoder import encode_texts
    from evalkit.embed.models import load_model
    from evalkit.embed.store import EmbeddingStore

    model = load_model(None, device="cpu")
    store = EmbeddingStore(cache)
    t = time.perf_counter()
    result = encode_texts(texts, model, store=store, batch_size=batch_size, progress=True)
    info = {"hits": result.hits, "misses": result.misses, "seconds": time.perf_counter() - t}
    return result.embeddings, result.fingerprint, info


class PeakRss:
    """Samples RssAnon (/proc/self/status) every 5 ms in a thread; `peak` is the maximum seen."""

    def __init__(self) -> None:
        self.peak = self.start = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_index(
    name, spec, corpus, queries, gt_scores, gt_pos, k, folder, flat_qps=None, grid=None
):
    """Build `spec` over the corpus (peak RssAnon, seconds, bytes on disk), then sweep it."""
    from evalkit.search.ann import recall_at_k, time_search
    from evalkit.search.build import build_index
    from evalkit.search.index import load_index, parameter_grid

    t = time.perf_counter()
    with PeakRss() as mem:
        built = build_index(corpus, spec=spec, out=folder)
    build_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in Path(folder).iterdir())
    del built
    idx = load_index(folder)  # search the saved index, as a user would
    rows = []
    for params in grid or parameter_grid(idx.index, k):
        timing = time_search(idx, queries, k, params, latency_queries=100)
        kr, _ = recall_at_k(timing["positions"], gt_pos, gt_scores, k)
        row = {
            "index": idx.spec,
            "name": name,
            "params": params,
            "recall": float(kr.mean()),
            "qps": timing["qps"],
            "p50_ms": timing["latency_ms_p50"],
        }
        row["ratio"] = row["qps"] / flat_qps if flat_qps else 1.0
        rows.append(row)
        print(
            f"  {name:<8} {idx.spec:<14} {_fmt(params):<14} recall@{k}={row['recall']:.4f} "
            f"qps={row['qps']:>9,.0f} x{row['ratio']:.1f} vs flat  p50={row['p50_ms']:.2f} ms",
            flush=True,
        )
        if row["recall"] >= 0.999:
            break
    info = {
        "name": name,
        "spec": idx.spec,
        "reason": idx.meta.get("choice_reason"),
        "build_s": build_s,
        "peak_rss_anon_bytes": mem.peak,
        "build_rss_anon_delta_bytes": mem.peak - mem.start,
        "index_bytes": size,
        "sweep": rows,
    }
    print(
        f"{name}: {idx.spec} built in {build_s:.1f} s, peak RssAnon {mem.peak / 2**20:,.0f} MiB "
        f"(+{(mem.peak - mem.start) / 2**20:,.0f} MiB during build), {size / 2**20:,.1f} MiB on disk",
        flush=True,
    )
    return info


def _fmt(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items()) or "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cache", default="/tmp/ek-bench-cache", help="embedding store directory")
    p.add_argument("--encode-only", action="store_true", help="fill the store and stop")
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N texts (smoke test)"
    )
    p.add_argument("--queries", type=int, default=1000, help="held-out query rows")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--memory-budget", default="4G", help="budget for the auto-chosen index")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"real data folder {DATA} is absent", file=sys.stderr)
        return 2
    ids, texts = load_texts(DATA, args.limit)
    print(f"{len(texts):,} texts", flush=True)
    emb, fingerprint, info = embed(texts, args.cache)
    print(f"embeddings {emb.shape} fingerprint {fingerprint[:12]} {info}", flush=True)
    if args.encode_only:
        return 0
    del texts

    import faiss

    from evalkit.search.ann import exact_ground_truth
    from evalkit.search.plan import choose_index, ivf_nlist

    k = args.k
    rng = np.random.default_rng(0)
    hold = np.sort(rng.choice(len(emb), args.queries, replace=False))
    queries = emb[hold].copy()
    corpus = np.delete(emb, hold, axis=0)
    del emb
    n, dim = corpus.shape
    print(
        f"corpus {n:,} x {dim}, {len(queries):,} held-out queries, faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    t = time.perf_counter()
    blocks = ((np.arange(s, min(s + 16384, n)), corpus[s : s + 16384]) for s in range(0, n, 16384))
    gt_scores, gt_pos = exact_ground_truth(queries, blocks, k + 16)
    print(
        f"exact ground truth (numpy, streamed blocks): {time.perf_counter() - t:.1f} s", flush=True
    )

    auto = choose_index(n, dim, args.memory_budget)
    print(f"auto choice: {auto.spec} -- {auto.reason}", flush=True)
    ivf = f"IVF{ivf_nlist(n)},Flat"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ann-") as tmp:
        flat = bench_index(
            "flat", "Flat", corpus, queries, gt_scores, gt_pos, k, Path(tmp) / "flat"
        )
        flat_qps = flat["sweep"][0]["qps"]
        flat["sweep"][0]["ratio"] = 1.0
        results.append(flat)
        runs = [("auto", auto.spec), ("hnsw", "HNSW32"), ("ivf", ivf)]
        done = {"Flat": flat}
        for name, spec in runs:
            if spec in done:  # the auto choice is one of the others: reuse its figures
                print(f"{name}: same index as {done[spec]['name']} ({spec})", flush=True)
                results.append({**done[spec], "name": name})
                continue
            done[spec] = bench_index(
                name, spec, corpus, queries, gt_scores, gt_pos, k, Path(tmp) / name, flat_qps
            )
            results.append(done[spec])

    print()
    print(
        f"{'index':<16}{'build s':>9}{'peak RssAnon':>14}{'size MiB':>10}  best setting >= 0.95 recall@{k}"
    )
    candidates = []
    for r in results:
        good = [row for row in r["sweep"] if row["recall"] >= 0.95]
        best = max(good, key=lambda row: row["qps"]) if good else None
        if best and r["name"] != "flat":
            candidates.append(best)
        desc = (
            f"{_fmt(best['params'])} recall={best['recall']:.4f} qps={best['qps']:,.0f} (x{best['ratio']:.1f})"
            if best
            else "none"
        )
        print(
            f"{r['name'] + ':' + r['spec']:<16}{r['build_s']:>9.1f}{r['peak_rss_anon_bytes'] / 2**20:>11,.0f} MiB"
            f"{r['index_bytes'] / 2**20:>10.1f}  {desc}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"flat_qps": flat_qps, "results": results}, indent=2, default=str)
        )
    if not candidates:
        print(f"best_recall@{k}=none qps_ratio_vs_flat=0 index=none")
        return 1
    best = max(candidates, key=lambda row: row["qps"])
    print(f"fastest setting with recall@{k} >= 0.95: {best['index']} {_fmt(best['params'])}")
    print(
        f"best_recall@{k}={best['recall']:.4f} qps_ratio_vs_flat={best['ratio']:.1f} index={best['index']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
