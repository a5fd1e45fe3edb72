"""The evaluation job under kill -9: nothing half-written, the store stays consistent, and a rerun
gives exactly the numbers of an uninterrupted run (with the finished part served from the store)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RUNNER = """
import sys
import time

from sentence_transformers import SentenceTransformer

from evalkit.jobs.evaluate import evaluate_pairs

_encode = SentenceTransformer.encode


def paced_encode(self, *args, **kwargs):  # ~0.1 s per call: a kill lands mid-job on any machine
    time.sleep(0.1)
    return _encode(self, *args, **kwargs)


SentenceTransformer.encode = paced_encode
data, out, cache, model = sys.argv[1:5]
evaluate_pairs(data, left="a", right="b", label="score", model=model, cache=cache, out=out,
               read_batch_size=40, progress=False)
"""


@pytest.fixture()
def pairs(tmp_path) -> Path:
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "score"])
        for i in range(480):
            w.writerow(
                [f"sentence {i} about topic {i % 7}", f"a text on theme {i % 11} no {i}", i % 6]
            )
    return path


def _job(tmp_path, data, out, cache, model_dir) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [sys.executable, str(script), str(data), str(out), str(cache), str(model_dir)]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_evaluation_leaves_nothing_half_written_and_resumes_from_the_store(
    pairs, tiny_model_dir, tmp_path
):
    """Guards against: a killed evaluation leaving a partial metrics.json that a pipeline reads as
    a result, or a half-written store whose vectors change the rerun's numbers."""
    from evalkit.embed.store import EmbeddingStore
    from evalkit.jobs.evaluate import evaluate_pairs

    cache, out = tmp_path / "cache", tmp_path / "out"
    killed = _job(tmp_path, pairs, out, cache, tiny_model_dir)
    deadline = time.monotonic() + 120
    while killed.poll() is None and time.monotonic() < deadline:
        if (cache / "cache.db").exists() and EmbeddingStore(cache).count() >= 160:
            break  # a few batches are in the store, the job is mid-way
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()
    assert not (out / "metrics.json").exists() and not (out / "summary.md").exists()
    assert EmbeddingStore(cache).check() == []  # consistent after the kill
    stored = EmbeddingStore(cache).count()
    assert 0 < stored < 960

    rerun = _job(tmp_path, pairs, out, cache, tiny_model_dir)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    got = json.loads((out / "metrics.json").read_text())
    assert got["cache"]["hits"] >= stored  # the finished part came from the store
    fresh = evaluate_pairs(pairs, left="a", right="b", label="score", model=str(tiny_model_dir),
                           cache=False, progress=False)  # fmt: skip
    for name, value in fresh["metrics"].items():
        assert got["metrics"][name] == pytest.approx(value, abs=1e-6), name
