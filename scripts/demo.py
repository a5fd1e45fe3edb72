#!/usr/bin/env python
"""`make demo`: the whole evalkit pipeline on real data that installs with the project.

The data is Lee, Pincombe & Welsh (2005): 50 news documents and the mean human similarity rating
of each of the 1,225 document pairs. It ships inside the `gensim` wheel (the `demo` extra), so the
demo needs no network beyond the package registries.

Steps, each the command a user would type:
1) write the pairs (doc1, doc2, similarity) as Parquet, the kind of file users hold;
2) `evalkit convert` it to a memory-mapped Arrow file and read it back through PairDataset;
3) `evalkit evaluate pairs` with the packaged all-MiniLM-L6-v2 (embeddings go into the store);
4) the same evaluation again: every embedding now comes from the store.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def lee_files() -> tuple[Path, Path]:
    try:
        data = importlib.resources.files("gensim") / "test" / "test_data"
    except ModuleNotFoundError:
        sys.exit(
            "the demo reads the Lee (2005) data shipped in gensim: pip install 'evalkit[demo]'"
        )
    docs, sims = data / "lee.cor", data / "similarities0-1.txt"
    if not (docs.is_file() and sims.is_file()):
        sys.exit(f"gensim is installed but its Lee test data is missing under {data}")
    return Path(str(docs)), Path(str(sims))


def write_pairs(dest: Path) -> int:
    """Lee's 50 documents and the upper triangle of the 50x50 rating matrix -> a Parquet of pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs_path, sims_path = lee_files()
    docs = [
        line.strip()
        for line in docs_path.read_text(encoding="latin-1").splitlines()
        if line.strip()
    ]
    rows = [line.split() for line in sims_path.read_text().splitlines() if line.strip()]
    assert len(docs) == len(rows) == 50, (len(docs), len(rows))
    left, right, score = [], [], []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            left.append(docs[i])
            right.append(docs[j])
            score.append(float(rows[i][j]))
    table = pa.table({"doc1": left, "doc2": right, "similarity": score})
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest)
    return table.num_rows


def run(cmd: list[str]) -> float:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    parser.add_argument("--cache", default=None, help="embedding store (default: ./cache)")
    args = parser.parse_args()
    out = Path(args.out)
    evalkit = [sys.executable, "-m", "evalkit"]
    cache = ["--cache", args.cache] if args.cache else []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    n = write_pairs(out / "lee_pairs.parquet")
    print(f"wrote {n} real document pairs (Lee et al. 2005) to {out / 'lee_pairs.parquet'}")

    run([*evalkit, "convert", str(out / "lee_pairs.parquet"), str(out / "lee_pairs.arrow")])

    from evalkit.data.dataset import PairDataset

    ds = PairDataset(
        out / "lee_pairs.arrow", text_columns=["doc1", "doc2"], label_column="similarity"
    )
    first = ds[0]
    print(
        f"PairDataset: {len(ds)} memory-mapped pairs; first: label={first.label:.3f}, "
        f"doc1={first.texts[0][:60]!r}..."
    )

    evaluate = [
        *evalkit,
        "evaluate",
        "pairs",
        str(out / "lee_pairs.arrow"),
        "--left",
        "doc1",
        "--right",
        "doc2",
        "--label",
        "similarity",
        *cache,
    ]
    first_s = run([*evaluate, "--out", str(out / "eval-1")])
    second_s = run([*evaluate, "--out", str(out / "eval-2")])

    m1 = json.loads((out / "eval-1" / "metrics.json").read_text())
    m2 = json.loads((out / "eval-2" / "metrics.json").read_text())
    cache2 = m2.get("cache", {})
    print("\n== demo summary ==")
    print(f"spearman_cosine (model vs human ratings): {m1['metrics']['spearman_cosine']:.4f}")
    print(
        f"first run {first_s:.1f} s; second run {second_s:.1f} s: {cache2.get('hits', 0)} store hits, "
        f"{cache2.get('misses', 0)} encoded, model loaded: {cache2.get('model_loaded', True)}"
    )
    print(f"reports: {out / 'eval-1' / 'summary.md'}, metrics: {out / 'eval-1' / 'metrics.json'}")


if __name__ == "__main__":
    main()
