"""FAISS indexes over streamed embeddings, with the data's ids, a sidecar and memory-mapped loads.

Building (`build_index`), in bounded memory:
1) plan: with no spec, `choose_index(rows, dim, memory_budget)` picks a FAISS factory string from
   the row count, the dimension and the memory budget, and says why;
2) sample: an index that needs training (IVF, PQ, OPQ, ...) is trained on a uniform sample of the
   rows (a reservoir over one pass when the source can be read twice, else its first rows);
3) add: the rows are added in chunks at positions 0..n-1 (cosine: each chunk is L2-normalised and
   searched by inner product), while the data's ids stream into an Arrow file beside the index;
4) save: `index.faiss`, `ids.arrow` and the sidecar `index.json` (spec, metric, dim, rows, model
   fingerprint, build parameters), each written to a temporary file and moved into place.

Loading (`load_index`) reads the sidecar, refuses an index made with another model fingerprint
unless forced, reads the FAISS file memory-mapped where FAISS can (Flat, IVF lists) and the id
table memory-mapped, and checks that the three agree. Search returns positions, which
`EmbeddingIndex.ids_of` maps back to the data's ids.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from evalkit._imports import require
from evalkit.errors import DataError, EvalkitError, FingerprintMismatchError
from evalkit.index_plan import (  # noqa: F401  (re-exported: the planning half of this API)
    HNSW_EF_GRID,
    IndexChoice,
    choose_index,
    estimate_bytes,
    ivf_nlist,
    parse_size,
)

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
    """The search settings worth sweeping for this index, cheapest first: nprobe 1, 2, 4, ... up
    to nlist for IVF indexes; efSearch from k up to 1024 for HNSW; one setting for the rest."""
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        grid, p = [], 1
        while p < ivf.nlist:
            grid.append({"nprobe": p})
            p *= 2
        return grid + [{"nprobe": int(ivf.nlist)}]
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
                f"this index has no search parameter {name!r}; IVF indexes take nprobe, HNSW "
                "indexes take efSearch, Flat takes none"
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
            writer = _IdWriter(out / IDS_FILE, self.ids.type)
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
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class _IdWriter:
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


def _open_ids(path: Path) -> pa.ChunkedArray:
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        return table.column("id")
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise DataError(
            f"id table {path} is corrupt or unreadable ({exc}); rebuild the index"
        ) from exc


# ----------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """A normalised embedding source: how to read its blocks, and what is known in advance."""

    blocks: Callable[[], Iterator[tuple[Any, np.ndarray]]]
    rows: int | None
    dim: int | None
    reiterable: bool
    model_fingerprint: str | None = None


def _as_source(source: Any, ids: Sequence | None, chunk_size: int) -> _Source:
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise DataError(f"embeddings must be a 2-D array [rows, dim]; got shape {source.shape}")
        n = len(source)
        if ids is not None and len(ids) != n:
            raise DataError(f"{len(ids)} ids for {n} embedding rows; give one id per row")

        def array_blocks() -> Iterator[tuple[Any, np.ndarray]]:
            for s in range(0, n, chunk_size):
                block_ids = (
                    np.arange(s, min(s + chunk_size, n)) if ids is None else ids[s : s + chunk_size]
                )
                yield block_ids, source[s : s + chunk_size]

        return _Source(array_blocks, n, source.shape[1], True)
    if isinstance(source, str | os.PathLike):
        from evalkit.precompute import iter_embeddings, load_manifest

        manifest = load_manifest(source)
        return _Source(
            lambda: iter(iter_embeddings(source)),
            int(manifest["rows"]),
            int(manifest["dim"]),
            True,
            manifest.get("model_fingerprint"),
        )
    if callable(source):
        return _Source(lambda: iter(source()), None, None, True)
    iterator = iter(source)
    used = []

    def once() -> Iterator[tuple[Any, np.ndarray]]:
        if used:
            raise EvalkitError(
                "this embedding stream was already consumed; pass a callable that reopens it"
            )
        used.append(True)
        return iterator

    return _Source(once, None, None, False)


def _sample(src: _Source, size: int, seed: int, budget: int) -> tuple[np.ndarray, int, int]:
    """(sample [<=size, dim], rows, dim) by reservoir sampling over one pass (Algorithm R, applied
    a block at a time: row t replaces slot j ~ U[0, t] when j < size). The reservoir takes at most
    a quarter of the memory budget."""
    rng = np.random.default_rng(seed)
    reservoir: np.ndarray | None = None
    seen = 0
    for _, vectors in src.blocks():
        v = np.asarray(vectors)
        if v.ndim != 2:
            raise DataError(f"embedding blocks must be 2-D [rows, dim]; got shape {v.shape}")
        if reservoir is None:
            size = max(1, min(size, budget // 4 // (4 * v.shape[1])))
            reservoir = np.empty((size, v.shape[1]), dtype=np.float32)
        elif v.shape[1] != reservoir.shape[1]:
            raise DataError(
                f"embedding dimension changes from {reservoir.shape[1]} to {v.shape[1]}"
            )
        fill = max(0, min(size - seen, len(v)))
        reservoir[seen : seen + fill] = v[:fill]
        if fill < len(v):
            t = np.arange(seen + fill, seen + len(v))
            j = (rng.random(len(t)) * (t + 1)).astype(np.int64)
            keep = j < size
            reservoir[j[keep]] = v[fill:][keep]
        seen += len(v)
    if reservoir is None or seen == 0:
        raise DataError("no embeddings to index (the source is empty)")
    return reservoir[: min(size, seen)], seen, reservoir.shape[1]


def _train_size(index: Any, rows: int, dim: int, budget: int) -> int:
    """Rows to train on: 64 per IVF list (>= 39 that FAISS asks for), >= 10,000 for PQ codebooks,
    all rows when there are fewer, and at most a quarter of the memory budget."""
    faiss = _faiss()
    want = 20_000
    try:
        want = max(want, 64 * faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        pass
    cap = max(1_000, budget // 4 // (4 * dim))
    return int(min(rows, want, cap, 1_000_000))


# ----------------------------------------------------------------------------- build / load


def build_index(
    source: Any,
    *,
    spec: str | None = None,
    ids: Sequence | None = None,
    metric: str = "cosine",
    memory_budget: str | int = "4G",
    model_fingerprint: str | None = None,
    out: str | os.PathLike | None = None,
    chunk_size: int = 65536,
    train_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> EmbeddingIndex:
    """Build a FAISS index over embeddings and (with `out`) save it.

    `source`: an array [rows, dim] (ids = `ids` or 0..rows-1); a precompute output directory
    (evalkit.precompute; its model fingerprint is recorded); a callable returning an iterator of
    (ids, vectors) blocks (read twice: sample, then add); or such an iterator (read once: trained
    on its first rows). `spec`: any FAISS factory string ('Flat', 'HNSW32', 'IVF1024,Flat',
    'OPQ16,IVF1024,PQ16', ...) or None/'auto' to let `choose_index` decide.
    """
    faiss = _faiss()
    fmetric = _faiss_metric(metric)
    budget = parse_size(memory_budget)
    if chunk_size <= 0:
        raise EvalkitError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    src = _as_source(source, ids, chunk_size)
    fingerprint = model_fingerprint or src.model_fingerprint
    t0 = time.perf_counter()

    sample, rows, dim = None, src.rows, src.dim
    head: list[tuple[Any, np.ndarray]] = []
    if src.reiterable and (rows is None or dim is None):
        sample, rows, dim = _sample(src, 50_000, seed, budget)  # the counting pass also samples
    elif not src.reiterable:  # one-shot stream: look at the first block for the dimension
        stream = src.blocks()
        first = next(stream, None)
        if first is None:
            raise DataError("no embeddings to index (the source is empty)")
        head.append(first)
        dim = np.asarray(first[1]).shape[1]

    auto = spec is None or str(spec).strip().lower() in ("", "auto")
    if auto:
        if rows is None:
            raise EvalkitError(
                "choosing an index needs the row count; pass spec= or a re-readable source"
            )
        choice = choose_index(rows, dim, budget)
        spec, reason, search_params = choice.spec, choice.reason, dict(choice.search_params)
    else:
        spec, reason, search_params = str(spec).strip(), "given", {}
    try:
        index = faiss.index_factory(dim, spec, fmetric)
    except RuntimeError as exc:
        raise EvalkitError(
            f"FAISS cannot build index spec {spec!r} for dimension {dim} "
            f"({str(exc).strip().splitlines()[-1][:200]}); see the FAISS index_factory docs"
        ) from exc
    if not search_params:
        grid = parameter_grid(index)
        search_params = grid[len(grid) // 2] if grid[0] else {}
        if "efSearch" in search_params:
            search_params = {"efSearch": 64}

    train_rows = 0
    if not index.is_trained:
        n_train = train_size or _train_size(index, rows or 10**9, dim, budget)
        if src.reiterable:
            if sample is None or (len(sample) < n_train and len(sample) < rows):
                sample, rows, _ = _sample(src, n_train, seed, budget)
            x = sample
            if len(sample) > n_train:  # a random subset of a uniform sample is uniform
                pick = np.random.default_rng(seed).choice(len(sample), n_train, replace=False)
                x = sample[np.sort(pick)]
        else:
            buffered = sum(len(v) for _, v in head)
            for block in stream:
                head.append(block)
                buffered += len(block[1])
                if buffered >= n_train:
                    break
            x = np.concatenate([np.asarray(v) for _, v in head])[:n_train]
            log.warning("training %s on the first %d rows of a one-shot stream", spec, len(x))
        x = _prepare(x, metric)
        train_rows = len(x)
        log.info("training %s on %d rows", spec, train_rows)
        index.train(x)
        del x
    sample = None

    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    writer = _IdWriter(None if out is None else Path(out) / IDS_FILE)
    blocks = _chain(head, stream) if not src.reiterable else src.blocks()
    bar = _progress(progress, rows, f"adding to {spec}")
    added = 0
    for block_ids, vectors in blocks:
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape[1] != dim:
            raise DataError(f"embedding block of shape {v.shape} does not match dimension {dim}")
        n_ids = len(block_ids)
        if n_ids != len(v):
            raise DataError(f"a block has {n_ids} ids for {len(v)} embedding rows")
        for s in range(0, len(v), chunk_size):
            index.add(_prepare(v[s : s + chunk_size], metric))
        writer.write(block_ids)
        added += len(v)
        if bar is not None:
            bar.update(len(v))
    if bar is not None:
        bar.close()
    if added == 0:
        raise DataError("no embeddings to index (the source is empty)")
    id_array = writer.close()
    meta = {
        "format": FORMAT,
        "spec": spec,
        "metric": metric,
        "faiss_metric": "l2" if metric == "l2" else "inner_product",
        "normalize": metric == "cosine",
        "dim": int(dim),
        "rows": int(index.ntotal),
        "id_type": str(id_array.type),
        "model_fingerprint": fingerprint,
        "auto": auto,
        "choice_reason": reason,
        "memory_budget": budget,
        "train_rows": train_rows,
        "chunk_size": chunk_size,
        "seed": seed,
        "search_params": search_params,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "faiss_version": getattr(faiss, "__version__", "?"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result = EmbeddingIndex(index, id_array, meta, Path(out) if out is not None else None)
    set_search_params(index, search_params)
    if out is not None:
        result.save(out)
    return result


def _chain(head: list, stream: Iterator) -> Iterator:
    yield from head
    yield from stream


def _progress(enabled: bool, total: int | None, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True)


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
