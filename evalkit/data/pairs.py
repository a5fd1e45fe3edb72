"""Labelled text pairs streamed from any source: (left texts, right texts, labels) batches.

1) stream record batches of the three columns with `evalkit.data.readers.iter_batches`;
2) reject a null in any column, naming its row;
3) cast the label column to float64 (a non-numeric label is refused with its type);
4) yield the two text lists and the label array, batch by batch.
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
    """(left texts, right texts, float64 labels) batches of a pairs source, nulls rejected by row."""
    columns = [left, right, label]
    row = 0
    for batch in iter_batches(data, columns=columns, batch_size=batch_size, **source_options):
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
        texts_l = [str(t) for t in batch.column(left).to_pylist()]
        texts_r = [str(t) for t in batch.column(right).to_pylist()]
        row += batch.num_rows
        yield texts_l, texts_r, gold
