"""Compare two evaluations item by item: every metric's difference (B - A), its 95% interval and a
paired p-value (evalkit.evaluation.significance, on scipy.stats).

1) Get the two results: evaluation output folders (metrics.json + per_query.parquet), or two
   models evaluated on one task (`evaluate_task`; the results store serves what it has).
2) Refuse what cannot be paired: other tasks, dialects, k values or data bytes, or per-item files
   whose items (pair labels, query ids) differ.
3) Load each per-item file (its BLAKE2b checked) and check it reproduces its metrics.json (a
   per-item file of another evaluation never passes for this one).
4) Per metric: pairs -> paired bootstrap of Spearman / Pearson (similarity) or AP
   (classification) over pairs; retrieval -> paired permutation test and paired bootstrap over
   the per-query values. Comparisons are memoised in the results store, keyed by both result keys,
   the metric and the settings (resamples, seed, confidence), so a rerun computes nothing.
5) Write OUT/compare.json and OUT/compare.md.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._io import write_json_atomic, write_text_atomic
from evalkit.errors import EvalkitError
from evalkit.jobs import results as rs

_CHECK_TOLERANCE = 1e-6


def load_evaluation(folder: str | os.PathLike) -> dict[str, Any]:
    """An evaluation output folder's metrics.json, its per-item file located in the folder."""
    folder = Path(folder)
    path = folder / "metrics.json"
    if not path.is_file():
        raise EvalkitError(
            f"{folder} is not an evaluation output folder (no metrics.json); to compare two "
            "models, add the data flags (--data F ... or --corpus F --queries F --qrels F)"
        )
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EvalkitError(f"{path} is not valid JSON ({exc})") from None
    info = result.get("per_query")
    if not info:
        raise EvalkitError(
            f"{folder} has no per-item results (evaluated before evalkit saved them); "
            "evaluate again with --out"
        )
    result["per_query"] = {**info, "path": str(folder / info["file"])}
    result.setdefault("out", str(folder))
    return result


def metrics_to_compare(result: dict[str, Any], columns: list[str]) -> list[str]:
    """Every metric that has a paired test: per-query columns (retrieval); Spearman/Pearson of
    every score (similarity); AP of every score (classification)."""
    metrics = result["metrics"]
    if result["task"] == "retrieval":
        return [c for c in columns if c != "query_id" and c in metrics]
    scores = [c for c in columns if c not in ("pair", "label")]
    if result["task"] == "pairs-classification":
        return [f"{s}_ap" for s in scores if f"{s}_ap" in metrics]
    names = [f"{f}_{s}" for f in ("spearman", "pearson") for s in scores]
    return [m for m in names if m in metrics]


def _check_comparable(a: dict[str, Any], b: dict[str, Any]) -> None:
    for what, get in (
        ("task", lambda r: r.get("task")),
        ("dialect", lambda r: r.get("dialect")),
        ("k values", lambda r: r.get("k_values")),
        ("data (content fingerprint)", lambda r: (r.get("data") or {}).get("fingerprint")),
    ):
        if get(a) != get(b):
            raise EvalkitError(
                f"A and B differ in {what} ({get(a)!r} vs {get(b)!r}); a paired comparison needs "
                "both evaluated on the same data with the same settings"
            )
    if not (a.get("data") or {}).get("fingerprint"):
        raise EvalkitError("A has no data fingerprint, so its data cannot be checked against B's")


def _items(result: dict[str, Any]):
    """(item ids, gold or None, {column: float64 array}) of a result's per-item file."""
    table = rs.read_table(result["per_query"])
    if result["task"] == "retrieval":
        ids = table.column("query_id").to_pylist()
        gold = None
    else:
        ids = table.column("pair").to_numpy()
        gold = table.column("label").to_numpy().astype(np.float64)
    values = {c: table.column(c).to_numpy().astype(np.float64) for c in table.column_names}
    return ids, gold, values


def _kind(metric: str) -> str:
    return "ap" if metric.endswith("_ap") else metric.split("_", 1)[0]


def _column(metric: str) -> str:
    return metric[: -len("_ap")] if metric.endswith("_ap") else metric.split("_", 1)[1]


def _check_reproduces(result, name, metric, values, gold) -> None:
    from evalkit.evaluation.significance import pair_metric

    if result["task"] == "retrieval":
        value = float(np.mean(values[metric]))
    else:
        value = pair_metric(_kind(metric), values[_column(metric)], gold)
    stated = result["metrics"][metric]
    both_nan = math.isnan(value) and math.isnan(stated)
    if not both_nan and not abs(value - stated) <= _CHECK_TOLERANCE:
        raise EvalkitError(
            f"{name}'s per-item file gives {metric} = {value:.6f} but its metrics.json says "
            f"{stated:.6f}: the two files are not from one evaluation"
        )


def compare_results(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    metrics: list[str] | None = None,
    settings: Any = None,
    store: rs.ResultsStore | None = None,
) -> list[dict[str, Any]]:
    """Paired comparisons (B - A) of two results with per-item files, one dict per metric."""
    from evalkit.evaluation.significance import Settings

    settings = (settings or Settings()).check()
    _check_comparable(a, b)
    keys = [(r.get("results_store") or {}).get("key") for r in (a, b)]
    memo = store if store is not None and all(keys) else None
    names = metrics or metrics_to_compare(a, a["per_query"].get("columns") or [])
    done: dict[str, dict[str, Any]] = {}
    ident = {}
    for m in names:
        ident[m] = {"format": rs.RESULTS_FORMAT, "a": keys[0], "b": keys[1], "metric": m,
                    "settings": asdict(settings)}  # fmt: skip
        cached = memo.get_comparison(ident[m]) if memo is not None else None
        if cached is not None:
            done[m] = cached
    todo = [m for m in names if m not in done]
    if todo:
        for m, comparison in _compute(a, b, todo, settings).items():
            done[m] = comparison
            if memo is not None:
                memo.put_comparison(ident[m], comparison)
    return [done[m] for m in names]


def _compute(a, b, names, settings) -> dict[str, dict[str, Any]]:
    from evalkit.evaluation.significance import compare_pairs, compare_per_query

    ids_a, gold_a, va = _items(a)
    ids_b, gold_b, vb = _items(b)
    same = np.array_equal(np.asarray(ids_a), np.asarray(ids_b))
    if not same or (gold_a is not None and not np.array_equal(gold_a, gold_b)):
        raise EvalkitError(
            "A and B were scored on different items (pair labels or query ids differ); "
            "a paired comparison needs the same items in the same order"
        )
    out = {}
    for m in names:
        if m not in a["metrics"] or m not in b["metrics"]:
            raise EvalkitError(f"metric {m!r} is not in both results")
        _check_reproduces(a, "A", m, va, gold_a)
        _check_reproduces(b, "B", m, vb, gold_b)
        if a["task"] == "retrieval":
            c = compare_per_query(m, va[m], vb[m], settings)
        else:
            col = _column(m)
            c = compare_pairs(m, _kind(m), gold_a, va[col], vb[col], settings)
        out[m] = c.to_dict()
    return out


def compare(
    a: Any,
    b: Any,
    *,
    task: Any = None,
    metrics: list[str] | None = None,
    resamples: int | None = None,
    seed: int | None = None,
    confidence: float | None = None,
    out: str | os.PathLike | None = None,
    cache: Any = None,
    results: Any = None,
    device: str = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare A and B (B - A) metric by metric with paired tests.

    `a`, `b`: evaluation output folders, or (with `task`, a jobs.tasks PairsTask/RetrievalTask)
    two models evaluated here through the results store. `resamples` (9999), `seed` (0) and
    `confidence` (0.95) set the tests. Returns {"a", "b", "task", "comparisons", ...}; with `out`
    also writes OUT/compare.json and OUT/compare.md.
    """
    from evalkit.evaluation.significance import Settings

    defaults = Settings()
    settings = Settings(
        resamples=defaults.resamples if resamples is None else resamples,
        seed=defaults.seed if seed is None else seed,
        confidence=defaults.confidence if confidence is None else confidence,
    ).check()
    folder = rs.results_dir(results, cache)
    store = rs.ResultsStore(folder) if folder is not None else None
    with tempfile.TemporaryDirectory(prefix="evalkit-compare-") as tmp:
        if task is None:
            ra, rb = load_evaluation(a), load_evaluation(b)
        else:
            kw = dict(cache=cache, results=results, device=device, batch_size=batch_size,
                      plots=False, progress=progress)  # fmt: skip
            ra = _evaluate(task, a, kw, store, Path(tmp) / "a")
            rb = _evaluate(task, b, kw, store, Path(tmp) / "b")
        comparisons = compare_results(ra, rb, metrics=metrics, settings=settings, store=store)
    report = {
        "task": ra["task"],
        "difference": "B - A",
        "a": _side(ra, a),
        "b": _side(rb, b),
        "data": {k: ra["data"].get(k) for k in ("paths", "rows", "queries", "fingerprint")},
        "settings": asdict(settings),
        "comparisons": comparisons,
    }
    if out is not None:
        write_json_atomic(Path(out) / "compare.json", report)
        write_text_atomic(Path(out) / "compare.md", compare_markdown(report))
        report["out"] = str(out)
    return report


def _evaluate(task, model, kw: dict[str, Any], store, scratch: Path) -> dict[str, Any]:
    """Evaluate one model on `task`, keeping its per-item file (results store, else `scratch`)."""
    from evalkit.jobs.evaluate import evaluate_task

    return evaluate_task(task, model=model, out=None if store is not None else scratch, **kw)


def _side(result: dict[str, Any], given: Any) -> dict[str, Any]:
    model = result.get("model") or {}
    return {
        "given": str(given), "model": model.get("path"), "fingerprint": model.get("fingerprint"),
        "results_key": (result.get("results_store") or {}).get("key"),
    }  # fmt: skip


def _f(v: float, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return str(v)
    return f"{v:+.5f}" if sign else f"{v:.5f}"


def format_p(p: float) -> str:
    return "nan" if p is None or not math.isfinite(p) else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def comparison_rows(comparisons: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows: metric, A, B, B - A, 95% interval, p."""
    return [
        [c["metric"], _f(c["a"]), _f(c["b"]), _f(c["difference"], True),
         f"[{_f(c['ci_low'], True)}, {_f(c['ci_high'], True)}]", format_p(c["p_value"])]
        for c in comparisons
    ]  # fmt: skip


def format_compare(report: dict[str, Any]) -> str:
    """The terminal table of a comparison."""
    cs = report["comparisons"]
    conf = int(round(100 * report["settings"]["confidence"]))
    head = ["metric", "A", "B", "B - A", f"{conf}% CI", "p"]
    rows = [head, *comparison_rows(cs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        f"compare {report['task']}: A = {report['a']['given']}, B = {report['b']['given']}",
        *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows),
    ]
    if cs:
        lines.append(f"p: {cs[0]['test']}; CI: {cs[0]['interval']}")
        floor = 1 / (report["settings"]["resamples"] + 1)
        if any(c["p_value"] <= floor * (1 + 1e-9) for c in cs):
            lines.append(f"p = {format_p(floor)} is the smallest p these resamples can give")
    if report.get("out"):
        lines.append(f"results: {report['out']}")
    return "\n".join(lines)


def compare_markdown(report: dict[str, Any]) -> str:
    cs = report["comparisons"]
    conf = int(round(100 * report["settings"]["confidence"]))
    out = [f"# evalkit compare: {report['task']}", ""]
    for side in ("a", "b"):
        s = report[side]
        out.append(f"- {side.upper()}: `{s['given']}` (fingerprint `{str(s['fingerprint'])[:16]}`)")
    out += [f"- difference: B - A over {cs[0]['n'] if cs else 0} paired items", ""]
    out += [f"| metric | A | B | B - A | {conf}% CI | p |", "|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in comparison_rows(cs)]
    if cs:
        out += ["", f"p-values: {cs[0]['test']}. Intervals: {cs[0]['interval']}."]
    return "\n".join(out) + "\n"
