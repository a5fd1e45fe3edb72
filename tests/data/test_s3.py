"""Remote sources for real: an S3-compatible server (moto) on 127.0.0.1, read through pyarrow.fs by
evalkit.data.convert.convert and by `evalkit convert`; and an fsspec filesystem (memory://)."""

from __future__ import annotations

import io
import socket

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from evalkit.cli import main
from evalkit.data import readers
from evalkit.data.convert import convert
from evalkit.errors import DataError

BUCKET = "evalkit-test"


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return pa.table(
        {
            "sentence1": [f"first sentence {i}" for i in range(100)],
            "sentence2": [f"second sentence {i}" for i in range(100)],
            "score": [i / 20 for i in range(100)],
        }
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(table):
    """moto's S3 server on loopback with a bucket holding a parquet file, a CSV and two shards."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            url = f"http://127.0.0.1:{port}"
            client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            parquet = io.BytesIO()
            pq.write_table(table, parquet, row_group_size=32)
            client.put_object(Bucket=BUCKET, Key="data/pairs.parquet", Body=parquet.getvalue())
            text = io.BytesIO()
            pacsv.write_csv(table, text, pacsv.WriteOptions(include_header=False))
            client.put_object(Bucket=BUCKET, Key="data/pairs.csv", Body=text.getvalue())
            for i, part in enumerate([table.slice(0, 60), table.slice(60)]):
                shard = io.BytesIO()
                pq.write_table(part, shard)
                client.put_object(
                    Bucket=BUCKET, Key=f"shards/part-{i}.parquet", Body=shard.getvalue()
                )
            yield url
        finally:
            server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Point pyarrow's S3 client at the loopback server the way a user would: AWS_ENDPOINT_URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return s3_endpoint


def test_convert_parquet_and_csv_from_s3(tmp_path, s3_env, table):
    got = convert(f"s3://{BUCKET}/data/pairs.parquet", tmp_path / "p.arrow", batch_size=7)
    assert got.rows == 100 and readers.open_ipc(got.dest).equals(table)
    got = convert(
        f"s3://{BUCKET}/data/pairs.csv",
        tmp_path / "c.arrow",
        column_names=["sentence1", "sentence2", "score"],
        filter="score >= 2.5",
        progress=False,
    )
    assert readers.open_ipc(got.dest).equals(table.slice(50))
    assert readers.count_rows(f"s3://{BUCKET}/data/pairs.parquet", filter="score < 1") == 20


def test_s3_glob_and_folder(tmp_path, s3_env, table):
    got = convert(f"s3://{BUCKET}/shards/*.parquet", tmp_path / "g.arrow")
    assert readers.open_ipc(got.dest).equals(table)
    got = convert(f"s3://{BUCKET}/shards/", tmp_path / "d.arrow", columns=["score"])
    assert (
        readers.open_ipc(got.dest).column("score").to_pylist() == table.column("score").to_pylist()
    )


def test_explicit_filesystem_argument(tmp_path, s3_endpoint, table):
    from pyarrow.fs import S3FileSystem

    fs = S3FileSystem(endpoint_override=s3_endpoint, region="us-east-1")
    got = convert(f"{BUCKET}/data/pairs.parquet", tmp_path / "f.arrow", filesystem=fs)
    assert readers.open_ipc(got.dest).equals(table)


def test_s3_through_the_cli_and_missing_key(tmp_path, s3_env, capsys):
    out = tmp_path / "cli.arrow"
    argv = ["convert", f"s3://{BUCKET}/data/pairs.csv", str(out), "--no-progress"]
    assert main([*argv, "--column-names", "sentence1,sentence2,score"]) == 0
    assert "wrote 100 rows x 3 columns" in capsys.readouterr().out
    assert readers.open_ipc(out).num_rows == 100
    missing = f"s3://{BUCKET}/data/nope.parquet"
    assert main(["convert", missing, str(tmp_path / "x.arrow")]) == 1
    assert f"no such file or directory: {missing}" in capsys.readouterr().err
    with pytest.raises(DataError, match="no files match"):
        convert(f"s3://{BUCKET}/shards/*.csv", tmp_path / "x.arrow")
    assert not (tmp_path / "x.arrow").exists()


def test_fsspec_memory_filesystem(tmp_path, table):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    with fs.open("/evalkit-test/pairs.parquet", "wb") as fh:
        pq.write_table(table, fh)
    with fs.open("/evalkit-test/more/pairs.jsonl", "wb") as fh:
        fh.write(b'{"a": 1, "b": "x"}\n{"a": 2, "b": null}\n')
    try:
        got = convert("memory://evalkit-test/pairs.parquet", tmp_path / "m.arrow")
        assert readers.open_ipc(got.dest).equals(table)
        got = convert("memory://evalkit-test/**/*.jsonl", tmp_path / "j.arrow", on_null="skip")
        assert readers.open_ipc(got.dest).to_pydict() == {"a": [1], "b": ["x"]}
        got = convert("evalkit-test/pairs.parquet", tmp_path / "o.arrow", filesystem=fs)
        assert got.rows == 100
        with pytest.raises(DataError, match="no such file or directory"):
            convert("memory://evalkit-test/absent.parquet", tmp_path / "x.arrow")
    finally:
        fs.rm("/evalkit-test", recursive=True)
