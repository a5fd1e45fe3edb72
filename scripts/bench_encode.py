#!/usr/bin/env python
"""Benchmark: evalkit's streaming encoder + embedding store vs plain SentenceTransformer.encode.

Real texts (WordNet glosses), the packaged all-MiniLM-L6-v2 on CPU, one batch size for all:

1. cold, unique texts: the first --n distinct glosses (no duplicate anywhere, so within-window
   de-duplication cannot help), cut into --runs parts (>= 5); run r times `model.encode(part_r)`
   (plain) and `evalkit.encode_texts(part_r, store=<one store for all parts>)` (cold: the parts
   are disjoint, so the store holds none of part r, only the parts before it, which evalkit
   still looks up) back to back, the order alternating every run; cold_ratio = median over runs
   of plain_r / cold_r (1.0 = no overhead);
2. de-duplication's gain, reported apart: the same on the first --dupes-n glosses as they come
   (WordNet repeats some glosses): dedupe_gain = its median ratio / the unique-text ratio;
3. a half-filled store: each part's store is first given a random half of the part (untimed);
   evalkit then encodes the whole part against it (reading the half it has, encoding the rest)
   and plain encodes only the missing half: half_ratio = median of plain_r / evalkit_r; it
   prices the lookups and the mixed windows, not the texts already stored;
4. warm: the --n texts re-encoded in one `encode_texts` call through the cold runs' store (all
   hits, every row's checksum verified, the vectors checked equal to the cold ones), 5 times;
   warm_speedup = plain's total time over the 5 parts / the median warm call. Each call is what
   a user's re-encode costs: a full fingerprint of the model's weights, 20,000 keys hashed, looked
   up and verified. Before timing, evalkit's first call with a store goes through a scratch
   store (one-time imports), as plain's first call is warmed up too. (Until 2026-12 this re-ran
   the 5 parts through 5 stores: 5 encoders, so 5 fingerprints, for one re-encode.)
Raw store read throughput is measured fairly (1M-entry store, cold processes, unseen keys) by
`scripts/bench_store.py`, not here.

The last line is `cold_ratio=X half_filled_ratio=Y dedupe_gain=Z warm_speedup=W`; exit 1 when
cold_ratio < 1.0, half_filled_ratio < 0.98 or warm_speedup < 1000.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv"


def read_glosses(path: Path, n: int, *, unique: bool) -> list[str]:
    """The first n glosses in file order; with `unique`, the first n distinct ones."""
    texts, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            text = line.rstrip("\n").split("\t")[3]
            if unique:
                if text in seen:
                    continue
                seen.add(text)
            texts.append(text)
            if len(texts) == n:
                return texts
    sys.exit(f"{path} has only {len(texts)} {'distinct ' if unique else ''}texts; asked for {n}")


def parts_of(texts: list[str], runs: int) -> list[list[str]]:
    return [texts[i * len(texts) // runs : (i + 1) * len(texts) // runs] for i in range(runs)]


def paired_ratios(
    parts, model, batch_size: int, tmp: Path, tag: str, prefill: bool = False, shared: bool = False
):
    """Per part: (plain seconds, evalkit seconds, evalkit's vectors); the order alternates.
    `shared`: one store for every part (else one each)."""
    import numpy as np

    from evalkit.embed.oneshot import encode_texts
    from evalkit.embed.store import EmbeddingStore

    out = []
    for r, part in enumerate(parts):
        store = EmbeddingStore(tmp / (tag if shared else f"{tag}{r}"))  # closed below
        plain_texts = part
        if prefill:  # a random half already stored; plain encodes only the other half
            pick = set(random.Random(r).sample(range(len(part)), len(part) // 2))
            encode_texts([part[i] for i in sorted(pick)], model, store=store, batch_size=batch_size)
            plain_texts = [t for i, t in enumerate(part) if i not in pick]
        secs = {}
        for kind in ("plain", "evalkit") if r % 2 == 0 else ("evalkit", "plain"):
            t0 = time.perf_counter()
            if kind == "plain":
                ref = model.encode(plain_texts, batch_size=batch_size)
            else:
                res = encode_texts(part, model, store=store, batch_size=batch_size)
            secs[kind] = time.perf_counter() - t0
        if not prefill:  # evalkit must serve what plain computes
            diff = float(np.abs(res.embeddings - ref).max())
            assert diff < 1e-4, f"evalkit and plain vectors differ by {diff}"
        store.close()
        out.append((secs["plain"], secs["evalkit"], res.embeddings))
        print(
            f"  {tag} run {r}: plain {len(plain_texts)} texts {secs['plain']:.1f} s, evalkit "
            f"{len(part)} texts ({res.misses} encoded) {secs['evalkit']:.1f} s: "
            f"{secs['plain'] / secs['evalkit']:.3f}",
            flush=True,
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000, help="distinct texts, cold and warm")
    parser.add_argument("--dupes-n", type=int, default=10_000, help="texts as they come (dedupe)")
    parser.add_argument("--half-n", type=int, default=10_000, help="texts, half-filled store")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="parts = paired timed runs (>= 5)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WordNet glosses TSV")
    parser.add_argument("--model", default=None, help="model directory (default: packaged MiniLM)")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be >= 5")

    import numpy as np
    import torch
    from _bench_common import machine_line

    from evalkit.embed.models import load_model
    from evalkit.embed.oneshot import encode_texts

    unique = read_glosses(args.data, args.n, unique=True)
    as_they_come = read_glosses(args.data, args.dupes_n, unique=False)
    n_dupes = len(as_they_come) - len(set(as_they_come))
    model = load_model(args.model, device="cpu")
    print(f"batch_size={args.batch_size} torch_threads={torch.get_num_threads()} {machine_line()}")
    model.encode(unique[:64], batch_size=args.batch_size)  # warm up kernels
    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # stores, models: GBs
    for _ in range(2):  # and evalkit's first calls, without a store and with one (then warm)
        encode_texts(unique[:64], model, batch_size=args.batch_size)
        encode_texts(unique[:64], model, store=tmp / "scratch", batch_size=args.batch_size)

    parts = parts_of(unique, args.runs)
    cold = paired_ratios(parts, model, args.batch_size, tmp, "cold", shared=True)
    cold_ratio = float(np.median([p / e for p, e, _ in cold]))
    dupes = paired_ratios(parts_of(as_they_come, args.runs), model, args.batch_size, tmp, "dupes")
    dupes_ratio = float(np.median([p / e for p, e, _ in dupes]))
    half_texts = unique[: args.half_n]
    half = paired_ratios(
        parts_of(half_texts, args.runs), model, args.batch_size, tmp, "half", prefill=True
    )
    half_ratio = float(np.median([p / e for p, e, _ in half]))

    warm_runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        warm = encode_texts(unique, model, store=tmp / "cold", batch_size=args.batch_size)
        warm_runs.append(time.perf_counter() - t0)
        if warm.hits != len(unique) or not np.array_equal(
            warm.embeddings, np.concatenate([v for _, _, v in cold])
        ):
            sys.exit("warm: the store did not serve the cold run's vectors for every text")
    warm_s = float(np.median(warm_runs))
    plain_s = sum(p for p, _, _ in cold)
    print(f"cold, {len(unique):,} distinct texts: median plain/evalkit {cold_ratio:.3f}")
    print(
        f"as they come, {len(as_they_come):,} texts ({n_dupes} duplicates): median "
        f"{dupes_ratio:.3f}; de-duplication's gain {dupes_ratio / cold_ratio:.3f}x"
    )
    print(f"half-filled store, {len(half_texts):,} texts: median {half_ratio:.3f}")
    print(
        f"warm: {len(unique)} texts, all hits, median {warm_s * 1e3:.1f} ms of "
        + ", ".join(f"{t * 1e3:.1f}" for t in warm_runs)
        + f"; plain took {plain_s:.1f} s"
    )
    ok = cold_ratio >= 1.0 and half_ratio >= 0.98 and plain_s / warm_s >= 1000
    print(
        "targets: cold_ratio >= 1.0, half_filled_ratio >= 0.98, warm_speedup >= 1000: "
        + ("PASS" if ok else "FAIL")
    )
    print(
        f"cold_ratio={cold_ratio:.3f} half_filled_ratio={half_ratio:.3f} "
        f"dedupe_gain={dupes_ratio / cold_ratio:.3f} warm_speedup={plain_s / warm_s:.1f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
