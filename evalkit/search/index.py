"""A built FAISS index with the data's ids and its sidecar: search, save and memory-mapped loads.

Building lives in `evalkit.search.build` (`build_index`), planning in `evalkit.search.plan`.

1) `EmbeddingIndex` holds the FAISS index, the id table and the sidecar metadata; `search`
   normalises queries for cosine and returns positions, which `ids_of` maps back to the data's ids;
2) `save` writes `index.faiss`, `ids.arrow` and `index.json`, each to a temporary file moved
   into place;
3) loading (`load_index`) reads the sidecar, refuses an index made with another model fingerprint
unless forced, reads the FAISS file memory-mapped where FAISS can (Flat, IVF lists) and the id
table memory-mapped, and checks that the three agree. Search returns positions, which
`EmbeddingIndex.ids_of` maps back to the data's ids.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from evalkit._imports import require
from evalkit._io import dumps_json
from evalkit.errors import DataError, EvalkitError, FingerprintMismatchError
from evalkit.search.plan import HNSW_EF_GRID, QUANTIZER_EF_MIN

log = logging.getLogger(__name__)

FORMAT = "evalkit-index/1"
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.arrow", "index.json"
METRICS = ("cosine", "dot", "l2")

Blocks = Iterable[tuple[Any, np.ndarray]]


def _faiss():
    return require("faiss", extra="faiss", package="faiss-cpu")


def _faiss_metric(metric: str) -> int:
    faiss = _faiss()
    if metric not in METRICS:
        raise EvalkitError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, a private copy; L2-normalised for cosine (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise DataError(f"embeddings must be a 2-D array [rows, dim]; got shape {x.shape}")
    if metric == "cosine" and len(x):
        _faiss().normalize_L2(x)
    return x


def parameter_grid(index: Any, k: int = 10) -> list[dict[str, int]]:
    """The search settings worth sweeping for this index, cheapest first: nprobe 1, 2, 3, 4, 5,
    6, 7, 8, 10, 12, 14, 16, 20, ... (each power of two p >= 4, then 1.25p, 1.5p, 1.75p) up to
    nlist for IVF indexes (with an HNSW coarse quantizer, its efSearch at max(64, 2 nprobe);
    behind a refine stage, its current k_factor_rf kept); efSearch from k up to 1024 for HNSW;
    one setting for the rest. The quarter steps matter to the tuned default: nprobe 64 -> 128
    doubles the query time, and on real data the target is often met in between."""
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        grid, p = [], 1
        while p < ivf.nlist:
            steps = (p, p + p // 4, p + p // 2, p + 3 * p // 4) if p >= 4 else (p, p + p // 2)
            grid.extend({"nprobe": n} for n in dict.fromkeys(steps) if n < ivf.nlist)
            p *= 2
        grid.append({"nprobe": int(ivf.nlist)})
        if hasattr(faiss.downcast_index(ivf.quantizer), "hnsw"):
            grid = [
                {**g, "quantizer_efSearch": max(QUANTIZER_EF_MIN, 2 * g["nprobe"])} for g in grid
            ]
        refine = faiss.downcast_index(index)
        if isinstance(refine, faiss.IndexRefine):
            grid = [{**g, "k_factor_rf": int(refine.k_factor)} for g in grid]
        return grid
    if _hnsw_of(index) is not None:
        efs = [ef for ef in HNSW_EF_GRID if ef >= k]
        return [{"efSearch": ef} for ef in (efs or [k])]
    return [{}]


def _hnsw_of(index: Any) -> Any:
    faiss = _faiss()
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return idx if hasattr(idx, "hnsw") else None


def set_search_params(index: Any, params: dict[str, int] | None) -> None:
    """Apply {'nprobe': 16} / {'efSearch': 128} (any FAISS ParameterSpace name) to an index."""
    if not params:
        return
    space = _faiss().ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
        except (RuntimeError, AttributeError) as exc:
            raise EvalkitError(
                f"this index has no search parameter {name!r}; IVF indexes take nprobe (and "
                "quantizer_efSearch with an HNSW quantizer), HNSW indexes take efSearch, a "
                "refined index (...,RFlat) takes k_factor_rf, Flat takes none"
            ) from exc


# ----------------------------------------------------------------------------- the index object


@dataclass
class EmbeddingIndex:
    """A FAISS index whose positions 0..rows-1 map to the data's ids through `ids` (an Arrow
    array, memory-mapped once saved) and whose `meta` is the sidecar."""

    index: Any
    ids: pa.Array | pa.ChunkedArray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "cosine")

    @property
    def spec(self) -> str:
        return self.meta.get("spec", "?")

    def set_params(self, params: dict[str, int] | None) -> None:
        set_search_params(self.index, params)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        params: dict[str, int] | None = None,
        batch_size: int = 16384,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores [nq, k] float32, positions [nq, k] int64); higher score = closer (l2
        scores are negated squared distances). A position of -1 means fewer than k were found."""
        q = np.asarray(queries)
        if q.ndim != 2:
            raise DataError(f"queries must be a 2-D array [n, dim]; got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise DataError(
                f"query embeddings have dimension {q.shape[1]} but the index ({self.spec}) has "
                f"dimension {self.dim}; encode queries with the model the index was built from"
            )
        check_k(k, self.rows)
        self.set_params(params)
        scores = np.empty((len(q), k), dtype=np.float32)
        positions = np.empty((len(q), k), dtype=np.int64)
        for start in range(0, len(q), batch_size):
            x = _prepare(q[start : start + batch_size], self.metric)
            d, i = self.index.search(x, k)
            scores[start : start + len(x)] = -d if self.metric == "l2" else d
            positions[start : start + len(x)] = i
        return scores, positions

    def ids_of(self, positions: np.ndarray) -> np.ndarray:
        """Map positions to the data's ids, same shape: int64 ids (-1 where the position is -1) or
        an object array of strings (None where the position is -1)."""
        pos = np.asarray(positions, dtype=np.int64)
        flat = pos.reshape(-1)
        missing = flat < 0
        taken = self.ids.take(pa.array(np.where(missing, 0, flat)))
        if pa.types.is_integer(self.ids.type):
            out = taken.to_numpy().astype(np.int64, copy=True)
            out[missing] = -1
        else:
            out = np.array(taken.to_pylist(), dtype=object)
            out[missing] = None
        return out.reshape(pos.shape)

    def save(self, out: str | os.PathLike) -> Path:
        """Write index.faiss, ids.arrow and index.json into `out` (created), each atomically."""
        faiss = _faiss()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{INDEX_FILE}.{os.getpid()}.tmp"
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, out / INDEX_FILE)
        if self.path is None or Path(self.path).resolve() != out.resolve():
            writer = IdWriter(out / IDS_FILE, self.ids.type)
            writer.write(self.ids)
            writer.close()
        self.meta["index_bytes"] = (out / INDEX_FILE).stat().st_size
        _write_json(out / META_FILE, self.meta)
        self.path = out
        return out


def check_k(k: int, rows: int) -> None:
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k <= 0:
        raise EvalkitError(f"k must be a positive integer; got {k!r}")
    if k > rows:
        raise EvalkitError(f"k={k} is larger than the corpus ({rows:,} rows); use k <= {rows}")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps_json(obj, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _open_ids(path: Path) -> pa.ChunkedArray:
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        return table.column("id")
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise DataError(
            f"id table {path} is corrupt or unreadable ({exc}); rebuild the index"
        ) from exc


# ----------------------------------------------------------------------------- sources


# ----------------------------------------------------------------------------- build / load


def load_index(
    path: str | os.PathLike,
    *,
    model_fingerprint: str | None = None,
    force: bool = False,
    mmap: bool = True,
) -> EmbeddingIndex:
    """Load an index directory written by `build_index`/`save`. With `model_fingerprint`, refuse
    (FingerprintMismatchError) an index built from another model unless `force`. `mmap` reads
    the FAISS file memory-mapped where FAISS supports it (Flat codes, IVF lists)."""
    faiss = _faiss()
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"{path} is not an evalkit index directory (no {META_FILE}); build one with `evalkit index build`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"index sidecar {meta_path} is corrupt ({exc}); rebuild the index") from exc
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    built_with = meta.get("model_fingerprint")
    if model_fingerprint and built_with and model_fingerprint != built_with:
        msg = (
            f"index {path} was built from embeddings of model {built_with[:12]}..., not the model "
            f"in use ({model_fingerprint[:12]}...); rebuild it, or force its use"
        )
        if not force:
            raise FingerprintMismatchError(msg)
        log.warning("%s (forced)", msg)
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        index = faiss.read_index(str(path / INDEX_FILE), flags)
    except RuntimeError as exc:
        if mmap:  # some index types cannot be mapped; a corrupt file fails both ways
            try:
                index = faiss.read_index(str(path / INDEX_FILE))
            except RuntimeError:
                index = None
        else:
            index = None
        if index is None:
            detail = str(exc).strip().splitlines()[-1][:160]
            raise DataError(
                f"index file {path / INDEX_FILE} is corrupt or not a FAISS index ({detail}); rebuild it"
            ) from exc
    ids = _open_ids(path / IDS_FILE)
    if index.d != meta.get("dim") or index.ntotal != meta.get("rows") or len(ids) != index.ntotal:
        raise DataError(
            f"index directory {path} is inconsistent: index has {index.ntotal} rows x {index.d} dims, "
            f"sidecar says {meta.get('rows')} x {meta.get('dim')}, id table has {len(ids)} rows; rebuild it"
        )
    result = EmbeddingIndex(index, ids, meta, path)
    set_search_params(index, meta.get("search_params"))
    return result


class IdWriter:
    """Streams id blocks into an Arrow IPC file (temporary name, moved into place on close), or
    collects them in memory when there is no path."""

    def __init__(self, path: Path | None, id_type: pa.DataType | None = None) -> None:
        self.path, self.type, self.chunks, self.writer = path, id_type, [], None

    def write(self, ids: Any) -> None:
        arr = ids if isinstance(ids, pa.Array | pa.ChunkedArray) else pa.array(ids)
        # integer ids stay int64; any other id type is kept as its text
        arr = arr.cast(pa.int64() if pa.types.is_integer(arr.type) else pa.large_string())
        if self.type is None:
            self.type = arr.type
        elif arr.type != self.type:
            raise DataError(f"ids change type from {self.type} to {arr.type} between blocks")
        chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
        if self.path is None:
            self.chunks.extend(chunks)
            return
        if self.writer is None:
            self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            schema = pa.schema([("id", self.type)])
            self.writer = pa.ipc.new_file(str(self.tmp), schema)
        for chunk in chunks:
            self.writer.write_batch(pa.record_batch([chunk], names=["id"]))

    def close(self) -> pa.ChunkedArray:
        if self.path is None:
            return pa.chunked_array(self.chunks, type=self.type or pa.int64())
        if self.writer is None:
            self.write(pa.array([], type=self.type or pa.int64()))
        self.writer.close()
        os.replace(self.tmp, self.path)
        return _open_ids(self.path)
