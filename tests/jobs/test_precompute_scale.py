"""The precompute job on several workers: the same bytes as one process (shards + stable manifest),
a kill -9 of one worker corrupts nothing and a rerun writes only what is missing; the key column
lets `cache import` fill a store without the texts, and `evaluate retrieval --corpus-embeddings`
gives the metrics of encoding the corpus (and refuses another model, ids or texts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from evalkit.data.beir import document_text
from evalkit.embed.shards import (
    import_into_store,
    iter_embeddings,
    load_manifest,
    stable_manifest,
)
from evalkit.embed.store import EmbeddingStore, make_keys
from evalkit.errors import EvalkitError, FingerprintMismatchError, StoreError
from evalkit.jobs.precompute import run_precompute
from evalkit.jobs.precompute_workers import plan_devices, run_precompute_workers

ROOT = Path(__file__).resolve().parents[2]
ROWS = 1200
PER_SHARD = 25  # 48 shards: a kill after the first one lands mid-job on any machine
SHARDS = ROWS // PER_SHARD


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> Path:
    """1,200 real WordNet glosses with repeats inside and across shards, as JSON Lines."""
    lines = (
        (shared_data / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv")
        .read_text(encoding="utf-8")
        .splitlines()[1 : ROWS + 1]
    )
    rows = [{"gid": p[0], "text": p[3]} for p in (line.split("\t") for line in lines)]
    for a, b in ((10, 1000), (11, 12), (130, 1150), (640, 641)):
        rows[a]["text"] = rows[b]["text"]
    path = tmp_path_factory.mktemp("corpus") / "glosses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _options(model_dir) -> dict:
    return dict(column="text", id_column="gid", model=str(model_dir), rows_per_shard=PER_SHARD,
                batch_size=16, progress=False)  # fmt: skip


def assert_same_output(a: Path, b: Path) -> None:
    """Every shard file byte for byte, and the manifests without their run log."""
    ma, mb = load_manifest(a), load_manifest(b)
    assert ma["complete"] and mb["complete"]
    assert json.dumps(stable_manifest(ma), sort_keys=True) == json.dumps(
        stable_manifest(mb), sort_keys=True
    )
    names = sorted(p.name for p in a.glob("embeddings-*.arrow"))
    assert names == sorted(p.name for p in b.glob("embeddings-*.arrow"))
    assert names == [s["file"] for s in ma["shards"]]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference(corpus, tiny_model_dir, tmp_path_factory) -> Path:
    """The single-process output everything is compared with."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_precompute(corpus, out=out, cache=out.parent / "cache", **_options(tiny_model_dir))
    return out


def _assert_store_holds(cache: Path, out: Path, corpus: Path) -> None:
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    first = {t: i for i, t in reversed(list(enumerate(texts)))}
    rows = sorted(first.values())
    with EmbeddingStore(cache) as store:
        fp = load_manifest(out)["model_fingerprint"]
        vectors, found = store.get_many(make_keys(fp, [texts[i] for i in rows]))
        assert found.all() and store.count() == len(rows)
    shards = np.concatenate([v for _, v in iter_embeddings(out)])
    np.testing.assert_array_equal(vectors, shards[rows])


def test_plan_devices():
    assert plan_devices(3, "cuda:0,cuda:1") == ["cuda:0", "cuda:1", "cuda:0"]
    assert plan_devices(None, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    with pytest.raises(EvalkitError, match="positive"):
        plan_devices(0, "cpu")


def test_two_workers_write_the_bytes_of_one_process(corpus, tiny_model_dir, reference, tmp_path):
    """Guards against outputs that depend on how many workers ran (a shard's misses, and so its
    batches and last bits, changing with what other workers wrote into the shared store)."""
    out = tmp_path / "two"
    got = run_precompute_workers(corpus, out=out, cache=tmp_path / "cache", workers=2,
                                 **_options(tiny_model_dir))  # fmt: skip
    assert got["last_run"]["written_shards"] == SHARDS and got["last_run"]["rows"] == ROWS
    assert got["last_run"]["imported_rows"] == ROWS
    assert_same_output(reference, out)
    # the store holds the shards' vectors under their keys (a text in several shards: the first)
    _assert_store_holds(tmp_path / "cache", out, corpus)
    # a rerun verifies and skips everything
    again = run_precompute_workers(corpus, out=out, cache=tmp_path / "cache", workers=2,
                                   **_options(tiny_model_dir))  # fmt: skip
    assert again["last_run"]["skipped_shards"] == SHARDS and again["last_run"]["rows"] == 0


def _cli_job(corpus, out, cache, model_dir, workers=2) -> subprocess.Popen:
    args = [sys.executable, "-m", "evalkit", "encode", str(corpus), "--column", "text",
            "--id-column", "gid", "--out", str(out), "--cache", str(cache), "--model",
            str(model_dir), "--rows-per-shard", str(PER_SHARD), "--batch-size", "16", "--no-progress",
            "--workers", str(workers)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _workers_of(pid: int) -> list:
    import psutil

    return [
        p
        for p in psutil.Process(pid).children()
        if any("spawn_main" in part for part in p.cmdline())
    ]


def test_killed_worker_fails_the_job_and_a_rerun_completes_it(
    corpus, tiny_model_dir, reference, tmp_path
):
    """Guards against a dead worker going unnoticed (exit 0 with missing rows), a torn shard or
    manifest, vectors of the killed job reaching the store, and a rerun that redoes finished
    shards or writes other bytes."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    job = _cli_job(corpus, out, cache, tiny_model_dir)
    deadline = time.monotonic() + 240
    while not list(out.glob("embeddings-*.arrow")) and time.monotonic() < deadline:
        assert job.poll() is None, job.stderr.read()
        time.sleep(0.02)
    workers = _workers_of(job.pid)
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 1, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err  # one line, and last
    assert errors[0].startswith("evalkit encode: error: worker 1 (pid")
    assert "was killed by SIGKILL while encoding rows" in errors[0]
    assert "rerun the same command" in errors[0]
    done = load_manifest(out)
    assert not done["complete"] and 1 <= len(done["shards"]) < SHARDS
    with EmbeddingStore(cache) as store:
        assert store.count() == 0  # nothing of an unfinished job is in the store
    rerun = _cli_job(corpus, out, cache, tiny_model_dir)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    manifest = load_manifest(out)
    run = manifest["runs"][-1]  # the killed worker's journaled windows are resumed, not encoded
    assert run["rows"] + run.get("resumed_rows", 0) == ROWS - PER_SHARD * len(done["shards"])
    assert_same_output(reference, out)
    assert not list(out.glob(".*-*"))  # no temp file or journal left behind


def test_cache_import_fills_a_store_without_the_texts(corpus, tiny_model_dir, reference, tmp_path):
    """Guards against an import that stores vectors under the wrong keys or model, or that loads
    a corrupt shard (its rows would be served later as the vectors of those texts)."""
    from evalkit.cli import main

    assert main(["cache", "import", str(reference), "--cache", str(tmp_path / "c")]) == 0
    _assert_store_holds(tmp_path / "c", reference, corpus)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    # a flipped byte in a shard: refused before any of its rows is stored
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in reference.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    shard = bad / load_manifest(bad)["shards"][3]["file"]
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with EmbeddingStore(tmp_path / "c2") as store:
        with pytest.raises(StoreError, match="does not match its manifest"):
            import_into_store(bad, store)
        assert store.count() == len(set(texts[: 3 * PER_SHARD]))  # the shards before it only


def _as_format_1(src: Path, dest: Path) -> None:
    """A copy of an output as evalkit wrote it before the key column (format 1)."""
    dest.mkdir()
    manifest = load_manifest(src)
    for entry in manifest["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(src / entry["file"]))).read_all()
        table = table.drop_columns(["key"])
        with pa.OSFile(str(dest / entry["file"]), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    manifest["format"] = "evalkit.embeddings/1"
    (dest / "manifest.json").write_text(json.dumps(manifest))


def test_format_1_outputs_are_read_but_not_imported_or_resumed(
    corpus, tiny_model_dir, reference, tmp_path, capsys
):
    """Guards against old outputs becoming unreadable, and against importing or extending one
    (its rows have no store keys)."""
    from evalkit.cli import main

    old = tmp_path / "old"
    _as_format_1(reference, old)
    got = np.concatenate([v for _, v in iter_embeddings(old)])
    np.testing.assert_array_equal(got, np.concatenate([v for _, v in iter_embeddings(reference)]))
    assert main(["cache", "import", str(old), "--cache", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no key column" in err[0]
    with pytest.raises(StoreError, match="older evalkit"):
        run_precompute(corpus, out=old, cache=tmp_path / "c", **_options(tiny_model_dir))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format"] = "evalkit.embeddings/9"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="upgrade evalkit"):
        load_manifest(old)


@pytest.fixture(scope="module")
def scifact_small(shared_data, tmp_path_factory) -> dict:
    """The first 600 SciFact documents, SciFact's queries and its test qrels on them."""
    src = shared_data / "beir-scifact"
    folder = tmp_path_factory.mktemp("scifact")
    lines = (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:600]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = {json.loads(line)["_id"] for line in lines}
    qrels = (src / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    kept = [q for q in qrels[1:] if q.split("\t")[1] in docs]
    (folder / "qrels.tsv").write_text("\n".join(qrels[:1] + kept) + "\n", encoding="utf-8")
    texts = {document_text(json.loads(x).get("title"), json.loads(x)["text"]) for x in lines}
    return {
        "corpus": folder / "corpus.jsonl",
        "queries": src / "queries.jsonl",
        "qrels": folder / "qrels.tsv",
        "unique_texts": len(texts),
    }


def test_corpus_embeddings_give_the_metrics_of_encoding(scifact_small, tiny_model_dir, tmp_path):
    """Guards against --corpus-embeddings scoring vectors of another model, another document
    order or other texts (e.g. `text` without the title): each would print a plausible nDCG."""
    from conftest import build_tiny_model_dir

    from evalkit.jobs.evaluate import evaluate_retrieval

    data = scifact_small
    args = (data["corpus"], data["queries"], data["qrels"])
    kw = dict(model=str(tiny_model_dir), plots=False, progress=False, batch_size=16)
    encoded = evaluate_retrieval(*args, cache=tmp_path / "c1", **kw)
    enc = dict(model=str(tiny_model_dir), batch_size=16, progress=False, cache=tmp_path / "c2")
    run_precompute(data["corpus"], column="title+text", id_column="_id", out=tmp_path / "e", **enc)
    served = evaluate_retrieval(
        *args, cache=tmp_path / "c3", corpus_embeddings=tmp_path / "e", **kw
    )
    assert served["metrics"] == encoded["metrics"]
    # the corpus was not encoded: only the queries were
    assert served["cache"]["misses"] == encoded["cache"]["misses"] - data["unique_texts"]
    # another model, the text column alone, row numbers as ids: refused
    other = build_tiny_model_dir(tmp_path / "m2", seed=5)
    with pytest.raises(FingerprintMismatchError, match="was made by model"):
        evaluate_retrieval(*args, model=str(other), cache=tmp_path / "c4", plots=False,
                           progress=False, corpus_embeddings=tmp_path / "e")  # fmt: skip
    run_precompute(data["corpus"], column="text", id_column="_id", out=tmp_path / "t", **enc)
    with pytest.raises(EvalkitError, match="title \\+ ' ' \\+ text"):
        evaluate_retrieval(*args, cache=tmp_path / "c3", corpus_embeddings=tmp_path / "t", **kw)
    run_precompute(data["corpus"], column="title+text", out=tmp_path / "n", **enc)
    with pytest.raises(EvalkitError, match="--id-column _id"):
        evaluate_retrieval(*args, cache=tmp_path / "c3", corpus_embeddings=tmp_path / "n", **kw)
