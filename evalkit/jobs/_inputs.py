"""The precompute job's input: which columns it reads, a scan checked at the door, its fingerprint.

1) `read_columns`: the text column(s) ("title+text" joins two) and the id column;
2) `checked_input`: a factory of fresh scans of those columns, text decoded as strict UTF-8,
   checked once now (columns exist, text columns hold text, the first batch has no null) so a
   bad input fails before any model loads;
3) `input_fingerprint`: the input's data fingerprint (None for in-memory inputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from evalkit.errors import DataError


def checked_input(data: Any, column: str, id_column: str | None, options: dict[str, Any]):
    """-> a function returning a fresh scan of the input's text (and id) columns, the text as
    valid UTF-8 strings (never str() of bytes or numbers, see evalkit.data.text). Checked now,
    before any model loads: the columns exist, the text column holds text, and the first batch
    has no null or bad UTF-8."""
    from evalkit.data import readers
    from evalkit.data.beir import text_columns

    texts = text_columns(column)
    columns = read_columns(column, id_column)

    def batches() -> Iterator[Any]:
        return readers.iter_batches(data, columns=columns, text_columns=texts, **options)

    first = next(batches(), None)
    for name in texts if first is not None else ():
        if first.column(name).null_count:
            row = int(first.column(name).is_null().to_numpy(zero_copy_only=False).argmax())
            raise DataError(f"{data}: row {row} has a null {name!r}; drop or fill it first")
    return batches


def input_fingerprint(data: Any) -> str | None:
    """The input's data fingerprint (None for inputs that have none, e.g. an in-memory table)."""
    from evalkit.data.fingerprint import data_fingerprint

    try:
        return data_fingerprint(data)
    except TypeError:
        return None


def read_columns(column: str, id_column: str | None) -> list[str]:
    """The input columns a job reads: the text column(s) ("title+text" joins two) and the ids."""
    from evalkit.data.beir import text_columns

    names = text_columns(column)
    return names + ([id_column] if id_column and id_column not in names else [])
