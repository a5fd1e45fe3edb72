"""Any tabular source -> record batches, streamed in input order, checked at the door.

1) Resolve the source: a path, directory, glob, list of paths or URI becomes a sorted list of files
   on one filesystem (pyarrow's for local paths and s3://, fsspec's for any other scheme); the format
   comes from `format=` or the file extensions. In-memory tables, pyarrow datasets, HF `datasets`
   and record-batch readers are taken as they are.
2) Open it as a `pyarrow.dataset.Dataset` (CSV/TSV header, delimiter and quoting as asked).
3) Validate at the door: selected and renamed columns, the filter and the text columns must exist;
   a mistake names the real columns; text columns must hold text (`evalkit.data.text`).
4) Scan record batches in input order (`dataset.to_batches()`, one batch of read-ahead). Batches
   of Arrow IPC/Feather files are fully validated (`RecordBatch.validate(full=True)`: offsets in
   bounds, UTF-8) as they are read and before any filter touches them, so a corrupt file is one
   DataError instead of a segfault or garbage text; text columns are checked and decoded batch by
   batch (`evalkit.data.text.as_text`). `iter_batches_from(source, row)` starts the scan at the
   file (Parquet: the row group) that holds `row`, counting the rows before it from metadata, so
   a worker that encodes rows [a, b) of a large Parquet/Arrow input does not read rows [0, a).
`open_ipc` memory-maps an Arrow IPC file as a Table (fully validated). Conversion to Arrow lives in
`evalkit.data.convert`, the filter syntax in `evalkit.data.filters`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from evalkit.data._mmap import validate_full
from evalkit.data.filters import _parse_filter
from evalkit.data.sources import Opened, first_line, missing_column, open_any, open_error
from evalkit.data.text import as_text, check_text_types
from evalkit.errors import DataError, EvalkitError

__all__ = ["count_rows", "iter_batches", "iter_batches_from", "open_ipc", "open_source"]

_BATCH_READAHEAD = 1  # batches decoded ahead of the writer: bounds RAM (measured below)
_FRAGMENT_READAHEAD = 1


def open_source(
    source: Any,
    *,
    format: str | None = None,
    column_names: Sequence[str] | None = None,
    delimiter: str | None = None,
    quoting: bool = True,
    filesystem: Any = None,
    text_columns: Sequence[str] | None = None,
) -> ds.Dataset:
    """Open `source` as a `pyarrow.dataset.Dataset` without reading its rows.

    `source` is a path, a directory (all its data files, sorted), a glob (`data/*.parquet`,
    `dir/**/*.csv`), a list of paths, a URI (`s3://bucket/key` through pyarrow, honouring
    `AWS_ENDPOINT_URL`; any other fsspec scheme such as `gs://`, `memory://`), a
    `pyarrow.dataset.Dataset`, a `pyarrow.Table`/`RecordBatch`, or a HF `datasets.Dataset`.
    `format` is one of parquet, csv, tsv, json/jsonl (JSON Lines), orc, arrow/feather/ipc (default:
    from the extension). `column_names` names the columns of a CSV/TSV without a header row;
    `quoting=False` reads quote characters as text. `filesystem` is a pyarrow or fsspec filesystem
    in which `source` is a path. `text_columns` are read from CSV/TSV as strings, never inferred as
    numbers. A `pyarrow.RecordBatchReader` source is read into memory here; `iter_batches`/`convert`
    stream it instead.
    """
    options = _options(format, column_names, delimiter, quoting, filesystem)
    opened = open_any(source, text_columns=text_columns, **options)
    if opened.dataset is not None:
        return opened.dataset
    return ds.dataset(opened.reader.read_all())


def iter_batches(
    source: Any,
    *,
    columns: Sequence[str] | None = None,
    filter: pc.Expression | str | Sequence[pc.Expression | str] | None = None,
    batch_size: int = 65536,
    text_columns: Sequence[str] | None = None,
    **source_options: Any,
) -> Iterator[pa.RecordBatch]:
    """Yield the record batches of `source` in input order, at most `batch_size` rows each.

    `columns` selects (and orders) columns; `filter` is a pyarrow expression, a "COL OP VALUE"
    string (see `parse_filter`) or a list of them, all of which must hold. `text_columns` (among
    the selected columns) must hold text: other types are refused, binary is decoded strictly as
    UTF-8, and they come out as string columns of valid UTF-8 (see `evalkit.data.text`). All of
    this is checked here, before any row is read: an unknown column raises DataError naming the
    real ones.
    """
    _check_batch_size(batch_size)
    texts = list(text_columns or [])
    opened = open_any(source, text_columns=texts, **source_options)
    return _Scan(opened, columns, filter, batch_size, texts=texts).batches()


def iter_batches_from(
    source: Any,
    row: int,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 65536,
    text_columns: Sequence[str] | None = None,
    **source_options: Any,
) -> tuple[int, Iterator[pa.RecordBatch]]:
    """(first, batches): the record batches of `source` from row `first` <= `row` on, in input
    order, read as `iter_batches` reads them (`text_columns` too). Whole files before `row` are
    skipped when their row counts are in metadata (Parquet, Arrow/Feather, ORC), and whole row
    groups within a Parquet file; other sources start at 0."""
    _check_batch_size(batch_size)
    texts = list(text_columns or [])
    opened = open_any(source, text_columns=texts, **source_options)
    first, fragments = 0, None
    if row > 0 and isinstance(opened.dataset, ds.FileSystemDataset):
        first, fragments = _guard(opened, lambda: _fragments_from(opened.dataset, row))
    if fragments is not None:
        sub = ds.FileSystemDataset(
            fragments, opened.dataset.schema, opened.dataset.format, opened.dataset.filesystem
        )
        opened = dataclasses.replace(opened, dataset=sub)
    return first, _Scan(opened, columns, None, batch_size, texts=texts).batches()


def _fragments_from(dataset: ds.FileSystemDataset, row: int) -> tuple[int, list | None]:
    fmt = dataset.format
    if not isinstance(fmt, (ds.ParquetFileFormat, ds.IpcFileFormat, ds.OrcFileFormat)):
        return 0, None
    fragments = list(dataset.get_fragments())
    first = 0
    for i, fragment in enumerate(fragments):
        n = fragment.count_rows()
        if first + n <= row:
            first += n
            continue
        rest = fragments[i + 1 :]
        if isinstance(fmt, ds.ParquetFileFormat):
            groups = fragment.split_by_row_group()
            for j, group in enumerate(groups):
                g = group.row_groups[0].num_rows
                if first + g > row:
                    return first, groups[j:] + rest
                first += g
        return first, [fragment, *rest]
    return first, []


def count_rows(source: Any, *, filter: Any = None, **source_options: Any) -> int:
    """The number of rows of `source` (that pass `filter`). Cheap for Parquet, ORC and Arrow files
    (metadata only, unless a filter needs the data); CSV is counted without converting values."""
    opened = open_any(source, **source_options)
    if opened.dataset is None:
        raise EvalkitError(f"cannot count the rows of {opened.label}: it can be read only once")
    expr = _combine_filters(filter, opened)
    return _guard(opened, lambda: opened.dataset.count_rows(filter=expr))


def open_ipc(path: str | os.PathLike[str]) -> pa.Table:
    """Memory-map an Arrow IPC file (file or stream format) as a Table, without copying its data.
    A missing, empty, truncated or corrupt file (full validation: offsets, UTF-8) raises DataError
    saying so."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise DataError(f"no such Arrow file: {p}")
    if os.path.getsize(p) == 0:
        raise DataError(f"{p} is empty, not an Arrow IPC file")
    try:
        mm = pa.memory_map(p, "r")
        magic = mm.read(6)
        mm.seek(0)
        if magic == b"ARROW1":
            table = pa.ipc.open_file(mm).read_all()
        else:
            table = pa.ipc.open_stream(mm).read_all()
        table.validate()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"{p} is corrupt or truncated, not a readable Arrow IPC file ({first_line(exc)})"
        ) from exc
    row = 0
    for batch in table.to_batches():  # offsets in bounds, UTF-8: a bad one would segfault later
        validate_full(batch, p, row)
        row += batch.num_rows
    return table


# --- internals ------------------------------------------------------------------------------


class _Scan:
    """A validated scan plan: output schema known, batches produced lazily in input order."""

    def __init__(
        self,
        opened: Opened,
        columns: Any,
        filter: Any,
        batch_size: int,
        aliases: Any = None,
        texts: Sequence[str] = (),
    ) -> None:
        self.opened = opened
        self.columns = _check_columns(columns, opened)
        self.filter = _combine_filters(filter, opened, aliases)
        self.batch_size = batch_size
        kwargs = {"columns": self.columns, "filter": self.filter, "batch_size": batch_size}
        if opened.kind == "ipc":
            # Validate each batch as it leaves the file, before the filter or anything else reads
            # it: corrupt offsets would make those read out of bounds.
            source, schema = _validated_ipc(opened, self.columns, self.filter, batch_size)
            kwargs.update(batch_readahead=_BATCH_READAHEAD, use_threads=False)
            self.scanner = _guard(
                opened, lambda: ds.Scanner.from_batches(source, schema=schema, **kwargs)
            )
        elif opened.dataset is not None:
            # One decode thread: parallel decoding of row groups holds several decoded groups at
            # once (measured on a 2 GB Parquet: 250-570 MB RssAnon growth threaded, ~110-170 MB not).
            kwargs.update(
                batch_readahead=_BATCH_READAHEAD,
                fragment_readahead=_FRAGMENT_READAHEAD,
                use_threads=False,
            )
            self.scanner = _guard(opened, lambda: opened.dataset.scanner(**kwargs))
        else:
            kwargs.update(batch_readahead=_BATCH_READAHEAD, use_threads=False)
            self.scanner = _guard(opened, lambda: ds.Scanner.from_batches(opened.reader, **kwargs))
        self.schema = self.scanner.projected_schema
        self.texts = list(texts)
        for name in self.texts:
            if name not in self.schema.names:
                raise DataError(missing_column(name, opened.label, self.schema.names))
        check_text_types(self.schema, self.texts, opened.label)

    def batches(self) -> Iterator[pa.RecordBatch]:
        def generate() -> Iterator[pa.RecordBatch]:
            iterator = _guard(self.opened, self.scanner.to_batches)
            row = 0
            while True:
                batch = _guard(self.opened, lambda: next(iterator, None))
                if batch is None:
                    return
                if self.texts:
                    batch = self._decoded(batch, row)
                row += batch.num_rows
                yield batch

        return generate()

    def _decoded(self, batch: pa.RecordBatch, row: int) -> pa.RecordBatch:
        """The batch with its text columns as valid UTF-8 strings (binary decoded strictly)."""
        arrays, fields = list(batch.columns), list(batch.schema)
        for name in self.texts:
            i = batch.schema.get_field_index(name)
            arrays[i] = as_text(arrays[i], self.opened.label, name, row)
            fields[i] = fields[i].with_type(arrays[i].type)
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, batch.schema.metadata))


def _validated_ipc(
    opened: Opened, columns: list[str] | None, filter: Any, batch_size: int
) -> tuple[Iterator[pa.RecordBatch], pa.Schema]:
    """The record batches of an Arrow IPC source, each fully validated before it is handed on
    (only the selected columns, or all of them when a filter needs to see them)."""
    wanted = columns if filter is None else None
    schema = (
        opened.schema if wanted is None else pa.schema([opened.schema.field(c) for c in wanted])
    )

    def generate() -> Iterator[pa.RecordBatch]:
        batches = opened.dataset.to_batches(
            columns=wanted,
            batch_size=batch_size,
            batch_readahead=_BATCH_READAHEAD,
            fragment_readahead=_FRAGMENT_READAHEAD,
            use_threads=False,
        )
        row = 0
        for batch in batches:
            validate_full(batch, opened.label, row)
            row += batch.num_rows
            yield batch

    return generate(), schema


def _guard(opened: Opened, call: Any) -> Any:
    """Run `call`, turning Arrow's read/parse errors into one DataError line naming the source."""
    try:
        return call()
    except pa.ArrowInvalid as exc:
        message = first_line(exc)
        name = re.search(r"No match for FieldRef\.Name\((.*?)\)", message)
        if name:
            raise DataError(missing_column(name[1], opened.label, opened.schema.names)) from exc
        raise DataError(open_error(exc, opened.kind, opened.label)) from exc
    except pa.ArrowNotImplementedError as exc:
        raise DataError(f"cannot apply this to {opened.label}: {first_line(exc)}") from exc
    except (pa.ArrowIOError, OSError) as exc:  # OSError covers ArrowIOError and local I/O
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise DataError(f"cannot read {opened.label}: {exc}") from exc
        raise DataError(f"cannot read {opened.label}: {first_line(exc)}") from exc


def _options(format, column_names, delimiter, quoting, filesystem) -> dict[str, Any]:
    return {
        "format": format,
        "column_names": column_names,
        "delimiter": delimiter,
        "quoting": quoting,
        "filesystem": filesystem,
    }


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise EvalkitError(f"batch_size must be a positive integer; got {batch_size!r}")


def _check_columns(columns: Any, opened: Opened) -> list[str] | None:
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    columns = list(columns)
    names = opened.schema.names
    for col in columns:
        if col not in names:
            raise DataError(missing_column(col, opened.label, names))
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise EvalkitError(f"columns lists {', '.join(duplicated)} more than once")
    return columns


def _combine_filters(filter: Any, opened: Opened, aliases: Any = None) -> pc.Expression | None:
    if filter is None:
        return None
    items = [filter] if isinstance(filter, (str, pc.Expression)) else list(filter)
    exprs = []
    for item in items:
        if isinstance(item, str):
            item = _parse_filter(item, opened.schema, opened.label, aliases)
        elif not isinstance(item, pc.Expression):
            raise EvalkitError(f"filter must be a pyarrow expression or a string; got {item!r}")
        exprs.append(item)
    if not exprs:
        return None
    expr = exprs[0]
    for other in exprs[1:]:
        expr = expr & other
    return expr
