#!/usr/bin/env python
"""Benchmark: evalkit's streaming encoder + embedding store vs plain SentenceTransformer.encode.

On N real texts (WordNet glosses), the packaged all-MiniLM-L6-v2 on CPU, one batch size:

1. plain  = model.encode(texts, batch_size=B)
2. cold   = evalkit.encode_texts(texts, model, store=<empty store>, batch_size=B)
3. warm   = the same call again: every text is served from the store (every row's checksum
   verified)

Raw store read throughput is measured fairly (1M-entry store, cold processes, unseen keys) by
`scripts/bench_store.py`, not here.

To be fair on a shared machine, the texts are split into --rounds parts and plain/cold alternate
(ABBA order), each cold part with its own empty store. Ratios: cold_ratio = plain / cold time
(1.0 = no overhead), warm_speedup = plain / warm time. The last line is machine-readable:

    cold_ratio=X warm_speedup=Y
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv"


def read_glosses(path: Path, n: int) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            texts.append(line.rstrip("\n").split("\t")[3])
            if len(texts) == n:
                break
    if len(texts) < n:
        sys.exit(f"{path} has only {len(texts)} texts; asked for {n}")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, default=20_000, help="number of texts (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="plain/cold alternations (default: %(default)s)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WordNet glosses TSV")
    parser.add_argument("--model", default=None, help="model directory (default: packaged MiniLM)")
    args = parser.parse_args()

    import numpy as np

    from evalkit.embed.encoder import encode_texts
    from evalkit.embed.fingerprint import model_fingerprint
    from evalkit.embed.models import load_model
    from evalkit.embed.store import EmbeddingStore

    texts = read_glosses(args.data, args.n)
    model = load_model(args.model, device="cpu")
    import torch

    print(f"texts={len(texts)} batch_size={args.batch_size} torch_threads={torch.get_num_threads()} "
          f"load_avg={os.getloadavg()[0]:.1f}")  # fmt: skip

    t0 = time.perf_counter()
    fp = model_fingerprint(model)
    t_fp = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_fingerprint(model)
    t_fp_cached = time.perf_counter() - t0
    print(f"fingerprint: {t_fp:.3f} s first call, {t_fp_cached * 1000:.1f} ms cached ({fp})")

    model.encode(texts[:64], batch_size=args.batch_size)  # warm up kernels
    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    parts = [
        texts[i * len(texts) // args.rounds : (i + 1) * len(texts) // args.rounds]
        for i in range(args.rounds)
    ]
    stores = [EmbeddingStore(tmp / f"store{i}") for i in range(args.rounds)]
    plain_s = cold_s = 0.0
    max_diff = 0.0
    for r, part in enumerate(parts):
        order = ("plain", "cold") if r % 2 == 0 else ("cold", "plain")
        for kind in order:
            t0 = time.perf_counter()
            if kind == "plain":
                ref = model.encode(part, batch_size=args.batch_size)
                plain_s += (dt := time.perf_counter() - t0)
            else:
                res = encode_texts(part, model, store=stores[r], batch_size=args.batch_size)
                cold_s += (dt := time.perf_counter() - t0)
            print(
                f"round {r} {kind:5s}: {len(part)} texts in {dt:.1f} s ({len(part) / dt:.0f}/s)",
                flush=True,
            )
        max_diff = max(max_diff, float(np.abs(res.embeddings - ref).max()))

    t0 = time.perf_counter()
    hits = 0
    for r, part in enumerate(parts):
        hits += encode_texts(part, model, store=stores[r], batch_size=args.batch_size).hits
    warm_s = time.perf_counter() - t0
    print(f"warm : {len(texts)} texts in {warm_s:.2f} s ({len(texts) / warm_s:.0f}/s), {hits} hits")

    print(
        f"plain={plain_s:.1f}s cold={cold_s:.1f}s warm={warm_s:.2f}s max|evalkit-plain|={max_diff:.2e}"
    )
    print(
        f"store: {stores[0].info()['bytes'] / max(1, stores[0].count()):.0f} bytes/vector on disk"
    )
    print(f"cold_ratio={plain_s / cold_s:.3f} warm_speedup={plain_s / warm_s:.1f}")


if __name__ == "__main__":
    main()
