"""Building a FAISS index from streamed embeddings, in bounded memory.

1) plan: with no spec, `choose_index(rows, dim, memory_budget)` (`evalkit.search.plan`) picks a
   FAISS factory string from the row count, the dimension and the memory budget, and says why;
2) sample: an index that needs training (IVF, PQ, OPQ, ...) is trained on a uniform sample of the
   rows (a reservoir over one pass when the source can be read twice, else its first rows);
3) add: the rows are added in chunks at positions 0..n-1 (cosine: each chunk is L2-normalised and
   searched by inner product), while the data's ids stream into an Arrow file beside the index;
3b) tune: the auto choice's default search setting is the cheapest of its grid reaching
   recall@10 >= 0.96 on 1,000 sampled rows against exact search (`evalkit.search.tune`);
4) save: `index.faiss`, `ids.arrow` and the sidecar `index.json` (spec, metric, dim, rows, model
   fingerprint, build parameters), each written to a temporary file and moved into place.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._io import out_dir_problem
from evalkit.errors import DataError, EvalkitError
from evalkit.search.index import (
    FORMAT,
    IDS_FILE,
    EmbeddingIndex,
    IdWriter,
    _faiss,
    _faiss_metric,
    _prepare,
    parameter_grid,
    set_search_params,
)
from evalkit.search.plan import choose_index, parse_size

log = logging.getLogger(__name__)


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
        from evalkit.embed.shards import iter_embeddings, load_manifest

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
    tune: bool = True,
) -> EmbeddingIndex:
    """Build a FAISS index over embeddings and (with `out`) save it.

    `source`: an array [rows, dim] (ids = `ids` or 0..rows-1); a precompute output directory
    (evalkit.jobs.precompute; its model fingerprint is recorded); a callable returning an iterator of
    (ids, vectors) blocks (read twice: sample, then add); or such an iterator (read once: trained
    on its first rows). `spec`: any FAISS factory string ('Flat', 'HNSW32', 'IVF1024,Flat',
    'OPQ16,IVF1024,PQ16', ...) or None/'auto' to let `choose_index` decide; the auto choice's
    default search setting is then tuned on sampled rows of a re-readable source
    (`evalkit.search.tune`, unless `tune=False`).
    """
    if out is not None and (problem := out_dir_problem(out)):
        raise EvalkitError(problem)  # before any work, not after the index is built
    faiss = _faiss()
    fmetric = _faiss_metric(metric)
    budget = parse_size(memory_budget)
    if chunk_size <= 0:
        raise EvalkitError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    src = _as_source(source, ids, chunk_size)
    fingerprint = model_fingerprint or src.model_fingerprint
    t0 = time.perf_counter()

    state = _Peek(src, seed, budget)
    plan = _plan(spec, state.rows, state.dim, budget, fmetric)
    train_rows = _train(plan, state, src, train_size, seed, budget, metric)

    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    id_array = _add(plan, state, src, out, chunk_size, metric, progress)
    tuned = _tune(plan, src, id_array, metric, seed) if tune else None
    meta = {
        "format": FORMAT,
        "spec": plan.spec,
        "metric": metric,
        "faiss_metric": "l2" if metric == "l2" else "inner_product",
        "normalize": metric == "cosine",
        "dim": int(state.dim),
        "rows": int(plan.index.ntotal),
        "id_type": str(id_array.type),
        "model_fingerprint": fingerprint,
        "auto": plan.auto,
        "choice_reason": plan.reason,
        "memory_budget": budget,
        "train_rows": train_rows,
        "chunk_size": chunk_size,
        "seed": seed,
        "search_params": plan.search_params,
        "tuned": tuned,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "faiss_version": getattr(faiss, "__version__", "?"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result = EmbeddingIndex(plan.index, id_array, meta, Path(out) if out is not None else None)
    set_search_params(plan.index, plan.search_params)
    if out is not None:
        result.save(out)
    return result


class _Peek:
    """What is learnt about a source before planning: its rows and dimension (a counting pass
    over a re-readable source of unknown size, which also samples), or, for a one-shot stream, its
    first block (kept in `head`, to be indexed with the rest of `stream`)."""

    def __init__(self, src: _Source, seed: int, budget: int) -> None:
        self.sample: np.ndarray | None = None
        self.rows, self.dim = src.rows, src.dim
        self.head: list[tuple[Any, np.ndarray]] = []
        self.stream: Iterator[tuple[Any, np.ndarray]] | None = None
        if src.reiterable and (self.rows is None or self.dim is None):
            self.sample, self.rows, self.dim = _sample(src, 50_000, seed, budget)
        elif not src.reiterable:  # one-shot stream: look at the first block for the dimension
            self.stream = src.blocks()
            first = next(self.stream, None)
            if first is None:
                raise DataError("no embeddings to index (the source is empty)")
            self.head.append(first)
            self.dim = np.asarray(first[1]).shape[1]


@dataclass
class _Plan:
    """Step 1's outcome: the empty FAISS index, its factory string, default search parameters,
    whether it was the auto choice and why."""

    index: Any
    spec: str
    reason: str
    search_params: dict[str, int]
    auto: bool


def _plan(spec: str | None, rows: int | None, dim: int, budget: int, fmetric: int) -> _Plan:
    """Step 1: the factory string (given, or `choose_index`'s) and an empty index made from it."""
    faiss = _faiss()
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
    return _Plan(index, spec, reason, search_params, auto)


def _train(
    plan: _Plan,
    state: _Peek,
    src: _Source,
    train_size: int | None,
    seed: int,
    budget: int,
    metric: str,
) -> int:
    """Step 2: train an index that needs it on a uniform sample (or a one-shot stream's first
    rows, buffered in `state.head`); returns the number of training rows (0: none needed)."""
    index, rows, dim = plan.index, state.rows, state.dim
    if index.is_trained:
        state.sample = None
        return 0
    n_train = train_size or _train_size(index, rows or 10**9, dim, budget)
    if src.reiterable:
        sample = state.sample
        if sample is None or (len(sample) < n_train and len(sample) < rows):
            sample, state.rows, _ = _sample(src, n_train, seed, budget)
        x = sample
        if len(sample) > n_train:  # a random subset of a uniform sample is uniform
            pick = np.random.default_rng(seed).choice(len(sample), n_train, replace=False)
            x = sample[np.sort(pick)]
    else:
        buffered = sum(len(v) for _, v in state.head)
        for block in state.stream:
            state.head.append(block)
            buffered += len(block[1])
            if buffered >= n_train:
                break
        x = np.concatenate([np.asarray(v) for _, v in state.head])[:n_train]
        log.warning("training %s on the first %d rows of a one-shot stream", plan.spec, len(x))
    x = _prepare(x, metric)
    train_rows = len(x)
    log.info("training %s on %d rows", plan.spec, train_rows)
    index.train(x)
    state.sample = None
    return train_rows


def _add(
    plan: _Plan,
    state: _Peek,
    src: _Source,
    out: str | os.PathLike | None,
    chunk_size: int,
    metric: str,
    progress: bool,
):
    """Step 3: add every block in chunks at positions 0..n-1 while the ids stream to the Arrow
    file; returns the ids as an Arrow array."""
    index, dim = plan.index, state.dim
    writer = IdWriter(None if out is None else Path(out) / IDS_FILE)
    blocks = _chain(state.head, state.stream) if not src.reiterable else src.blocks()
    bar = _progress(progress, state.rows, f"adding to {plan.spec}")
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
    return writer.close()


def _tune(plan: _Plan, src: _Source, id_array, metric: str, seed: int) -> dict | None:
    """Step 3b: the auto choice's default setting, tuned on sampled rows of a re-readable source
    (`evalkit.search.tune`); None when not tuned (a given spec, a one-shot stream, l2, one
    setting only)."""
    from evalkit.search.tune import tune_params

    rows = int(plan.index.ntotal)
    if not plan.auto or not src.reiterable or metric == "l2" or rows < 2:
        return None
    set_search_params(plan.index, plan.search_params)  # e.g. the refine factor the grid keeps
    if len(parameter_grid(plan.index)) < 2:
        return None
    index = EmbeddingIndex(plan.index, id_array, {"spec": plan.spec, "metric": metric})
    plan.search_params, report = tune_params(index, src.blocks, rows, metric=metric, seed=seed)
    log.info(
        "auto index %s: default search setting %s (%s)",
        plan.spec,
        plan.search_params,
        report["chosen"],
    )
    return report


def _chain(head: list, stream: Iterator) -> Iterator:
    yield from head
    yield from stream


def _progress(enabled: bool, total: int | None, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True)
