"""Loaders for the BEIR retrieval layout: corpus.jsonl, queries.jsonl and a qrels TSV.

Algorithm:
1) `iter_corpus` reads corpus.jsonl with pyarrow's streaming JSON reader (C++, ~10x Python's
   json), falling back to the line-by-line reader below (which names the file and line of any
   fault) for whatever pyarrow cannot vouch for, and yields (ids, texts) batches, so a corpus of
   any size streams in bounded memory; each document's text is `(title + " " + text).strip()`,
   exactly as BEIR's SentenceBERT wrapper and MTEB build it for sentence-transformers models.
   Other formats `evalkit convert` reads (Parquet, CSV, Arrow, ...) with `_id`/`title`/`text`
   columns stream through `evalkit.data.readers.iter_batches`.
2) `corpus_ids` makes a first, cheap pass that keeps only the ids (as one Arrow string array),
   rejects duplicates and gives every id its rank in byte order, so ties can be broken by id
   exactly as sentence-transformers (ascending) and trec_eval (descending) do;
   `count_corpus` makes the same pass when only the count, the duplicate check and membership
   are needed, keeping 8 bytes per document: a 64-bit hash of each id, sorted; equal hashes
   send the ids that carry them through a second pass, compared as strings, so a collision is
   never taken for a duplicate.
3) `load_queries` reads queries.jsonl into (ids, texts); queries are few, they fit in memory.
4) `load_qrels` reads the BEIR TSV (`query-id corpus-id score`, header line) or a TREC qrels file
   (`qid 0 docid rel`, no header) into {query_id: {corpus_id: grade}}.
Every malformed line raises DataError naming the file and line number, as does a line that is
not valid UTF-8 (lines are decoded strictly, one by one). Texts and titles must be strings (a
number or a list is refused, never str()'d); ids may be strings or integers. Tables are read
through `evalkit.data.readers.iter_batches`, which checks and decodes their text columns.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evalkit.data._arrow_json import _arrow_jsonl, _Fallback
from evalkit.errors import DataError

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")


def document_text(title: Any, text: Any) -> str:
    """The text a sentence-transformers model sees for one BEIR document (BEIR/MTEB convention)."""
    return f"{title or ''} {text or ''}".strip()


def text_columns(column: str) -> list[str]:
    """The columns a text spec names: "text", or "title+text" (joined like `document_text`)."""
    return [c.strip() for c in column.split("+")] if "+" in column else [column]


def document_texts(batch: Any, column: str) -> Any:
    """Column `column` of a record batch, or for "title+text" the BEIR document texts
    (`document_text`: the values joined by a space, nulls as empty, stripped)."""
    import pyarrow as pa

    names = text_columns(column)
    if len(names) == 1:
        return batch.column(column)
    values = [batch.column(n).to_pylist() for n in names]
    return pa.array(
        [" ".join(v or "" for v in row).strip() for row in zip(*values, strict=True)],
        type=pa.string(),
    )


def _is_jsonl(path: str) -> bool:
    return path.lower().endswith(_JSON_SUFFIXES)


def _open_binary(path: str):
    if path.lower().endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, each decoded strictly as UTF-8 (BOM on line 1 dropped)."""
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start + 1}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                    ) from None
                yield lineno, line
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated/corrupt .gz
        raise DataError(f"cannot read {path}: {exc}") from None


def _check_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{what} file {path} does not exist")
    if os.path.isdir(path):
        raise DataError(f"{what} {path} is a directory; give the file (e.g. {what}.jsonl)")
    return path


def _iter_jsonl(path: str, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object raises."""
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); each line of a BEIR {what} file "
                "must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _field(obj: dict, key: str, path: str, lineno: int, *, required: bool = True) -> Any:
    if key in obj:
        return obj[key]
    if required:
        raise DataError(
            f"{path}:{lineno}: missing field {key!r}; fields are: {', '.join(map(str, obj)) or '(none)'}"
        )
    return None


def _doc_id(obj: dict, path: str, lineno: int) -> str:
    value = _field(obj, "_id", path, lineno)
    if value is None or value == "":
        raise DataError(f"{path}:{lineno}: empty '_id'")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(
            f"{path}:{lineno}: '_id' is a {type(value).__name__} ({value!r}); ids are strings "
            "(or integers)"
        )
    return str(value)


def _text_field(obj: dict, key: str, path: str, lineno: int, *, required: bool = True) -> Any:
    """A text field: a string (None when absent/null and not required); never str() of a number."""
    value = _field(obj, key, path, lineno, required=required)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        what = "null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"
        raise DataError(f"{path}:{lineno}: {key!r} is {what}, not a string")
    return value


def iter_corpus(
    path: str | os.PathLike, *, batch_size: int = 10_000, **source_options: Any
) -> Iterator[tuple[list[str], list[str]]]:
    """Yield (ids, texts) batches of a BEIR corpus in file order; text = (title + " " + text).strip().

    `path` is a corpus.jsonl (optionally .gz) or any source `evalkit convert` reads with columns
    `_id` (or `id`), optional `title`, and `text`. `source_options` go to evalkit.data.readers for the latter.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be a positive integer; got {batch_size!r}")
    path = os.fspath(path)
    if "://" not in path:
        _check_file(path, "corpus")
    if _is_jsonl(path):
        yield from _iter_corpus_jsonl(path, batch_size)
        return
    yield from _iter_corpus_arrow(path, batch_size=batch_size, **source_options)


def _iter_corpus_jsonl(path: str, batch_size: int) -> Iterator[tuple[list[str], list[str]]]:
    """corpus.jsonl batches: pyarrow's JSON reader while it can vouch for every document (string
    ids, string texts and titles, valid JSON and UTF-8), else, from the start, the line-by-line
    reader, which raises the precise error; documents already yielded are skipped, not repeated."""
    done = 0
    try:
        ids: list[str] = []
        texts: list[str] = []
        for batch in _arrow_jsonl(path, ["_id", "title", "text"]):
            data = batch.to_pydict()  # strict UTF-8: an invalid byte raises UnicodeDecodeError
            if None in data["_id"] or "" in data["_id"] or None in data["text"]:
                raise _Fallback
            ids.extend(data["_id"])
            texts.extend(
                document_text(t, x) for t, x in zip(data["title"], data["text"], strict=True)
            )
            while len(ids) >= batch_size:
                yield ids[:batch_size], texts[:batch_size]
                done += batch_size
                ids, texts = ids[batch_size:], texts[batch_size:]
        if ids:
            yield ids, texts
        return
    except (_Fallback, UnicodeDecodeError):
        pass
    ids, texts, row = [], [], 0
    for lineno, obj in _iter_jsonl(path, "corpus"):
        if obj.get("text", "") is None:
            raise DataError(f"{path}:{lineno}: document {obj.get('_id')!r} has null 'text'")
        text = _text_field(obj, "text", path, lineno)
        title = _text_field(obj, "title", path, lineno, required=False)
        doc_id = _doc_id(obj, path, lineno)
        row += 1
        if row <= done:
            continue
        ids.append(doc_id)
        texts.append(document_text(title, text))
        if len(ids) >= batch_size:
            yield ids, texts
            ids, texts = [], []
    if ids:
        yield ids, texts


def _iter_corpus_arrow(
    path: str, *, batch_size: int, **source_options: Any
) -> Iterator[tuple[list[str], list[str]]]:
    import pyarrow as pa

    from evalkit.data.readers import iter_batches, open_source

    # CSV/TSV: ids and texts are read as strings (an id 007 stays '007')
    as_strings = ["_id", "id", "text", "title"]
    schema = open_source(path, text_columns=as_strings, **source_options).schema
    names = schema.names
    id_col = "_id" if "_id" in names else "id" if "id" in names else None
    if id_col is None or "text" not in names:
        raise DataError(
            f"corpus {path} needs columns '_id' and 'text' (and optionally 'title'); "
            f"columns are: {', '.join(names)}"
        )
    columns = [id_col, "text"] + (["title"] if "title" in names else [])
    int_ids = pa.types.is_integer(schema.field(id_col).type)  # exact as decimal strings
    texts = columns[1:] if int_ids else columns
    row = 0
    batches = iter_batches(
        path, columns=columns, text_columns=texts, batch_size=batch_size, **source_options
    )
    for batch in batches:
        id_array = batch.column(id_col)
        data = batch.to_pydict()
        titles = data.get("title") or [None] * batch.num_rows
        ids = []
        for i, value in enumerate(
            id_array.cast(pa.string()).to_pylist() if int_ids else data[id_col]
        ):
            if value is None or value == "":
                raise DataError(f"corpus {path}: row {row + i} has an empty {id_col!r}")
            ids.append(value)
        for i, value in enumerate(data["text"]):
            if value is None:
                raise DataError(f"corpus {path}: row {row + i} (id {ids[i]!r}) has null 'text'")
        row += batch.num_rows
        if ids:
            yield ids, [document_text(t, x) for t, x in zip(titles, data["text"], strict=True)]


def check_corpus(path: str | os.PathLike, **source_options: Any) -> None:
    """Cheap checks before any model loads: the corpus exists, is not empty, and its first
    document (and for tables the columns and their types) is usable. Reads one document only."""
    path = os.fspath(path)
    if "://" not in path:
        _check_file(path, "corpus")
    first = iter_corpus(path, batch_size=1, **source_options)
    if next(first, None) is None:
        raise DataError(f"corpus {path} has no documents")
    first.close()


def corpus_ids(path: str | os.PathLike, **source_options: Any):
    """All corpus ids in file order as a pyarrow string array, after checking they are unique.

    Costs one pass over the file and ~(id bytes + 8) bytes per document, never the texts.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    def collect(batches):
        return [pa.array(ids, type=pa.large_string()) for ids, _ in batches]

    chunks = _over_ids(path, collect, **source_options)
    array = pa.concat_arrays(chunks) if chunks else pa.array([], type=pa.large_string())
    if len(array):
        order = pc.sort_indices(array)
        ordered = array.take(order)
        same = pc.equal(ordered[1:], ordered[:-1]) if len(array) > 1 else pa.array([], pa.bool_())
        if len(array) > 1 and pc.any(same).as_py():
            dup = ordered[int(pc.index(same, True).as_py())].as_py()
            raise DataError(f"corpus {os.fspath(path)}: document id {dup!r} occurs more than once")
    return array


class CorpusIdSet:
    """What `count_corpus` keeps of the ids: their number and sorted 64-bit hashes (8 bytes per
    document). `present(ids)` tests membership by hash: a missing id whose hash collides with a
    corpus id's (~n / 2^64) reads as present; it feeds a warning, never a metric."""

    def __init__(self, hashes: Any) -> None:
        self.hashes = hashes

    def __len__(self) -> int:
        return len(self.hashes)

    def present(self, ids: list[str]) -> Any:
        import numpy as np

        h = np.array([hash(i) for i in ids], dtype=np.int64)
        at = np.minimum(np.searchsorted(self.hashes, h), max(len(self.hashes) - 1, 0))
        return (self.hashes[at] == h) if len(self.hashes) else np.zeros(len(ids), bool)


def count_corpus(path: str | os.PathLike, **source_options: Any) -> CorpusIdSet:
    """The corpus ids' count (len) and membership, after checking they are unique (DataError
    names a duplicate), in ~8 bytes per document (step 2 of the module docstring)."""
    from array import array

    import numpy as np

    def hash_all(batches):
        hashes = array("q")
        for ids, _ in batches:
            hashes.extend(map(hash, ids))
        return hashes

    hashes = _over_ids(path, hash_all, **source_options)
    keys = np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, np.int64)
    keys.sort()  # in place, in the array's own buffer
    clash = np.unique(keys[1:][keys[1:] == keys[:-1]])
    if len(clash):  # equal hashes: compare the ids that carry them as strings
        wanted = set(clash.tolist())

        def check(batches):
            seen = set()
            for ids, _ in batches:
                for i in ids:
                    if hash(i) in wanted:
                        if i in seen:
                            raise DataError(
                                f"corpus {os.fspath(path)}: document id {i!r} occurs more than once"
                            )
                        seen.add(i)

        _over_ids(path, check, **source_options)
    return CorpusIdSet(keys)


def _over_ids(path: str | os.PathLike, consume, **source_options: Any):
    """consume(batches of ids) -> result, over pyarrow's reader, or over the line-by-line one
    (from the start, with fresh state) when pyarrow gives up part way."""
    try:
        return consume(_iter_ids(path, fast=True, **source_options))
    except _Fallback:
        return consume(_iter_ids(path, fast=False, **source_options))


def _iter_ids(
    path: str | os.PathLike, *, fast: bool = True, **source_options: Any
) -> Iterator[tuple[list[str], None]]:
    path = os.fspath(path)
    if _is_jsonl(path):
        _check_file(path, "corpus")
        if fast:  # may raise _Fallback part way: callers start again with fast=False
            for batch in _arrow_jsonl(path, ["_id"]):
                try:
                    ids = batch.column(0).to_pylist()
                except UnicodeDecodeError:
                    raise _Fallback from None
                if None in ids or "" in ids:
                    raise _Fallback
                yield ids, None
            return
        ids: list[str] = []
        for lineno, obj in _iter_jsonl(path, "corpus"):
            ids.append(_doc_id(obj, path, lineno))
            if len(ids) >= 65_536:
                yield ids, None
                ids = []
        if ids:
            yield ids, None
        return
    for ids, _ in _iter_corpus_arrow(path, batch_size=65_536, **source_options):
        yield ids, None


def id_ranks(ids) -> Any:
    """rank[i] = position of ids[i] in byte (= Unicode code point) order, as int64 numpy array."""
    import numpy as np
    import pyarrow.compute as pc

    order = pc.sort_indices(ids).to_numpy()
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order), dtype=np.int64)
    return ranks


def load_queries(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(ids, texts) of a BEIR queries.jsonl (fields `_id`, `text`); a duplicate id is an error."""
    path = _check_file(path, "queries")
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    if not _is_jsonl(path):
        raise DataError(f"queries {path}: expected a BEIR queries.jsonl (one JSON object per line)")
    for lineno, obj in _iter_jsonl(path, "queries"):
        qid = _doc_id(obj, path, lineno)
        if obj.get("text", "") is None:
            raise DataError(f"{path}:{lineno}: query {qid!r} has null 'text'")
        text = _text_field(obj, "text", path, lineno)
        if qid in seen:
            raise DataError(f"{path}:{lineno}: query id {qid!r} occurs more than once")
        seen.add(qid)
        ids.append(qid)
        texts.append(text)
    if not ids:
        raise DataError(f"queries {path} is empty")
    return ids, texts


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """{query_id: {corpus_id: grade}} from a BEIR qrels TSV or a TREC qrels file.

    BEIR: tab-separated `query-id corpus-id score` with a header line. TREC: whitespace-separated
    `query-id iteration corpus-id relevance`, no header. Grades are integers (0 = judged not
    relevant); a pair listed twice keeps its last grade, as BEIR's loader does.
    """
    path = _check_file(path, "qrels")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
        if lineno == 1 and _is_header(parts):
            continue
        if len(parts) == 3:
            qid, docid, grade = parts
        elif len(parts) == 4:
            qid, _, docid, grade = parts
        else:
            raise DataError(
                f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score) "
                f"or 4 TREC fields (qid, 0, docid, rel); got {len(parts)}: {line.strip()[:80]!r}"
            )
        try:
            value = int(float(grade))
        except (ValueError, OverflowError):
            raise DataError(f"{path}:{lineno}: score {grade!r} is not a number") from None
        qrels.setdefault(qid.strip(), {})[docid.strip()] = value
    if not qrels:
        raise DataError(f"qrels {path} has no judgements")
    return qrels


def _is_header(parts: list[str]) -> bool:
    try:
        float(parts[-1])
    except ValueError:
        return True
    return False


def beir_paths(folder: str | os.PathLike, split: str = "test") -> dict[str, Path]:
    """corpus/queries/qrels paths of a BEIR dataset folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)."""
    root = Path(folder)
    paths = {
        "corpus": root / "corpus.jsonl",
        "queries": root / "queries.jsonl",
        "qrels": root / "qrels" / f"{split}.tsv",
    }
    for what, p in paths.items():
        if not p.exists():
            raise DataError(f"BEIR folder {root} has no {p.relative_to(root)} ({what})")
    return paths
