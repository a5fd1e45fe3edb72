"""Text reaches the model exactly as stored, or the run stops naming file, column and row.

Every test here guards against a text that was silently changed on its way to the encoder:
bytes embedded as their Python repr ("b'caf\\xe9'"), numbers re-spelt by str() ('1.50' -> '1.5',
'007' -> '7'), or a JSON reader's invalid UTF-8 crashing with a traceback."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evalkit.data import beir
from evalkit.data.pairs import iter_pair_batches
from evalkit.data.readers import iter_batches
from evalkit.errors import DataError


def _pairs(path, **kw):
    return list(iter_pair_batches(path, left="a", right="b", label="score", **kw))


def test_latin1_csv_is_refused_naming_line_not_embedded_as_bytes_repr(tmp_path):
    """Before: pyarrow typed the column binary and pairs.py embedded str(b'caf\\xe9')."""
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"a,b,score\nhello,world,1.0\ncaf\xe9,bar,2.0\n")
    with pytest.raises(DataError, match=r"latin1\.csv is not valid UTF-8.*Row #3.*iconv"):
        _pairs(path)


def test_binary_parquet_column_of_utf8_is_decoded_exactly(tmp_path):
    """A Parquet text column written as BYTE_ARRAY without the UTF-8 annotation holds valid text:
    it is decoded, not turned into "b'...'"."""
    path = tmp_path / "binary.parquet"
    texts = ["café", "naïve", "日本語"]
    table = pa.table(
        {
            "a": pa.array([t.encode() for t in texts], pa.binary()),
            "b": pa.array([t.encode() for t in texts], pa.large_binary()),
            "score": [1.0, 2.0, 3.0],
        }
    )
    pq.write_table(table, path)
    [(left, right, gold)] = _pairs(path)
    assert left == texts and right == texts and gold.tolist() == [1.0, 2.0, 3.0]


def test_binary_parquet_column_with_bad_bytes_names_column_and_row(tmp_path):
    """Before: the bad value reached the encoder as str(bytes)."""
    path = tmp_path / "bad.parquet"
    values = [b"ok"] * 5 + [b"caf\xe9"] + [b"ok"] * 4
    pq.write_table(pa.table({"a": values, "b": ["x"] * 10, "score": [1.0] * 10}), path)
    with pytest.raises(
        DataError, match=r"bad\.parquet: row 5 \(0-based\) of text column 'a'.*0xe9"
    ):
        _pairs(path, batch_size=3)


def test_json_reader_invalid_utf8_is_refused_with_its_row(tmp_path):
    """pyarrow's JSON reader hands over string arrays holding invalid UTF-8; reading them as
    Python text raised UnicodeDecodeError (a traceback)."""
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(
        b'{"a": "fine", "b": "x", "score": 1}\n{"a": "caf\xe9", "b": "y", "score": 2}\n'
    )
    with pytest.raises(DataError, match=r"row 1 \(0-based\) of text column 'a' is not valid UTF-8"):
        _pairs(path)


@pytest.mark.parametrize("dtype", [pa.int64(), pa.float64(), pa.list_(pa.string())])
def test_non_text_columns_are_refused_before_any_row_is_read(tmp_path, dtype):
    """Before: str(1.5), str(7) or str(['x']) was embedded in place of the stored text."""
    values = {
        "int64": [7, 8],
        "double": [1.5, 2.0],
        "list<item: string>": [["x"], ["y"]],
    }[str(dtype)]
    path = tmp_path / "typed.parquet"
    pq.write_table(
        pa.table({"a": pa.array(values, dtype), "b": ["p", "q"], "score": [1.0, 2.0]}), path
    )
    kind = str(dtype).split("<")[0]
    with pytest.raises(DataError, match=rf"text column 'a' of .* holds {kind}.*, not text"):
        iter_pair_batches(path, left="a", right="b", label="score").__next__()


def test_csv_digit_texts_keep_their_exact_characters(tmp_path):
    """CSV type inference read '007' as 7 and '1.50' as 1.5; text columns are read as strings."""
    path = tmp_path / "digits.csv"
    path.write_text("a,b,score\n007,1.50,1\n1e3,00,2\n", encoding="utf-8")
    [(left, right, _)] = _pairs(path)
    assert left == ["007", "1e3"] and right == ["1.50", "00"]


def test_as_text_passes_string_types_and_refuses_other_types():
    from evalkit.data.text import as_text

    strings = pa.array(["a", None, "c"])
    assert as_text(strings, "src", "t", 0) is strings
    dictionary = pa.array(["x", "y", "x"]).dictionary_encode()
    assert as_text(dictionary, "src", "t", 0).to_pylist() == ["x", "y", "x"]
    with pytest.raises(DataError, match="holds timestamp"):
        as_text(pa.array(np.array(["2020-01-01"], dtype="datetime64[s]")), "src", "t", 0)


def test_iter_batches_text_columns_must_exist(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": ["x"]}), path)
    with pytest.raises(DataError, match="'zz'"):
        iter_batches(path, text_columns=["zz"])


# ---------------------------------------------------------------------------------- BEIR files


def _write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def test_beir_jsonl_invalid_utf8_names_file_and_line(tmp_path):
    """Before: a UnicodeDecodeError traceback from the text-mode reader."""
    corpus = _write(
        tmp_path / "corpus.jsonl",
        [b'{"_id": "d1", "text": "ok"}', b'{"_id": "d2", "text": "caf\xe9"}'],
    )
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        list(beir.iter_corpus(corpus))
    queries = _write(tmp_path / "queries.jsonl", [b'{"_id": "q\xff", "text": "x"}'])
    with pytest.raises(DataError, match=r"queries\.jsonl:1: not valid UTF-8"):
        beir.load_queries(queries)
    qrels = _write(tmp_path / "qrels.tsv", [b"query-id\tcorpus-id\tscore", b"q1\td\xe91\t1"])
    with pytest.raises(DataError, match=r"qrels\.tsv:2: not valid UTF-8"):
        beir.load_qrels(qrels)


def test_beir_text_fields_must_be_strings(tmp_path):
    """Before: {"text": 42} was embedded as '42' and {"text": ["a"]} as "['a']"."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "text": ["a"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"corpus\.jsonl:1: 'text' is a list"):
        list(beir.iter_corpus(corpus))
    corpus.write_text(json.dumps({"_id": "d1", "title": 3, "text": "t"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"'title' is a int"):
        list(beir.iter_corpus(corpus))
    corpus.write_text(json.dumps({"_id": 1.5, "text": "t"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"'_id' is a float"):
        list(beir.iter_corpus(corpus))
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"_id": "q", "text": 42}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"queries\.jsonl:1: 'text' is a int"):
        beir.load_queries(queries)


def test_beir_bom_and_integer_ids_read_exactly(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'\xef\xbb\xbf{"_id": 7, "text": "seven"}\n')
    assert list(beir.iter_corpus(corpus)) == [(["7"], ["seven"])]


def test_corpus_table_ids_and_texts_keep_their_characters(tmp_path):
    """CSV ids '007' were inferred as the integer 7 and then matched qrels as '7'."""
    csv = tmp_path / "corpus.csv"
    csv.write_text("_id,title,text\n007,,1.50\n8,T,x\n", encoding="utf-8")
    assert list(beir.iter_corpus(csv)) == [(["007", "8"], ["1.50", "T x"])]
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"_id": [5, 6], "text": [b"caf\xc3\xa9", b"x"]}), parquet)
    assert list(beir.iter_corpus(parquet)) == [(["5", "6"], ["café", "x"])]
    pq.write_table(pa.table({"_id": ["a"], "text": [3]}), parquet)
    with pytest.raises(DataError, match="text column 'text' .* holds int64"):
        list(beir.iter_corpus(parquet))
