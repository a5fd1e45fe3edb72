#!/usr/bin/env python
"""Benchmark: retrieval evaluation on precomputed vectors, evalkit vs sentence-transformers'
InformationRetrievalEvaluator, at 100,000 and 1,000,000 documents (time and peak RssAnon).

1) data per size (--sizes): a BEIR-layout corpus.jsonl whose documents are real WordNet glosses
   (../shared/data; text "#<row> <gloss>"), queries.jsonl and qrels.tsv, and the vectors.npy both
   contenders read: 384-dim float32, one row per document and per query (seeded normal vectors;
   each query is its relevant document's vector plus noise, so the metrics mean something);
2) the same "precomputed-vector model" for both: a SentenceTransformer whose only module maps the
   text "#<row> ..." to row <row> of vectors.npy (memory-mapped: page cache, not RssAnon); every
   cost left is the evaluation's own: reading the files, batching, search, ranking, metrics;
3) every run is a fresh process (`--worker`), importing its libraries, running once untimed on
   a 2,000-document set (first calls, lazy imports) and building the model before the clock
   starts: evalkit = `evaluate_retrieval(corpus, queries, qrels, cache=False)`
   (no embedding store: nothing persists between runs), sentence-transformers = read the same
   files into dicts as its docs show + `InformationRetrievalEvaluator(...)(model)`; same batch
   size, same k lists, same CPU threads. Wall seconds and peak RssAnon (sampled every 5 ms);
4) --runs (>= 5) runs per contender and size, interleaved (the order alternates every run);
   medians reported. Every metric of the two must agree within 1e-6 at every size;
5) optional (--parity-docs > 0): the packaged all-MiniLM-L6-v2 on a small real-text corpus
   through both evaluators, every metric's difference printed (must be <= 1e-6).

Targets: evalkit >= 1.5x faster and a lower peak RssAnon than sentence-transformers at every
size; evalkit's peak RssAnon grows <= 20 MB from the smallest to the largest size. The last line
is `speedup_vs_st=<at each size> peak_rss_growth_mb=X`; exit 1 when a target is missed.

    python scripts/bench_evaluate.py [--sizes 100000,1000000] [--runs 5] [--queries 1000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
GLOSSES = ROOT.parent / "shared" / "data" / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv"
KS = [1, 3, 5, 10, 100]
DIM = 384
CONTENDERS = ("evalkit", "sentence-transformers")


def read_glosses(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [row[3] for row in reader]


def build_data(folder: Path, rows: int, n_queries: int, glosses: list[str], seed: int) -> Path:
    """corpus.jsonl, queries.jsonl, qrels.tsv and vectors.npy ([rows + n_queries, 384])."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vectors = np.lib.format.open_memmap(
        folder / "vectors.npy.tmp", mode="w+", dtype=np.float32, shape=(rows + n_queries, DIM)
    )
    for s in range(0, rows, 65536):
        vectors[s : min(rows, s + 65536)] = rng.standard_normal((min(rows, s + 65536) - s, DIM))
    relevant = rng.choice(rows, n_queries, replace=False)
    noise = rng.standard_normal((n_queries, DIM)).astype(np.float32)
    vectors[rows:] = vectors[relevant] + 0.7 * noise  # the relevant document is near, not exact
    vectors.flush()
    del vectors
    os.replace(folder / "vectors.npy.tmp", folder / "vectors.npy")
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for r in range(rows):
            f.write(
                json.dumps(
                    {"_id": f"d{r}", "title": "", "text": f"#{r} {glosses[r % len(glosses)]}"}
                )
            )
            f.write("\n")
    with (
        open(folder / "queries.jsonl", "w", encoding="utf-8") as fq,
        open(folder / "qrels.tsv", "w", encoding="utf-8") as fr,
    ):
        fr.write("query-id\tcorpus-id\tscore\n")
        for i, doc in enumerate(relevant):
            words = " ".join(glosses[int(doc) % len(glosses)].split()[:5])
            fq.write(json.dumps({"_id": f"q{i}", "text": f"#{rows + i} {words}"}) + "\n")
            fr.write(f"q{i}\td{int(doc)}\t1\n")
    return folder


# ----------------------------------------------------------------------------- one run (worker)


def lookup_model(vectors_path: Path):
    """A SentenceTransformer whose single module returns row <row> of vectors.npy for "#<row> ..."."""
    import hashlib

    import torch
    from sentence_transformers import SentenceTransformer

    class PrecomputedVectors(torch.nn.Module):
        def __init__(self, path: Path) -> None:
            super().__init__()
            self.vectors = np.load(path, mmap_mode="r")
            digest = hashlib.sha256(f"{path}:{self.vectors.shape}".encode()).digest()[:8]
            self.register_buffer("source", torch.tensor(list(digest), dtype=torch.uint8))

        def preprocess(self, inputs, prompt=None, **kwargs):
            return {"row": torch.tensor([int(t.split(" ", 1)[0][1:]) for t in inputs])}

        def forward(self, features, **kwargs):
            rows = features["row"].numpy()
            features["sentence_embedding"] = torch.from_numpy(np.array(self.vectors[rows]))
            return features

        def get_embedding_dimension(self) -> int:
            return int(self.vectors.shape[1])

    return SentenceTransformer(modules=[PrecomputedVectors(vectors_path)], device="cpu")


def run_evalkit(data: Path, model, batch_size: int) -> dict:
    from evalkit.jobs.evaluate import evaluate_retrieval

    result = evaluate_retrieval(
        data / "corpus.jsonl", data / "queries.jsonl", data / "qrels.tsv", model=model,
        cache=False, device="cpu", batch_size=batch_size, k_values=KS, progress=False,
        plots=False, results=False,  # measure the evaluation, never a stored result
    )  # fmt: skip
    return result["metrics"]


def run_st(data: Path, model, batch_size: int) -> dict:
    """The sentence-transformers way: the files read into dicts, then the evaluator."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    corpus, queries, relevant = {}, {}, {}
    with open(data / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            corpus[doc["_id"]] = f"{doc.get('title') or ''} {doc['text']}".strip()
    with open(data / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            queries[q["_id"]] = q["text"]
    with open(data / "qrels.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, doc, score = line.rstrip("\n").split("\t")
            if int(score) > 0:
                relevant.setdefault(qid, set()).add(doc)
    queries = {q: t for q, t in queries.items() if q in relevant}
    evaluator = InformationRetrievalEvaluator(
        queries, corpus, relevant, batch_size=batch_size, show_progress_bar=False,
        accuracy_at_k=KS, precision_recall_at_k=KS, mrr_at_k=KS, ndcg_at_k=KS, map_at_k=KS,
        write_csv=False,
    )  # fmt: skip
    return evaluator(model)


def worker(contender: str, data: Path, batch_size: int, warmup: Path | None) -> None:
    """One timed run in this (fresh) process, after an untimed warm-up on a small dataset (first
    calls, lazy imports, thread pools: the same for both contenders); prints one JSON line."""
    import logging

    from _bench_common import PeakRss, rss_anon

    logging.disable(logging.WARNING)
    import sentence_transformers.sentence_transformer.evaluation  # noqa: F401

    import evalkit.jobs.evaluate  # noqa: F401 - imports before the clock, as for the peer

    run = run_evalkit if contender == "evalkit" else run_st
    if warmup is not None:
        run(warmup, lookup_model(warmup / "vectors.npy"), batch_size)
    model = lookup_model(data / "vectors.npy")
    start = rss_anon()
    t = time.perf_counter()
    with PeakRss() as mem:
        metrics = run(data, model, batch_size)
    seconds = time.perf_counter() - t
    out = {"contender": contender, "seconds": seconds, "peak": mem.peak, "start": start}
    out["metrics"] = {k: float(v) for k, v in metrics.items()}
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- the benchmark


def run_size(data: Path, runs: int, batch_size: int, warmup: Path) -> dict[str, list[dict]]:
    """`runs` fresh-process runs of each contender, the order alternating every run."""
    results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for r in range(runs):
        for contender in CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]:
            cmd = [sys.executable, __file__, "--worker", contender, "--data", str(data),
                   "--batch-size", str(batch_size), "--warmup", str(warmup)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{contender} run failed (exit {proc.returncode})")
            res = json.loads(lines[-1][len("RESULT ") :])
            results[contender].append(res)
            print(
                f"  run {r + 1} {contender:<22} {res['seconds']:8.2f} s  peak RssAnon "
                f"{res['peak'] / 2**20:7.0f} MiB (start {res['start'] / 2**20:.0f} MiB)",
                flush=True,
            )
    return results


def summarise(size: int, results: dict[str, list[dict]]) -> dict:
    from _bench_common import median

    ek, st = results["evalkit"], results["sentence-transformers"]
    out = {
        "size": size,
        "evalkit_s": median([r["seconds"] for r in ek]),
        "st_s": median([r["seconds"] for r in st]),
        "evalkit_peak": median([r["peak"] for r in ek]),
        "st_peak": median([r["peak"] for r in st]),
    }
    a, b = ek[0]["metrics"], st[0]["metrics"]
    common = sorted(set(a) & set(b))
    out["metric_diff"] = max(abs(a[k] - b[k]) for k in common) if common else float("inf")
    out["metrics_compared"] = len(common)
    out["ndcg@10"] = a.get("cosine_ndcg@10")
    out["speedup"] = out["st_s"] / out["evalkit_s"]
    print(
        f"== {size:,} docs: evalkit {out['evalkit_s']:.2f} s vs sentence-transformers "
        f"{out['st_s']:.2f} s (median of {len(ek)}): {out['speedup']:.2f}x; peak RssAnon evalkit "
        f"{out['evalkit_peak'] / 2**20:,.0f} MiB vs {out['st_peak'] / 2**20:,.0f} MiB; "
        f"{len(common)} metrics agree within {out['metric_diff']:.1e} "
        f"(cosine_ndcg@10 {out['ndcg@10']:.5f})",
        flush=True,
    )
    return out


def parity(docs: int, n_queries: int, workdir: Path, seed: int) -> float:
    """The packaged MiniLM on real glosses through both evaluators; max |difference|."""
    from evalkit.embed.models import load_model

    glosses = read_glosses(GLOSSES)
    folder = workdir / "parity"
    build_data(folder, docs, n_queries, glosses, seed)
    # real texts this time: the gloss after the "#row" marker is what MiniLM reads
    model = load_model(None, device="cpu")
    a = run_evalkit(folder, model, 64)
    b = run_st(folder, model, 64)
    diffs = {k: abs(a[k] - b[k]) for k in set(a) & set(b)}
    worst = max(diffs, key=diffs.get)
    print(
        f"== parity, all-MiniLM-L6-v2 on {docs:,} real glosses x {n_queries} queries: "
        f"{len(diffs)} metrics, max |evalkit - sentence-transformers| {diffs[worst]:.1e} ({worst})"
    )
    return diffs[worst]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--sizes", default="100000,1000000", help="corpus sizes, comma-separated")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5, help="fresh-process runs per contender and size")
    p.add_argument("--batch-size", type=int, default=256, help="encode batch size, both")
    p.add_argument("--parity-docs", type=int, default=2000, help="0 skips the MiniLM parity run")
    p.add_argument("--workdir", default=None, help="default: a new temporary folder, removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        worker(args.worker, args.data, args.batch_size, args.warmup)
        return 0
    if args.runs < 5:
        p.error("--runs must be >= 5")
    from _bench_common import machine_line

    sizes = [int(s) for s in args.sizes.split(",")]
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-evaluate-") if own else args.workdir)
    print(f"{machine_line()}; {args.queries} queries, batch {args.batch_size}, k {KS}, no store")
    try:
        glosses = read_glosses(GLOSSES)
        warmup = build_data(workdir / "warmup", 2000, 50, glosses, args.seed + 7)
        summaries = []
        for size in sizes:
            t = time.perf_counter()
            data = build_data(workdir / f"n{size}", size, args.queries, glosses, args.seed)
            print(f"built {size:,} docs + vectors in {time.perf_counter() - t:.1f} s", flush=True)
            results = run_size(data, args.runs, args.batch_size, warmup)
            summaries.append(summarise(size, results))
            shutil.rmtree(data, ignore_errors=True)
        worst_parity = (
            parity(args.parity_docs, 100, workdir, args.seed) if args.parity_docs else 0.0
        )
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return report(summaries, worst_parity)


def report(summaries: list[dict], worst_parity: float) -> int:
    growth = (summaries[-1]["evalkit_peak"] - summaries[0]["evalkit_peak"]) / 1e6  # MB
    checks = {
        "evalkit >= 1.5x faster at every size": all(s["speedup"] >= 1.5 for s in summaries),
        "evalkit peak RssAnon below ST's at every size": all(
            s["evalkit_peak"] < s["st_peak"] for s in summaries
        ),
        f"evalkit peak RssAnon growth {summaries[0]['size']:,} -> {summaries[-1]['size']:,} docs "
        "<= 20 MB": growth <= 20,
        "metrics agree within 1e-6": all(s["metric_diff"] <= 1e-6 for s in summaries)
        and worst_parity <= 1e-6,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    speed = " ".join(f"speedup_vs_st_{s['size']}={s['speedup']:.2f}" for s in summaries)
    print(f"{speed} peak_rss_growth_mb={growth:.1f}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
