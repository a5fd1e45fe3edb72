"""evalkit.data.readers: every source format round-trips, streaming matches the in-memory answer at any
batch size, bad input gives one clear DataError, and a failed write leaves nothing behind."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.feather as feather
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from evalkit.data import readers
from evalkit.data.convert import convert
from evalkit.data.filters import parse_filter
from evalkit.errors import DataError, EvalkitError


@pytest.fixture
def table() -> pa.Table:
    n = 50
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "text": [f"sentence number {i}, with a comma" for i in range(n)],
            "score": [i / 10 for i in range(n)],
        }
    )


def write_source(table: pa.Table, path: Path, kind: str) -> Path:
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=16)
    elif kind == "csv":
        pacsv.write_csv(table, path)
    elif kind == "tsv":
        pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter="\t"))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    elif kind == "orc":
        orc.write_table(table, path)
    elif kind == "feather":
        feather.write_feather(table, path)
    elif kind == "arrow":  # IPC file format, several batches
        with pa.ipc.new_file(path, table.schema) as w:
            for batch in table.to_batches(max_chunksize=16):
                w.write_batch(batch)
    elif kind == "arrows":  # IPC stream format
        with pa.ipc.new_stream(path, table.schema) as w:
            for batch in table.to_batches(max_chunksize=16):
                w.write_batch(batch)
    return path


FORMATS = ["parquet", "csv", "tsv", "jsonl", "orc", "feather", "arrow", "arrows"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_round_trips(tmp_path, table, kind):
    src = write_source(table, tmp_path / f"data.{kind}", kind)
    result = convert(src, tmp_path / "out.arrow", progress=False)
    assert result.rows == 50 and result.columns == ["id", "text", "score"]
    assert result.bytes == (tmp_path / "out.arrow").stat().st_size
    assert readers.open_ipc(result.dest).equals(table)
    assert readers.count_rows(src) == 50


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow", "arrows"])
@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_iter_batches_matches_in_memory_at_any_batch_size(tmp_path, table, kind, block):
    src = write_source(table, tmp_path / f"data.{kind}", kind)
    expr = pc.field("score") >= 1.2
    batches = list(readers.iter_batches(src, columns=["text", "id"], filter=expr, batch_size=block))
    assert all(b.num_rows <= block for b in batches)
    got = pa.Table.from_batches(batches).combine_chunks()
    assert got.equals(table.filter(expr).select(["text", "id"]))


@pytest.mark.parametrize("stream", [False, True])
def test_output_file_and_stream_formats(tmp_path, table, stream):
    out = convert(table, tmp_path / "t.arrow", stream=stream, progress=False, batch_size=7)
    raw = (tmp_path / "t.arrow").read_bytes()
    assert raw.startswith(b"ARROW1") != stream
    reader = pa.ipc.open_stream if stream else pa.ipc.open_file
    assert reader(pa.BufferReader(raw)).read_all().equals(table)
    assert readers.open_ipc(out.dest).equals(table)


def test_directory_glob_and_list_sources_keep_sorted_file_order(tmp_path, table):
    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    parts = [table.slice(0, 20), table.slice(20, 20), table.slice(40)]
    write_source(parts[2], folder / "sub" / "part-2.parquet", "parquet")
    write_source(parts[1], folder / "part-1.parquet", "parquet")
    write_source(parts[0], folder / "part-0.parquet", "parquet")
    (folder / "README.txt").write_text("not data")
    (folder / "_SUCCESS").write_text("")
    (folder / ".hidden.parquet").write_text("junk")

    whole = readers.open_ipc(convert(folder, tmp_path / "a.arrow", progress=False).dest)
    assert whole.equals(table)
    top = readers.open_ipc(convert(f"{folder}/*.parquet", tmp_path / "b.arrow").dest)
    assert top.equals(table.slice(0, 40))
    deep = readers.open_ipc(convert(f"{folder}/**/part-*.parquet", tmp_path / "c.arrow").dest)
    assert deep.equals(table)
    listed = [folder / "sub" / "part-2.parquet", folder / "part-0.parquet"]
    got = readers.open_ipc(convert(listed, tmp_path / "d.arrow", progress=False).dest)
    assert got.equals(pa.concat_tables([parts[2], parts[0]]))
    with pytest.raises(DataError, match="no files match"):
        convert(f"{folder}/*.csv", tmp_path / "e.arrow")


def test_csv_without_header_delimiter_and_quoting(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text('a "quoted" word|b\n"x|y\n', encoding="utf-8")
    out = convert(
        path,
        tmp_path / "o.arrow",
        format="csv",
        column_names=["s1", "s2"],
        delimiter="|",
        quoting=False,
        progress=False,
    )
    got = readers.open_ipc(out.dest).to_pylist()
    assert got == [{"s1": 'a "quoted" word', "s2": "b"}, {"s1": '"x', "s2": "y"}]
    with pytest.raises(DataError, match=r"cannot parse .*pairs.txt as CSV: .*--no-quoting"):
        convert(path, tmp_path / "o2.arrow", format="csv", column_names=["s1", "s2"], delimiter="|")


def test_select_rename_and_string_filters(tmp_path, table):
    src = write_source(table, tmp_path / "d.parquet", "parquet")
    result = convert(
        src,
        tmp_path / "o.arrow",
        columns=["text", "score"],
        rename={"text": "sentence1", "score": "label"},
        filter=["label >= 1", "id != 12", pc.field("id") < 30],  # strings may use output names
        progress=False,
    )
    got = readers.open_ipc(result.dest)
    assert got.column_names == result.columns == ["sentence1", "label"]
    keep = [i for i in range(50) if i / 10 >= 1 and i != 12 and i < 30]
    assert got.column("label").to_pylist() == [i / 10 for i in keep]
    assert readers.count_rows(src, filter="score >= 1") == 40


def test_parse_filter_forms():
    t = pa.table({"n": [1, 2, 3, None], "s": ["1", "b", "c", None], "#1 ID": [5, 6, 7, 8]})

    def rows(text):
        return t.filter(parse_filter(text, schema=t.schema)).num_rows

    assert rows("n == 2") == 1 and rows("n=2") == 1 and rows("n != 2") == 2
    assert rows("n < 3") == 2 and rows("n <= 3") == 3 and rows("n > 1") == 2 and rows("n>=1") == 3
    assert rows("s == 1") == 1  # a number compared with a text column is compared as text
    assert rows("s == 'b'") == 1 and rows('s > "a"') == 2
    assert rows("n == null") == 1 and rows("s != null") == 3
    assert rows("`#1 ID` >= 7") == 2
    assert rows("n == 2.0") == 1  # cast to the column's type
    assert isinstance(parse_filter("x > 1.5"), pc.Expression)
    with pytest.raises(EvalkitError, match="cannot parse filter"):
        parse_filter("score 3")
    with pytest.raises(EvalkitError, match="not a valid int64"):
        parse_filter("n > abc", schema=t.schema)
    with pytest.raises(DataError, match="column 'zz' not in the data; columns are: n, s, #1 ID"):
        parse_filter("zz > 1", schema=t.schema)


@pytest.fixture
def with_nulls(tmp_path) -> Path:
    t = pa.table({"a": ["x", None, "z", "w"], "b": ["1", "2", None, "4"], "n": [1, None, 3, 4]})
    return write_source(t, tmp_path / "nulls.parquet", "parquet")


def test_on_null_policies(tmp_path, with_nulls):
    def run(policy, **kw):
        out = convert(with_nulls, tmp_path / f"{policy}.arrow", on_null=policy, **kw)
        return readers.open_ipc(out.dest).to_pydict()

    assert run("keep")["a"] == ["x", None, "z", "w"]
    assert run("skip") == {"a": ["x", "w"], "b": ["1", "4"], "n": [1, 4]}
    assert run("empty") == {
        "a": ["x", "", "z", "w"],
        "b": ["1", "2", "", "4"],
        "n": [1, None, 3, 4],
    }
    assert run("skip", text_columns=["b"])["a"] == ["x", None, "w"]
    renamed = run("skip", text_columns=["b"], rename={"b": "sentence"}, batch_size=1)
    assert renamed["sentence"] == ["1", "2", "4"]
    with pytest.raises(DataError, match=r"row 2 of .*nulls.parquet .*column 'b' is null"):
        run("error", text_columns=["b"], batch_size=1)
    assert not (tmp_path / "error.arrow").exists()
    with pytest.raises(DataError, match="text column 'n' holds int64, not text"):
        run("error", text_columns=["n"])
    with pytest.raises(EvalkitError, match="on_null must be one of"):
        run("drop")


def test_failure_mid_write_leaves_no_dest_and_no_temp(tmp_path, table):
    def batches():
        yield from table.to_batches(max_chunksize=10)[:2]
        raise RuntimeError("source broke")

    dest = tmp_path / "out" / "t.arrow"
    reader = pa.RecordBatchReader.from_batches(table.schema, batches())
    with pytest.raises(RuntimeError, match="source broke"):
        convert(reader, dest, progress=False, batch_size=10)
    assert os.listdir(dest.parent) == []

    dest.write_bytes(b"previous contents")  # an existing DEST survives a failed overwrite too
    reader = pa.RecordBatchReader.from_batches(table.schema, batches())
    with pytest.raises(RuntimeError):
        convert(reader, dest, progress=False)
    assert dest.read_bytes() == b"previous contents" and os.listdir(dest.parent) == ["t.arrow"]


def test_reader_and_in_memory_sources(tmp_path, table):
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=9))
    assert readers.open_ipc(convert(reader, tmp_path / "r.arrow").dest).equals(table)
    assert readers.open_ipc(convert(ds.dataset(table), tmp_path / "d.arrow").dest).equals(table)
    assert readers.open_source(table).count_rows() == 50
    with pytest.raises(EvalkitError, match="cannot read the int"):
        readers.open_source(5)


def test_hf_datasets_source(tmp_path, table):
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset(table)
    assert readers.open_ipc(convert(hf, tmp_path / "a.arrow").dest).equals(table)
    picked = hf.select([5, 3, 40])  # an indices mapping: streamed in its own order
    got = readers.open_ipc(convert(picked, tmp_path / "b.arrow", progress=False).dest)
    assert got.column("id").to_pylist() == [5, 3, 40]


def test_unknown_column_names_the_real_ones(tmp_path, table):
    src = write_source(
        table.rename_columns(["sentence1", "sentence2", "score"]), tmp_path / "p.parquet", "parquet"
    )
    expected = f"column 'sentence3' not in {src}; columns are: sentence1, sentence2, score"
    for kwargs in (
        {"columns": ["sentence3"]},
        {"rename": {"sentence3": "x"}},
        {"filter": "sentence3 > 1"},
    ):
        with pytest.raises(DataError) as info:
            convert(src, tmp_path / "o.arrow", **kwargs)
        assert str(info.value) == expected
    with pytest.raises(DataError, match="column 'sentence3' not in"):
        readers.iter_batches(src, filter=pc.field("sentence3") == "a")
    assert not (tmp_path / "o.arrow").exists()


def test_corrupt_and_truncated_files(tmp_path, table):
    good = write_source(table, tmp_path / "good.arrow", "arrow")
    truncated = tmp_path / "truncated.arrow"
    truncated.write_bytes(good.read_bytes()[:-100])
    for path in (truncated, tmp_path / "garbage.parquet"):
        path.write_bytes(path.read_bytes() if path.exists() else b"PAR1 this is not parquet")
        with pytest.raises(DataError, match="corrupt or truncated"):
            convert(path, tmp_path / "o.arrow")
    with pytest.raises(DataError, match="corrupt or truncated"):
        readers.open_ipc(truncated)
    stream = write_source(table, tmp_path / "s.arrows", "arrows")
    cut = tmp_path / "cut.arrows"
    cut.write_bytes(stream.read_bytes()[:700])
    with pytest.raises(DataError, match="corrupt or truncated"):
        readers.open_ipc(cut)
    (tmp_path / "empty.arrow").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        readers.open_ipc(tmp_path / "empty.arrow")
    assert not (tmp_path / "o.arrow").exists()


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*nope.csv"):
        convert(tmp_path / "nope.csv", tmp_path / "o.arrow")
    (tmp_path / "data.xlsx").write_bytes(b"x")
    with pytest.raises(DataError, match=r"extension '\.xlsx'; supported: parquet, csv.*--format"):
        convert(tmp_path / "data.xlsx", tmp_path / "o.arrow")
    with pytest.raises(EvalkitError, match="unknown format 'xls'"):
        readers.count_rows(tmp_path / "data.xlsx", format="xls")
    with pytest.raises(EvalkitError, match="batch_size must be a positive integer"):
        readers.iter_batches(tmp_path / "data.xlsx", batch_size=0)


def test_json_array_is_explained(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"a": 1},\n {"a": 2}]\n')
    with pytest.raises(DataError, match="JSON Lines"):
        convert(path, tmp_path / "o.arrow")


def test_stsb_csv_without_header(tmp_path, shared_data):
    src = shared_data / "stsb" / "stsb-en-test.csv"
    out = convert(src, tmp_path / "stsb.arrow", column_names="sentence1,sentence2,score")
    with open(src, newline="", encoding="utf-8") as fh:
        first = next(csv.reader(fh))
    got = readers.open_ipc(out.dest)
    assert out.rows == got.num_rows == 1379
    row = got.slice(0, 1).to_pylist()[0]
    assert [row["sentence1"], row["sentence2"], row["score"]] == [
        first[0],
        first[1],
        float(first[2]),
    ]


def test_mrpc_tsv_with_bom_and_no_quoting(tmp_path, shared_data):
    src = shared_data / "mrpc" / "msr_paraphrase_test.txt"
    out = convert(src, tmp_path / "mrpc.arrow", quoting=False, progress=False)
    got = readers.open_ipc(out.dest)
    assert got.num_rows == 1725 and got.column_names[0] == "Quality"  # the BOM is not in the name
    assert sum(got.column("Quality").to_pylist()) == 1147
    with open(src, newline="", encoding="utf-8-sig") as fh:
        lines = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert got.column("#1 String").to_pylist() == [line[3] for line in lines[1:]]


def test_reading_and_converting_hold_a_bounded_number_of_batches(tmp_path):
    """Arrow-allocated memory (pyarrow's pool) stays at a few batches, far below the data size."""
    rows, block = 600_000, 4096
    text = pa.array([f"a sentence long enough to weigh something {i}" for i in range(rows)])
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": text})
    src = tmp_path / "big.parquet"
    pq.write_table(table, src, row_group_size=block)
    size = table.nbytes  # 40 MB
    del table, text
    base, peak, read = pa.total_allocated_bytes(), 0, 0
    for batch in readers.iter_batches(src, batch_size=block):
        peak = max(peak, pa.total_allocated_bytes() - base)
        read += batch.num_rows
    assert read == rows and peak < size / 5, (peak, size)  # measured: 3-5 MB
    del batch

    base, peak, streamed = pa.total_allocated_bytes(), 0, 4 * rows

    def generate():
        nonlocal peak
        for start in range(0, streamed, block):
            ids = pa.array(range(start, min(start + block, streamed)), pa.int64())
            peak = max(peak, pa.total_allocated_bytes() - base)
            yield pa.record_batch({"id": ids, "text": pc.cast(ids, pa.string())})

    schema = pa.schema({"id": pa.int64(), "text": pa.string()})
    reader = pa.RecordBatchReader.from_batches(schema, generate())
    result = convert(reader, tmp_path / "out.arrow", on_null="error", progress=False)
    # A one-shot reader is pulled by Acero's source node, which runs ahead by up to ~60 batches
    # depending on thread timing: measured 1.7-4.6 MB whether 0.6M, 2.4M or 3M rows are streamed
    # (10.7-56 MB written), so the stream is 2.4M rows (44.6 MB) and the bound a fixed 12 MB.
    assert result.rows == streamed and result.bytes > 40e6, result
    assert peak < 12e6, (peak, result.bytes)


def test_dictionary_columns_are_stored_as_their_values(tmp_path):
    """The IPC file format cannot change dictionaries between batches (pandas categoricals do)."""
    parts = [pa.table({"label": pa.array(v).dictionary_encode()}) for v in (["a", "b"], ["c", "a"])]
    table = pa.concat_tables(parts)
    assert table.column("label").num_chunks == 2
    got = readers.open_ipc(convert(table, tmp_path / "o.arrow", progress=False).dest)
    assert got.schema.field("label").type == pa.string()
    assert got.column("label").to_pylist() == ["a", "b", "c", "a"]


@pytest.mark.parametrize("kind", ["parquet", "arrow", "orc", "jsonl"])
@pytest.mark.parametrize("row", [0, 1, 15, 16, 33, 49, 50, 99, 100])
def test_iter_batches_from_matches_the_full_scan(tmp_path, kind, row):
    """Guards against a worker that starts its shard at the wrong row (its ids and vectors would
    be shifted): from `first` on, the rows are exactly the full scan's, and `first` <= `row`,
    over several files of several Parquet row groups."""
    n = 100
    big = pa.table({"id": pa.array(range(n), pa.int64()), "text": [f"t{i}" for i in range(n)]})
    ext = {"parquet": "parquet", "arrow": "arrow", "orc": "orc", "jsonl": "jsonl"}[kind]
    for i, (a, b) in enumerate([(0, 50), (50, 80), (80, 100)]):
        part = big.slice(a, b - a)
        path = tmp_path / f"part-{i}.{ext}"
        if kind == "parquet":
            pq.write_table(part, path, row_group_size=16)
        elif kind == "arrow":
            feather.write_feather(part, path)
        elif kind == "orc":
            orc.write_table(part, path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in part.to_pylist()))
    for batch_size in (7, 1000):
        first, batches = readers.iter_batches_from(
            str(tmp_path / f"*.{ext}"), row, columns=["text", "id"], batch_size=batch_size
        )
        ids = [i for batch in batches for i in batch.column("id").to_pylist()]
        assert first <= row and ids == list(range(first, n))
        if kind in ("parquet", "arrow", "orc") and row >= 50:
            assert first >= 50  # whole files before the row are skipped, not read
