"""The precompute job on a real local Ray cluster (127.0.0.1, no dashboard, no mocks): two actors
write the bytes of one process, into a local folder and into s3:// (moto's S3 server on
loopback); an actor killed with SIGKILL mid-job fails the job with one line, and a rerun writes
only the missing shards, giving the same bytes again. One cluster serves the whole module."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from evalkit.embed.shards import (
    OutputDir,
    import_into_store,
    iter_embeddings,
    load_manifest,
    stable_manifest,
)
from evalkit.embed.store import EmbeddingStore
from evalkit.errors import EvalkitError
from evalkit.jobs.precompute import run_precompute

ROOT = Path(__file__).resolve().parents[2]
ROWS, PER_SHARD = 600, 25
BUCKET = "evalkit-ray"


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> Path:
    lines = (
        (shared_data / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv")
        .read_text(encoding="utf-8")
        .splitlines()[1 : ROWS + 1]
    )
    rows = [{"gid": p[0], "text": p[3]} for p in (line.split("\t") for line in lines)]
    rows[30]["text"] = rows[500]["text"]
    path = tmp_path_factory.mktemp("corpus") / "glosses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _options(model_dir) -> dict:
    return dict(column="text", id_column="gid", model=str(model_dir), rows_per_shard=PER_SHARD,
                batch_size=16, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def reference(corpus, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    run_precompute(corpus, out=out, cache=out.parent / "cache", **_options(tiny_model_dir))
    return out


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback with an empty bucket; its address and credentials go into
    the environment before Ray starts, so the actors inherit them."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    ray = pytest.importorskip("ray")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
             num_cpus=2, log_to_driver=False, configure_logging=False)  # fmt: skip
    yield ray
    ray.shutdown()


def assert_same_output(ref: Path, out: str | Path) -> None:
    """Every shard file byte for byte, and the manifests without their run log."""
    loc = OutputDir(out)
    a, b = load_manifest(ref), load_manifest(loc)
    assert b["complete"]
    assert json.dumps(stable_manifest(a), sort_keys=True) == json.dumps(
        stable_manifest(b), sort_keys=True
    )
    assert loc.names("embeddings-*.arrow") == [s["file"] for s in a["shards"]]
    for entry in a["shards"]:
        got = loc.read_buffer(entry["file"]).to_pybytes()
        assert got == (ref / entry["file"]).read_bytes(), entry["file"]


def _encoder_actors() -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::EncoderActor"):
            found.append(proc)
    return found


def test_two_actors_write_the_bytes_of_one_process_then_survive_a_kill(
    ray_cluster, corpus, tiny_model_dir, reference, tmp_path
):
    """Guards against a Ray output that differs from the single-process one, a dead actor that
    goes unnoticed (exit 0, rows missing), and a rerun that redoes finished shards or changes
    bytes."""
    from evalkit.jobs.precompute_ray import run_precompute_ray

    cache = tmp_path / "cache"
    got = run_precompute_ray(corpus, out=tmp_path / "a", cache=cache, workers=2,
                             **_options(tiny_model_dir))  # fmt: skip
    assert len(got["last_run"]["ray"]) == 2 and got["last_run"]["imported_rows"] == ROWS
    assert_same_output(reference, tmp_path / "a")
    deadline = time.monotonic() + 60
    while _encoder_actors() and time.monotonic() < deadline:  # the first job's actors leave
        time.sleep(0.1)

    out = tmp_path / "b"
    killed: list[int] = []

    def kill_one_actor() -> None:
        end = time.monotonic() + 240
        while not list(out.glob("embeddings-*.arrow")) and time.monotonic() < end:
            time.sleep(0.01)
        actors = _encoder_actors()
        if actors:
            actors[-1].send_signal(signal.SIGKILL)
            killed.append(actors[-1].pid)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    with pytest.raises(EvalkitError, match=r"Ray actor \d died while encoding rows \d+\.\.\d+"):
        run_precompute_ray(corpus, out=out, cache=tmp_path / "cache-b", workers=2,
                           **_options(tiny_model_dir))  # fmt: skip
    killer.join()
    assert killed
    done = load_manifest(out)
    assert not done["complete"] and 1 <= len(done["shards"]) < ROWS // PER_SHARD
    with EmbeddingStore(tmp_path / "cache-b") as store:
        assert store.count() == 0  # an unfinished job puts nothing into the store
    again = run_precompute_ray(corpus, out=out, cache=tmp_path / "cache-b", workers=2,
                               **_options(tiny_model_dir))  # fmt: skip
    # the killed actor's shard resumes from its journal when the kill landed after a flush
    run = again["last_run"]
    assert run["rows"] + run["resumed_rows"] == ROWS - PER_SHARD * len(done["shards"])
    assert run["skipped_shards"] == len(done["shards"])
    assert_same_output(reference, out)


def test_two_actors_write_to_s3(ray_cluster, corpus, tiny_model_dir, reference, tmp_path):
    """Guards against an s3:// output whose files or manifest differ from a local one, and
    against readers (iter_embeddings, import) that only work on local folders."""
    from evalkit.jobs.precompute_ray import run_precompute_ray

    uri = f"s3://{BUCKET}/emb"
    got = run_precompute_ray(corpus, out=uri, cache=tmp_path / "c", workers=2,
                             **_options(tiny_model_dir))  # fmt: skip
    assert got["complete"]
    assert_same_output(reference, uri)
    again = run_precompute_ray(corpus, out=uri, cache=tmp_path / "c", workers=2,
                               **_options(tiny_model_dir))  # fmt: skip
    assert again["last_run"]["skipped_shards"] == ROWS // PER_SHARD  # verified through S3
    remote = np.concatenate([v for _, v in iter_embeddings(uri)])
    np.testing.assert_array_equal(
        remote, np.concatenate([v for _, v in iter_embeddings(reference)])
    )
    with EmbeddingStore(tmp_path / "c2") as store:
        assert import_into_store(uri, store)["rows"] == ROWS
