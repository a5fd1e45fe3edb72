"""`evalkit encode --ray [ADDRESS]`: the precompute job on a Ray cluster, with Ray Core actors.

1. Connect: to the cluster at ADDRESS (`auto` for one started with `ray start`, `HOST:PORT`,
   `ray://...`), to RAY_ADDRESS, or to the one this process already joined with `ray.init()`;
   with none of these, start a local cluster on 127.0.0.1 with the dashboard off (and stop it at
   the end).
2. Start the actors: one per GPU (`num_gpus=1`) or, on CPU, `workers` actors each holding its
   share of the cluster's CPUs (default: one per node). Each is a `_shardworker.ShardWorker`:
   the model loaded once, and the store of its own node (the same absolute path on every node,
   on the node's local disk; read only during the job).
3. The driver (this process, `_shardjob.ShardJob`) checks the input, prepares the manifest from
   the actors' description (they must agree on the fingerprint), has the actors verify the
   shards already listed (in parallel), and hands out whole shards in plan order to idle actors
   (`ray.wait`); an actor writes its shard into the output folder (a path all nodes share) or
   uploads it whole to s3://. The driver alone writes the manifest, and polls the actors' row
   counts for one progress bar.
4. An actor that dies (killed, out of memory, node lost: `RayActorError`) leaves its shard
   unfinished; the other actors carry on; the job then fails with one line. A rerun — also after
   the driver itself was killed, which takes its actors with it — redoes only missing shards.
5. When every shard is written, each actor puts the shards it wrote (and those of earlier runs,
   spread over the actors) into its node's store.

Why Ray Core actors rather than Ray Data's `map_batches` with an actor pool: see docs/design.md.
"""

from __future__ import annotations

import os
from typing import Any

from evalkit._imports import require
from evalkit.errors import EvalkitError
from evalkit.jobs._shardjob import ShardJob, check_same_model

__all__ = ["run_precompute_ray"]

_POLL_S = 0.5


def run_precompute_ray(
    data: Any,
    *,
    column: str,
    out: str | os.PathLike,
    address: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> dict:
    """Encode column `column` of `data` into shards under `out` (a path every node sees, or
    s3://) with Ray actors; `address` picks the cluster (see the module docstring) and `workers`
    the number of actors. Takes run_precompute's other keyword arguments except `device`;
    returns the manifest with "last_run" (its "ray" entry: actors and their nodes). Raises
    EvalkitError (one line) when an actor died; rerun to finish."""
    options.pop("device", None)
    job = ShardJob(data, column=column, out=out, **options)
    ray = require("ray", extra="ray")
    started = _connect(ray, address)
    try:
        actors = _start_actors(ray, job.spec, workers)
        infos = ray.get([a.describe.remote() for a in actors])
        info = check_same_model(infos)

        def verify(entries: list[dict]) -> list[str]:
            parts = [entries[i :: len(actors)] for i in range(len(actors))]
            calls = [a.verify.remote(p) for a, p in zip(actors, parts, strict=True) if p]
            return [f for files in ray.get(calls) for f in files]

        todo = job.start(info, verify)
        failures, written = _run(ray, actors, todo, job)
        manifest = job.finish(failures, lambda m: _import(ray, actors, written, m))
    finally:
        job.close_bar()
        if started and ray.is_initialized():
            ray.shutdown()
    manifest["last_run"]["ray"] = [
        {k: i[k] for k in ("host", "device", "pid", "store")} for i in infos
    ]
    return manifest


def _connect(ray: Any, address: str | None) -> bool:
    """Join or start a cluster; True when this call started it (and so must stop it)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **quiet)
        return True
    # the cluster evalkit starts for itself: no usage-stats reporting (the user can still opt in)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        num_cpus=os.cpu_count(),
        **quiet,
    )
    return True


def _start_actors(ray: Any, spec: dict, workers: int | None) -> list:
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    if workers is not None and (not isinstance(workers, int) or workers <= 0):
        raise EvalkitError(f"workers must be a positive integer; got {workers!r}")
    n = workers or (gpus or nodes)
    actor = _actor_class(ray)
    if gpus:
        threads = max(1, cpus // n)
        return [
            actor.options(num_gpus=1, num_cpus=1).remote(spec, "cuda", threads) for _ in range(n)
        ]
    threads = max(1, cpus // n)
    return [actor.options(num_cpus=threads).remote(spec, "cpu", threads) for _ in range(n)]


def _actor_class(ray: Any) -> Any:
    from evalkit.jobs._shardworker import ShardWorker

    @ray.remote(max_concurrency=2)  # one thread encodes, the other answers rows_done()
    class EncoderActor:
        def __init__(self, spec: dict, device: str, threads: int) -> None:
            self.worker = ShardWorker(spec, device, threads)
            self.rows = 0

        def describe(self) -> dict:
            return self.worker.describe()

        def _count(self, n: int) -> None:
            self.rows += n

        def encode(self, a: int, b: int) -> tuple[dict, dict]:
            return self.worker.encode(a, b, self._count)

        def rows_done(self) -> int:
            return self.rows

        def verify(self, entries: list[dict]) -> list[str]:
            return self.worker.verify(entries)

        def import_shards(self, manifest: dict, files: list[str]) -> int:
            return self.worker.import_shards(manifest, files)

    return EncoderActor


def _run(ray: Any, actors: list, todo: list, job: ShardJob) -> tuple[list[str], dict]:
    """Hand out shards until done; -> (one message per dead actor, {actor index: files})."""
    queue, pending, failures = list(todo), {}, []
    written: dict[int, list[str]] = {i: [] for i in range(len(actors))}
    seen = dict.fromkeys(range(len(actors)), 0)  # rows each actor had encoded at the last poll

    def give(i: int) -> None:
        if queue:
            shard = queue.pop(0)
            pending[actors[i].encode.remote(*shard)] = (i, shard)

    for i in range(len(actors)):
        give(i)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
        _poll(ray, actors, {i for i, _ in pending.values()}, seen, job)
        for ref in ready:
            i, (a, b) = pending.pop(ref)
            try:
                entry, tallies = ray.get(ref)
            except ray.exceptions.RayActorError:
                failures.append(f"Ray actor {i} died while encoding rows {a}..{b}")
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise (
                    cause if isinstance(cause, EvalkitError) else EvalkitError(str(exc))
                ) from None
            _poll(ray, actors, {i}, seen, job)
            job.record(entry, tallies)
            written[i].append(entry["file"])
            give(i)
    return failures, written


def _poll(ray: Any, actors: list, which: set, seen: dict, job: ShardJob) -> None:
    """Advance the bar by the rows the actors in `which` encoded since the last poll."""
    refs = {i: actors[i].rows_done.remote() for i in which}
    for i, ref in refs.items():
        try:
            total = ray.get(ref, timeout=5)
        except Exception:  # a dead or busy actor: counted at the next poll, or never
            continue
        job.progress(total - seen[i])
        seen[i] = total


def _import(ray: Any, actors: list, written: dict, manifest: dict) -> int:
    """Each actor imports the shards it wrote; the others are spread over the actors."""
    mine = {f for files in written.values() for f in files}
    rest = [s["file"] for s in manifest["shards"] if s["file"] not in mine]
    plan = {i: list(files) + rest[i :: len(actors)] for i, files in written.items()}
    calls = [actors[i].import_shards.remote(manifest, files) for i, files in plan.items() if files]
    return sum(ray.get(calls))
