"""The checkpoint sweep: evaluate every model of a training run on one task, compare each with the
base model, and say which is best.

1) Plan (`jobs.runs.plan`): the base model (recorded by the run, or given), the run's complete
   checkpoints by step, `best/`, and any plain model folders given.
2) Per model: one StreamingEncoder over one shared embedding store. A fingerprint already seen in
   this sweep (`best/` is a copy of some `step-N/`) reuses that row: identical weights are
   evaluated once. Otherwise `evaluate_task` with the one task of the sweep (the data parsed once:
   queries, qrels and corpus ids in memory, pairs converted once to Arrow) answers from the results
   store when it can, else evaluates; each model's files go to DIR/evals/<label>/.
3) Each model vs the base on the primary metric: a paired test (jobs.compare: bootstrap for pair
   metrics, permutation for retrieval; memoised in the results store), Holm-adjusted over the
   compared models.
4) Write DIR/sweep.json (one row per model), DIR/summary.md (the table, best marked, the change vs
   base) and DIR/metric_vs_step.png (primary metric and two others against step; redrawn only
   when its numbers changed).
5) `watch=True`: repeat 1-4 every `poll` seconds for new complete checkpoints until the run has
   finished (result.json: then `best/` too) or `watch_timeout` seconds pass without a new one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalkit._io import write_json_atomic, write_text_atomic
from evalkit.errors import EvalkitError
from evalkit.jobs import results as rs
from evalkit.jobs import runs

logger = logging.getLogger(__name__)
SWEEP_FORMAT = "evalkit-sweep-1"
_EXTRA_PLOTTED = {"pairs-similarity": ["spearman_manhattan"]}  # dot = cosine when normalised


@dataclass
class SweepOptions:
    """How models are run and compared (every field is a keyword argument of `sweep`)."""

    base: Any = False  # a model, None (packaged default), False (the run's own), "none"
    cache: Any = None
    results: Any = None
    recompute: bool = False
    device: str = "auto"
    batch_size: int = 64
    resamples: int = 9999
    seed: int = 0
    confidence: float = 0.95
    watch: bool = False
    poll: float = 10.0
    watch_timeout: float | None = None
    progress: bool = True


@dataclass
class _Row:
    candidate: runs.Candidate
    result: dict[str, Any]
    same_as: str | None = None
    vs_base: dict[str, Any] | None = field(default=None)


def sweep(targets: list[Any], task: Any, *, out: str | os.PathLike, **options: Any) -> dict:
    """Evaluate every checkpoint of the runs (and models) in `targets` on `task` (a
    jobs.tasks.PairsTask or RetrievalTask); see the module docstring and SweepOptions.
    Returns sweep.json's content."""
    known = set(SweepOptions.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"sweep() got unexpected keyword arguments: {', '.join(unknown)}")
    opts = SweepOptions(**options)
    if not targets:
        raise EvalkitError("give at least one run folder or model folder to sweep")
    for t in targets:
        if not Path(t).exists() and not opts.watch:
            raise EvalkitError(f"{t} does not exist")
    _check_out(Path(out))
    with tempfile.TemporaryDirectory(prefix="evalkit-sweep-") as tmp:
        if task.kind == "pairs":
            task.materialise(tmp)  # converted at the first evaluation the store cannot answer
        state = _Sweep(targets, task, Path(out), opts)
        return state.run()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise EvalkitError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalkitError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise EvalkitError(f"--out {out} is not writable")


class _Sweep:
    def __init__(self, targets: list[Any], task: Any, out: Path, opts: SweepOptions) -> None:
        from evalkit.embed.store import open_store
        from evalkit.evaluation.significance import Settings

        self.targets, self.task, self.out, self.o = targets, task, out, opts
        self.settings = Settings(opts.resamples, opts.seed, opts.confidence).check()
        self.embedding_store = open_store(opts.cache)
        folder = rs.results_dir(opts.results, opts.cache)
        self.results_store = rs.ResultsStore(folder) if folder is not None else None
        self.rows: list[_Row] = []
        self.by_fingerprint: dict[str, _Row] = {}
        self.seen: set[Path] = set()

    def run(self) -> dict[str, Any]:
        if not self.o.watch:
            candidates, finished = runs.plan(self.targets, base=self.o.base)
            self.evaluate(candidates)
            return self.write(finished)
        return self.watch()

    def watch(self) -> dict[str, Any]:
        stability = runs.Stability()
        last_new = time.monotonic()
        report: dict[str, Any] | None = None
        while True:
            candidates, finished = runs.plan(
                self.targets, base=self.o.base, watching=not self._finished(), stability=stability
            )
            new = [c for c in candidates if c.path not in self.seen]
            if new or (report is None and self.rows):
                self.evaluate(new)
                report = self.write(finished)
                last_new = time.monotonic() if new else last_new
            if finished:
                return report if report is not None else self.write(True)
            if (
                self.o.watch_timeout is not None
                and time.monotonic() - last_new > self.o.watch_timeout
            ):
                logger.info("sweep: no new checkpoint for %.0f s; stopping", self.o.watch_timeout)
                return self.write(False)
            time.sleep(self.o.poll)

    def _finished(self) -> bool:
        for t in map(Path, self.targets):
            if runs.is_run_dir(t):
                if not runs.run_finished(t):
                    return False
            elif not runs.is_model_dir(t):
                return False  # not started yet
        return True

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, candidates: list[runs.Candidate]) -> None:
        for c in candidates:
            self.seen.add(c.path)
            self.rows.append(self._evaluate_one(c))

    def _evaluate_one(self, c: runs.Candidate) -> _Row:
        from evalkit.embed.encoder import StreamingEncoder
        from evalkit.jobs.evaluate import evaluate_task

        o = self.o
        encoder = StreamingEncoder(
            str(c.path), store=self.embedding_store, device=o.device, batch_size=o.batch_size
        )
        fingerprint = encoder.known_fingerprint
        if fingerprint is None and self.results_store is None:
            try:  # loads the model: without a results store, needed anyway
                fingerprint = encoder.fingerprint
            except EvalkitError:
                fingerprint = None  # weights that cannot be fingerprinted are never deduplicated
        twin = self.by_fingerprint.get(fingerprint) if fingerprint else None
        if twin is not None:
            encoder.close()
            logger.info(
                "sweep: %s has the weights of %s; not evaluated again",
                c.label,
                twin.candidate.label,
            )
            return _Row(c, self._copy_of(twin, c), same_as=twin.candidate.label)
        logger.info("sweep: %s (%s)", c.label, c.path)
        result = evaluate_task(
            self.task, encoder=encoder, cache=o.cache, results=o.results, recompute=o.recompute,
            out=self.out / "evals" / c.label, plots=False, progress=o.progress,
        )  # fmt: skip
        row = _Row(c, result)
        if result["model"]["fingerprint"]:
            self.by_fingerprint.setdefault(result["model"]["fingerprint"], row)
        return row

    def _copy_of(self, twin: _Row, c: runs.Candidate) -> dict[str, Any]:
        """DIR/evals/<label>/ for a model with a twin's weights: the twin's result, this path."""
        from evalkit.jobs import report

        folder = self.out / "evals" / c.label
        result = {**twin.result, "model": {**twin.result["model"], "path": str(c.path)}}
        result["per_query"] = rs.copy_verified(twin.result["per_query"], folder / rs.PER_ITEM_FILE)
        result.pop("plots", None)
        return report.finish(result, folder)

    # -- comparisons and files -----------------------------------------------------------------

    def compare_with_base(self, primary: str) -> str | None:
        from evalkit.evaluation.significance import holm
        from evalkit.jobs.compare import compare_results

        base = next((r for r in self.rows if r.candidate.role == "base"), None)
        if base is None:
            return None
        family = [r for r in self.rows if r is not base and r.same_as is None]
        try:
            for r in family:
                r.vs_base = compare_results(
                    base.result, r.result, metrics=[primary], settings=self.settings,
                    store=self.results_store,
                )[0]  # fmt: skip
        except EvalkitError as exc:  # e.g. a single query: the table stands without the test
            logger.warning("sweep: no comparison with the base: %s", exc)
            for r in self.rows:
                r.vs_base = None
            return f"none: {exc}"
        adjusted = holm([r.vs_base["p_value"] for r in family])
        for r, p in zip(family, adjusted, strict=True):
            r.vs_base = {**r.vs_base, "p_holm": p}
        for r in self.rows:
            if r.same_as is not None and r is not base:
                twin = next(t for t in self.rows if t.candidate.label == r.same_as)
                r.vs_base = twin.vs_base
        return (
            f"Holm-adjusted over the {len(family)} model(s) compared with the base on {primary} "
            f"(p_holm); p: {family[0].vs_base['test'] if family else '-'}"
        )

    def write(self, finished: bool) -> dict[str, Any]:
        from evalkit.jobs import sweep_report

        if not self.rows:
            raise EvalkitError("nothing to evaluate: no complete checkpoint or model was found")
        first = self.rows[0].result
        primary = first["primary_metric"]
        correction = self.compare_with_base(primary)
        plotted = _plotted(first)
        rows = [self._row_json(r) for r in self.rows]
        best = sweep_report.best_row(rows, primary)
        report = {
            "format": SWEEP_FORMAT, "task": first["task"], "primary_metric": primary,
            "plotted_metrics": plotted, "best": best, "finished": finished,
            "targets": [str(t) for t in self.targets],
            "data": {k: first["data"].get(k) for k in ("paths", "rows", "queries", "fingerprint")},
            "dialect": first.get("dialect"), "k_values": first.get("k_values"),
            "significance": {**asdict(self.settings), "correction": correction,
                             "difference": "model - base"},
            "rows": rows,
        }  # fmt: skip
        report["plot"] = sweep_report.plot(report, self.out, self._previous_plot())
        write_json_atomic(self.out / "sweep.json", report)
        write_text_atomic(self.out / "summary.md", sweep_report.markdown(report))
        return report

    def _previous_plot(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.out / "sweep.json").read_text(encoding="utf-8")).get("plot")
        except (OSError, ValueError, AttributeError):
            return None

    def _row_json(self, r: _Row) -> dict[str, Any]:
        res, c = r.result, r.candidate
        stored = res.get("results_store") or {}
        evals = self.out / "evals" / c.label
        return {
            "label": c.label, "role": c.role, "step": c.step, "path": str(c.path),
            "model_fingerprint": res["model"]["fingerprint"], "results_key": stored.get("key"),
            "from_results_store": bool(stored.get("hit")) and r.same_as is None,
            "same_as": r.same_as, "eval_dir": os.path.relpath(evals, self.out),
            "metrics": res["metrics"], "vs_base": r.vs_base,
        }  # fmt: skip


def _plotted(result: dict[str, Any]) -> list[str]:
    """The primary metric and two others (from the result's headline)."""
    primary = result["primary_metric"]
    names = [primary] + [m for m in result.get("headline", []) if m != primary]
    names += [m for m in _EXTRA_PLOTTED.get(result["task"], []) if m in result["metrics"]]
    return list(dict.fromkeys(names))[:3]
