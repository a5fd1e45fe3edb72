"""Reading rows of a memory-mapped Arrow IPC file in place, without building Arrow arrays.

1) `IpcFile` memory-maps the file once and opens it as an IPC file (or stream) over that one
   zero-copy buffer, so every record batch is a view into the map; each batch is fully validated
   once (`validate(full=True)`: offsets within their buffers, UTF-8 strings), since the gathers
   below trust the offsets they read (a corrupt one would serve wrong text or crash);
2) `Column` records, per record batch, the first row id, the array offset and the file positions
   of the validity bitmap, offsets/values buffer and string data buffer, in small numpy tables;
3) `Column.take(rows)` maps global row ids to (batch, row) with np.searchsorted, reads validity
   bits, offsets and values with one vectorised numpy gather from the mapped bytes, and decodes
   only the strings asked for; types the fast path cannot read in place (nested, dictionary,
   view types, compressed files) fall back to a per-batch `take`.
"""

from __future__ import annotations

import mmap
import os
import re
import sys

import numpy as np
import pyarrow as pa

from evalkit.errors import DataError

_ITEM = {k: np.arange(k, dtype=np.int64) for k in (1, 2, 4, 8)}


def _kind(t: pa.DataType) -> str:
    if sys.byteorder != "little":
        return "generic"
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return "var32"
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return "var64"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "fixed"
    return "generic"


class IpcFile:
    """One memory-mapped Arrow IPC file: its batches (views into the map) and where each batch starts."""

    def __init__(self, path: str, validate: str = "full") -> None:
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"Arrow file {path} does not exist")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty, not an Arrow IPC file")
        try:
            self._mm = pa.memory_map(path, "r")
            self.buffer = self._mm.read_buffer()
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot memory-map {path}: {exc}") from exc
        self.size = self.buffer.size
        self._reader = None
        self._cache: dict[int, pa.RecordBatch] = {}
        # A batch that is not a view into the map (a compressed file) is not kept: the file format
        # re-reads it when needed; the stream format cannot seek, so it keeps it in memory.
        self._batches: list[pa.RecordBatch | None] = []
        self.zero_copy: list[bool] = []
        lengths = []
        head = bytes(memoryview(self.buffer)[:6])
        try:
            if head == b"ARROW1":
                self.format = "file"
                self._reader = pa.ipc.open_file(self.buffer)
                self.schema = self._reader.schema
                batches = (
                    self._reader.get_batch(i) for i in range(self._reader.num_record_batches)
                )
            else:
                self.format = "stream"
                batches = pa.ipc.open_stream(self.buffer)
                self.schema = batches.schema
            for batch in batches:
                if validate == "full":
                    validate_full(batch, path, sum(lengths))
                else:
                    batch.validate()
                in_map = self._in_map(batch)
                lengths.append(batch.num_rows)
                self.zero_copy.append(in_map)
                self._batches.append(batch if in_map or self._reader is None else None)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(
                f"{path} is not a readable Arrow IPC file (file or stream format); it is corrupt or "
                f"truncated: {str(exc).splitlines()[0]}"
            ) from exc
        lengths = np.array(lengths, dtype=np.int64)
        self.starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=self.starts[1:])
        self.num_rows = int(lengths.sum())
        self.bytes = np.frombuffer(self.buffer, dtype=np.uint8)
        # A second, Python-level map of the same pages: slicing it gives bytes ready to decode.
        with open(path, "rb") as fh:
            self.mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def _in_map(self, batch: pa.RecordBatch) -> bool:
        base = self.buffer.address
        for col in batch.columns:
            for buf in col.buffers():
                if (
                    buf is not None
                    and buf.size
                    and not (base <= buf.address and buf.address + buf.size <= base + self.size)
                ):
                    return False
        return True

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def batch(self, b: int) -> pa.RecordBatch:
        got = self._batches[b]
        if got is not None:
            return got
        if b not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[b] = self._reader.get_batch(b)
        return self._cache[b]

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row ids (valid, non-negative) -> (batch index, row within batch)."""
        b = np.searchsorted(self.starts, rows, side="right") - 1
        return b, rows - self.starts[b]


def validate_full(batch: pa.RecordBatch, path: str, first_row: int) -> None:
    """Offsets within their buffers and valid UTF-8 strings (`validate(full=True)`), or a
    DataError naming the column (and for bad UTF-8 the row); `first_row` is the row of batch[0].
    Anything that reads Arrow IPC data in place calls this first."""
    try:
        batch.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid as exc:
            message = str(exc).splitlines()[0]
            utf8 = re.search(r"Invalid UTF8 sequence at string index (\d+)", message)
            if utf8:
                raise DataError(
                    f"row {first_row + int(utf8[1])}, column {name!r} of {path} is not valid UTF-8; "
                    "re-create the file from UTF-8 text"
                ) from None
            raise DataError(
                f"{path} is a corrupt Arrow file: column {name!r} (batch starting at row "
                f"{first_row}) fails validation ({message}); it cannot be read safely: re-create "
                "it (e.g. evalkit convert from the original data)"
            ) from None
    batch.validate(full=True)  # the batch itself is bad (raises)


class Column:
    """Reads one column's values for (batch, row) pairs straight from the mapped bytes."""

    def __init__(self, f: IpcFile, name: str) -> None:
        self.f, self.name = f, name
        self.type = f.schema.field(name).type
        self.kind = _kind(self.type) if all(f.zero_copy) else "generic"
        if self.kind == "generic":
            return
        nb, base = f.num_batches, f.buffer.address
        self.offset = np.zeros(nb, dtype=np.int64)
        # file positions of each batch's validity bitmap (-1: no nulls), values or offsets, string bytes
        self.valid = np.full(nb, -1, dtype=np.int64)
        self.values = np.zeros(nb, dtype=np.int64)
        self.data = np.zeros(nb, dtype=np.int64)
        for b in range(nb):
            arr = f.batch(b).column(name)
            bufs = arr.buffers()
            self.offset[b] = arr.offset
            if bufs[0] is not None and arr.null_count:
                self.valid[b] = bufs[0].address - base
            if len(arr):
                self.values[b] = bufs[1].address - base
                if self.kind.startswith("var") and bufs[2] is not None and bufs[2].size:
                    self.data[b] = bufs[2].address - base
        self.may_be_null = bool((self.valid >= 0).any())
        if self.kind == "fixed":
            self.dtype = np.dtype(self.type.to_pandas_dtype())
        elif self.kind != "bool":
            self.dtype = np.dtype(np.int64 if self.kind == "var64" else np.int32)
            self._pair = np.arange(2 * self.dtype.itemsize, dtype=np.int64)  # offsets i and i + 1
        if self.kind != "bool":  # file position of row 0's value (fixed) or offset (strings)
            self.start = self.values + self.offset * self.dtype.itemsize
        self.text = pa.types.is_string(self.type) or pa.types.is_large_string(self.type)

    def _bits(self, where: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return (self.f.bytes[where + (pos >> 3)] >> (pos & 7).astype(np.uint8)) & 1 == 1

    def nulls(self, b: np.ndarray, r: np.ndarray) -> np.ndarray | None:
        """Boolean mask of null cells, or None when none of the rows is null."""
        if self.kind == "generic":
            mask = np.zeros(len(b), dtype=bool)
            for bb in np.unique(b):
                sel = np.flatnonzero(b == bb)
                arr = self.f.batch(int(bb)).column(self.name)
                if arr.null_count:
                    taken = arr.take(pa.array(r[sel]))
                    mask[sel] = taken.is_null().to_numpy(zero_copy_only=False)
            return mask if mask.any() else None
        if not self.may_be_null:
            return None
        where = self.valid[b]
        has = where >= 0
        if not has.any():
            return None
        mask = np.zeros(len(b), dtype=bool)
        mask[has] = ~self._bits(where[has], self.offset[b[has]] + r[has])
        return mask if mask.any() else None

    def read(self, b: np.ndarray, r: np.ndarray) -> list:
        """Python values (None for nulls) of rows r of batches b."""
        if self.kind == "generic":
            out: list = [None] * len(b)
            for bb in np.unique(b):
                sel = np.flatnonzero(b == bb)
                vals = self.f.batch(int(bb)).column(self.name).take(pa.array(r[sel])).to_pylist()
                for i, v in zip(sel.tolist(), vals, strict=True):
                    out[i] = v
            return out
        data = self.f.bytes
        if self.kind == "bool":
            out = self._bits(self.values[b], self.offset[b] + r).tolist()
        elif self.kind == "fixed":
            size = self.dtype.itemsize
            at = self.start[b] + r * size
            out = data[at[:, None] + _ITEM[size]].view(self.dtype).reshape(-1).tolist()
        else:
            # one gather reads offsets i and i+1 of every row: its [start, end) in the data buffer
            at = self.start[b] + r * self.dtype.itemsize
            spans = data[at[:, None] + self._pair].view(self.dtype).astype(np.int64, copy=False)
            spans += self.data[b][:, None]
            mm = self.f.mmap
            if self.text:
                try:
                    out = [mm[s:e].decode() for s, e in spans.tolist()]
                except UnicodeDecodeError:
                    out = self._decode_slow(spans, b, r)
            else:
                out = [mm[s:e] for s, e in spans.tolist()]
        if self.may_be_null:
            nulls = self.nulls(b, r)
            if nulls is not None:
                for i in np.flatnonzero(nulls).tolist():
                    out[i] = None
        return out

    def _decode_slow(self, spans: np.ndarray, b: np.ndarray, r: np.ndarray) -> list:
        out = []
        for (s, e), bb, rr in zip(spans.tolist(), b.tolist(), r.tolist(), strict=True):
            try:
                out.append(self.f.mmap[s:e].decode())
            except UnicodeDecodeError as exc:
                row = int(self.f.starts[bb]) + rr
                raise DataError(
                    f"row {row}, column {self.name!r} of {self.f.path} is not valid UTF-8 ({exc.reason})"
                ) from exc
        return out
