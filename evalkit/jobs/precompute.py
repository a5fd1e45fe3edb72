"""The resumable embedding precompute job: DATA column -> Arrow IPC shards + manifest.json.

1. Plan (pure, `plan_shards`): the job's rows are `[rows*I//N, rows*(I+1)//N)` for `--shard I/N`
   (disjoint and complete over I = 0..N-1, under any scheduler); they are cut at global multiples
   of `rows_per_shard`, so shard files have the same names however the job is split.
2. Refuse an output directory made with another model fingerprint, dtype, input, column, shard
   size or format (FingerprintMismatchError / StoreError) unless `overwrite=True`.
3. Verify shards the manifest lists as done: the file (size + BLAKE2b), then, in one read pass
   over their rows, the input (`shards.RowDigest` of texts and ids as read, recorded as
   `input_xxh128`). A shard whose input changed since (e.g. a same-size edit the sampled input
   fingerprint cannot see) is re-encoded, with a warning; the others are skipped.
4. Stream the input (evalkit.data.readers.iter_batches, only the text and id columns) through one
   StreamingEncoder that reads the store but does not write it; write each shard to a temp file
   in DIR as windows arrive (`id`, `key`: the store key of the text, `embedding`:
   fixed_size_list<float32|float16>[dim]), each window's batch fsync'ed and then named in a
   journal beside it (`evalkit.jobs._partial`); finished: `os.replace` into place, then rewrite
   the manifest the same way. A kill -9 loses at most the window in progress of each shard: a
   rerun copies the finished windows of a dead writer's temp file (journal-checked, and checked
   against the input: ids, and keys = this model's keys of the texts) and encodes from the next
   window on, which gives the uninterrupted run's bytes (`resumed_rows` in the run log).
5. When every shard of the run is written, put the job's shards into the store
   (`shards.import_into_store`: keys and vectors from the files, no second pass over the texts).

Why the store is written only at the end: a window's bytes depend on which of its texts hit
(the misses are encoded together, and a batch's padding changes the last bits of a vector), so a
window may hit only what was in the store before the job started. Then a shard's bytes depend
only on its texts and that store, never on how many workers run, in which order, or on a kill:
`--workers N` (evalkit.jobs.precompute_workers) and Ray (evalkit.jobs.precompute_ray) run the
same per-shard writer (`_write_shard`) and give byte-identical shards and stable manifests.

One manifest per job: `manifest.json` for 1/1, `manifest-IIIII-of-NNNNN.json` for `--shard I/N`,
so N jobs can share one DIR; `load_manifest` merges them.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._io import out_dir_problem
from evalkit.embed.shards import (
    _SHARD_GLOB,
    DEFAULT_ROWS_PER_SHARD,
    FORMAT,
    ID_COLUMN,
    KEY_COLUMN,
    VECTOR_COLUMN,
    RowDigest,
    _atomic_write_json,
    _file_digest,
    _manifest_name,
    _manifests,
    _read_json,
    parse_shard,
    plan_shards,
    shard_name,
)
from evalkit.errors import DataError, EvalkitError, FingerprintMismatchError, StoreError
from evalkit.jobs._inputs import checked_input, input_fingerprint, read_columns  # noqa: F401
from evalkit.jobs._partial import forget, job_window

logger = logging.getLogger(__name__)


class _RowReader:
    """Row cursor over record batches: skip_to(row), then take(n) batch slices."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = batches
        self._current = None
        self.row = 0

    def _next(self) -> Any:
        if self._current is None or len(self._current) == 0:
            self._current = next(self._batches, None)
        return self._current

    def skip_to(self, row: int) -> None:
        while self.row < row:
            cur = self._next()
            if cur is None:
                raise DataError(
                    f"input ended at row {self.row}, before row {row}; did it change while encoding?"
                )
            step = min(len(cur), row - self.row)
            self._current, self.row = cur.slice(step), self.row + step

    def take(self, n: int) -> Iterator[Any]:
        while n > 0:
            cur = self._next()
            if cur is None:
                raise DataError(f"input ended at row {self.row}; did it change while encoding?")
            piece, self._current = cur.slice(0, n), cur.slice(n)
            self.row += len(piece)
            n -= len(piece)
            yield piece


def run_precompute(
    data: Any,
    *,
    column: str,
    out: str | os.PathLike,
    id_column: str | None = None,
    model: Any = None,
    cache: Any = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "float32",
    shard: tuple[int, int] | str = (0, 1),
    overwrite: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    window: int | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
    normalize: bool = False,
    progress: bool = True,
    **source_options: Any,
) -> dict:
    """Encode column `column` of `data` into Arrow shards under `out`; returns the manifest.

    `cache`: store directory (None: $EVALKIT_CACHE or ./cache; False: no store). The manifest's
    "last_run" holds this run's rows/hits/misses/seconds and the shards it skipped.
    """
    from evalkit.data import readers as arrow
    from evalkit.embed.encoder import EncodeStats, StreamingEncoder
    from evalkit.embed.store import EmbeddingStore

    shard = parse_shard(shard)
    _check_args(dtype, batch_size, rows_per_shard)
    window = job_window(rows_per_shard, window)
    out = _local_out(out)
    if problem := out_dir_problem(out):
        raise EvalkitError(problem)
    t_start = time.perf_counter()
    batches = checked_input(data, column, id_column, source_options)
    input_fp = input_fingerprint(data)
    rows = arrow.count_rows(data, **source_options)
    if rows == 0:
        raise DataError(f"{data} has no rows to encode")
    store = None if cache is False else EmbeddingStore(cache, dtype=dtype)
    encoder = StreamingEncoder(model, store=store, batch_size=batch_size, window=window, prompt=prompt,
                               prompt_name=prompt_name, normalize=normalize, device=device, dtype=dtype,
                               write_store=False)  # fmt: skip
    stats = EncodeStats()
    try:
        manifest = _prepare(out, encoder, input_fp, rows, column, id_column, dtype, shard,
                            rows_per_shard, overwrite, data, model)  # fmt: skip
        plan = plan_shards(rows, shard, rows_per_shard)
        manifest.setdefault("runs", []).append(
            {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": 0, "hits": 0, "misses": 0}
        )

        done, changed = _resumable(out, manifest, plan, batches, column, id_column)
        todo = [r for r in plan if r not in done]
        if todo:
            _encode_shards(out, manifest, encoder, batches(), todo, (column, id_column, dtype),
                           (shard, plan), stats, progress)  # fmt: skip
        encoder.close()
        manifest = _save(out, manifest, shard, plan, stats)
        imported = import_finished(out, manifest, store) if todo else 0
    finally:
        encoder.close()
    manifest["last_run"] = {
        "rows": stats.rows,
        "hits": stats.hits,
        "misses": stats.misses,
        "duplicates": stats.duplicates,
        "resumed_rows": stats.resumed,
        "skipped_shards": len(done),
        "written_shards": len(todo),
        "reencoded_shards": [changed[r] for r in plan if r in changed],
        "imported_rows": imported,
        "startup_s": round(encoder.load_s, 3),
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    return manifest


def import_finished(out: Any, manifest: dict, store: Any) -> int:
    """Put the job's finished shards into `store` (step 5); returns the rows put."""
    from evalkit.embed.shards import import_into_store

    if store is None or not manifest["shards"]:
        return 0
    files = [s["file"] for s in manifest["shards"]]
    return import_into_store(out, store, files=files, manifest=manifest)["rows"]


def _local_out(out: Any) -> Path:
    if "://" in str(out):
        raise EvalkitError(
            f"--out {out}: write to a remote folder with run_precompute_workers or run_precompute_ray"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvalkitError(f"--out {out} is a file; give a directory")
    return out


def _check_args(dtype: str, batch_size: Any, rows_per_shard: Any) -> None:
    from evalkit.embed.store import DTYPES

    if dtype not in DTYPES:
        raise EvalkitError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("rows_per_shard", rows_per_shard)):
        if not isinstance(value, int) or value <= 0:
            raise EvalkitError(f"{name} must be a positive integer; got {value!r}")


def _encode_shards(out, manifest, encoder, batches, todo, cols, job, stats, progress) -> None:
    """Write each unfinished shard in row order, saving the manifest after each one."""
    column, id_column, dtype = cols
    shard, plan = job
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(b - a for a, b in todo)
        bar = tqdm(total=total, unit="rows", desc=f"encode {out.name}", dynamic_ncols=True)
    try:
        reader = _RowReader(batches)
        for a, b in todo:
            reader.skip_to(a)
            entry = _write_shard(out, encoder, reader, a, b, column, id_column, dtype, stats, bar)
            manifest["shards"].append(entry)
            manifest["shards"].sort(key=lambda s: s["start"])
            _save(out, manifest, shard, plan, stats)
            forget(out, entry["file"])  # listed: its journal is no longer needed
    finally:
        if bar is not None:
            bar.close()


def _prepare(
    out,
    encoder,
    input_fp,
    rows,
    column,
    id_column,
    dtype,
    shard,
    rows_per_shard,
    overwrite,
    data,
    model,
) -> dict:
    expected = {
        "model_fingerprint": encoder.fingerprint,
        "input_fingerprint": input_fp,
        "column": column,
        "id_column": id_column,
        "dtype": dtype,
        "dim": encoder.dim,
        "rows": rows,
        "rows_per_shard": rows_per_shard,
    }
    existing = _manifests(out) if out.is_dir() else []
    if existing and overwrite:
        for path in [
            *out.glob("manifest*.json"),
            *out.glob(_SHARD_GLOB),
            *out.glob(".*.tmp-*"),
            *out.glob(".*.journal-*"),
        ]:
            path.unlink()
        existing = []
    for old in existing:
        if old.get("format") != FORMAT:
            raise StoreError(
                f"{out} was written by an older evalkit (format {old.get('format')!r}, no key "
                "column); use another --out or pass --overwrite"
            )
        if old.get("model_fingerprint") != encoder.fingerprint:
            raise FingerprintMismatchError(
                f"{out} holds embeddings of another model (fingerprint {old.get('model_fingerprint')}, "
                f"this one is {encoder.fingerprint}); use another --out or pass --overwrite"
            )
        for key, value in expected.items():
            if old.get(key) != value:
                raise StoreError(
                    f"{out} was made with {key}={old.get(key)!r}, this run has {value!r}; "
                    "use another --out or pass --overwrite"
                )
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out, _manifest_name(shard))  # a manifest write torn by a kill
    mine = out / _manifest_name(shard)
    if mine.exists():
        return _read_json(mine)
    from evalkit import __version__

    return {
        "format": FORMAT,
        "evalkit_version": __version__,
        "model": str(model) if model is not None else "all-MiniLM-L6-v2",
        "input": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
        **expected,
        "prompt": encoder.prompt,
        "normalize": encoder.normalize,
        "shard": list(shard),
        "columns": {"id": ID_COLUMN, "key": KEY_COLUMN, "vector": VECTOR_COLUMN},
        "shards": [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _verified(out: Path, manifest: dict, plan: list[tuple[int, int]]) -> dict:
    """Shards listed as done whose file still has its recorded size and digest."""
    wanted = set(plan)
    done = {}
    for entry in manifest.get("shards", []):
        key = (entry["start"], entry["end"])
        path = out / entry["file"]
        if (
            key in wanted
            and path.is_file()
            and path.stat().st_size == entry["bytes"]
            and _file_digest(path) == entry["blake2b"]
        ):
            done[key] = entry
    return done


def _resumable(out: Path, manifest: dict, plan: list, batches: Any, column, id_column) -> tuple:
    """(done, changed): the shards to keep (file and input verified, now the manifest's list)
    and {(start, end): file} of those re-encoded because their input changed."""
    done = _verified(out, manifest, plan)
    changed = _changed_inputs(done, batches, column, id_column)
    done = {r: e for r, e in done.items() if r not in changed}
    manifest["shards"] = [done[r] for r in plan if r in done]
    return done, changed


def _changed_inputs(done: dict, batches: Any, column: str, id_column: str | None) -> dict:
    """{(start, end): file} of the done shards whose input rows no longer match the digest
    recorded when they were written (one read pass over those rows; none if nothing is done)."""
    changed: dict = {}
    if not done:
        return changed
    reader = _RowReader(batches())
    for a, b in sorted(done):
        reader.skip_to(a)
        digest = RowDigest()
        for piece in reader.take(b - a):
            digest.update(*_digest_columns(piece, column, id_column))
        entry = done[(a, b)]
        if digest.hexdigest() != entry.get("input_xxh128"):
            logger.warning(
                "input rows %d..%d changed since %s was written; re-encoding it",
                a,
                b,
                entry["file"],
            )
            changed[(a, b)] = entry["file"]
    return changed


def _digest_columns(piece: Any, column: str, id_column: str | None) -> list:
    """The columns a shard's input digest covers: the texts, and the ids when they are read."""
    from evalkit.data.beir import document_texts

    return [document_texts(piece, column)] + ([piece.column(id_column)] if id_column else [])


def _save(out: Path, manifest: dict, shard, plan, stats) -> dict:
    runs = manifest.setdefault("runs", [])
    runs[-1].update(rows=stats.rows, hits=stats.hits, misses=stats.misses)
    if stats.resumed:
        runs[-1]["resumed_rows"] = stats.resumed
    manifest["counts"] = {
        "rows_done": sum(s["rows"] for s in manifest["shards"]),
        "hits": sum(r["hits"] for r in runs),
        "misses": sum(r["misses"] for r in runs),
    }
    manifest["row_range"] = [plan[0][0], plan[-1][1]] if plan else [0, 0]
    manifest["complete"] = {(s["start"], s["end"]) for s in manifest["shards"]} == set(plan)
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _atomic_write_json(out / _manifest_name(shard), manifest)
    return manifest


def _write_shard(out, encoder, reader, a, b, column, id_column, dtype, stats, bar) -> dict:
    import pyarrow as pa

    from evalkit.data.beir import document_texts
    from evalkit.embed.store import KEY_BYTES, make_keys
    from evalkit.jobs._partial import ShardFile, resume

    np_dtype = np.float16 if dtype == "float16" else np.float32
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    ids: collections.deque = collections.deque()
    digest = RowDigest()
    keys: collections.deque = collections.deque()
    fingerprint = encoder.fingerprint
    name = shard_name(a, b)
    expect = {"fingerprint": fingerprint, "dtype": dtype, "dim": encoder.dim}
    header = {"format": FORMAT, "start": a, "rows": b - a, "window": encoder.window, **expect}
    sink = ShardFile(out, name, header)
    try:
        consume = lambda piece: digest.update(*_digest_columns(piece, column, id_column))  # noqa: E731
        resumed, pending = resume(out, name, header, {**expect, "column": column,
                                  "id_column": id_column}, reader, sink, consume)  # fmt: skip
        stats.resumed += resumed
        if bar is not None and resumed:
            bar.update(resumed)
        first = a + resumed
        left = b - first - sum(len(p) for p in pending)

        def texts() -> Iterator[Any]:
            row = first
            for piece in _chain(pending, reader, left):
                consume(piece)
                ids.append(
                    piece.column(id_column)
                    if id_column
                    else pa.array(np.arange(row, row + len(piece), dtype=np.int64))
                )
                text = document_texts(piece, column)
                # a non-string text gets a placeholder key: the encoder refuses its window anyway
                plain = [t if isinstance(t, str) else "" for t in text.to_pylist()]
                keys.append(pa.array(make_keys(fingerprint, plain), type=pa.binary(KEY_BYTES)))
                row += len(piece)
                yield text

        update = None if bar is None else bar.update
        for block in encoder.iter_encode(texts(), stats=stats, first_row=first, on_progress=update):
            vec = pa.FixedSizeListArray.from_arrays(
                pa.array(block.astype(np_dtype).reshape(-1), type=value_type), block.shape[1]
            )
            sink.write(
                pa.record_batch(
                    [_take_ids(ids, len(block)), _take_ids(keys, len(block)), vec],
                    names=[ID_COLUMN, KEY_COLUMN, VECTOR_COLUMN],
                )
            )
            if bar is not None:
                bar.set_postfix(hits=stats.hits, misses=stats.misses, refresh=False)
        if sink.empty:
            raise DataError(f"no rows in [{a}, {b})")
        sink.finish(out / name)
    except BaseException as exc:
        sink.abort(
            keep=isinstance(exc, KeyboardInterrupt)
        )  # Ctrl-C: a rerun resumes, as after kill
        raise
    return {
        "file": name,
        "start": a,
        "end": b,
        "rows": b - a,
        "bytes": (out / name).stat().st_size,
        "blake2b": _file_digest(out / name),
        "input_xxh128": digest.hexdigest(),
    }


def _chain(pending: list, reader: _RowReader, left: int) -> Iterator[Any]:
    """The input pieces read back for a window that was not recovered, then the shard's rest."""
    yield from pending
    yield from reader.take(left)


def _remove_stale_temps(out: Path, name: str) -> None:
    """Temp files of this manifest left by a killed process (whose pid is gone) are removed."""
    from evalkit.jobs._partial import writer_alive

    for tmp in out.glob(f".{name}.tmp-*"):
        if not writer_alive(tmp):
            tmp.unlink(missing_ok=True)


def _take_ids(ids: collections.deque, n: int) -> Any:
    import pyarrow as pa

    parts, need = [], n
    while need:
        head = ids.popleft()
        if len(head) > need:
            ids.appendleft(head.slice(need))
            head = head.slice(0, need)
        parts.append(head)
        need -= len(head)
    return parts[0] if len(parts) == 1 else pa.concat_arrays(parts)
