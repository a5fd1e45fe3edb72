"""BEIR loaders: title/text joining as BEIR/MTEB do, streaming in any batch size, qrels formats,
and one clear DataError per malformed line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalkit.data import _arrow_json, beir
from evalkit.errors import DataError


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    rows = [
        {"_id": "d2", "title": "Title two", "text": "Body two."},
        {"_id": "d10", "title": "", "text": "  Body ten.  "},
        {"_id": "d1", "text": "No title key."},
        {"_id": 7, "title": "Numeric id", "text": "seven"},
        {"_id": "d3", "title": "Only title", "text": ""},
    ]
    return _write_jsonl(tmp_path / "corpus.jsonl", rows)


def test_document_text_matches_beir_convention():
    # BEIR SentenceBERT / MTEB: (title + " " + text).strip(), text.strip() without a title
    assert beir.document_text("T", "body") == "T body"
    assert beir.document_text("", " body ") == "body"
    assert beir.document_text(None, "body") == "body"
    assert beir.document_text("T", "") == "T"


@pytest.mark.parametrize("block", [1, 2, 7, 10_000])
def test_iter_corpus_streams_in_order_whatever_the_batch(corpus, block):
    batches = list(beir.iter_corpus(corpus, batch_size=block))
    assert all(len(ids) <= block for ids, _ in batches)
    ids = [i for b, _ in batches for i in b]
    texts = [t for _, b in batches for t in b]
    assert ids == ["d2", "d10", "d1", "7", "d3"]
    assert texts == [
        "Title two Body two.",
        "Body ten.",
        "No title key.",
        "Numeric id seven",
        "Only title",
    ]


def test_corpus_ids_and_byte_order_ranks(corpus):
    ids = beir.corpus_ids(corpus)
    assert ids.to_pylist() == ["d2", "d10", "d1", "7", "d3"]
    ranks = beir.id_ranks(ids)
    expected = sorted(ids.to_pylist())  # Python str order = code point order
    assert [expected[r] for r in ranks] == ids.to_pylist()
    assert ranks.dtype == np.int64


def test_duplicate_corpus_id_is_an_error(tmp_path):
    path = _write_jsonl(
        tmp_path / "c.jsonl", [{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}]
    )
    with pytest.raises(DataError, match="'a' occurs more than once"):
        beir.corpus_ids(path)


def test_count_corpus_counts_and_rejects_duplicates(tmp_path, monkeypatch):
    """Guards the hash-based duplicate check: a duplicate id must be reported (even among ids
    whose hashes all collide), and colliding hashes of distinct ids must not be taken for one."""
    rows = [{"_id": f"d{i}", "text": "x"} for i in range(50)]
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    assert len(beir.count_corpus(path)) == 50
    dup = _write_jsonl(tmp_path / "d.jsonl", [*rows, {"_id": "d17", "text": "again"}])
    with pytest.raises(DataError, match="'d17' occurs more than once"):
        beir.count_corpus(dup)
    monkeypatch.setattr(beir, "hash", lambda s: 7, raising=False)  # every id collides
    assert len(beir.count_corpus(path)) == 50
    with pytest.raises(DataError, match="'d17' occurs more than once"):
        beir.count_corpus(dup)


def test_bad_corpus_lines_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        list(beir.iter_corpus(path))
    path.write_text('{"_id": "a", "body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":1: missing field 'text'; fields are: _id, body"):
        list(beir.iter_corpus(path))
    path.write_text('{"id": "a", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="missing field '_id'"):
        list(beir.iter_corpus(path))
    with pytest.raises(DataError, match="does not exist"):
        list(beir.iter_corpus(tmp_path / "nope.jsonl"))


def test_corpus_from_a_parquet_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"_id": ["a", "b"], "title": ["T", None], "text": ["x", "y "]})
    pq.write_table(table, tmp_path / "corpus.parquet")
    batches = list(beir.iter_corpus(tmp_path / "corpus.parquet", batch_size=1))
    assert batches == [(["a"], ["T x"]), (["b"], ["y"])]
    pq.write_table(pa.table({"doc": ["a"], "text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="columns are: doc, text"):
        list(beir.iter_corpus(tmp_path / "bad.parquet"))


def test_queries(tmp_path):
    path = _write_jsonl(
        tmp_path / "q.jsonl",
        [{"_id": "q1", "text": "one", "metadata": {}}, {"_id": 2, "text": "two"}],
    )
    assert beir.load_queries(path) == (["q1", "2"], ["one", "two"])
    _write_jsonl(path, [{"_id": "q1", "text": "one"}, {"_id": "q1", "text": "again"}])
    with pytest.raises(DataError, match="query id 'q1' occurs more than once"):
        beir.load_queries(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        beir.load_queries(path)


def test_qrels_beir_tsv_and_trec(tmp_path):
    tsv = tmp_path / "test.tsv"
    tsv.write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td1\t0\n", encoding="utf-8"
    )
    assert beir.load_qrels(tsv) == {"q1": {"d1": 1, "d2": 2}, "q2": {"d1": 0}}
    trec = tmp_path / "qrels.txt"
    trec.write_text("q1 0 d1 1\nq1 0 d2 2\nq2 0 d1 0\n", encoding="utf-8")
    assert beir.load_qrels(trec) == beir.load_qrels(tsv)
    tsv.write_text("query-id\tcorpus-id\tscore\nq1\td1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.tsv:2: expected 3 tab-separated fields"):
        beir.load_qrels(tsv)
    tsv.write_text("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", encoding="utf-8")
    with pytest.raises(DataError, match="score 'high' is not a number"):
        beir.load_qrels(tsv)
    tsv.write_text("query-id\tcorpus-id\tscore\n", encoding="utf-8")
    with pytest.raises(DataError, match="no judgements"):
        beir.load_qrels(tsv)


def test_real_scifact_layout(shared_data):
    folder = shared_data / "beir-scifact"
    paths = beir.beir_paths(folder, "test")
    qrels = beir.load_qrels(paths["qrels"])
    assert len(qrels) == 300 and sum(map(len, qrels.values())) == 339
    ids, texts = beir.load_queries(paths["queries"])
    assert len(ids) == 1109 and set(qrels) <= set(ids)
    n = 0
    first = None
    for doc_ids, doc_texts in beir.iter_corpus(paths["corpus"], batch_size=1000):
        first = first or (doc_ids[0], doc_texts[0])
        n += len(doc_ids)
    assert n == 5183 == len(beir.corpus_ids(paths["corpus"]))
    row = json.loads(paths["corpus"].open(encoding="utf-8").readline())
    assert first == (row["_id"], (row["title"] + " " + row["text"]).strip())


def _docs(n, seed=0):
    """Documents with and without titles, escapes, non-ASCII text, blank lines between."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        doc = {"_id": f"d{i}", "text": f'text "{i}" é 😀 \\ {rng.random():.6f}'}
        if i % 3:
            doc["title"] = f"title {i}"
        if i % 7 == 0:
            doc["extra"] = {"nested": [1, 2]}
        out.append(doc)
    return out


def _write_lines(path, docs, blank_every=0):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write((d if isinstance(d, str) else json.dumps(d, ensure_ascii=i % 2 == 0)) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n")
    return path


def _line_by_line(monkeypatch):
    """Force the line-by-line reader (pyarrow's always gives up)."""

    def refuse(path, fields):
        raise beir._Fallback
        yield

    monkeypatch.setattr(beir, "_arrow_jsonl", refuse)


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_arrow_reader_gives_exactly_the_line_reader_batches(tmp_path, monkeypatch, batch):
    """Guards the fast JSON path: the same ids, texts and batch boundaries as the line-by-line
    reader (a mangled text or a shifted batch would change every metric)."""
    monkeypatch.setattr(_arrow_json, "ARROW_BLOCK", 4096)  # many pyarrow blocks
    path = _write_lines(tmp_path / "c.jsonl", _docs(300), blank_every=13)
    used = []
    real = beir._arrow_jsonl

    def spy(p, fields):
        used.append(fields)
        yield from real(p, fields)

    monkeypatch.setattr(beir, "_arrow_jsonl", spy)
    fast = list(beir.iter_corpus(path, batch_size=batch))
    assert used and len(beir.count_corpus(path)) == 300
    _line_by_line(monkeypatch)
    assert fast == list(beir.iter_corpus(path, batch_size=batch))


@pytest.mark.parametrize("batch", [1, 64, 1000])
def test_fallback_part_way_neither_repeats_nor_skips(tmp_path, monkeypatch, batch):
    """Guards the switch between readers: a document pyarrow rejects late in the file (a
    numeric id) must not repeat or drop the documents already yielded."""
    monkeypatch.setattr(_arrow_json, "ARROW_BLOCK", 4096)
    docs = _docs(400)
    docs[350]["_id"] = 350  # pyarrow: string column changes to number
    path = _write_lines(tmp_path / "c.jsonl", docs)
    got = [(i, t) for ids, texts in beir.iter_corpus(path, batch_size=batch)
           for i, t in zip(ids, texts, strict=True)]  # fmt: skip
    assert [i for i, _ in got] == [str(d["_id"]) for d in docs]
    assert len(beir.count_corpus(path)) == 400
    assert beir.corpus_ids(path).to_pylist() == [str(d["_id"]) for d in docs]
    _line_by_line(monkeypatch)
    assert got == [(i, t) for ids, texts in beir.iter_corpus(path, batch_size=batch)
                   for i, t in zip(ids, texts, strict=True)]  # fmt: skip


def test_late_faults_still_name_their_line(tmp_path, monkeypatch):
    """Guards the error messages after a fast start: the line-by-line reader takes over and
    names the file and line of a null text, an empty id or a broken line."""
    monkeypatch.setattr(_arrow_json, "ARROW_BLOCK", 4096)
    docs = _docs(300)
    for fault, match in [
        ({"_id": "x", "text": None}, r"c\.jsonl:251: document 'x' has null 'text'"),
        ({"_id": "", "text": "t"}, r"c\.jsonl:251: empty '_id'"),
        ('{"_id": "x", "text": ', r"c\.jsonl:251: not valid JSON"),
    ]:
        path = _write_lines(tmp_path / "c.jsonl", [*docs[:250], fault, *docs[250:]])
        with pytest.raises(DataError, match=match):
            list(beir.iter_corpus(path, batch_size=64))


def test_byte_order_mark_and_bad_utf8_read_as_the_line_reader_reads_them(tmp_path, monkeypatch):
    """Guards against the fast reader disagreeing with the documented one: a BOM on line 1 is
    dropped by both; an invalid UTF-8 byte or a lone surrogate is still refused, with its line."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n')
    fast = list(beir.iter_corpus(path))
    assert fast == [(["a", "b"], ["x", "y"])]
    path.write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "bad \xff"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid UTF-8"):
        list(beir.iter_corpus(path))
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid UTF-8"):
        beir.count_corpus(path)
    path.write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y", "z": "\xff"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid UTF-8"):  # a field nobody reads
        beir.count_corpus(path)
    _line_by_line(monkeypatch)
    path.write_bytes(b'\xef\xbb\xbf{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n')
    assert list(beir.iter_corpus(path)) == fast


@pytest.mark.parametrize("size", [1, 17, 4096, 1 << 20])
def test_pieces_are_whole_lines_covering_the_file(tmp_path, size):
    """Guards the piece cutter of the fast JSON path: pieces that split a record, drop or repeat
    bytes, or lose a last line without a newline would parse as garbage or lose documents."""
    docs = _docs(200)
    docs[50]["text"] = "long " * 3000  # a record longer than the smaller piece sizes
    path = _write_lines(tmp_path / "c.jsonl", docs, blank_every=11)
    data = path.read_bytes() + b'{"_id": "last", "text": "no newline"}'
    path.write_bytes(data)
    with open(path, "rb") as f:
        pieces = list(_arrow_json._pieces(f, size))
    assert b"".join(pieces) == data
    assert all(p.endswith(b"\n") for p in pieces[:-1])
    longest = max(len(line) + 1 for line in data.split(b"\n"))
    assert max(len(p) for p in pieces) <= size + longest  # bounded: a piece and one record


def test_json_fast_path_parses_bounded_pieces(tmp_path, monkeypatch):
    """Guards the bounded memory of reading a corpus.jsonl: pyarrow's streaming reader kept
    ~the file's size of RssAnon (+140-190 MB on a 128 MB corpus); every parse must see at most
    about ARROW_BLOCK bytes plus one record, however large the file, and give the same batches
    as the line-by-line reader at several piece sizes."""
    import pyarrow.json as pj

    path = _write_lines(tmp_path / "c.jsonl", _docs(3000), blank_every=13)
    seen: list[int] = []
    real = pj.read_json

    def spy(source, **kwargs):
        seen.append(source.size)
        return real(source, **kwargs)

    monkeypatch.setattr(pj, "read_json", spy)
    answers = []
    for block in (300, 4096, 65536, 1 << 20):
        monkeypatch.setattr(_arrow_json, "ARROW_BLOCK", block)
        seen.clear()
        answers.append(list(beir.iter_corpus(path, batch_size=256)))
        longest = max(len(line) for line in path.read_bytes().split(b"\n")) + 1
        assert seen and max(seen) <= block + longest
        if block < path.stat().st_size // 4:
            assert len(seen) >= path.stat().st_size // (block + longest)  # many pieces
    _line_by_line(monkeypatch)
    reference = list(beir.iter_corpus(path, batch_size=256))
    assert all(a == reference for a in answers)


def test_bad_utf8_after_many_pieces_names_its_line(tmp_path, monkeypatch):
    """Guards the per-piece UTF-8 check: an invalid byte far into the file, after batches were
    already yielded from earlier pieces, is still refused with its line (never parsed, never
    skipped), by iter_corpus and by the ids-only pass."""
    monkeypatch.setattr(_arrow_json, "ARROW_BLOCK", 512)
    path = _write_lines(tmp_path / "c.jsonl", _docs(400))
    lines = path.read_bytes().split(b"\n")
    lines[300] = lines[300].replace(b'"text": "', b'"text": "\xff', 1)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"c\.jsonl:301: not valid UTF-8"):
        list(beir.iter_corpus(path, batch_size=64))
    with pytest.raises(DataError, match=r"c\.jsonl:301: not valid UTF-8"):
        beir.count_corpus(path)


_RSS_PROBE = """
import sys
from evalkit.data._arrow_json import _arrow_jsonl

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) * 1024

next(_arrow_jsonl(sys.argv[1], ["_id"]))  # pyarrow loaded, first piece parsed
before = rss_anon()
rows = sum(b.num_rows for b in _arrow_jsonl(sys.argv[1], ["_id", "title", "text"]))
print(rows, rss_anon() - before)
"""


def test_reading_a_corpus_keeps_anonymous_memory_flat(tmp_path):
    """Guards the bounded memory of the corpus pass: reading a corpus 8x larger (25 MB vs 3 MB
    of JSON) must not grow RssAnon by more than a few MB. pyarrow's streaming JSON reader,
    used before, kept about the file's size (+60 MB at 13 MB, +190 MB at 128 MB): evaluating a
    1,000,000-document corpus cost 168 MB more than a 100,000-document one."""
    import subprocess
    import sys

    text = "a gloss of some twenty words, as WordNet has it, repeated here to fill the line"
    line = '{"_id": "d%d", "title": "", "text": "#%d ' + text + '"}\n'
    grown = {}
    for n in (25_000, 200_000):
        path = tmp_path / f"c{n}.jsonl"
        path.write_text("".join(line % (i, i) for i in range(n)), encoding="utf-8")
        out = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, str(path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows, growth = map(int, out.stdout.split())
        assert rows == n
        grown[n] = growth
    assert grown[200_000] - grown[25_000] < 8 * 2**20, grown
