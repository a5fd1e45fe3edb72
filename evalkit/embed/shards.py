"""The precompute output format: embedding shards + manifest, and how to read them back.

A precompute output folder holds `embeddings-<start>-<end>.arrow` shards (Arrow IPC files with
`id` and `embedding`: fixed_size_list<float32|float16>[dim]) and one manifest per job
(`manifest.json`, or `manifest-IIIII-of-NNNNN.json` for `--shard I/N`).

1) `plan_shards` (pure) cuts a job's rows at global multiples of `rows_per_shard`, so shard
   files have the same names however the job is split;
2) `load_manifest` reads and merges the manifests of the jobs that wrote into one folder;
3) `iter_embeddings` memory-maps the shards in row order and yields (ids, vectors) blocks;
4) `RowDigest` is the content digest of a shard's input rows (texts and ids as read), recorded
   in its manifest entry (`input_xxh128`) so a resumed job can tell a finished shard from one
   whose input changed since.

The writer is the precompute job (`evalkit.jobs.precompute`); index building, ANN checks and
evaluation read through this module only.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._io import dumps_json
from evalkit.errors import EvalkitError, FingerprintMismatchError, StoreError

FORMAT = "evalkit.embeddings/1"
ID_COLUMN, VECTOR_COLUMN = "id", "embedding"
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


def _manifests(out: Path) -> list[dict]:
    return [_read_json(Path(p)) for p in sorted(glob.glob(str(out / "manifest*.json")))]


def load_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of an output directory; the manifests of several `--shard I/N` jobs writing
    into one DIR are merged ("shards" sorted by row; "complete" when every row is covered)."""
    out = Path(out_dir)
    parts = _manifests(out)
    if not parts:
        raise StoreError(f"no manifest.json in {out}; is it an `evalkit encode --out` directory?")
    if len(parts) == 1 and tuple(parts[0].get("shard", (0, 1)))[1] == 1:
        return parts[0]
    first = parts[0]
    for part in parts[1:]:
        for key in ("model_fingerprint", "dim", "dtype", "input_fingerprint", "rows"):
            if part.get(key) != first.get(key):
                raise FingerprintMismatchError(
                    f"manifests in {out} disagree on {key}: {first.get(key)!r} vs {part.get(key)!r}"
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
    out_dir: str | os.PathLike, *, allow_partial: bool = False
) -> Iterator[tuple[Any, np.ndarray]]:
    """Yield (ids, vectors [n, dim]) blocks in row order from memory-mapped shards.

    ids is a numpy array for numeric ids, else a list; vectors keep the stored dtype (zero-copy).
    An incomplete directory raises StoreError unless `allow_partial=True`.
    """
    import pyarrow as pa

    out = Path(out_dir)
    manifest = load_manifest(out)
    if not manifest.get("complete") and not allow_partial:
        raise StoreError(
            f"{out} is incomplete (an encode job is unfinished); rerun it, or pass allow_partial=True"
        )
    dim = manifest["dim"]
    for entry in manifest["shards"]:
        path = out / entry["file"]
        if not path.exists():
            raise StoreError(f"{path} is listed in the manifest but missing; rerun the encode job")
        with pa.memory_map(str(path)) as source:
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
                yield ids, vectors
