"""Scale-out overhead of the precompute job on the same cores: one process vs `--workers 2` vs a
2-actor local Ray cluster, on the same 20,000 unique real WordNet glosses, per model (a tiny local
BERT and the packaged all-MiniLM-L6-v2), in one run.

Fair: the same Parquet input (row groups of 2,000), shards of 2,000 rows, batch size 64, a fresh
store per run, the machine's cores split evenly (one process: all of them; two workers or actors:
half each); the modes are interleaved, `--repeats` times, median. Each run's start-up (spawning
the workers / actors and loading the model; for one process, loading the model) is measured by
the job itself (`last_run.startup_s`) and reported; the overhead compares the time after
start-up. Each job is a fresh `evalkit encode` process (Ray: `--ray ADDRESS` of a local cluster
started once on 127.0.0.1 by a holder process, whose start is timed and reported separately). Every output must be
byte-identical to the single-process one (shard files + stable manifest).

Last line: `workers_overhead=X ray_overhead=Y identical=yes|no` (X, Y: the worst model's ratio of
time after start-up to the single process's); exit 1 when either is over --target (1.15) or an
output differs.

    python scripts/bench_scale.py                         # the full run (quiet machine)
    python scripts/bench_scale.py --rows 2000 --models tiny --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# a local Ray cluster on loopback, held by its own process until its stdin closes
HOLDER = (
    "import os, sys, ray; ray.init(address='local', include_dashboard=False, "
    "_node_ip_address='127.0.0.1', num_cpus=os.cpu_count(), log_to_driver=False); "
    "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read(); ray.shutdown()"
)
GLOSSES = ROOT.parent / "shared" / "data" / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv"


def write_input(rows: int, folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = Path(os.environ.get("EVALKIT_GLOSSES", GLOSSES)).read_text("utf-8").splitlines()[1:]
    texts = list(dict.fromkeys(line.split("\t")[3] for line in lines))[:rows]
    if len(texts) < rows:
        raise SystemExit(f"only {len(texts)} unique glosses")
    path = folder / "glosses.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=2000)
    return path


def run_mode(mode: str, data: Path, model: str, out: Path, per_shard: int, address: str) -> dict:
    """One job as a user runs it: `evalkit encode` in a fresh process (no Ray driver threads or
    warm imports shared with the other modes); wall time measured around the process."""
    args = [sys.executable, "-m", "evalkit", "encode", str(data), "--column", "text", "--out",
            str(out), "--model", model, "--cache", str(out.parent / f"{out.name}-store"),
            "--rows-per-shard", str(per_shard), "--batch-size", "64", "--device", "cpu",
            "--no-progress", "--json"]  # fmt: skip
    if mode == "workers":
        args += ["--workers", "2", "--devices", "cpu"]
    elif mode == "ray":
        args = [a for a in args if a not in ("--device", "cpu")] + [
            "--ray",
            "auto",
            "--workers",
            "2",
        ]
    t = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"{mode} failed: {done.stderr.strip().splitlines()[-1]}")
    startup = json.loads(done.stdout)["last_run"]["startup_s"]
    return {"wall_s": wall, "startup_s": startup, "after_startup_s": wall - startup}


def same_output(a: Path, b: Path) -> bool:
    from evalkit.embed.shards import load_manifest, stable_manifest

    ma, mb = load_manifest(a), load_manifest(b)
    if json.dumps(stable_manifest(ma), sort_keys=True) != json.dumps(
        stable_manifest(mb), sort_keys=True
    ):
        return False
    return all((a / s["file"]).read_bytes() == (b / s["file"]).read_bytes() for s in ma["shards"])


def bench_model(name: str, model: str, data: Path, tmp: Path, args, address) -> tuple[dict, bool]:
    modes = ["single", "workers", "ray"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    identical = True
    for rep in range(args.repeats):
        order = modes[rep % 3 :] + modes[: rep % 3]  # interleaved, rotating who goes first
        for mode in order:
            out = tmp / f"{name}-{mode}-{rep}"
            runs[mode].append(run_mode(mode, data, model, out, args.per_shard, address))
            r = runs[mode][-1]
            print(f"  {name} {mode:8s} rep {rep}: wall {r['wall_s']:.1f} s, start-up "
                  f"{r['startup_s']:.1f} s, after start-up {r['after_startup_s']:.1f} s", flush=True)  # fmt: skip
        for mode in ("workers", "ray"):
            identical &= same_output(tmp / f"{name}-single-{rep}", tmp / f"{name}-{mode}-{rep}")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    base = med["single"]
    result = {
        "medians": med,
        "workers_overhead": med["workers"]["after_startup_s"] / base["after_startup_s"],
        "ray_overhead": med["ray"]["after_startup_s"] / base["after_startup_s"],
        "workers_overhead_with_startup": med["workers"]["wall_s"] / base["wall_s"],
        "ray_overhead_with_startup": med["ray"]["wall_s"] / base["wall_s"],
        "texts_per_s_single": args.rows / base["after_startup_s"],
    }
    return result, identical


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--per-shard", type=int, default=2_000)
    parser.add_argument("--models", default="tiny,minilm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=1.15)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    from evalkit.embed.models import resolve_model_path

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))

    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # stores, models: GBs
    data = write_input(args.rows, tmp)
    models = {}
    for name in args.models.split(","):
        if name == "tiny":
            from conftest import build_tiny_model_dir

            models[name] = str(build_tiny_model_dir(tmp / "tiny"))
        else:
            models[name] = str(resolve_model_path(None))
    load = os.getloadavg()
    print(f"{args.rows} unique glosses, shards of {args.per_shard}, {os.cpu_count()} cores, "
          f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)  # fmt: skip
    t = time.perf_counter()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    address = holder.stdout.readline().strip()
    ray_startup = time.perf_counter() - t
    print(f"ray cluster start-up: {ray_startup:.1f} s (not in the overheads)", flush=True)
    results, identical = {}, True
    try:
        for name, model in models.items():
            results[name], same = bench_model(name, model, data, tmp, args, address)
            identical &= same
            r = results[name]
            print(f"{name}: single {r['texts_per_s_single']:.0f} texts/s after start-up; overhead "
                  f"workers {r['workers_overhead']:.3f} (with start-up "
                  f"{r['workers_overhead_with_startup']:.3f}), ray {r['ray_overhead']:.3f} (with "
                  f"start-up {r['ray_overhead_with_startup']:.3f}); identical {same}", flush=True)  # fmt: skip
    finally:
        holder.stdin.close()  # it stops the cluster it started, nothing else
        holder.wait(timeout=120)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    workers = max(r["workers_overhead"] for r in results.values())
    ray_over = max(r["ray_overhead"] for r in results.values())
    ok = workers <= args.target and ray_over <= args.target and identical
    print(f"workers_overhead={workers:.3f} ray_overhead={ray_over:.3f} "
          f"identical={'yes' if identical else 'no'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
