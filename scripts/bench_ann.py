#!/usr/bin/env python
"""Benchmark: FAISS indexes against exact Flat search on ~164,000 real sentence embeddings.

Steps:
1) texts: every WordNet 3.0 gloss (117,659) and every SciFact abstract sentence (45,952) in
   ../shared/data, in file order, ids "wn:<synset>" / "sf:<doc>:<sent>";
2) embeddings with the packaged all-MiniLM-L6-v2 through the embedding store (--cache; the first
   run encodes for ~20 min on 2 CPU cores, later runs only read the store);
3) hold out --queries random rows as queries (removed from the corpus), exact top-k ground truth
   with evalkit.search.exact_search over corpus blocks (ties by position);
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
    from evalkit.encode import encode_texts
    from evalkit.models import load_model
    from evalkit.store import EmbeddingStore

    model = load_model(None, device="cpu")
    store = EmbeddingStore(cache)
    t = time.perf_counter()
    result = encode_texts(texts, model, store=store, batch_size=batch_size, progress=True)
    info = {"hits": result.hits, "misses": result.misses, "seconds": time.perf_counter() - t}
    return result.embeddings, result.fingerprint, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/ek-bench-cache", help="embedding store directory")
    p.add_argument("--encode-only", action="store_true", help="fill the store and stop")
    p.add_argument("--limit", type=int, default=None, help="use only the first N texts (smoke test)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
