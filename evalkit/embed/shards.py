"""The precompute output format: embedding shards + manifest, and how to read them back.

A precompute output folder (a local directory or an s3:// prefix) holds
`embeddings-<start>-<end>.arrow` shards and one manifest per job (`manifest.json`, or
`manifest-IIIII-of-NNNNN.json` for `--shard I/N`). Format 2 (`evalkit.embeddings/2`) shards are
Arrow IPC files with `id`, `key` (fixed_size_binary[16]: the store key of the row's text,
`evalkit.embed.store.make_keys(model fingerprint, text)`) and `embedding`
(fixed_size_list<float32|float16>[dim]); format 1 outputs (no `key`) are still read.

1) `plan_shards` (pure) cuts a job's rows at global multiples of `rows_per_shard`, so shard
   files have the same names however the job is split;
2) `load_manifest` reads and merges the manifests of the jobs that wrote into one folder;
3) `iter_embeddings` memory-maps the shards in row order (or reads them through pyarrow's S3
   filesystem) and yields (ids, vectors) blocks;
4) `RowDigest` is the content digest of a shard's input rows (texts and ids as read), recorded
   in its manifest entry (`input_xxh128`) so a resumed job can tell a finished shard from one
   whose input changed since;
5) `import_into_store` loads an output into an embedding store without touching the texts: each
   shard's bytes are checked against the manifest's BLAKE2b, then its (key, vector) rows are put;
6) `stable_manifest` is the manifest without its run log (timestamps, per-run tallies): two
   outputs are identical when their shard files and stable manifests are byte for byte equal.

The writer is the precompute job (`evalkit.jobs.precompute`); index building, ANN checks and
evaluation read through this module only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._io import dumps_json
from evalkit.errors import EvalkitError, FingerprintMismatchError, StoreError

FORMAT = "evalkit.embeddings/2"
FORMATS_READ = ("evalkit.embeddings/1", FORMAT)
ID_COLUMN, KEY_COLUMN, VECTOR_COLUMN = "id", "key", "embedding"
RUN_LOG_KEYS = ("created", "updated", "runs", "counts", "last_run")
DEFAULT_ROWS_PER_SHARD = 100_000
_SHARD_GLOB = "embeddings-*.arrow"


class RowDigest:
    """xxh3-128 over the rows of one or more Arrow columns, fed piece by piece: for each column,
    every value's length (-1 for null) and bytes, plus the column types seen. Independent of how
    the rows are cut into pieces.

    Strings and binaries are hashed as their raw bytes, other types (integer ids, ...) as their
    Arrow string cast. Lengths and bytes are hashed as two streams side by side, so the digest
    depends only on the values: rows "ab","c" and "a","bc" differ by their lengths."""

    def __init__(self) -> None:
        self._streams: list[tuple[Any, Any, set[str]]] = []

    def update(self, *columns: Any) -> None:
        """Add the next rows: one Arrow (chunked) array per column, the same columns each call."""
        import xxhash

        while len(self._streams) < len(columns):
            self._streams.append((xxhash.xxh3_128(), xxhash.xxh3_128(), set()))
        for column, stream in zip(columns, self._streams, strict=False):
            self._update(column, *stream)

    @staticmethod
    def _update(column: Any, lengths_h: Any, bytes_h: Any, types: set[str]) -> None:
        import pyarrow as pa

        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        for arr in chunks:
            types.add(str(arr.type))
            if not len(arr):
                continue
            stringy = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
            binary = stringy or pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)
            arr = arr.cast(pa.large_binary() if binary else pa.large_string())
            offsets = np.frombuffer(arr.buffers()[1], dtype="<i8")[arr.offset :][: len(arr) + 1]
            lengths = np.diff(offsets)
            if arr.null_count:
                lengths[arr.is_null().to_numpy(zero_copy_only=False)] = -1
            lengths_h.update(lengths.astype("<i8").tobytes())
            if offsets[-1] > offsets[0]:
                bytes_h.update(memoryview(arr.buffers()[2])[offsets[0] : offsets[-1]])

    def hexdigest(self) -> str:
        import xxhash

        h = xxhash.xxh3_128(f"{len(self._streams)} columns\n".encode())
        for lengths_h, bytes_h, types in self._streams:
            h.update(lengths_h.digest() + bytes_h.digest())
            h.update(("|".join(sorted(types)) + "\n").encode())
        return h.hexdigest()


def parse_shard(text: str | tuple[int, int]) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/")) if isinstance(text, str) else map(int, text)
    except (ValueError, TypeError):
        raise EvalkitError(f"shard must look like I/N (e.g. 0/4); got {text!r}") from None
    if n <= 0 or not 0 <= i < n:
        raise EvalkitError(f"shard I/N needs 0 <= I < N; got {i}/{n}")
    return i, n


def plan_shards(
    rows: int, shard: tuple[int, int] = (0, 1), rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
) -> list[tuple[int, int]]:
    """Row ranges [start, end) this job writes, one per output file."""
    i, n = shard
    start, end = rows * i // n, rows * (i + 1) // n
    cuts = (
        [start]
        + list(range((start // rows_per_shard + 1) * rows_per_shard, end, rows_per_shard))
        + [end]
    )
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def shard_name(start: int, end: int) -> str:
    return f"embeddings-{start:012d}-{end:012d}.arrow"


def _manifest_name(shard: tuple[int, int]) -> str:
    i, n = shard
    return "manifest.json" if n == 1 else f"manifest-{i:05d}-of-{n:05d}.json"


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(dumps_json(obj, indent=1, sort_keys=True) + "\n")  # strict: NaN -> null
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path}: {exc}; remove it or rerun with --overwrite") from exc


class OutputDir:
    """Where a precompute output lives: a local directory, or a prefix on a pyarrow filesystem
    (`s3://bucket/prefix`, which honours AWS_ENDPOINT_URL, through `evalkit.data.sources`).
    Files are replaced whole: locally through a temp file + `os.replace`, on S3 by one upload."""

    def __init__(self, where: str | os.PathLike | OutputDir) -> None:
        if isinstance(where, OutputDir):
            self.__dict__.update(where.__dict__)
            return
        text = os.fspath(where)
        self.label = text
        self.fs = self.local = None
        if "://" in text and not text.startswith("file://"):
            from evalkit.data.sources import _filesystem

            self.fs, self.root, _ = _filesystem(text, None)
            self.root = self.root.rstrip("/")
        else:
            self.local = Path(text.removeprefix("file://")).expanduser()
            self.root = str(self.local)

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def where(self, name: str) -> str:
        return f"{self.label.rstrip('/')}/{name}" if self.remote else str(self.local / name)

    def _info(self, name: str | None = None) -> Any:
        return self.fs.get_file_info(self.root if name is None else f"{self.root}/{name}")

    def is_file(self) -> bool:
        """True when the location is a file (an output must be a folder)."""
        if not self.remote:
            return self.local.exists() and not self.local.is_dir()
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def names(self, pattern: str = "*") -> list[str]:
        """Names of the files directly in the folder that match `pattern`, sorted."""
        import fnmatch

        if not self.remote:
            return sorted(p.name for p in self.local.glob(pattern)) if self.local.is_dir() else []
        import pyarrow.fs as pafs

        listing = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        found = (i.base_name for i in listing if i.type == pafs.FileType.File)
        return sorted(n for n in found if fnmatch.fnmatchcase(n, pattern))

    def size(self, name: str) -> int | None:
        if not self.remote:
            path = self.local / name
            return path.stat().st_size if path.is_file() else None
        info = self._info(name)
        return info.size if info.is_file else None

    def read_buffer(self, name: str) -> Any:
        """The whole file as a pyarrow Buffer (memory-mapped when local)."""
        import pyarrow as pa

        try:
            if not self.remote:
                with pa.memory_map(str(self.local / name)) as mm:
                    return mm.read_buffer()
            with self.fs.open_input_file(f"{self.root}/{name}") as fh:
                return fh.read_buffer()
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read {self.where(name)}: {exc}") from exc

    def open_shard(self, name: str) -> Any:
        """A random-access source for an Arrow IPC file (a memory map when local)."""
        import pyarrow as pa

        if not self.remote:
            return pa.memory_map(str(self.local / name))
        return self.fs.open_input_file(f"{self.root}/{name}")

    def read_json(self, name: str) -> dict:
        if not self.remote:
            return _read_json(self.local / name)
        try:
            return json.loads(self.read_buffer(name).to_pybytes().decode("utf-8"))
        except ValueError as exc:
            raise StoreError(f"cannot read {self.where(name)}: {exc}") from exc

    def write_json(self, name: str, obj: dict) -> None:
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)
            _atomic_write_json(self.local / name, obj)
            return
        data = (dumps_json(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")  # strict
        with self.fs.open_output_stream(f"{self.root}/{name}") as fh:
            fh.write(data)

    def put_file(self, path: Path, name: str) -> None:
        """Move the finished local file `path` into the folder as `name` (atomic)."""
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.local / name)
            return
        import pyarrow.fs as pafs

        pafs.copy_files(
            str(path),
            f"{self.root}/{name}",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )
        path.unlink()

    def delete(self, name: str) -> None:
        if not self.remote:
            (self.local / name).unlink(missing_ok=True)
        elif self.size(name) is not None:
            self.fs.delete_file(f"{self.root}/{name}")


def _manifests(out: Path | OutputDir) -> list[dict]:
    loc = OutputDir(out)
    return [loc.read_json(name) for name in loc.names("manifest*.json")]


def digest_bytes(buffer: Any) -> str:
    """BLAKE2b-128 of a buffer, as `_file_digest` computes it for a file."""
    h = hashlib.blake2b(digest_size=16)
    view = memoryview(buffer)
    for start in range(0, len(view), 1 << 22):
        h.update(view[start : start + (1 << 22)])
    return h.hexdigest()


def stable_manifest(manifest: dict) -> dict:
    """The manifest without its run log (timestamps and per-run tallies, `RUN_LOG_KEYS`): what
    must be equal, with the shard files, for two outputs to be the same output."""
    return {k: v for k, v in manifest.items() if k not in RUN_LOG_KEYS}


def load_manifest(out_dir: str | os.PathLike | OutputDir) -> dict:
    """The manifest of an output directory; the manifests of several `--shard I/N` jobs writing
    into one DIR are merged ("shards" sorted by row; "complete" when every row is covered)."""
    loc = OutputDir(out_dir)
    parts = _manifests(loc)
    if not parts:
        raise StoreError(
            f"no manifest.json in {loc.label}; is it an `evalkit encode --out` directory?"
        )
    for part in parts:
        if part.get("format") not in FORMATS_READ:
            raise StoreError(
                f"{loc.label} has format {part.get('format')!r}; this evalkit reads "
                f"{', '.join(FORMATS_READ)} (upgrade evalkit)"
            )
    if len(parts) == 1 and tuple(parts[0].get("shard", (0, 1)))[1] == 1:
        return parts[0]
    first = parts[0]
    for part in parts[1:]:
        for key in ("model_fingerprint", "dim", "dtype", "input_fingerprint", "rows", "format"):
            if part.get(key) != first.get(key):
                raise FingerprintMismatchError(
                    f"manifests in {loc.label} disagree on {key}: {first.get(key)!r} vs {part.get(key)!r}"
                )
    merged = dict(first)
    merged["shards"] = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["start"])
    merged["jobs"] = [p["shard"] for p in parts]
    covered = sum(s["rows"] for s in merged["shards"])
    merged["complete"] = covered == first["rows"] and all(p.get("complete") for p in parts)
    merged["shard"] = [0, 1]
    merged["row_range"] = [0, first["rows"]]
    merged["counts"] = {
        k: sum(p.get("counts", {}).get(k, 0) for p in parts)
        for k in ("rows_done", "hits", "misses")
    }
    return merged


def iter_embeddings(
    out_dir: str | os.PathLike, *, allow_partial: bool = False, with_keys: bool = False
) -> Iterator[tuple[Any, ...]]:
    """Yield (ids, vectors [n, dim]) blocks in row order from memory-mapped shards (local) or
    shards read through pyarrow's filesystem (s3://).

    ids is a numpy array for numeric ids, else a list; vectors keep the stored dtype (zero-copy).
    `with_keys=True` yields (ids, keys: list of 16-byte store keys, vectors) (format 2 only).
    An incomplete directory raises StoreError unless `allow_partial=True`.
    """
    import pyarrow as pa

    loc = OutputDir(out_dir)
    manifest = load_manifest(loc)
    if not manifest.get("complete") and not allow_partial:
        raise StoreError(
            f"{loc.label} is incomplete (an encode job is unfinished); rerun it, or pass allow_partial=True"
        )
    if with_keys and manifest.get("format") != FORMAT:
        raise StoreError(
            f"{loc.label} was written in format {manifest.get('format')!r}, which has no key "
            "column; re-encode it with this evalkit (evalkit encode ... --overwrite)"
        )
    dim = manifest["dim"]
    for entry in manifest["shards"]:
        if loc.size(entry["file"]) is None:
            raise StoreError(
                f"{loc.where(entry['file'])} is listed in the manifest but missing; rerun the encode job"
            )
        with loc.open_shard(entry["file"]) as source:
            reader = pa.ipc.open_file(source)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                vec_col = batch.column(VECTOR_COLUMN)
                vectors = vec_col.values.to_numpy(zero_copy_only=True).reshape(-1, dim)
                ids_col = batch.column(ID_COLUMN)
                if pa.types.is_integer(ids_col.type) or pa.types.is_floating(ids_col.type):
                    ids = ids_col.to_numpy(zero_copy_only=False)
                else:
                    ids = ids_col.to_pylist()
                if with_keys:
                    yield ids, batch.column(KEY_COLUMN).to_pylist(), vectors
                else:
                    yield ids, vectors


def import_into_store(
    out_dir: str | os.PathLike | OutputDir,
    store: Any,
    *,
    files: Any = None,
    manifest: dict | None = None,
    on_rows: Any = None,
) -> dict:
    """Put every finished shard's (key, vector) rows into `store` under the output's model
    fingerprint, without reading any text: each shard's bytes are first checked against the
    manifest (size + BLAKE2b), so a corrupt or replaced file is refused before any of its rows
    is stored. `files`: only these shard file names; `manifest`: the output's manifest when the
    caller holds it. -> {"rows", "shards", "model_fingerprint", "complete"}."""
    import pyarrow as pa

    loc = OutputDir(out_dir)
    manifest = manifest if manifest is not None else load_manifest(loc)
    if manifest.get("format") != FORMAT:
        raise StoreError(
            f"{loc.label} was written in format {manifest.get('format')!r}, which has no key "
            "column; re-encode it with this evalkit (evalkit encode ... --overwrite) to import it"
        )
    if store.dtype != manifest["dtype"]:
        raise StoreError(f"store reads {store.dtype}, {loc.label} holds {manifest['dtype']}")
    fp, rows, done = manifest["model_fingerprint"], 0, 0
    wanted = None if files is None else set(files)
    for entry in manifest["shards"]:
        if wanted is not None and entry["file"] not in wanted:
            continue
        buffer = loc.read_buffer(entry["file"])
        if buffer.size != entry["bytes"] or digest_bytes(buffer) != entry["blake2b"]:
            raise StoreError(
                f"{loc.where(entry['file'])} does not match its manifest entry (size/BLAKE2b): "
                f"corrupt or replaced; {done} shard(s) imported before it; rerun the encode job"
            )
        reader = pa.ipc.open_file(pa.BufferReader(buffer))
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            keys = batch.column(KEY_COLUMN)
            vectors = batch.column(VECTOR_COLUMN).values.to_numpy(zero_copy_only=True)
            store.put_many(keys.to_pylist(), vectors.reshape(len(batch), -1), model=fp)
            rows += len(batch)
            if on_rows is not None:
                on_rows(len(batch))
        done += 1
    return {"rows": rows, "shards": done, "model_fingerprint": fp, "complete": manifest["complete"]}
