"""The results store: every evaluation result remembered by identity, with its per-item file.

1) identity = {result format, evalkit version, model fingerprint, model similarity function,
   data content digest (every byte of every input file), task, dialect, k values, columns and
   parsing options, evaluator settings}; key = BLAKE2b-128 of its canonical JSON;
2) `put` writes DIR/<key[:2]>/<key>.parquet (per-query or per-pair values, temp file + rename),
   then DIR/<key[:2]>/<key>.json (the result, the identity, the Parquet file's BLAKE2b; temp file
   + rename): the JSON commits the entry, so a reader never sees a half-written one;
3) `get` reads the JSON, and answers only when its stored identity equals the one asked for (a
   copied or renamed file never answers another key) and the Parquet file is there with the
   recorded BLAKE2b; anything else is a miss (with a warning), so the result is computed again and
   the entry rewritten. The digest is checked again whenever the bytes are used (`copy_verified`,
   `read_table`);
4) comparisons (jobs.compare, jobs.sweep) are memoised under DIR/compare/<key>.json, keyed by
   the two result keys, the metric and the test settings.

Where: `results=` a folder; None = beside the embedding store (`<cache>-results`, so that
`evalkit cache check --fix`, which deletes files diskcache does not know, never touches it), or
`$EVALKIT_RESULTS`; False (or no embedding store and no folder given) = no results store.
Per-item files: `PairsWriter` streams per-pair scores into Parquet (one row group per batch,
bounded memory); `write_queries` writes per-query metric values (queries x metrics, small).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._io import jsonable, write_json_atomic
from evalkit.errors import EvalkitError, StoreError

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "evalkit-results-1"
PER_ITEM_FILE = "per_query.parquet"


def results_dir(results: Any, cache: Any) -> Path | None:
    """The results store folder for a job's `results` and `cache` arguments (see module doc)."""
    if results is False:
        return None
    if results is not None:
        return Path(results).expanduser()
    env = os.environ.get("EVALKIT_RESULTS")
    if env:
        return Path(env).expanduser()
    if cache is False:
        return None
    from evalkit.embed.store import EmbeddingStore, default_cache_dir

    if isinstance(cache, EmbeddingStore):
        base = cache.directory
    else:
        base = Path(cache).expanduser() if cache is not None else default_cache_dir()
    base = Path(os.path.abspath(base))
    return base.with_name(base.name + "-results")


def digest_key(identity: dict[str, Any]) -> str:
    blob = json.dumps(jsonable(identity), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ResultsStore:
    """Results of evaluations in one folder, keyed by `digest_key(identity)`."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(f"results store {self.directory} is a file; give a directory")

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.directory / key[:2]
        return folder / f"{key}.json", folder / f"{key}.parquet"

    def scratch(self) -> Path:
        """A temporary folder on the store's filesystem (per-item files are renamed from it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.directory))

    def get(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The stored record of `identity` ({"key", "identity", "result", "per_query",
        "extra"}, "per_query" with its "path"), or None."""
        key = digest_key(identity)
        meta, table = self._paths(key)
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable results store entry %s: %s", meta, exc)
            return None
        if record.get("format") != RESULTS_FORMAT or record.get("identity") != jsonable(identity):
            logger.warning("ignoring results store entry %s: its identity does not match", meta)
            return None
        info = record.get("per_query") or {}
        if not table.is_file() or file_digest(table) != info.get("blake2b"):
            logger.warning(
                "ignoring results store entry %s: its per-item file is missing or changed", meta
            )
            return None
        record["per_query"] = {**info, "path": str(table)}
        return record

    def put(
        self,
        identity: dict[str, Any],
        result: dict[str, Any],
        per_item: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Move the per-item file `per_item["path"]` into the store, then commit the record."""
        key = digest_key(identity)
        meta, table = self._paths(key)
        table.parent.mkdir(parents=True, exist_ok=True)
        os.replace(per_item["path"], table)
        info = {k: v for k, v in per_item.items() if k != "path"} | {"file": table.name}
        stored = {k: v for k, v in result.items() if k not in ("out", "plots", "per_query")}
        record = {
            "format": RESULTS_FORMAT, "key": key, "identity": identity,
            "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "result": stored, "per_query": info, "extra": extra or {},
        }  # fmt: skip
        write_json_atomic(meta, record)
        return {**record, "per_query": {**info, "path": str(table)}}

    # -- memoised comparisons ---------------------------------------------------------------

    def get_comparison(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        path = self.directory / "compare" / f"{digest_key(identity)}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if record.get("identity") != jsonable(identity):
            return None
        return record.get("comparison")

    def put_comparison(self, identity: dict[str, Any], comparison: dict[str, Any]) -> None:
        path = self.directory / "compare" / f"{digest_key(identity)}.json"
        write_json_atomic(path, {"identity": identity, "comparison": comparison})


# ------------------------------------------------------------------------- per-item files


def _finish(tmp: Path, dest: Path, kind: str, rows: int, columns: list[str]) -> dict[str, Any]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return {
        "file": dest.name, "path": str(dest), "kind": kind, "rows": rows, "columns": columns,
        "bytes": dest.stat().st_size, "blake2b": file_digest(dest),
    }  # fmt: skip


class PairsWriter:
    """`sink(scores, gold)` for `engine.pairs_pass`: per-pair Parquet rows (pair index, label,
    one float column per score), written batch by batch to a temp file; `close()` renames it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.rows = 0
        self.columns: list[str] = []
        self._writer = None

    def __call__(self, scores: dict[str, np.ndarray], gold: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(gold)
        table = pa.table(
            {"pair": np.arange(self.rows, self.rows + n, dtype=np.int64), "label": gold}
            | {name: np.asarray(v) for name, v in scores.items()}
        )
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, table.schema)
            self.columns = table.column_names
        self._writer.write_table(table)
        self.rows += n

    def close(self) -> dict[str, Any]:
        if self._writer is None:
            raise EvalkitError("no pairs were written")
        self._writer.close()
        return _finish(self.tmp, self.path, "pairs", self.rows, self.columns)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def write_queries(path: str | os.PathLike, ids: list, keys: list[str], values: np.ndarray):
    """Per-query Parquet: a `query_id` column and one float64 column per metric key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    columns = {"query_id": pa.array([str(q) for q in ids], pa.string())}
    columns |= {key: values[:, j] for j, key in enumerate(keys)}
    try:
        pq.write_table(pa.table(columns), tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _finish(tmp, path, "queries", len(ids), list(columns))


def copy_verified(info: dict[str, Any], dest: str | os.PathLike) -> dict[str, Any]:
    """Copy a per-item file to `dest` (temp + rename), checking its BLAKE2b on the way."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    h = hashlib.blake2b(digest_size=32)
    try:
        with open(info["path"], "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != info["blake2b"]:
            raise StoreError(
                f"{info['path']} does not match the digest recorded for it (changed or corrupt); "
                "rerun with --recompute"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return {**info, "file": dest.name, "path": str(dest)}


def read_table(info: dict[str, Any]):
    """The per-item file as a pyarrow Table, after checking its BLAKE2b (read once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = info.get("path")
    if not path or not os.path.isfile(path):
        raise EvalkitError(f"per-item file {path} is missing")
    data = Path(path).read_bytes()
    if hashlib.blake2b(data, digest_size=32).hexdigest() != info.get("blake2b"):
        raise StoreError(
            f"{path} does not match the digest its metrics.json records (changed or corrupt)"
        )
    return pq.read_table(pa.BufferReader(data))


def remove_tree(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
