"""pyarrow's streaming JSON reader as a fast path for the BEIR loaders (`evalkit.data.beir`).

1) the whole file must decode as strict UTF-8 (read in 1 MiB chunks through an incremental
   decoder; pyarrow itself does not check fields it skips);
2) `_arrow_jsonl(path, fields)` yields record batches of the named fields, typed as strings;
3) whatever it cannot vouch for raises `_Fallback`, and the caller reads the file with its
   line-by-line reader instead (which names file and line of any fault).
"""

from __future__ import annotations

import codecs

ARROW_BLOCK = 1 << 22  # bytes pyarrow's JSON reader parses at a time


def _utf8(path: str) -> bool:
    """Whether the whole file decodes as strict UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except (UnicodeDecodeError, OSError):
        return False
    return True


class _Fallback(Exception):
    """pyarrow's JSON reader cannot vouch for this file: read it line by line instead."""


def _arrow_jsonl(path: str, fields: list[str]):
    """Record batches of the named string fields from pyarrow's streaming JSON reader (C++);
    raises _Fallback for what only the line-by-line reader handles exactly as documented:
    compressed files and anything pyarrow rejects (numbers as ids or texts, repeated keys,
    invalid JSON, lone surrogates, non-object lines). Invalid UTF-8 surfaces as
    UnicodeDecodeError when the batch's strings are read."""
    import pyarrow as pa
    import pyarrow.json as pj

    if path.lower().endswith(".gz") or not _utf8(path):
        raise _Fallback
    options = pj.ParseOptions(
        explicit_schema=pa.schema([(name, pa.string()) for name in fields]),
        unexpected_field_behavior="ignore",
    )
    try:
        reader = pj.open_json(path, read_options=pj.ReadOptions(block_size=ARROW_BLOCK),
                              parse_options=options)  # fmt: skip
        yield from reader
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as exc:
        raise _Fallback from exc
