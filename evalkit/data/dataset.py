"""Memory-mapped map-style datasets over Arrow IPC files (file or stream format), for torch DataLoaders.

A gather of arbitrary rows never builds an Arrow array or touches whole columns:

1) memory-map the file once (`_mmap.IpcFile`): every record batch is a view into the map;
   nothing is read into anonymous memory;
2) per requested column, `_mmap.Column` gathers the asked rows straight from the mapped bytes
   (one vectorised numpy gather per buffer) and decodes only those strings;
3) rows are assembled as dicts (`ArrowDataset`) or InputExample-like samples (`PairDataset`),
   with the null policy applied;
4) pickling keeps the path and options only; unpickling re-opens the map, so DataLoader workers work
   under both fork and spawn.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evalkit.data._mmap import Column, IpcFile
from evalkit.errors import DataError

__all__ = ["ArrowDataset", "PairDataset"]

_ON_NULL = ("error", "skip", "empty")


def _dict_rows(names: Sequence[str]):
    """A function turning column lists into row dicts; a dict display is ~3x faster than dict(zip())."""
    if not names:
        return lambda cols, n: [{} for _ in range(n)]
    keys = ", ".join(f"{name!r}: v{i}" for i, name in enumerate(names))
    args = ", ".join(f"v{i}" for i in range(len(names)))
    code = f"lambda cols, n: [{{{keys}}} for {args}, in zip(*cols)]"
    return eval(code, {})  # names enter only as repr() string literals


class _MappedDataset:
    """Common machinery: the mapped file, index checks, batching and pickling as path + options."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] | None) -> None:
        self.path = os.fspath(path)
        self._file = IpcFile(self.path)
        names = self._file.schema.names
        wanted = list(names) if columns is None else list(columns)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(
                f"column {missing[0]!r} not in {self.path}; columns are: {', '.join(names) or '(none)'}"
            )
        self._columns = {c: Column(self._file, c) for c in dict.fromkeys(wanted)}

    @property
    def schema(self) -> pa.Schema:
        return self._file.schema

    @property
    def format(self) -> str:
        """'file' or 'stream': which Arrow IPC format the file is in."""
        return self._file.format

    def __len__(self) -> int:
        return self._file.num_rows

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return self._state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._state().items())
        return f"{type(self).__name__}({args}) with {len(self)} rows"

    def _rows(self, indices: Any) -> np.ndarray:
        """Dataset indices (ints, negatives allowed) -> file row ids; IndexError when out of range."""
        idx = np.asarray(indices)
        if idx.dtype == bool or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"dataset indices must be integers; got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"index {int(bad)} is out of range for a dataset of {n} rows")
        return np.where(idx < 0, idx + n, idx)

    def _gather(self, rows: np.ndarray) -> list:
        raise NotImplementedError

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self.__getitems__(range(*index.indices(len(self))))
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"dataset index must be an int or a slice; got {type(index).__name__}")
        return self._gather(self._rows([index]))[0]

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> list:
        """Batched gather (torch's DataLoader calls this with a list of indices): a list of samples."""
        return self._gather(self._rows(indices))

    def __iter__(self) -> Iterator[Any]:
        for batch in self.iter_batches():
            yield from batch

    def iter_batches(
        self, rows: Iterable[int] | np.ndarray | None = None, batch_size: int = 1024
    ) -> Iterator[list]:
        """Yield lists of up to `batch_size` samples for `rows` (default: every row, in order)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if rows is None:
            for start in range(0, len(self), batch_size):
                yield self._gather(self._rows(np.arange(start, min(start + batch_size, len(self)))))
            return
        if not isinstance(rows, np.ndarray):
            rows = np.fromiter(rows, dtype=np.int64) if not isinstance(rows, Sequence) else rows
        rows = np.asarray(rows)
        for start in range(0, len(rows), batch_size):
            yield self.__getitems__(rows[start : start + batch_size])


class ArrowDataset(_MappedDataset):
    """Rows of a memory-mapped Arrow IPC file as dicts {column: Python value} (None for nulls).

    `columns` picks and orders the columns (default: all). Pickles as its path, not its data.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
        super().__init__(path, columns)
        self._names = list(self._columns)
        self._make_rows = _dict_rows(self._names)

    def _state(self) -> dict[str, Any]:
        return {"path": self.path, "columns": self._names}

    @property
    def column_names(self) -> list[str]:
        return list(self._names)

    def _gather(self, rows: np.ndarray) -> list[dict[str, Any]]:
        b, r = self._file.locate(rows)
        return self._make_rows([self._columns[c].read(b, r) for c in self._names], len(rows))


class PairDataset(_MappedDataset):
    """Text pairs (or triplets, or single texts) with an optional label, from a memory-mapped Arrow file.

    Items are sentence-transformers `InputExample(texts=[...], label=...)` (`as_dict=False`, the default;
    sentence_transformers is imported on first use) or dicts {column: value}. The label column must be
    integer or boolean (classes: Python int) or floating point (scores: Python float); without one, the
    label is 0 as InputExample's default. `on_null` says what to do with a null text or label:
    "error" raises a DataError naming the row and column; "skip" leaves such rows out of the dataset
    (indices then count only the kept rows); "empty" reads a null text as "" (a null label still raises).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        text_columns: Sequence[str] = ("sentence1", "sentence2"),
        label_column: str | None = None,
        *,
        as_dict: bool = False,
        on_null: str = "error",
    ) -> None:
        if isinstance(text_columns, str):
            text_columns = [text_columns]
        text_columns = list(text_columns)
        if not text_columns:
            raise ValueError("text_columns must name at least one column")
        if on_null not in _ON_NULL:
            raise ValueError(f"on_null must be one of {', '.join(_ON_NULL)}; got {on_null!r}")
        extra = [label_column] if label_column is not None else []
        super().__init__(path, text_columns + extra)
        self.text_columns, self.label_column = text_columns, label_column
        self.as_dict, self.on_null = as_dict, on_null
        for name in text_columns:
            t = self._columns[name].type
            if not (
                pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            ) and not (
                (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))
                or str(t) == "string_view"
            ):
                raise DataError(
                    f"text column {name!r} of {self.path} has type {t}; text columns must hold strings"
                )
        self._int_label = False
        if label_column is not None:
            t = self._columns[label_column].type
            if pa.types.is_integer(t) or pa.types.is_boolean(t):
                self._int_label = True
            elif not pa.types.is_floating(t):
                raise DataError(
                    f"label column {label_column!r} of {self.path} has type {t}; a label must be an "
                    "integer (classes) or floating-point (scores) column"
                )
        self._make_rows = _dict_rows(text_columns + extra)
        self._skipped: np.ndarray | None = None  # file rows left out under on_null="skip", sorted
        self._example_cls: Any = None

    def _state(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "text_columns": self.text_columns,
            "label_column": self.label_column,
            "as_dict": self.as_dict,
            "on_null": self.on_null,
        }

    def null_rows(self) -> np.ndarray:
        """Sorted file rows that have a null text or label (whatever `on_null` says); one
        vectorised pass over the null bitmaps, computed once."""
        return self._skip_index()

    def _skip_index(self) -> np.ndarray:
        """Sorted file rows with a null text or label (vectorised, per batch; computed once)."""
        if self._skipped is None:
            f, parts = self._file, []
            for b in range(f.num_batches):
                batch = f.batch(b)
                cols = [batch.column(c) for c in self._columns]
                if not any(c.null_count for c in cols):
                    continue
                mask = None
                for c in cols:
                    if c.null_count:
                        isnull = c.is_null()
                        mask = isnull if mask is None else pc.or_(mask, isnull)
                parts.append(np.flatnonzero(mask.to_numpy(zero_copy_only=False)) + f.starts[b])
            self._skipped = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self._skipped

    def __len__(self) -> int:
        n = self._file.num_rows
        return n - len(self._skip_index()) if self.on_null == "skip" else n

    def _rows(self, indices: Any) -> np.ndarray:
        rows = super()._rows(indices)
        if self.on_null == "skip":
            skipped = self._skip_index()
            if len(skipped):
                # kept index i is file row i + (number of skipped rows at or before it)
                kept_before = skipped - np.arange(len(skipped))
                rows = rows + np.searchsorted(kept_before, rows, side="right")
        return rows

    def _null_error(self, column: str, rows: np.ndarray, values: list) -> DataError:
        row = int(rows[next(i for i, v in enumerate(values) if v is None)])
        what = "text" if column in self.text_columns else "label"
        fix = "pass on_null='skip' or 'empty'" if what == "text" else "pass on_null='skip'"
        return DataError(
            f"row {row}, column {column!r} of {self.path} has a null {what}; fix the data or {fix}"
        )

    def _read_columns(self, rows: np.ndarray) -> tuple[list[list[str]], list | None]:
        b, r = self._file.locate(rows)
        texts = []
        for name in self.text_columns:
            col = self._columns[name]
            vals = col.read(b, r)
            if (col.kind == "generic" or col.may_be_null) and None in vals:
                if self.on_null != "empty":
                    raise self._null_error(name, rows, vals)
                vals = ["" if v is None else v for v in vals]
            texts.append(vals)
        labels = None
        if self.label_column is not None:
            col = self._columns[self.label_column]
            labels = col.read(b, r)
            if (col.kind == "generic" or col.may_be_null) and None in labels:
                raise self._null_error(self.label_column, rows, labels)
            if pa.types.is_boolean(col.type):
                labels = [int(v) for v in labels]
        return texts, labels

    def texts_batch(
        self, indices: Sequence[int] | np.ndarray
    ) -> tuple[list[list[str]], np.ndarray | None]:
        """Column-wise gather: ([texts of column 0, texts of column 1, ...], labels array or None)."""
        texts, labels = self._read_columns(self._rows(indices))
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64 if self._int_label else np.float64)
        return texts, labels

    def _gather(self, rows: np.ndarray) -> list:
        texts, labels = self._read_columns(rows)
        if self.as_dict:
            return self._make_rows(texts if labels is None else [*texts, labels], len(rows))
        if self._example_cls is None:
            from sentence_transformers import InputExample

            self._example_cls = InputExample
        make = self._example_cls
        if labels is None:
            return [make(texts=list(t)) for t in zip(*texts, strict=True)]
        return [
            make(texts=list(t), label=y)
            for t, y in zip(zip(*texts, strict=True), labels, strict=True)
        ]
