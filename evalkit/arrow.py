"""Any tabular source -> an Arrow IPC file on local disk, streaming, never holding the data in RAM.

1) Resolve the source: a path, directory, glob, list of paths or URI becomes a sorted list of files
   on one filesystem (pyarrow's for local paths and s3://, fsspec's for any other scheme); the format
   comes from `format=` or the file extensions. In-memory tables, pyarrow datasets, HF `datasets`
   and record-batch readers are taken as they are.
2) Open it as a `pyarrow.dataset.Dataset` (CSV/TSV header, delimiter and quoting as asked).
3) Validate at the door: selected and renamed columns, the filter and the text columns must exist;
   a mistake names the real columns.
4) Scan record batches in input order (`dataset.to_batches()`, small read-ahead), apply the null
   policy to text columns, and write each batch to a temporary IPC file next to DEST.
5) On success fsync and `os.replace(temp, DEST)`; on any failure remove the temp, so DEST is never
   partial.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from evalkit._sources import Opened, first_line, missing_column, open_any, open_error
from evalkit.errors import DataError, EvalkitError

__all__ = [
    "ConvertResult",
    "convert",
    "count_rows",
    "iter_batches",
    "open_ipc",
    "open_source",
    "parse_filter",
]

NULL_POLICIES = ("keep", "error", "skip", "empty")
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
) -> ds.Dataset:
    """Open `source` as a `pyarrow.dataset.Dataset` without reading its rows.

    `source` is a path, a directory (all its data files, sorted), a glob (`data/*.parquet`,
    `dir/**/*.csv`), a list of paths, a URI (`s3://bucket/key` through pyarrow, honouring
    `AWS_ENDPOINT_URL`; any other fsspec scheme such as `gs://`, `memory://`), a
    `pyarrow.dataset.Dataset`, a `pyarrow.Table`/`RecordBatch`, or a HF `datasets.Dataset`.
    `format` is one of parquet, csv, tsv, json/jsonl (JSON Lines), orc, arrow/feather/ipc (default:
    from the extension). `column_names` names the columns of a CSV/TSV without a header row;
    `quoting=False` reads quote characters as text. `filesystem` is a pyarrow or fsspec filesystem
    in which `source` is a path. A `pyarrow.RecordBatchReader` source is read into memory here;
    `iter_batches`/`convert` stream it instead.
    """
    opened = open_any(source, **_options(format, column_names, delimiter, quoting, filesystem))
    if opened.dataset is not None:
        return opened.dataset
    return ds.dataset(opened.reader.read_all())


def iter_batches(
    source: Any,
    *,
    columns: Sequence[str] | None = None,
    filter: pc.Expression | str | Sequence[pc.Expression | str] | None = None,
    batch_size: int = 65536,
    **source_options: Any,
) -> Iterator[pa.RecordBatch]:
    """Yield the record batches of `source` in input order, at most `batch_size` rows each.

    `columns` selects (and orders) columns; `filter` is a pyarrow expression, a "COL OP VALUE"
    string (see `parse_filter`) or a list of them, all of which must hold. Both are checked here,
    before any row is read: an unknown column raises DataError naming the real ones.
    """
    _check_batch_size(batch_size)
    opened = open_any(source, **source_options)
    return _Scan(opened, columns, filter, batch_size).batches()


def count_rows(source: Any, *, filter: Any = None, **source_options: Any) -> int:
    """The number of rows of `source` (that pass `filter`). Cheap for Parquet, ORC and Arrow files
    (metadata only, unless a filter needs the data); CSV is counted without converting values."""
    opened = open_any(source, **source_options)
    if opened.dataset is None:
        raise EvalkitError(f"cannot count the rows of {opened.label}: it can be read only once")
    expr = _combine_filters(filter, opened)
    return _guard(opened, lambda: opened.dataset.count_rows(filter=expr))


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote: DEST, its row count, output column names, file size and wall time."""

    dest: Path
    rows: int
    columns: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dest"] = str(self.dest)
        out["rows_per_second"] = round(self.rows_per_second, 1) if self.seconds > 0 else None
        return out


def convert(
    source: Any,
    dest: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    rename: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    filter: pc.Expression | str | Sequence[pc.Expression | str] | None = None,
    on_null: str = "keep",
    text_columns: Sequence[str] | None = None,
    batch_size: int = 65536,
    progress: bool = True,
    stream: bool = False,
    **source_options: Any,
) -> ConvertResult:
    """Stream `source` (anything `open_source` takes) into the Arrow IPC file `dest`, atomically.

    `columns` selects source columns, `rename` maps source names to output names, `filter` keeps
    the rows that match (an expression on source names, or "COL OP VALUE" strings on source or
    output names; a list must all hold). `on_null`
    says what a null in a text column does: "keep" it, raise an "error" naming the row and
    column, "skip" the row, or replace it with "empty" text. Text columns are `text_columns`
    (output or source names; each must hold strings) or, by default, every string column.
    `stream=True` writes the IPC stream format instead of the (random-access) file format.
    A failure leaves no DEST and no temporary file behind.
    """
    _check_batch_size(batch_size)
    if on_null not in NULL_POLICIES:
        raise EvalkitError(f"on_null must be one of {', '.join(NULL_POLICIES)}; got {on_null!r}")
    dest = Path(os.fspath(dest))
    if "://" in str(dest):
        raise EvalkitError(f"DEST must be a local path; got {dest}")
    started = time.perf_counter()
    opened = open_any(source, **source_options)
    aliases = {new: old for old, new in _pairs(rename)}
    scan = _Scan(opened, columns, filter, batch_size, aliases)
    names = _output_names(scan.schema.names, rename, opened)
    renamed = _renamed(scan.schema, names)
    texts = _text_columns(renamed, text_columns, rename)
    schema = _writable(renamed)
    total = _cheap_total(opened, scan) if progress else None

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    rows = 0
    try:
        bar = _progress(total, progress, opened.label)
        pool = pa.default_memory_pool()
        with bar, pa.OSFile(str(tmp), "wb") as sink:
            new_writer = pa.ipc.new_stream if stream else pa.ipc.new_file
            with new_writer(sink, schema) as writer:
                seen = 0  # rows read after the filter, for error messages
                for batch in scan.batches():
                    read = batch.num_rows
                    if names:
                        batch = batch.rename_columns(names)
                    batch = _apply_null_policy(batch, texts, on_null, seen, opened, filter)
                    if batch.schema != schema:
                        batch = batch.cast(schema)
                    writer.write_batch(batch)
                    seen += read
                    rows += batch.num_rows
                    bar.update(read)
                    # Hand freed decode buffers back to the OS after each batch: mimalloc
                    # otherwise keeps them a while, and on bench_dataset's 2 GB Parquet that
                    # retention was most of the RSS growth (+188 MB -> +106 MB; conversion
                    # measured 0-17% slower, still ~2M rows/s).
                    del batch
                    pool.release_unused()
                if bar.total != seen:  # an estimate, or rows a null policy dropped
                    bar.total = seen
                    bar.refresh()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ConvertResult(
        dest=dest,
        rows=rows,
        columns=list(schema.names),
        bytes=dest.stat().st_size,
        seconds=time.perf_counter() - started,
    )


_FILTER_RE = re.compile(
    r"^\s*(?P<col>`[^`]+`|\"[^\"]+\"|'[^']+'|.+?)\s*(?P<op>==|!=|<=|>=|=|<|>)\s*(?P<val>.*?)\s*$"
)
_OPS = {
    "==": lambda a, b: a == b,
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def parse_filter(text: str, *, schema: pa.Schema | None = None) -> pc.Expression:
    """Parse the CLI's "COL OP VALUE" into a pyarrow expression. OP is ==, !=, <, <=, >, >=
    (= means ==). VALUE is a number, true/false, null (with == or !=), or text (quote it to keep
    digits as text: `label == "1"`). Quote a COL with spaces in backticks: `#1 ID` > 5.
    With `schema`, the column must exist and VALUE is cast to its type."""
    return _parse_filter(text, schema, "the data")


def _parse_filter(
    text: str, schema: pa.Schema | None, label: str, aliases: Mapping[str, str] | None = None
) -> pc.Expression:
    match = _FILTER_RE.match(text or "")
    if not match or not match["val"]:
        raise EvalkitError(
            f"cannot parse filter {text!r}; write COL OP VALUE with OP one of "
            "==, !=, <, <=, >, >= (for example: score >= 2.5)"
        )
    col, op, raw = match["col"], match["op"], match["val"]
    if col[0] in "`\"'" and col[-1] == col[0]:
        col = col[1:-1]
    if schema is not None and col not in schema.names and aliases and col in aliases:
        col = aliases[col]  # an output name given by rename
    ref = pc.field(col)
    target = None
    if schema is not None:
        if col not in schema.names:
            raise DataError(missing_column(col, label, schema.names))
        target = schema.field(col).type
    quoted = len(raw) >= 2 and raw[0] in "\"'" and raw[-1] == raw[0]
    if not quoted and raw.lower() in ("null", "none"):
        if op in ("==", "="):
            return ref.is_null()
        if op == "!=":
            return ref.is_valid()
        raise EvalkitError(f"filter {text!r}: null can only be compared with == or !=")
    value: Any = raw[1:-1] if quoted else _literal(raw)
    if target is not None:
        value = _cast_literal(value, raw, target, col, text)
    return _OPS[op](ref, value)


def open_ipc(path: str | os.PathLike[str]) -> pa.Table:
    """Memory-map an Arrow IPC file (file or stream format) as a Table, without copying its data.
    A missing, empty, truncated or corrupt file raises DataError saying so."""
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
    return table


# --- internals ------------------------------------------------------------------------------


class _Scan:
    """A validated scan plan: output schema known, batches produced lazily in input order."""

    def __init__(
        self, opened: Opened, columns: Any, filter: Any, batch_size: int, aliases: Any = None
    ) -> None:
        self.opened = opened
        self.columns = _check_columns(columns, opened)
        self.filter = _combine_filters(filter, opened, aliases)
        self.batch_size = batch_size
        kwargs = {"columns": self.columns, "filter": self.filter, "batch_size": batch_size}
        if opened.dataset is not None:
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

    def batches(self) -> Iterator[pa.RecordBatch]:
        def generate() -> Iterator[pa.RecordBatch]:
            iterator = _guard(self.opened, self.scanner.to_batches)
            while True:
                batch = _guard(self.opened, lambda: next(iterator, None))
                if batch is None:
                    return
                yield batch

        return generate()


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


def _output_names(names: list[str], rename: Any, opened: Opened) -> list[str] | None:
    if not rename:
        return None
    mapping = {}
    for old, new in _pairs(rename):
        if old not in names:
            raise DataError(missing_column(old, opened.label, names))
        mapping[old] = new
    out = [mapping.get(n, n) for n in names]
    clashes = sorted({n for n in out if out.count(n) > 1})
    if clashes:
        raise EvalkitError(f"renaming would give two columns the name {', '.join(clashes)}")
    return out


def _renamed(schema: pa.Schema, names: list[str] | None) -> pa.Schema:
    if not names:
        return schema
    return pa.schema(
        [f.with_name(n) for f, n in zip(schema, names, strict=True)], metadata=schema.metadata
    )


def _pairs(rename: Any) -> list[tuple[str, str]]:
    if not rename:
        return []
    return list(rename.items()) if isinstance(rename, Mapping) else [tuple(p) for p in rename]


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or dtype == pa.string_view()


def _text_columns(schema: pa.Schema, text_columns: Any, rename: Any) -> list[str]:
    if text_columns is None:
        return [f.name for f in schema if _is_text(f.type)]
    if isinstance(text_columns, str):
        text_columns = [c.strip() for c in text_columns.split(",")]
    renamed = dict(_pairs(rename))
    out = []
    for col in text_columns:
        name = col if col in schema.names else renamed.get(col, col)
        if name not in schema.names:
            raise DataError(missing_column(col, "the output", schema.names))
        dtype = schema.field(name).type
        if not _is_text(dtype):
            raise DataError(f"text column '{name}' holds {dtype}, not text")
        out.append(name)
    return out


def _writable(schema: pa.Schema) -> pa.Schema:
    """The IPC file format cannot replace dictionaries between batches: store their values."""
    fields = [
        f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema
    ]
    return pa.schema(fields, metadata=schema.metadata)


def _apply_null_policy(
    batch: pa.RecordBatch, texts: list[str], policy: str, seen: int, opened: Opened, filter: Any
) -> pa.RecordBatch:
    if policy == "keep" or not texts or batch.num_rows == 0:
        return batch
    if policy == "error":
        for name in texts:
            column = batch.column(name)
            if column.null_count:
                row = seen + pc.index(column.is_null(), True).as_py()
                where = " counting rows that pass the filter" if filter is not None else ""
                raise DataError(
                    f"row {row} of {opened.label} (0-based{where}): column '{name}' is null; "
                    "choose what nulls do with --on-null skip|empty (on_null='skip'|'empty')"
                )
        return batch
    if policy == "skip":
        mask = None
        for name in texts:
            valid = batch.column(name).is_valid()
            mask = valid if mask is None else pc.and_(mask, valid)
        return batch.filter(mask)
    arrays = [
        pc.fill_null(col, "") if name in texts and col.null_count else col
        for name, col in zip(batch.schema.names, batch.columns, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def _cheap_total(opened: Opened, scan: _Scan) -> int | None:
    """Row count for the progress bar when it costs little next to the conversion: exact from
    metadata for Parquet/ORC/Arrow, estimated from a sample for local CSV/TSV/JSON Lines."""
    if opened.dataset is None:
        return opened.rows_hint if scan.filter is None else None
    try:
        if opened.kind in ("parquet", "orc", "ipc", "memory"):
            return opened.dataset.count_rows(filter=scan.filter)
        if opened.kind in ("csv", "tsv", "json") and scan.filter is None:
            return opened.estimate_rows()
    except (pa.ArrowException, OSError):
        pass  # the conversion itself will report the problem
    return None


def _progress(total: int | None, enabled: bool, label: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        disable=not enabled,
        unit=" rows",
        unit_scale=True,
        desc=f"convert {label.rstrip('/').rsplit('/', 1)[-1]}"[:50],
        dynamic_ncols=True,
    )


def _literal(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _cast_literal(value: Any, raw: str, target: pa.DataType, col: str, text: str) -> Any:
    if _is_text(target):
        return value if isinstance(value, str) else raw
    try:
        return pa.scalar(value).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise EvalkitError(
            f"filter {text!r}: {raw!r} is not a valid {target} value for column '{col}'"
        ) from exc
