"""The precompute job: shards + manifest aligned with the input, resume after SIGKILL gives
byte-identical output, another model's DIR is refused, --shard I/N is disjoint and complete, and
the `evalkit encode` / `evalkit cache` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evalkit.embed.shards import iter_embeddings, load_manifest, plan_shards
from evalkit.errors import FingerprintMismatchError, StoreError
from evalkit.jobs.precompute import run_precompute

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> Path:
    """600 real WordNet glosses (with a few repeats and an empty text) as a JSON Lines file."""
    lines = (
        (shared_data / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv")
        .read_text(encoding="utf-8")
        .splitlines()[1:601]
    )
    rows = [{"gid": parts[0], "text": parts[3]} for parts in (line.split("\t") for line in lines)]
    rows[10]["text"] = rows[500]["text"]
    rows[20]["text"] = ""
    path = tmp_path_factory.mktemp("corpus") / "glosses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _texts(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("rows", [0, 1, 7, 250, 1000])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_plan_is_disjoint_and_complete(rows, n):
    ranges = [r for i in range(n) for r in plan_shards(rows, (i, n), rows_per_shard=100)]
    assert sorted(ranges) == ranges
    covered = [row for a, b in ranges for row in range(a, b)]
    assert covered == list(range(rows))
    # file boundaries do not depend on how the job is split (only its ends do)
    assert all(b - a <= 100 for a, b in ranges)
    assert {a for a, _ in plan_shards(rows, (0, 1), 100)} <= {a for a, _ in ranges}


def test_writes_shards_and_manifest_aligned_with_rows(corpus, tiny_model_dir, tiny_model, tmp_path):
    out = tmp_path / "out"
    manifest = run_precompute(corpus, column="text", id_column="gid", out=out, model=str(tiny_model_dir), cache=tmp_path / "c",
                              batch_size=32, rows_per_shard=256, progress=False)  # fmt: skip
    assert manifest["complete"] and manifest["rows"] == 600 and manifest["dim"] == 32
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [
        (0, 256),
        (256, 512),
        (512, 600),
    ]
    assert sorted(p.name for p in out.iterdir()) == [s["file"] for s in manifest["shards"]] + [
        "manifest.json"
    ]
    assert load_manifest(out)["model_fingerprint"] == manifest["model_fingerprint"]
    blocks = list(iter_embeddings(out))
    ids = [i for b, _ in blocks for i in b]
    vectors = np.concatenate([v for _, v in blocks])
    texts = _texts(corpus)
    assert ids == [json.loads(line)["gid"] for line in corpus.read_text().splitlines()]
    np.testing.assert_allclose(vectors, tiny_model.encode(texts, batch_size=32), atol=1e-5, rtol=0)
    # rerun: everything verified and skipped; another DIR: everything from the store
    again = run_precompute(corpus, column="text", id_column="gid", out=out, model=str(tiny_model_dir), cache=tmp_path / "c", progress=False, rows_per_shard=256)  # fmt: skip
    assert again["last_run"]["skipped_shards"] == 3 and again["last_run"]["rows"] == 0
    other = run_precompute(corpus, column="text", out=tmp_path / "o2", model=str(tiny_model_dir), cache=tmp_path / "c", progress=False)  # fmt: skip
    assert other["last_run"]["misses"] == 0 and other["last_run"]["hits"] == 599  # one repeat
    assert [i for b, _ in iter_embeddings(tmp_path / "o2") for i in b] == list(range(600))


def test_float16_output(corpus, tiny_model_dir, tmp_path):
    out = tmp_path / "half"
    run_precompute(corpus, column="text", out=out, model=str(tiny_model_dir), cache=tmp_path / "c", dtype="float16", progress=False)  # fmt: skip
    vectors = np.concatenate([v for _, v in iter_embeddings(out)])
    assert vectors.dtype == np.float16 and vectors.shape == (600, 32)


def test_other_model_dir_is_refused(corpus, tiny_model_dir, tmp_path):
    from conftest import build_tiny_model_dir

    out = tmp_path / "out"
    small = corpus.parent / "small.jsonl"
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:40]))
    run_precompute(
        small,
        column="text",
        out=out,
        model=str(tiny_model_dir),
        cache=tmp_path / "c",
        progress=False,
    )
    other = build_tiny_model_dir(tmp_path / "m2", seed=3)
    with pytest.raises(FingerprintMismatchError, match="another model"):
        run_precompute(
            small, column="text", out=out, model=str(other), cache=tmp_path / "c", progress=False
        )
    with pytest.raises(StoreError, match="column"):
        run_precompute(
            small,
            column="gid",
            out=out,
            model=str(tiny_model_dir),
            cache=tmp_path / "c",
            progress=False,
        )
    m = run_precompute(
        small,
        column="text",
        out=out,
        model=str(other),
        cache=tmp_path / "c",
        overwrite=True,
        progress=False,
    )
    assert load_manifest(out)["model_fingerprint"] == m["model_fingerprint"]


def test_sharded_jobs_into_one_dir(corpus, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    for i in (2, 0, 1):
        run_precompute(corpus, column="text", out=out, model=str(tiny_model_dir), cache=tmp_path / "c", shard=f"{i}/3",
                       rows_per_shard=128, progress=False)  # fmt: skip
        if i == 2:
            assert not load_manifest(out)["complete"]
            with pytest.raises(StoreError, match="incomplete"):
                next(iter_embeddings(out))
    merged = load_manifest(out)
    assert merged["complete"] and len(merged["jobs"]) == 3
    ids = np.concatenate([b for b, _ in iter_embeddings(out)])
    np.testing.assert_array_equal(ids, np.arange(600))


RUNNER = """
import sys
import time

from sentence_transformers import SentenceTransformer

from evalkit.jobs.precompute import run_precompute

_encode = SentenceTransformer.encode


def paced_encode(self, *args, **kwargs):  # ~0.1 s per call: a kill lands mid-job on any machine
    time.sleep(0.1)
    return _encode(self, *args, **kwargs)


SentenceTransformer.encode = paced_encode
data, out, cache, model = sys.argv[1:5]
run_precompute(data, column="text", id_column="gid", out=out, model=model, cache=cache, batch_size=16,
               rows_per_shard=100, window=40, progress=False)
"""


def _job(tmp_path, corpus, out, cache, model_dir) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = [sys.executable, str(script), str(corpus), str(out), str(cache), str(model_dir)]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_and_resumed_is_byte_identical(corpus, tiny_model_dir, tmp_path):
    full = _job(tmp_path, corpus, tmp_path / "full", tmp_path / "cache-full", tiny_model_dir)
    killed = _job(tmp_path, corpus, tmp_path / "part", tmp_path / "cache-part", tiny_model_dir)
    first = tmp_path / "part" / "embeddings-000000000000-000000000100.arrow"
    deadline = time.monotonic() + 240
    while not first.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next shard: some of its windows reach the store, then SIGKILL
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()
    done_before = load_manifest(tmp_path / "part")["shards"]
    assert 1 <= len(done_before) < 6

    _, err = full.communicate(timeout=300)  # the uninterrupted run, started alongside
    assert full.returncode == 0, err
    resumed = _job(tmp_path, corpus, tmp_path / "part", tmp_path / "cache-part", tiny_model_dir)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = load_manifest(tmp_path / "full"), load_manifest(tmp_path / "part")
    assert b["complete"] and len(b["runs"]) == 2
    # finished shards were skipped; the killed shard's finished windows were resumed, not encoded
    left = 600 - 100 * len(done_before)
    assert b["runs"][1]["rows"] + b["runs"][1].get("resumed_rows", 0) == left
    assert b["runs"][1]["rows"] >= left - 100  # only windows of the killed shard can be resumed
    assert [s["blake2b"] for s in a["shards"]] == [s["blake2b"] for s in b["shards"]]
    for s in a["shards"]:
        assert (tmp_path / "full" / s["file"]).read_bytes() == (
            tmp_path / "part" / s["file"]
        ).read_bytes()
    assert not list((tmp_path / "part").glob(".*-*"))  # no temp file or journal left behind


def test_cli_encode_and_cache(corpus, tiny_model_dir, tmp_path, capsys):
    from evalkit.cli import main

    small = corpus.parent / "cli.jsonl"
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:50]))
    cache = tmp_path / "cache"
    base = [
        "encode",
        str(small),
        "--column",
        "text",
        "--model",
        str(tiny_model_dir),
        "--cache",
        str(cache),
        "--no-progress",
    ]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "0 cache hits, 50 encoded" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "hit rate 100.0%" in captured.err
    fp = json.loads(captured.out)["model_fingerprint"]
    assert main(["cache", "info", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert fp in out and "50 entries" in out
    assert main(["cache", "check", "--cache", str(cache)]) == 0
    assert "ok (50 entries)" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache", str(cache), "--model", fp]) == 0
    assert "removed 50 entries" in capsys.readouterr().out
    assert (
        main(
            [
                "encode",
                str(small),
                "--column",
                "nope",
                "--out",
                str(tmp_path / "c"),
                "--model",
                str(tiny_model_dir),
                "--cache",
                str(cache),
            ]
        )
        == 1
    )
    assert "gid" in capsys.readouterr().err  # the error names the real columns
    assert main(["cache", "info", "--cache", str(tmp_path / "missing")]) == 1
