"""The driver of a scaled-out precompute: one manifest, whole shards handed to many workers.

Shared by `--workers N` (evalkit.jobs.precompute_workers) and Ray (evalkit.jobs.precompute_ray);
it keeps the single-process job's files and rules (evalkit.jobs.precompute), so the outputs are
the same bytes:

1. at the door, before any worker starts: the arguments, the output folder, the input's rows,
   columns and fingerprint, the plan (`plan_shards`);
2. `start(info)`: with the workers' description (fingerprint, dim, prompt, normalize), prepare
   the manifest as the single-process job does (`precompute._prepare`: another model/input is
   refused, unless overwrite), verify the shards it lists (their files, then their input rows'
   digests, `precompute._changed_inputs`), and return the unfinished ones in plan order; an s3:// output keeps its manifest in a local mirror uploaded after each change;
3. `record(entry, tallies)`: a finished shard joins the manifest (sorted by row, rewritten
   atomically); `progress(n)`: one bar for the whole job;
4. `finish(failures, import_shards)`: save; if a worker died, fail with one line naming it and
   the rows it left (a rerun writes only the missing shards); else, once every shard of the job
   is written, let the workers put them into their node's store, and report the run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from evalkit._io import out_dir_problem
from evalkit.embed.shards import (
    DEFAULT_ROWS_PER_SHARD,
    OutputDir,
    _manifest_name,
    parse_shard,
    plan_shards,
)
from evalkit.errors import DataError, EvalkitError


class ShardJob:
    """The driver's state for one precompute job (see the module docstring)."""

    def __init__(
        self,
        data: Any,
        *,
        column: str,
        out: Any,
        id_column: str | None = None,
        model: Any = None,
        cache: Any = None,
        batch_size: int = 64,
        dtype: str = "float32",
        shard: Any = (0, 1),
        overwrite: bool = False,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
        window: int | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
        normalize: bool = False,
        progress: bool = True,
        **source_options: Any,
    ) -> None:
        from evalkit.data import readers
        from evalkit.embed.encoder import EncodeStats
        from evalkit.jobs._partial import job_window
        from evalkit.jobs.precompute import _check_args, checked_input, input_fingerprint

        self.t_start = time.perf_counter()
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise EvalkitError(
                "several workers load the model themselves: give it as a folder or name, "
                "not a loaded SentenceTransformer"
            )
        self.shard = parse_shard(shard)
        _check_args(dtype, batch_size, rows_per_shard)
        self.loc = OutputDir(out)
        if self.loc.is_file():
            raise EvalkitError(f"--out {self.loc.label} is a file; give a directory")
        if not self.loc.remote and (problem := out_dir_problem(self.loc.local)):
            raise EvalkitError(problem)
        self._scan = checked_input(data, column, id_column, source_options)  # fails fast
        self.rows = readers.count_rows(data, **source_options)
        if self.rows == 0:
            raise DataError(f"{data} has no rows to encode")
        self.input_fp = input_fingerprint(data)
        self.plan = plan_shards(self.rows, self.shard, rows_per_shard)
        self.model, self.data, self.overwrite = model, data, overwrite
        self.spec = {
            "data": _absolute(data), "column": column, "id_column": id_column,
            "model": _absolute(model), "cache": _store_path(cache), "batch_size": batch_size,
            "dtype": dtype,
            "window": job_window(rows_per_shard, window),
            "prompt": prompt,
            "prompt_name": prompt_name, "normalize": normalize, "out": self.loc.label,
            "rows_per_shard": rows_per_shard, "source_options": dict(source_options),
        }  # fmt: skip
        self.stats = EncodeStats()
        self.show_progress = progress
        self.bar = None
        self.todo: list[tuple[int, int]] = []
        self.manifest: dict = {}
        self._mirror: Path | None = None
        self.skipped = 0
        self.startup_s = 0.0
        self.changed: dict = {}

    # ----------------------------------------------------------------------------- manifest

    def _folder(self) -> Path:
        """The local folder holding the manifest: the output itself, or a mirror for s3://."""
        if not self.loc.remote:
            return self.loc.local
        if self._mirror is None:
            self._mirror = Path(tempfile.mkdtemp(prefix="evalkit-manifest-"))
            for name in self.loc.names("manifest*.json"):
                (self._mirror / name).write_bytes(self.loc.read_buffer(name).to_pybytes())
        return self._mirror

    def start(self, info: dict, verify: Any = None) -> list[tuple[int, int]]:
        """Prepare the manifest for a worker described by `info`; the unfinished shards.
        `verify(entries)` -> the files still intact (default: checked here)."""
        from evalkit.jobs.precompute import _changed_inputs, _prepare, _verified

        self.startup_s = time.perf_counter() - self.t_start  # workers started, model loaded
        spec = self.spec
        encoder = SimpleNamespace(
            **{k: info[k] for k in ("fingerprint", "dim", "prompt", "normalize")}
        )
        folder = self._folder()
        if self.loc.remote and self.overwrite:
            for name in self.loc.names("manifest*.json") + self.loc.names("embeddings-*.arrow"):
                self.loc.delete(name)
        try:
            self.manifest = _prepare(folder, encoder, self.input_fp, self.rows, spec["column"],
                                     spec["id_column"], spec["dtype"], self.shard,
                                     spec["rows_per_shard"], self.overwrite, self.data, self.model)  # fmt: skip
        except EvalkitError as exc:
            if self._mirror is None:
                raise
            raise type(exc)(str(exc).replace(str(folder), self.loc.label)) from None
        self.manifest.setdefault("runs", []).append(
            {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": 0, "hits": 0, "misses": 0}
        )
        if self.loc.remote:
            plan = set(self.plan)
            wanted = [e for e in self.manifest.get("shards", []) if (e["start"], e["end"]) in plan]
            good = set((verify or self._verify)(wanted))
            done = {(e["start"], e["end"]): e for e in wanted if e["file"] in good}
        else:
            done = _verified(folder, self.manifest, self.plan)
        self.changed = _changed_inputs(done, self._batches, spec["column"], spec["id_column"])
        done = {r: e for r, e in done.items() if r not in self.changed}
        self.manifest["shards"] = [done[r] for r in self.plan if r in done]
        self.skipped = len(done)
        self.todo = [r for r in self.plan if r not in done]
        self._save()
        if self.show_progress and self.todo:
            from tqdm.auto import tqdm

            total = sum(b - a for a, b in self.todo)
            name = self.loc.label.rstrip("/").rsplit("/", 1)[-1]
            self.bar = tqdm(total=total, unit="rows", desc=f"encode {name}", dynamic_ncols=True)
        return list(self.todo)

    def _batches(self) -> Any:
        return self._scan()

    def _verify(self, entries: list[dict]) -> list[str]:
        from evalkit.embed.shards import digest_bytes

        return [
            e["file"]
            for e in entries
            if self.loc.size(e["file"]) == e["bytes"]
            and digest_bytes(self.loc.read_buffer(e["file"])) == e["blake2b"]
        ]

    def _save(self) -> None:
        from evalkit.jobs.precompute import _save

        self.manifest = _save(self._folder(), self.manifest, self.shard, self.plan, self.stats)
        if self.loc.remote:
            self.loc.write_json(_manifest_name(self.shard), self.manifest)

    # ------------------------------------------------------------------------------ running

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def progress(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def record(self, entry: dict, tallies: dict) -> None:
        from evalkit.embed.encoder import EncodeStats

        self.stats.merge(EncodeStats(**tallies))
        self.manifest["shards"].append(entry)
        self.manifest["shards"].sort(key=lambda s: s["start"])
        self._save()
        if not self.loc.remote:  # listed: the worker's journal of this shard is no longer needed
            from evalkit.jobs._partial import forget

            forget(self.loc.local, entry["file"])
        if self.bar is not None:
            self.bar.set_postfix(hits=self.stats.hits, misses=self.stats.misses, refresh=False)

    def finish(self, failures: list[str], import_shards: Any = None) -> dict:
        """Save, fail on `failures`, import a complete job's shards via `import_shards(manifest)`
        (-> rows put), and return the manifest with this run's "last_run"."""
        self.close_bar()
        self._save()
        if failures:
            left = len(self.plan) - len(self.manifest["shards"])
            raise EvalkitError(
                f"{'; '.join(failures)}; {left} of {len(self.plan)} shards unfinished, the "
                f"others are saved in {self.loc.label}; rerun the same command to finish them"
            )
        imported = 0
        if self.todo and self.manifest["complete"] and import_shards is not None:
            imported = import_shards(self.manifest)
        stats = self.stats
        self.manifest["last_run"] = {
            "rows": stats.rows, "hits": stats.hits, "misses": stats.misses,
            "duplicates": stats.duplicates, "resumed_rows": stats.resumed,
            "skipped_shards": self.skipped,
            "written_shards": len(self.todo), "imported_rows": imported,
            "reencoded_shards": [self.changed[r] for r in self.plan if r in self.changed],
            "startup_s": round(self.startup_s, 3),
            "seconds": round(time.perf_counter() - self.t_start, 3),
        }  # fmt: skip
        return self.manifest


def _absolute(path: Any) -> Any:
    """A local path as an absolute one (workers may run in another directory); else as it is."""
    if isinstance(path, (str, os.PathLike)) and "://" not in str(path) and os.path.exists(path):
        return os.path.abspath(path)
    return path


def _store_path(cache: Any) -> Any:
    """The store folder every worker opens on its node: False (none) or an absolute path."""
    from evalkit.embed.store import default_cache_dir

    if cache is False:
        return False
    return os.path.abspath(os.fspath(cache if cache is not None else default_cache_dir()))


def check_same_model(infos: list[dict]) -> dict:
    """All workers must encode with the same fingerprint (same weights, settings and compute
    precision: a bf16 GPU and an fp16 GPU differ); -> the first description."""
    first = infos[0]
    for info in infos[1:]:
        if info["fingerprint"] != first["fingerprint"]:
            raise EvalkitError(
                f"workers disagree on the model fingerprint: {first['device']} on {first['host']} "
                f"gives {first['fingerprint'][:12]}..., {info['device']} on {info['host']} gives "
                f"{info['fingerprint'][:12]}... (mixed GPU types?); use --devices of one kind"
            )
    return first
