"""Fault injection on the precompute job: inputs edited between runs, and kill -9 in every phase.

Each test states the wrong result it guards against. The kill tests run the job in a subprocess
(tiny model, paced so a kill lands where intended) and compare the resumed output byte for byte
with an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evalkit.cli.encode import summary
from evalkit.data.fingerprint import _BLOCK, _N_BLOCKS, data_fingerprint
from evalkit.embed.shards import iter_embeddings, load_manifest
from evalkit.jobs.precompute import run_precompute

ROOT = Path(__file__).resolve().parents[2]
WORDS = "river stone light music paper garden window silver market winter forest engine".split()


def _write_corpus(path: Path, rows: int, pad: int = 2000) -> list[str]:
    """JSON Lines with `gid`, a short `text` (`NNNNN alpha ...`) and `pad`: `pad` bytes that are
    never encoded but make the file large enough (> 1.2 MB) to be fingerprinted by sampling."""
    rng = random.Random(0)
    texts = [" ".join([f"{i:05d}", "alpha", *rng.choices(WORDS, k=8)]) for i in range(rows)]
    path.write_text(
        "".join(
            json.dumps({"gid": f"g{i}", "text": t, "pad": "p" * pad}) + "\n"
            for i, t in enumerate(texts)
        ),
        encoding="utf-8",
    )
    return texts


def _unsampled(path: Path, token: bytes) -> tuple[int, int]:
    """The first row whose `token` lies outside every block the data fingerprint samples;
    returns (row, byte offset of the token)."""
    size = path.stat().st_size
    starts = [0, size - _BLOCK] + [size * i // (_N_BLOCKS + 1) for i in range(1, _N_BLOCKS + 1)]
    offset = 0
    for row, line in enumerate(path.read_bytes().splitlines(keepends=True)):
        at = offset + line.index(token)
        if all(not (s <= at < s + _BLOCK + len(token)) for s in starts):
            return row, at
        offset += len(line)
    raise AssertionError("no row outside the sampled blocks; make the corpus larger")


def _overwrite(path: Path, at: int, data: bytes) -> None:
    fp_before = data_fingerprint(path)
    with open(path, "r+b") as fh:  # same size, in place
        fh.seek(at)
        fh.write(data)
    assert data_fingerprint(path) == fp_before  # the sampled fingerprint cannot see it


def _run(corpus, out, model, cache, **kw):
    return run_precompute(corpus, column="text", id_column="gid", out=out, model=model,
                          cache=cache, batch_size=32, rows_per_shard=150, progress=False, **kw)  # fmt: skip


def test_same_size_edit_outside_sampled_blocks_is_reencoded(tiny_model, tmp_path):
    """Guards against: a same-size in-place edit of the input between runs, outside the blocks
    the (sampled) data fingerprint reads, kept the finished shard of the old text: the output
    held a vector of a text the input no longer has, and the run said "complete", exit 0."""
    corpus = tmp_path / "corpus.jsonl"
    texts = _write_corpus(corpus, rows=600)
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = _run(corpus, out, tiny_model, cache)
    assert first["complete"] and len(first["shards"]) == 4

    row, at = _unsampled(corpus, b"alpha")
    _overwrite(corpus, at, b"omega")
    texts[row] = texts[row].replace("alpha", "omega", 1)

    again = _run(corpus, out, tiny_model, cache)
    vectors = np.concatenate([v for _, v in iter_embeddings(out)])
    truth = tiny_model.encode([texts[row]], convert_to_numpy=True)[0]
    np.testing.assert_allclose(vectors[row], truth, atol=1e-5, rtol=0)
    assert again["last_run"]["reencoded_shards"] == [again["shards"][row // 150]["file"]]
    assert again["last_run"]["skipped_shards"] == 3 and again["last_run"]["misses"] == 1
    assert "re-encoded 1 finished shards whose input rows changed" in summary(
        again
    )  # the CLI says so
    # and the output equals a fresh run over the edited input, byte for byte
    fresh = _run(corpus, tmp_path / "fresh", tiny_model, tmp_path / "cache2")
    for a, b in zip(again["shards"], fresh["shards"], strict=True):
        assert a["blake2b"] == b["blake2b"] and a["input_xxh128"] == b["input_xxh128"]
    # a third run over the unchanged input keeps everything
    third = _run(corpus, out, tiny_model, cache)
    assert third["last_run"]["reencoded_shards"] == [] and third["last_run"]["rows"] == 0


def test_edited_ids_are_reencoded_too(tiny_model, tmp_path):
    """Guards against: an edited id column (texts unchanged) kept a shard with the old ids, so
    vectors were joined to the wrong documents downstream."""
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus, rows=600)
    out, cache = tmp_path / "out", tmp_path / "cache"
    _run(corpus, out, tiny_model, cache)
    row, at = _unsampled(corpus, b': "g')
    _overwrite(corpus, at + 3, b"x")
    again = _run(corpus, out, tiny_model, cache)
    ids = [i for b, _ in iter_embeddings(out) for i in b]
    assert ids[row] == f"x{row}"
    assert again["last_run"]["reencoded_shards"] == [again["shards"][row // 150]["file"]]
    assert again["last_run"]["misses"] == 0  # same texts: all from the store


# ------------------------------------------------------------------ kill -9 in every phase

RUNNER = """
import json
import os
import signal
import sys
import time

from sentence_transformers import SentenceTransformer

import evalkit.jobs.precompute as job
from evalkit.embed.store import EmbeddingStore

_encode, _put = SentenceTransformer.encode, EmbeddingStore.put_many


def paced_encode(self, texts, *args, **kwargs):  # ~0.1 s per call: a kill lands mid-job anywhere
    time.sleep(0.1)
    out = _encode(self, texts, *args, **kwargs)
    with open(os.environ["PROGRESS"], "a") as fh:  # tell the test how many texts were encoded
        fh.write(f"{len(texts)}\\n")
    return out


def logged_put(self, keys, vectors, **kwargs):  # tell the test how many vectors reached the store
    n = _put(self, keys, vectors, **kwargs)
    with open(os.environ["STORED"], "a") as fh:
        fh.write(f"{len(keys)}\\n")
    return n


def die_on_call(fn, n, before=None):
    calls = [0]

    def wrapped(*args):
        calls[0] += 1
        if calls[0] == n:
            if before is not None:
                before(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args)

    return wrapped


def torn_manifest(path, obj):  # half a manifest in the temp file, then death
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj)[:200])


SentenceTransformer.encode = paced_encode
EmbeddingStore.put_many = logged_put
kill = os.environ.get("KILL_AT", "")
if kill == "manifest-write":  # while the manifest after shard 2 is being written
    job._atomic_write_json = die_on_call(job._atomic_write_json, 2, before=torn_manifest)
elif kill == "before-manifest":  # shard 2 is in place, the manifest does not list it yet
    job._save = die_on_call(job._save, 2)
data, out, cache, model = sys.argv[1:5]
job.run_precompute(data, column="text", id_column="gid", out=out, model=model, cache=cache,
                   batch_size=16, rows_per_shard=200, progress=False)
"""
KILL_ROWS, KILL_SHARD = 600, 200


def _job(tmp_path: Path, corpus: Path, out: Path, cache: Path, model_dir, kill: str = ""):
    script = tmp_path / "job.py"
    script.write_text(RUNNER)
    progress = out.with_name(out.name + ".progress")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PROGRESS=str(progress), STORED=str(_stored_log(out)), KILL_AT=kill)  # fmt: skip
    args = [sys.executable, str(script), str(corpus), str(out), str(cache), str(model_dir)]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, progress


def _stored_log(out: Path) -> Path:
    return out.with_name(out.name + ".stored")


def _stored(progress: Path) -> int:
    """The texts a job logged (encoded, or put into the store for `_stored_log`)."""
    try:
        return sum(int(x) for x in progress.read_text().split())
    except (OSError, ValueError):
        return 0


def _outputs(out: Path) -> dict[str, bytes]:
    """Every shard file and the manifest's shard list (what must be byte-identical)."""
    files = {p.name: p.read_bytes() for p in sorted(out.glob("embeddings-*.arrow"))}
    shards = [
        {k: s[k] for k in ("file", "start", "end", "bytes", "blake2b", "input_xxh128")}
        for s in load_manifest(out)["shards"]
    ]
    return {**files, "manifest shards": json.dumps(shards).encode()}


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kill") / "corpus.jsonl"
    _write_corpus(path, rows=KILL_ROWS, pad=0)
    return path


@pytest.fixture(scope="module")
def reference(kill_corpus, tiny_model_dir, tmp_path_factory) -> dict[str, bytes]:
    """The uninterrupted run, in a subprocess with the same settings as the killed ones."""
    tmp = tmp_path_factory.mktemp("reference")
    proc, _ = _job(tmp, kill_corpus, tmp / "out", tmp / "cache", tiny_model_dir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return _outputs(tmp / "out")


def _kill_when(proc, ready, what: str) -> None:
    deadline = time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the job ended before {what}: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _resume_and_compare(tmp_path, kill_corpus, out, cache, tiny_model_dir, reference) -> dict:
    proc, _ = _job(tmp_path, kill_corpus, out, cache, tiny_model_dir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert _outputs(out) == reference
    assert not list(out.glob(".*-*"))  # no temp file (shard or manifest) or journal left behind
    return load_manifest(out)


@pytest.mark.slow
def test_kill_before_the_first_shard_stores_nothing(
    kill_corpus, tiny_model_dir, reference, tmp_path
):
    """Guards against: vectors of an unfinished job reaching the store, where the rerun would hit
    them and encode its windows in other batches (other last bits: a resumed output that is not
    the uninterrupted run's bytes). The job reads the store as it was when it started and imports
    its shards only once all are written; a kill before the first shard loses that shard only."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = out / "embeddings-000000000000-000000000200.arrow"
    proc, progress = _job(tmp_path, kill_corpus, out, cache, tiny_model_dir)
    _kill_when(proc, lambda: _stored(progress) >= 64 or first.exists(), "a window was encoded")
    assert not first.exists() and _stored(_stored_log(out)) == 0  # nothing in the store
    resumed = _resume_and_compare(tmp_path, kill_corpus, out, cache, tiny_model_dir, reference)
    run = resumed["runs"][-1]  # the killed shard's journaled windows are resumed, not encoded
    assert run["rows"] + run.get("resumed_rows", 0) == KILL_ROWS and run["hits"] == 0
    assert _stored(_stored_log(out)) == KILL_ROWS  # imported once, at the end


@pytest.mark.slow
def test_kill_mid_shard(kill_corpus, tiny_model_dir, reference, tmp_path):
    """Guards against: a kill inside shard 2 (its temp file half written) leaving a torn shard
    that is kept, or a resumed output that differs in any byte."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = out / "embeddings-000000000000-000000000200.arrow"
    proc, progress = _job(tmp_path, kill_corpus, out, cache, tiny_model_dir)
    _kill_when(proc, lambda: first.exists() and _stored(progress) > KILL_SHARD, "shard 2")
    assert len(load_manifest(out)["shards"]) == 1
    resumed = _resume_and_compare(tmp_path, kill_corpus, out, cache, tiny_model_dir, reference)
    run = resumed["runs"][-1]  # shard 1 was verified, kept; shard 2's finished windows resumed
    assert run["rows"] + run.get("resumed_rows", 0) == KILL_ROWS - KILL_SHARD


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["manifest-write", "before-manifest"])
def test_kill_around_the_manifest_write(kill_corpus, tiny_model_dir, reference, tmp_path, phase):
    """Guards against: a kill while the manifest is rewritten (a torn temp manifest) or between
    a shard's rename and the manifest update (a shard file the manifest does not list) giving a
    resumed output that differs from an uninterrupted run, leaving temp files behind, or
    encoding that finished shard again."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc, _ = _job(tmp_path, kill_corpus, out, cache, tiny_model_dir, kill=phase)
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "embeddings-000000000200-000000000400.arrow").exists()
    assert len(load_manifest(out)["shards"]) == 1  # the manifest as it was after shard 1
    if phase == "manifest-write":
        assert list(out.glob(".manifest.json.tmp-*"))  # the torn temp is there
    resumed = _resume_and_compare(tmp_path, kill_corpus, out, cache, tiny_model_dir, reference)
    # shard 2, renamed but not listed, is resumed whole from its file (its journal outlives the
    # rename); shard 3 is encoded; an unfinished job put nothing into the store
    run = resumed["runs"][-1]
    assert run.get("resumed_rows") == KILL_SHARD and run["rows"] == KILL_SHARD, run
    assert run["hits"] == 0


@pytest.mark.slow
def test_two_jobs_writing_one_store_at_once(kill_corpus, tiny_model_dir, reference, tmp_path):
    """Guards against: two jobs encoding into one store at the same time serving each other torn
    or mismatched vectors; both outputs must equal the uninterrupted single run byte for byte."""
    cache = tmp_path / "cache"
    jobs = [
        _job(tmp_path, kill_corpus, tmp_path / f"out{i}", cache, tiny_model_dir)[0] for i in (0, 1)
    ]
    for proc in jobs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    assert _outputs(tmp_path / "out0") == reference
    assert _outputs(tmp_path / "out1") == reference
