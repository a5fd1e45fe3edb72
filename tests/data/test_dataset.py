"""evalkit.data.dataset against the in-memory answer (Table.to_pylist) over files of many uneven record
batches, in both IPC formats, with nulls, every label type, bad input, pickling, DataLoader workers
under fork and spawn, and flat anonymous memory."""

from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from evalkit.data.dataset import ArrowDataset, PairDataset
from evalkit.errors import DataError

WORDS = ["alpha", "béta", "", "gamma delta", "x" * 70, "日本語のテキスト", "a\nb", "emoji 🙂"]
SCHEMA = pa.schema(
    [
        ("s1", pa.large_string()),
        ("s2", pa.string()),
        ("score", pa.float64()),
        ("cls", pa.int8()),
        ("flag", pa.bool_()),
        ("tags", pa.list_(pa.int64())),
    ]
)


def _batch(rng: np.random.Generator, start: int, n: int, null_every: int = 0) -> pa.RecordBatch:
    ids = range(start, start + n)
    s1 = [f"{WORDS[i % len(WORDS)]} {i}" for i in ids]
    s2 = [None if null_every and i % null_every == 3 else WORDS[(i * 7) % len(WORDS)] for i in ids]
    return pa.record_batch(
        [
            pa.array(s1, pa.large_string()),
            pa.array(s2, pa.string()),
            pa.array(rng.random(n)),
            pa.array(rng.integers(-3, 4, n), pa.int8()),
            pa.array(rng.random(n) > 0.5),
            pa.array([[i, i] if i % 5 else None for i in ids], pa.list_(pa.int64())),
        ],
        schema=SCHEMA,
    )


def make_batches(seed: int = 0, null_every: int = 0) -> list[pa.RecordBatch]:
    """~2,000 rows in many record batches of uneven sizes, some empty, some sliced views."""
    rng = np.random.default_rng(seed)
    out, start = [], 0
    for n in rng.integers(0, 40, 80).tolist():
        out.append(_batch(rng, start, n, null_every))
        start += n
    for lo, hi in [(5, 30), (0, 1), (17, 600)]:  # sliced batches: a non-zero array offset
        out.append(_batch(rng, start - lo, hi, null_every).slice(lo, hi - lo))
        start += hi - lo
    return out


def write(path, batches, fmt="file", **options) -> str:
    opener = pa.ipc.new_file if fmt == "file" else pa.ipc.new_stream
    with pa.OSFile(str(path), "wb") as sink, opener(sink, batches[0].schema, **options) as w:
        for b in batches:
            w.write_batch(b)
    return str(path)


@pytest.fixture(scope="module", params=["file", "stream"])
def data(request, tmp_path_factory):
    batches = make_batches()
    path = write(tmp_path_factory.mktemp(request.param) / "d.arrow", batches, request.param)
    return path, pa.Table.from_batches(batches).to_pylist(), request.param


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_gather_matches_in_memory_answer(data, block):
    path, expected, fmt = data
    ds = ArrowDataset(path)
    assert len(ds) == len(expected) and ds.format == fmt
    rng = np.random.default_rng(block)
    idx = rng.integers(-len(expected), len(expected), max(block, 300))
    for start in range(0, len(idx), block):
        chunk = idx[start : start + block]
        assert ds.__getitems__(chunk) == [expected[i] for i in chunk]
        assert ds.__getitems__(chunk.tolist()) == [expected[i] for i in chunk]
    assert [r for b in ds.iter_batches(batch_size=block) for r in b] == expected
    rows = rng.permutation(len(expected))
    assert [r for b in ds.iter_batches(rows, batch_size=block) for r in b] == [
        expected[i] for i in rows
    ]


def test_single_items_slices_and_columns(data):
    path, expected, _ = data
    ds = ArrowDataset(path, columns=["score", "s2"])
    assert ds.column_names == ["score", "s2"]
    for i in [0, 1, len(expected) - 1, -1, -len(expected), 123]:
        assert ds[i] == {"score": expected[i]["score"], "s2": expected[i]["s2"]}
    assert ds[10:20:3] == [{"score": e["score"], "s2": e["s2"]} for e in expected[10:20:3]]
    assert ds.__getitems__([]) == []
    for bad in [len(expected), -len(expected) - 1]:
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
    with pytest.raises(IndexError):
        ds.__getitems__([0, len(expected)])
    with pytest.raises(TypeError):
        ds["s1"]


def test_pair_dataset_dicts_texts_batch_and_labels(data):
    path, expected, _ = data
    ds = PairDataset(path, ["s1", "s2"], "score", as_dict=True)
    idx = np.random.default_rng(1).integers(0, len(expected), 200)
    assert ds.__getitems__(idx) == [
        {"s1": expected[i]["s1"], "s2": expected[i]["s2"], "score": expected[i]["score"]}
        for i in idx
    ]
    texts, labels = ds.texts_batch(idx)
    assert texts == [[expected[i]["s1"] for i in idx], [expected[i]["s2"] for i in idx]]
    assert labels.dtype == np.float64 and labels.tolist() == [expected[i]["score"] for i in idx]

    for label, kind in [("cls", int), ("flag", int), ("score", float)]:
        one = PairDataset(path, ["s2"], label, as_dict=True)
        got = one.__getitems__(idx[:20])
        assert [type(g[label]) for g in got] == [kind] * 20
        assert [g[label] for g in got] == [
            int(expected[i][label]) if kind is int else expected[i][label] for i in idx[:20]
        ]
    assert PairDataset(path, ["s1", "s2", "s1"], None, as_dict=True)[3] == {
        "s1": expected[3]["s1"],
        "s2": expected[3]["s2"],
    }


def test_input_examples(data):
    path, expected, _ = data
    ds = PairDataset(path, ["s1", "s2"], "cls")
    from sentence_transformers import InputExample

    items = ds.__getitems__([4, -2])
    assert all(isinstance(it, InputExample) for it in items)
    assert items[0].texts == [expected[4]["s1"], expected[4]["s2"]]
    assert items[0].label == expected[4]["cls"] and isinstance(items[0].label, int)
    single = PairDataset(path, ["s1"])[7]
    assert single.texts == [expected[7]["s1"]] and single.label == 0


def test_null_policies(tmp_path):
    batches = make_batches(seed=3, null_every=11)
    path = write(tmp_path / "nulls.arrow", batches)
    expected = pa.Table.from_batches(batches).to_pylist()
    null_rows = [i for i, e in enumerate(expected) if e["s2"] is None]
    assert null_rows

    strict = PairDataset(path, ["s1", "s2"], "score", as_dict=True)
    assert len(strict) == len(expected)
    with pytest.raises(DataError, match=rf"row {null_rows[0]}, column 's2' .*null text.*on_null"):
        strict.__getitems__([0, null_rows[0], 1])
    assert strict[null_rows[0] + 1]["s2"] == expected[null_rows[0] + 1]["s2"]

    empty = PairDataset(path, ["s1", "s2"], "score", as_dict=True, on_null="empty")
    assert [r["s2"] for r in empty.__getitems__(null_rows)] == [""] * len(null_rows)

    kept = [e for e in expected if e["s2"] is not None]
    skip = PairDataset(path, ["s1", "s2"], "score", as_dict=True, on_null="skip")
    assert len(skip) == len(kept)
    want = [{"s1": e["s1"], "s2": e["s2"], "score": e["score"]} for e in kept]
    for block in [1, 7, 64, 10_000]:
        assert [r for b in skip.iter_batches(batch_size=block) for r in b] == want
    idx = np.random.default_rng(0).integers(-len(kept), len(kept), 300)
    assert skip.__getitems__(idx) == [want[i] for i in idx]
    assert pickle.loads(pickle.dumps(skip))[-1] == want[-1]

    # a null label: an error under "error"/"empty" (there is no empty label), skipped under "skip"
    tags = PairDataset(path, ["s1"], "cls", as_dict=True)
    assert tags[5]["cls"] == expected[5]["cls"]
    labelled = pa.Table.from_batches(batches).set_column(
        2, "score", pa.array([None, 1.5] * (len(expected) // 2) + [2.0] * (len(expected) % 2))
    )
    lpath = write(tmp_path / "null-label.arrow", labelled.to_batches(max_chunksize=50))
    with pytest.raises(DataError, match=r"row 0, column 'score' .*null label"):
        PairDataset(lpath, ["s1"], "score", on_null="empty", as_dict=True)[0]
    assert (
        len(PairDataset(lpath, ["s1"], "score", on_null="skip"))
        == len(expected) // 2 + len(expected) % 2
    )


def test_bad_columns_and_types(data, tmp_path):
    path, _, _ = data
    with pytest.raises(
        DataError, match=r"column 'sentence3' not in .*columns are: s1, s2, score, cls, flag, tags"
    ):
        PairDataset(path, ["s1", "sentence3"], "score")
    with pytest.raises(DataError, match=r"column 'nope' not in .*columns are: s1, s2"):
        ArrowDataset(path, columns=["nope"])
    with pytest.raises(
        DataError, match=r"label column 's1' .*has type large_string.*integer.*floating"
    ):
        PairDataset(path, ["s2"], "s1")
    with pytest.raises(DataError, match=r"label column 'tags' .*has type list"):
        PairDataset(path, ["s2"], "tags")
    with pytest.raises(DataError, match=r"text column 'score' .*has type double.*strings"):
        PairDataset(path, ["s1", "score"])
    with pytest.raises(ValueError, match="on_null"):
        PairDataset(path, ["s1"], on_null="drop")


def test_corrupt_truncated_missing_files(data, tmp_path):
    path, _, fmt = data
    raw = open(path, "rb").read()
    cases = {
        "missing": None,
        "empty": b"",
        "garbage": b"this is not an arrow file at all" * 10,
        "truncated-end": raw[: len(raw) - 100],
        "truncated-half": raw[: len(raw) // 2],
        "head-only": raw[:20],
    }
    for name, content in cases.items():
        p = tmp_path / f"{fmt}-{name}.arrow"
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(DataError, match=r"does not exist|empty|corrupt or truncated") as err:
            ArrowDataset(p)
        assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_invalid_utf8_names_row_and_column(tmp_path):
    """A string column holding bytes that are not UTF-8 is refused when the file is opened (full
    validation), naming the row and column, instead of serving mangled text later."""
    offsets = pa.py_buffer(np.array([0, 2, 4, 6], dtype=np.int32).tobytes())
    bad = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"ok\xff\xfeok")])
    ok = pa.array(["a", "b", "c"])
    path = write(tmp_path / "bad.arrow", [pa.record_batch({"t": ok}), pa.record_batch({"t": bad})])
    with pytest.raises(DataError, match=r"row 4, column 't' .*not valid UTF-8"):
        PairDataset(path, ["t"], as_dict=True)


def test_compressed_file_reads_batches_on_demand(tmp_path):
    batches = make_batches(seed=5)
    expected = pa.Table.from_batches(batches).to_pylist()
    path = write(
        tmp_path / "zstd.arrow", batches, options=pa.ipc.IpcWriteOptions(compression="zstd")
    )
    ds = ArrowDataset(path)
    idx = np.random.default_rng(0).integers(0, len(expected), 200)
    assert ds.__getitems__(idx) == [expected[i] for i in idx]
    pair = PairDataset(path, ["s1", "s2"], "score", as_dict=True)
    assert pair.texts_batch([3])[0] == [[expected[3]["s1"]], [expected[3]["s2"]]]


def test_pickles_as_path_and_options(data):
    path, expected, _ = data
    ds = PairDataset(path, ["s1", "s2"], "cls", as_dict=True, on_null="empty")
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    back = pickle.loads(blob)
    assert (back.path, back.text_columns, back.label_column, back.on_null) == (
        path,
        ["s1", "s2"],
        "cls",
        "empty",
    )
    assert back.__getitems__(range(50)) == ds.__getitems__(range(50))
    plain = pickle.loads(pickle.dumps(ArrowDataset(path, columns=["s2"])))
    assert plain[-1] == {"s2": expected[-1]["s2"]}
    assert "rows" in repr(plain)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(data, method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {method} is not available here")
    import torch
    from torch.utils.data import DataLoader

    path, expected, _ = data
    ds = PairDataset(path, ["s1", "s2"], "score", as_dict=True)
    loader = DataLoader(
        ds,
        batch_size=64,
        shuffle=True,
        num_workers=2,
        collate_fn=list,
        multiprocessing_context=method,
        generator=torch.Generator().manual_seed(0),
    )
    got = [row for batch in loader for row in batch]
    want = [{"s1": e["s1"], "s2": e["s2"], "score": e["score"]} for e in expected]
    assert sorted(got, key=repr) == sorted(want, key=repr)


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status on this system")


def test_anonymous_memory_stays_flat(tmp_path):
    """A full random pass over a ~150 MB file: no Arrow allocations, RssAnon grows by far less
    than the file (the data stays in the page cache, mapped, never copied)."""
    rng = np.random.default_rng(0)
    vocab = pa.array([" ".join(rng.choice(WORDS[:6], 12)) + f" {i}" for i in range(5000)])
    schema = pa.schema([("a", pa.string()), ("b", pa.large_string()), ("y", pa.float32())])
    path = tmp_path / "big.arrow"
    n_batches, per = 60, 20_000
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        for _ in range(n_batches):
            a = vocab.take(pa.array(rng.integers(0, len(vocab), per)))
            b = vocab.take(pa.array(rng.integers(0, len(vocab), per))).cast(pa.large_string())
            w.write_batch(
                pa.record_batch([a, b, pa.array(rng.random(per, dtype=np.float32))], schema=schema)
            )
    size_mb = path.stat().st_size / 2**20
    assert size_mb > 100
    ds = PairDataset(path, ["a", "b"], "y", as_dict=True)
    ds.__getitems__([0, 1])
    arrow_before, rss_before = pa.total_allocated_bytes(), rss_anon_mb()
    order = rng.permutation(len(ds))
    seen = 0
    for start in range(0, len(order), 4096):
        seen += len(ds.__getitems__(order[start : start + 4096]))
    assert seen == n_batches * per
    assert pa.total_allocated_bytes() == arrow_before
    growth = rss_anon_mb() - rss_before
    assert growth < 40, f"RssAnon grew {growth:.0f} MB reading a {size_mb:.0f} MB file"


def test_stsb_converted_csv_first_row(shared_data, tmp_path):
    """The real STS-B test split, CSV -> Arrow: 1379 pairs, first item equals the CSV's first row."""
    src = shared_data / "stsb" / "stsb-en-test.csv"
    table = pacsv.read_csv(
        src, read_options=pacsv.ReadOptions(column_names=["sentence1", "sentence2", "score"])
    )
    path = write(tmp_path / "stsb.arrow", table.to_batches(max_chunksize=500))
    ds = PairDataset(path, ["sentence1", "sentence2"], "score")
    assert len(ds) == 1379
    first = ds[0]
    assert first.texts == ["A girl is styling her hair.", "A girl is brushing her hair."]
    assert first.label == 2.5
