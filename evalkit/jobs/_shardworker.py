"""One precompute worker: a model on one device that writes whole shards of the job's plan.

Used by both scale-out backends (a process per device, `evalkit.jobs.precompute_workers`; a Ray
actor per GPU or CPU slot, `evalkit.jobs.precompute_ray`):

1. start: limit torch to this worker's share of the CPU threads, open the node's store (read
   only during the job) and a StreamingEncoder on the worker's device; `describe()` reports the
   fingerprint, dim, prompt and normalize flag the driver checks and records;
2. `encode(a, b)`: open the input at the file / row group holding row `a`
   (`readers.iter_batches_from`), skip to `a`, and run the single-process job's own shard
   writer (`precompute._write_shard`) into the output folder (local) or a node-local staging
   folder that is then uploaded whole (s3://); returns the manifest entry and the tallies;
3. `verify(entries)`: the entries whose file still has its recorded size and BLAKE2b;
4. `import_shards(files)`: put finished shards into the node's store (after the whole job).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from evalkit.embed.shards import OutputDir, digest_bytes


class _Progress:
    """The two calls `_write_shard` makes on a progress bar, forwarded to a callback."""

    def __init__(self, on_rows: Any) -> None:
        self._on_rows = on_rows

    def update(self, n: int) -> None:
        if self._on_rows is not None and n:
            self._on_rows(int(n))

    def set_postfix(self, **_: Any) -> None:
        pass


def cpu_threads(workers: int) -> int:
    """The CPU threads each of `workers` workers on this node gets (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


class ShardWorker:
    """`spec`: the job's settings (see `job_spec` in evalkit.jobs.precompute_workers)."""

    def __init__(self, spec: dict, device: str, threads: int | None = None) -> None:
        import torch

        from evalkit.embed.encoder import StreamingEncoder
        from evalkit.embed.store import EmbeddingStore

        if threads:
            torch.set_num_threads(threads)
        self.spec, self.device = spec, device
        cache = spec["cache"]
        self.store = None if cache is False else EmbeddingStore(cache, dtype=spec["dtype"])
        self.encoder = StreamingEncoder(
            spec["model"], store=self.store, batch_size=spec["batch_size"], window=spec["window"],
            prompt=spec["prompt"], prompt_name=spec["prompt_name"], normalize=spec["normalize"],
            device=device, dtype=spec["dtype"], write_store=False,
        )  # fmt: skip
        self.out = OutputDir(spec["out"])
        self._staging: Path | None = None

    def describe(self) -> dict:
        enc = self.encoder
        return {
            "fingerprint": enc.fingerprint,
            "dim": enc.dim,
            "prompt": enc.prompt,
            "normalize": enc.normalize,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": self.device,
            "store": str(self.store.directory) if self.store is not None else None,
        }

    def _folder(self) -> Path:
        """Where shard files are written: the output folder, or node-local staging for s3://."""
        if not self.out.remote:
            self.out.local.mkdir(parents=True, exist_ok=True)
            return self.out.local
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="evalkit-shards-"))
        return self._staging

    def encode(self, a: int, b: int, on_rows: Any = None) -> tuple[dict, dict]:
        from evalkit.data.beir import text_columns
        from evalkit.data.readers import iter_batches_from
        from evalkit.embed.encoder import EncodeStats
        from evalkit.jobs.precompute import _RowReader, _write_shard, read_columns

        spec = self.spec
        column, id_column = spec["column"], spec["id_column"]
        columns = read_columns(column, id_column)
        first, batches = iter_batches_from(spec["data"], a, columns=columns,
                                           text_columns=text_columns(column),
                                           **spec["source_options"])  # fmt: skip
        reader = _RowReader(batches)
        reader.row = first
        reader.skip_to(a)
        stats = EncodeStats()
        folder = self._folder()
        entry = _write_shard(folder, self.encoder, reader, a, b, column, id_column, spec["dtype"],
                             stats, _Progress(on_rows))  # fmt: skip
        if self.out.remote:
            self.out.put_file(folder / entry["file"], entry["file"])
        tallies = {
            k: getattr(stats, k) for k in ("rows", "hits", "misses", "duplicates", "resumed")
        }
        return entry, tallies

    def verify(self, entries: list[dict]) -> list[str]:
        """The files of `entries` that still have their recorded size and BLAKE2b."""
        good = []
        for entry in entries:
            if self.out.size(entry["file"]) != entry["bytes"]:
                continue
            if digest_bytes(self.out.read_buffer(entry["file"])) == entry["blake2b"]:
                good.append(entry["file"])
        return good

    def import_shards(self, manifest: dict, files: list[str]) -> int:
        """Put `files` (finished shards of the job) into this node's store; rows put."""
        from evalkit.embed.shards import import_into_store

        if self.store is None or not files:
            return 0
        return import_into_store(self.out, self.store, files=files, manifest=manifest)["rows"]

    def close(self) -> None:
        self.encoder.close()
        if self.store is not None:
            self.store.close()
