"""`evalkit encode --workers N [--devices ...]`: the precompute job on several devices of one node.

1. Check everything that can fail fast (arguments, output folder, input columns and rows) in
   this process (`_shardjob.ShardJob`), then start one process per worker with the `spawn`
   context (torch and CUDA are not fork-safe): each takes a device (default: every visible GPU,
   else the CPU, its cores split evenly between the workers with torch.set_num_threads) and
   loads the model once (`_shardworker.ShardWorker`).
2. The workers must agree on the model fingerprint; the manifest is prepared from it.
3. Hand out whole shards in plan order to whichever worker is idle; each worker writes its
   shard with the single-process job's writer into the output folder and reports it; this
   process alone writes the manifest, and draws one progress bar from the workers' row counts.
4. A worker that dies (kill -9, out of memory) is noticed through its process sentinel: its
   shard stays unfinished, the others carry on with the rest, and the job then fails with one
   line naming it; a rerun writes only the missing shards. When all shards are written, this
   process puts them into the node's store (one writer; SQLite WAL).

Output: the same shard files and stable manifest as `run_precompute` (see its docstring for why
the bytes cannot depend on the number of workers). Scripts that call this must guard their
entry point with `if __name__ == "__main__":` (the `spawn` rule).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from multiprocessing.connection import wait
from typing import Any

from evalkit.errors import EvalkitError
from evalkit.jobs._shardjob import ShardJob, check_same_model
from evalkit.jobs._shardworker import cpu_threads

__all__ = ["plan_devices", "run_precompute_workers"]


def plan_devices(workers: int | None, devices: Any = None) -> list[str]:
    """The device of each worker: `devices` ("cuda:0,cuda:1" or a list) round-robin, else every
    visible GPU, else "cpu"; `workers` defaults to one per device."""
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if not devices:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if workers is None:
        workers = len(devices)
    if not isinstance(workers, int) or workers <= 0:
        raise EvalkitError(f"workers must be a positive integer; got {workers!r}")
    return [devices[i % len(devices)] for i in range(workers)]


def run_precompute_workers(
    data: Any,
    *,
    column: str,
    out: str | os.PathLike,
    workers: int | None = None,
    devices: Any = None,
    **options: Any,
) -> dict:
    """Encode column `column` of `data` into shards under `out` with `workers` processes.

    Takes the keyword arguments of `evalkit.jobs.precompute.run_precompute` (id_column, model,
    cache, batch_size, dtype, shard, overwrite, rows_per_shard, window, prompt, prompt_name,
    normalize, progress, source options) except `device`; returns the manifest with "last_run".
    Raises EvalkitError (one line) when a worker died; rerun to finish.
    """
    options.pop("device", None)
    job = ShardJob(data, column=column, out=out, **options)
    plan = plan_devices(workers, devices)
    cpu_workers = sum(d == "cpu" for d in plan) or len(plan)
    pool = _Pool(job.spec, plan, cpu_threads(cpu_workers))
    try:
        info = check_same_model(pool.describe())
        todo = job.start(info)
        failures = pool.run(todo, job)
    finally:
        pool.stop()
        job.close_bar()
    return job.finish(failures, lambda manifest: _import(job, manifest))


def _import(job: ShardJob, manifest: dict) -> int:
    from evalkit.embed.store import EmbeddingStore
    from evalkit.jobs.precompute import import_finished

    if job.spec["cache"] is False:
        return 0
    with EmbeddingStore(job.spec["cache"], dtype=job.spec["dtype"]) as store:
        return import_finished(job.loc, manifest, store)


class _Pool:
    """One spawned process per device, talking over a pipe each."""

    def __init__(self, spec: dict, devices: list[str], threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.workers = []
        for device in devices:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(theirs, spec, device, threads), daemon=True
            )
            proc.start()
            theirs.close()
            self.workers.append({"proc": proc, "conn": mine, "device": device, "shard": None})

    def describe(self) -> list[dict]:
        infos = []
        for w in self.workers:
            msg = self._receive(w)
            if msg[0] != "ready":
                raise EvalkitError(msg[1] + ("" if w["proc"].is_alive() else " while starting"))
            infos.append(msg[1])
        return infos

    def _receive(self, w: dict) -> tuple:
        """The worker's next message, or ("error", why) once it is dead and its pipe drained."""
        wait([w["conn"], w["proc"].sentinel])
        try:
            return w["conn"].recv()
        except (EOFError, OSError):
            w["proc"].join()
            return ("error", f"worker on {w['device']} {_death(w['proc'].exitcode)}")

    def run(self, todo: list[tuple[int, int]], job: ShardJob) -> list[str]:
        """Hand out `todo` shards until done; -> one message per worker that died."""
        queue, failures = list(todo), []
        live = list(self.workers)
        for w in live:
            self._give(w, queue)
        while any(w["shard"] is not None for w in live):
            busy = [w for w in live if w["shard"] is not None]
            ready = wait([w["conn"] for w in busy] + [w["proc"].sentinel for w in busy])
            for w in busy:
                if w["conn"] not in ready and w["proc"].sentinel not in ready:
                    continue
                msg = self._receive(w)  # a dead worker's last messages come first, then EOF
                if msg[0] == "error" and not w["proc"].is_alive():
                    a, b = w["shard"]
                    failures.append(
                        f"worker {self.workers.index(w)} (pid {w['proc'].pid}, {w['device']}) "
                        f"{_death(w['proc'].exitcode)} while encoding rows {a}..{b}"
                    )
                    w["shard"] = None
                    live.remove(w)
                else:
                    self._handle(msg, w, job, queue)
        return failures

    def _handle(self, msg: tuple, w: dict, job: ShardJob, queue: list) -> None:
        if msg[0] == "progress":
            job.progress(msg[1])
        elif msg[0] == "done":
            job.record(msg[1], msg[2])
            w["shard"] = None
            self._give(w, queue)
        elif msg[0] == "error":
            raise EvalkitError(msg[1])

    @staticmethod
    def _give(w: dict, queue: list) -> None:
        if queue:
            w["shard"] = queue.pop(0)
            w["conn"].send(("encode", *w["shard"]))

    def stop(self) -> None:
        for w in self.workers:
            try:
                w["conn"].send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for w in self.workers:
            w["proc"].join(timeout=30)
            if w["proc"].is_alive():
                w["proc"].kill()
                w["proc"].join()


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _worker_main(conn: Any, spec: dict, device: str, threads: int) -> None:
    """A worker process: load the model, then encode the shards it is sent until "stop"."""
    import threading

    from tqdm import tqdm

    from evalkit.jobs._shardworker import ShardWorker

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tqdm's default lock is a multiprocessing semaphore: a worker killed with it would make the
    # resource tracker warn about a leak at exit. A thread lock is all one process needs.
    tqdm.set_lock(threading.RLock())
    try:
        worker = ShardWorker(spec, device, threads)
        conn.send(("ready", worker.describe()))
    except Exception as exc:  # reported by the parent as one line
        conn.send(("error", _message(exc)))
        return
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the parent is gone
                return
            if msg[0] != "encode":
                return
            try:
                entry, tallies = worker.encode(msg[1], msg[2], lambda n: conn.send(("progress", n)))
            except Exception as exc:
                conn.send(("error", _message(exc)))
                return
            conn.send(("done", entry, tallies))
    finally:
        worker.close()


def _message(exc: BaseException) -> str:
    if isinstance(exc, EvalkitError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
