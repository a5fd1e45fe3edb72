"""Helpers for the job tests: STS-B flags, an `evalkit train` command line, the CLI in a fresh
interpreter (to see what a run imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STSB_COLUMNS = "sentence1,sentence2,score"
HEAVY = ("torch", "sentence_transformers", "transformers")


def stsb_flags(path) -> list[str]:
    return [
        "--data", str(path), "--column-names", STSB_COLUMNS, "--left", "sentence1", "--right",
        "sentence2", "--label", "score",
    ]  # fmt: skip


def train_args(shared_data, model_dir, out, eval_data=None) -> list[str]:
    """`evalkit train` on STS-B train, tiny model: 30 steps, a checkpoint every 10."""
    args = [
        "train", str(shared_data / "stsb" / "stsb-en-train.csv"), "--column-names", STSB_COLUMNS,
        "--left", "sentence1", "--right", "sentence2", "--label", "score", "--loss", "cosine",
        "--max-steps", "30", "--checkpoint-every", "10", "--keep-checkpoints", "0", "--lr", "1e-3",
        "--model", str(model_dir), "--out", str(out), "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    if eval_data is not None:
        args += ["--eval-data", str(eval_data), "--eval-every", "10"]
    return args


def run_fresh(args: list[str]) -> tuple[int, str, str, list[str] | None]:
    """The CLI in a fresh interpreter -> (exit code, stdout, stderr, heavy modules it imported)."""
    code = "\n".join(
        [
            "import json, sys",
            "from evalkit.cli import main",
            f"code = main({args!r})",
            f"print('HEAVY=' + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))",
            "sys.exit(code)",
        ]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )
    heavy = json.loads(proc.stdout.rsplit("HEAVY=", 1)[1]) if "HEAVY=" in proc.stdout else None
    return proc.returncode, proc.stdout, proc.stderr, heavy
