"""Source resolution for evalkit.data.readers: whatever the user names -> a pyarrow dataset (or a one-shot
record-batch reader), plus a label for error messages.

1) Objects: a pyarrow Dataset or Table is used as is; a HF `datasets.Dataset` gives its memory-mapped
   Arrow table; a RecordBatchReader stays a one-shot stream.
2) Strings: pick the filesystem (`filesystem=`, else s3:// through pyarrow.fs, which honours
   AWS_ENDPOINT_URL; any other scheme through fsspec; else local), then expand the path: a glob is
   matched against a listing of its fixed prefix, a directory lists its data files recursively
   (skipping names that start with "." or "_"), all sorted so input order is deterministic.
3) Format: `format=` or the extensions (compression suffixes such as .gz are looked through);
   Arrow IPC files are sniffed: file format scans lazily, stream format is memory-mapped.
   CSV/TSV columns named as text are read as strings (no type inference for them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from evalkit.errors import DataError, EvalkitError

FORMATS = {
    "parquet": "parquet",
    "pq": "parquet",
    "csv": "csv",
    "tsv": "tsv",
    "json": "json",
    "jsonl": "json",
    "ndjson": "json",
    "orc": "orc",
    "arrow": "ipc",
    "arrows": "ipc",
    "feather": "ipc",
    "ipc": "ipc",
}
_EXTRA_EXTENSIONS = {"txt": "tsv", "tab": "tsv"}
_COMPRESSION = ("gz", "bz2", "zst", "lz4", "br")
_NAMES = {
    "parquet": "Parquet",
    "csv": "CSV",
    "tsv": "TSV",
    "json": "JSON Lines",
    "orc": "ORC",
    "ipc": "Arrow IPC",
}
SUPPORTED = "parquet, csv, tsv, json (JSON Lines), orc, arrow/feather/ipc"
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Opened:
    """A source made scannable: exactly one of `dataset` and `reader` is set."""

    dataset: ds.Dataset | None
    reader: pa.RecordBatchReader | None
    label: str  # the source as the user wrote it, for messages
    kind: str  # parquet, csv, tsv, json, orc, ipc, memory or reader
    local: bool = True
    rows_hint: int | None = None
    header_lines: int = 0  # per file, for estimating the rows of CSV/TSV/JSON Lines

    def estimate_rows(self, sample_bytes: int = 4 << 20) -> int | None:
        """Rows of a local, uncompressed text source, estimated from the line density of a
        sample of its first file (exact when the files fit in the sample); else None.
        Counting exactly would cost a parse of the whole input, about as long as converting it."""
        if not self.local or not isinstance(self.dataset, ds.FileSystemDataset):
            return None
        files = self.dataset.files
        if any(_extension(f) != f.rsplit(".", 1)[-1].lower() for f in files):
            return None  # compressed
        sizes = [os.path.getsize(f) for f in files]
        with open(files[0], "rb") as fh:
            sample = fh.read(sample_bytes)
        lines = sample.count(b"\n") + (0 if sample.endswith(b"\n") or not sample else 1)
        if sum(sizes) <= len(sample):
            return max(lines - self.header_lines, 0)
        total = sum(sizes) * lines / max(len(sample), 1)
        return max(int(total) - self.header_lines * len(files), 0)

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema if self.dataset is not None else self.reader.schema


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def missing_column(col: str, label: str, names: Sequence[str]) -> str:
    return f"column '{col}' not in {label}; columns are: {', '.join(names)}"


def open_error(exc: BaseException, kind: str, label: str) -> str:
    """One line for an Arrow error raised while opening or reading a file of `label`."""
    message = first_line(exc)
    where = re.search(r"input source '(.*?)'", message)
    if where:
        message = message.rsplit("': ", 1)[-1]
    message = re.sub(r"^(Invalid|IOError): ", "", message)
    name = where[1] if where and where[1] != label and not where[1].endswith(label) else None
    what = f"{name} (in {label})" if name else label
    if "utf8" in message.lower().replace("-", ""):  # CSV "Row #N" is the 1-based line number
        return (
            f"{what} is not valid UTF-8 text: {message}; evalkit reads text as UTF-8 only: "
            "re-encode the file (e.g. iconv -f latin1 -t utf-8)"
        )
    if kind in ("csv", "tsv"):
        return (
            f"cannot parse {what} as {_NAMES[kind]}: {message} "
            "(check --delimiter, --no-quoting and --column-names)"
        )
    if kind == "json":
        return f"cannot parse {what} as JSON Lines (one object per line): {message}"
    return (
        f"{what} is not a readable {_NAMES.get(kind, kind)} file, corrupt or truncated: {message}"
    )


def describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (list, tuple)):
        if not source:
            return "an empty list of sources"
        head = describe(source[0])
        return head if len(source) == 1 else f"{head} and {len(source) - 1} more"
    return f"the {type(source).__name__}"


def open_any(
    source: Any,
    *,
    format: str | None = None,
    column_names: Sequence[str] | None = None,
    delimiter: str | None = None,
    quoting: bool = True,
    filesystem: Any = None,
    text_columns: Sequence[str] | None = None,
) -> Opened:
    """`source` made scannable. `text_columns` are read as strings from CSV/TSV, never inferred as
    numbers (a column of digits keeps its exact characters: '007' stays '007')."""
    label = describe(source)
    if isinstance(source, ds.Dataset):
        return Opened(source, None, label, "memory" if _in_memory(source) else "dataset")
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        return Opened(ds.dataset(source), None, label, "memory")
    if isinstance(source, pa.RecordBatchReader):
        return Opened(None, source, label, "reader")
    if _is_hf_dataset(source):
        return _open_hf(source)
    if not isinstance(source, (str, os.PathLike, list, tuple)):
        raise EvalkitError(
            f"cannot read {label}: give a path, glob, URI, list of paths, pyarrow Dataset/Table, "
            "RecordBatchReader or datasets.Dataset"
        )
    fs, paths, local = _resolve(source, filesystem, label)
    kind = _format(paths, format, label)
    if kind in ("csv", "tsv"):
        file_format = _csv_format(kind, column_names, delimiter, quoting, text_columns)
    elif column_names:
        raise EvalkitError(f"column_names is for CSV/TSV files without a header, not {kind}")
    elif kind == "parquet":
        file_format = _parquet_format(local)
    else:
        file_format = {"json": ds.JsonFileFormat(), "orc": "orc"}.get(kind)
    try:
        if kind == "ipc":
            dataset = _ipc_dataset(fs, paths, local)
        else:
            dataset = ds.dataset(paths, filesystem=fs, format=file_format)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise DataError(open_error(exc, kind, label)) from exc
    header = 1 if kind in ("csv", "tsv") and column_names is None else 0
    return Opened(dataset, None, label, kind, local=local, header_lines=header)


def _in_memory(dataset: ds.Dataset) -> bool:
    return isinstance(dataset, ds.InMemoryDataset)


def _is_hf_dataset(source: Any) -> bool:
    cls = type(source)
    return cls.__module__.split(".")[0] == "datasets" and cls.__name__ == "Dataset"


def _open_hf(source: Any) -> Opened:
    label = f"the datasets.Dataset ({len(source)} rows)"
    if getattr(source, "_indices", None) is None:
        return Opened(ds.dataset(source.data.table), None, label, "memory")
    # a selection/shuffle: stream it in its own order rather than materialize the take()
    batches = (t.to_batches() for t in source.with_format("arrow").iter(batch_size=65536))
    schema = source.data.table.schema
    reader = pa.RecordBatchReader.from_batches(schema, (b for bs in batches for b in bs))
    return Opened(None, reader, label, "reader", rows_hint=len(source))


def _resolve(source: Any, filesystem: Any, label: str) -> tuple[pafs.FileSystem, list[str], bool]:
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise DataError("no source given: the list of paths is empty")
    fs, paths, local = None, [], True
    for item in items:
        item_fs, path, local = _filesystem(os.fspath(item), filesystem)
        if fs is not None and item_fs.type_name != fs.type_name:
            raise EvalkitError(f"{label}: all sources must be on one filesystem")
        fs = fs or item_fs
        paths.extend(_expand(item_fs, path, os.fspath(item)))
    return fs, paths, local


def _filesystem(text: str, filesystem: Any) -> tuple[pafs.FileSystem, str, bool]:
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    if filesystem is not None:
        path = text.split("://", 1)[1] if scheme else text
        fs = filesystem if isinstance(filesystem, pafs.FileSystem) else _wrap_fsspec(filesystem)
        return fs, path, isinstance(fs, pafs.LocalFileSystem)
    if scheme is None or scheme == "file":
        path = text.split("://", 1)[1] if scheme else text
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), True
    if scheme in ("s3", "s3a"):
        try:
            fs, path = pafs.FileSystem.from_uri("s3://" + text.split("://", 1)[1])
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"cannot open {text}: {first_line(exc)}") from exc
        return fs, path, False
    from evalkit._imports import require

    core = require("fsspec.core", extra="remote", package="fsspec")
    try:
        fsspec_fs, path = core.url_to_fs(text)
    except (ImportError, ValueError) as exc:
        raise DataError(f"cannot open {text} through fsspec: {first_line(exc)}") from exc
    return _wrap_fsspec(fsspec_fs), path, False


def _wrap_fsspec(fs: Any) -> pafs.FileSystem:
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _expand(fs: pafs.FileSystem, path: str, label: str) -> list[str]:
    try:
        if _GLOB_CHARS.search(path):
            found = _glob(fs, path)
            if not found:
                raise DataError(f"no files match {label}")
            return found
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"no such file or directory: {label}")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            found = sorted(i.path for i in infos if i.is_file and not _hidden(i.path[len(path) :]))
            if not found:
                raise DataError(f"directory {label} holds no data files")
            return found
    except OSError as exc:
        raise DataError(f"cannot open {label}: {first_line(exc)}") from exc
    return [path]


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _glob(fs: pafs.FileSystem, pattern: str) -> list[str]:
    """Glob on any pyarrow filesystem: * and ? stay within a folder, ** crosses folders."""
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
    base = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else "")
    recursive = "**" in pattern or fixed < len(parts) - 1
    info = fs.get_file_info(base) if base else None
    if info is not None and info.type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    regex = re.compile(_glob_regex(pattern))
    dotted = "/." in pattern or pattern.startswith(".")
    return sorted(
        i.path
        for i in infos
        if i.is_file
        and regex.fullmatch(i.path)
        and (dotted or not any(p.startswith(".") for p in i.path[len(base) :].split("/")))
    )


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    parts = name.split(".")
    if len(parts) > 2 and parts[-1] in _COMPRESSION:
        parts = parts[:-1]
    return parts[-1] if len(parts) > 1 else ""


def _format(paths: list[str], format: str | None, label: str) -> str:
    if format is not None:
        kind = FORMATS.get(format.lower().lstrip("."))
        if kind is None:
            raise EvalkitError(f"unknown format {format!r}; supported: {SUPPORTED}")
        wanted = [p for p in paths if _kind_of(p) == kind]
        if wanted and len(wanted) < len(paths) and len(paths) > 1:
            paths[:] = wanted  # a folder with a README next to its CSVs
        return kind
    strong = {FORMATS.get(_extension(p)) for p in paths} - {None}
    if len(paths) > 1 and strong:  # a folder of shards next to a README.txt or _SUCCESS
        paths[:] = [p for p in paths if FORMATS.get(_extension(p)) is not None]
    kinds = {_kind_of(p) for p in paths}
    if None in kinds:
        ext = _extension(paths[0])
        what = f"its extension '.{ext}'" if ext else "its name (no extension)"
        raise DataError(
            f"cannot tell the format of {label} from {what}; "
            f"supported: {SUPPORTED}; pass --format (format=) to say which"
        )
    if len(kinds) > 1:
        raise DataError(f"{label} mixes formats ({', '.join(sorted(kinds))}); pass --format")
    return kinds.pop()


def _kind_of(path: str) -> str | None:
    ext = _extension(path)
    return FORMATS.get(ext) or _EXTRA_EXTENSIONS.get(ext)


def _parquet_format(local: bool) -> ds.ParquetFileFormat:
    """Pre-buffering whole row groups pays on high-latency stores; on local disk it only
    multiplies RAM (measured: peak RssAnon 500 MB -> 225 MB on a 320 MB file), so it is off."""
    options = ds.ParquetFragmentScanOptions(pre_buffer=not local)
    return ds.ParquetFileFormat(default_fragment_scan_options=options)


def _csv_format(kind: str, column_names, delimiter, quoting, text_columns) -> ds.CsvFileFormat:
    import pyarrow.csv as pacsv

    if column_names is not None:
        column_names = [
            c.strip()
            for c in (column_names.split(",") if isinstance(column_names, str) else column_names)
        ]
    delimiter = delimiter or ("\t" if kind == "tsv" else ",")
    if len(delimiter) != 1:
        raise EvalkitError(f"delimiter must be one character; got {delimiter!r}")
    return ds.CsvFileFormat(
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False),
        read_options=pacsv.ReadOptions(column_names=column_names),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in text_columns or ()}
        ),
    )


def _ipc_dataset(fs: pafs.FileSystem, paths: list[str], local: bool) -> ds.Dataset:
    """IPC file format scans lazily; stream format has no footer to scan by, so a local stream
    file is memory-mapped (zero-copy) and a remote one is read."""
    streams = [p for p in paths if _sniff(fs, p) != b"ARROW1"]
    if not streams:
        return ds.dataset(paths, filesystem=fs, format="ipc")
    parts = []
    for path in paths:
        if path not in streams:
            parts.append(ds.dataset(path, filesystem=fs, format="ipc"))
        elif local:
            parts.append(ds.dataset(pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()))
        else:
            with fs.open_input_stream(path) as fh:
                parts.append(ds.dataset(pa.ipc.open_stream(fh).read_all()))
    return parts[0] if len(parts) == 1 else ds.dataset(parts)


def _sniff(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read(6)


def is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or dtype == pa.string_view()
