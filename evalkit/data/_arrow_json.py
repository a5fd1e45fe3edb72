"""pyarrow's JSON parser as a fast path for the BEIR loaders (`evalkit.data.beir`).

1) the file is read in pieces of about ARROW_BLOCK bytes, each cut after its last newline (a
   JSON Lines record never holds a raw newline, so every piece is whole records; a record longer
   than ARROW_BLOCK makes a longer piece);
2) every piece must decode as strict UTF-8 (pyarrow itself does not check fields it skips);
3) each piece is parsed by its own `pyarrow.json.read_json` call into record batches of the
   named fields, typed as strings. One call per piece keeps memory bounded by the piece: the
   streaming reader (`open_json`) was measured to keep ~the file's size of anonymous memory
   (+140-190 MB RssAnon over a 128 MB, 1,000,000-document corpus.jsonl, whatever the memory
   pool or threading), where this keeps < 20 MB, and it is faster on 2 cores;
4) whatever it cannot vouch for raises `_Fallback` (possibly part way, after batches were
   yielded), and the caller reads the file with its line-by-line reader instead (which names
   file and line of any fault).
"""

from __future__ import annotations

from collections.abc import Iterator

ARROW_BLOCK = 1 << 20  # bytes parsed per read_json call (whole records: more for a longer one)


class _Fallback(Exception):
    """pyarrow's JSON reader cannot vouch for this file: read it line by line instead."""


def _pieces(f, size: int) -> Iterator[bytes]:
    """The file's bytes in pieces of at most `size` bytes plus one record, each ending after a
    newline (the last piece: at the end of the file, newline or not)."""
    rest = b""
    while True:
        data = f.read(size)
        if not data:
            if rest:
                yield rest
            return
        data = rest + data if rest else data
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # one record longer than `size` so far: keep reading
            rest = data
            continue
        yield data[:cut] if cut < len(data) else data
        rest = data[cut:]


def _arrow_jsonl(path: str, fields: list[str]):
    """Record batches of the named string fields, parsed by pyarrow (C++) piece by piece;
    raises _Fallback for what only the line-by-line reader handles exactly as documented:
    compressed files, invalid UTF-8, and anything pyarrow rejects (numbers as ids or texts,
    repeated keys, invalid JSON, lone surrogates, non-object lines)."""
    import pyarrow as pa
    import pyarrow.json as pj

    if path.lower().endswith(".gz"):
        raise _Fallback
    options = pj.ParseOptions(
        explicit_schema=pa.schema([(name, pa.string()) for name in fields]),
        unexpected_field_behavior="ignore",
    )
    try:
        with open(path, "rb") as f:
            for piece in _pieces(f, ARROW_BLOCK):
                try:
                    piece.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Fallback from None
                read = pj.ReadOptions(block_size=len(piece) + 1, use_threads=False)
                table = pj.read_json(pa.py_buffer(piece), read_options=read, parse_options=options)
                yield from table.to_batches()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as exc:
        raise _Fallback from exc
