"""Labelled text pairs streamed from any source: (left texts, right texts, labels) batches.

1) stream record batches of the three columns with `evalkit.data.readers.iter_batches`, the two
   text columns checked at the door and decoded as strict UTF-8 (`evalkit.data.text`): numbers are
   never turned into text and bytes never become "b'...'";
2) reject a null in any column, naming its row;
3) cast the label column to float64 (a non-numeric label is refused with its type) and reject a
   label that is NaN or infinite, naming its row (an `inf` gold score would make every
   correlation meaningless);
4) re-cut the rows into batches of exactly `batch_size` (the last one shorter), whatever the
   source's own chunking (a CSV block, a Parquet row group, a copy of it in Arrow), so the texts
   encoded together, and with them the floats of every embedding, depend only on the rows;
5) yield the two text lists and the label array, batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evalkit.data.readers import iter_batches
from evalkit.errors import DataError


def iter_pair_batches(
    data: Any, *, left: str, right: str, label: str, batch_size: int = 8192, **source_options: Any
) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    """(left texts, right texts, float64 labels) batches of exactly `batch_size` rows (the last one
    shorter) of a pairs source, nulls and non-finite labels rejected by row."""
    pending: list[tuple[list[str], list[str], np.ndarray]] = []
    held = 0
    for part in _source_batches(data, left, right, label, batch_size, source_options):
        pending.append(part)
        held += len(part[0])
        while held >= batch_size:
            texts_l, texts_r, gold = _join(pending)
            yield texts_l[:batch_size], texts_r[:batch_size], gold[:batch_size]
            pending = [(texts_l[batch_size:], texts_r[batch_size:], gold[batch_size:])]
            held -= batch_size
    if held:
        yield _join(pending)


def _join(parts: list[tuple[list[str], list[str], np.ndarray]]):
    if len(parts) == 1:
        return parts[0]
    return (
        [t for p in parts for t in p[0]],
        [t for p in parts for t in p[1]],
        np.concatenate([p[2] for p in parts]),
    )


def _source_batches(data, left, right, label, batch_size, source_options):
    """The source's own record batches as (left texts, right texts, float64 labels)."""
    columns = [left, right, label]
    row = 0
    batches = iter_batches(
        data, columns=columns, text_columns=[left, right], batch_size=batch_size, **source_options
    )
    for batch in batches:
        if batch.num_rows == 0:
            continue
        for col in columns:
            if batch.column(col).null_count:
                first = int(pc.index(pc.is_null(batch.column(col)), True).as_py())
                raise DataError(
                    f"{data}: row {row + first} has a null {col!r}; drop or fill it first"
                )
        try:
            gold = batch.column(label).cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            kind = batch.column(label).type
            raise DataError(f"{data}: label column {label!r} is {kind}, not numeric") from None
        check_finite_labels(gold, f"{data}", label, row)
        yield batch.column(left).to_pylist(), batch.column(right).to_pylist(), gold
        row += batch.num_rows


def check_finite_labels(gold: np.ndarray, where: str, label: str, first_row: int) -> None:
    """Refuse a NaN or infinite label, naming its row (0-based)."""
    bad = ~np.isfinite(gold)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where}: row {first_row + i} has label {label!r} = {float(gold[i])}; labels must be "
            "finite numbers (drop or fix that row)"
        )
