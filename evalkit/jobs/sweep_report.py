"""The sweep's files for people: summary.md (the table), metric_vs_step.png, the terminal table.

1) `best_row`: the model (not the base) with the highest primary metric; ties go to the earlier
   step (the first row);
2) `table`: one line per model: label, step, the plotted metrics, the change vs the base with its
   interval, p and Holm-adjusted p; `markdown` and `format_table` render it;
3) `plot`: the plotted metrics against step (base = step 0, `best/` as a star), drawn with
   matplotlib (`jobs.report._pyplot`), and only when the plotted numbers differ from the previous
   drawing recorded in sweep.json (a rerun served from the results store imports no matplotlib).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from evalkit.jobs.compare import format_p

PLOT_FILE = "metric_vs_step.png"


def best_row(rows: list[dict[str, Any]], primary: str) -> str | None:
    best, value = None, -math.inf
    for r in rows:
        v = r["metrics"].get(primary)
        if r["role"] != "base" and v is not None and math.isfinite(v) and v > value:
            best, value = r["label"], v
    return best


def _f(v: Any, sign: bool = False) -> str:
    if not isinstance(v, int | float) or not math.isfinite(v):
        return "-" if v is None else str(v)
    return f"{v:+.5f}" if sign else f"{v:.5f}"


def table(report: dict[str, Any]) -> list[list[str]]:
    """Header + one row per model (see the module docstring)."""
    conf = int(round(100 * report["significance"]["confidence"]))
    plotted = report["plotted_metrics"]
    head = ["", "model", "step", *plotted, "vs base", f"{conf}% CI", "p", "p (Holm)", "source"]
    rows = [head]
    for r in report["rows"]:
        vs = r.get("vs_base") or {}
        if r["same_as"]:
            source = f"= {r['same_as']}"
        else:
            source = "results store" if r["from_results_store"] else "evaluated"
        rows.append(
            [
                "*" if r["label"] == report["best"] else "", r["label"],
                "-" if r["step"] is None else str(r["step"]),
                *(_f(r["metrics"].get(m)) for m in plotted),
                _f(vs.get("difference"), True),
                f"[{_f(vs['ci_low'], True)}, {_f(vs['ci_high'], True)}]" if vs else "",
                format_p(vs["p_value"]) if vs else "", format_p(vs["p_holm"]) if vs else "",
                source,
            ]
        )  # fmt: skip
    return rows


def format_table(report: dict[str, Any]) -> str:
    rows = table(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    sig = report["significance"]
    data = report.get("data") or {}
    out = [f"# evalkit sweep: {report['task']}", ""]
    for name, path in (data.get("paths") or {}).items():
        out.append(f"- {name}: `{path}`")
    out.append(f"- primary metric: {report['primary_metric']}; best (*): {report['best']}")
    if not report["finished"]:
        out.append("- the run had not finished when this was written")
    out += ["", *_md_table(table(report)), ""]
    out.append(
        f"vs base = model - base on {report['primary_metric']}, {int(round(100 * sig['confidence']))}% "
        f"interval from a paired bootstrap ({sig['resamples']} resamples, seed {sig['seed']})."
    )
    if sig.get("correction"):
        out.append(f"Many comparisons: {sig['correction']}.")
    if report.get("plot", {}).get("file"):
        out += ["", f"![metric vs step]({report['plot']['file']})"]
    return "\n".join(out) + "\n"


def _md_table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def _points(report: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in report["rows"] if r["step"] is not None]
    return {
        "metrics": report["plotted_metrics"],
        "points": [[r["label"], r["role"], r["step"], [r["metrics"].get(m) for m in
                    report["plotted_metrics"]]] for r in rows],
    }  # fmt: skip


def plot(report: dict[str, Any], out: Path, previous: dict[str, Any] | None) -> dict[str, Any]:
    """Draw metric_vs_step.png unless the same numbers are drawn there already; -> its record."""
    points = _points(report)
    digest = hashlib.blake2b(json.dumps(points).encode(), digest_size=16).hexdigest()
    path = out / PLOT_FILE
    if previous and previous.get("digest") == digest and path.is_file():
        return previous
    if not points["points"]:
        return {"file": None, "digest": digest}
    if _draw(points, report["primary_metric"], path) is None:
        return {"file": None, "digest": None}
    return {"file": PLOT_FILE, "digest": digest}


def _draw(points: dict[str, Any], primary: str, path: Path) -> Path | None:
    from evalkit.jobs.report import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    line = sorted((p for p in points["points"] if p[1] != "best"), key=lambda p: p[2])
    for j, metric in enumerate(points["metrics"]):
        xs = [p[2] for p in line if p[3][j] is not None]
        ys = [p[3][j] for p in line if p[3][j] is not None]
        ax.plot(xs, ys, marker="o", linewidth=2.2 if metric == primary else 1.2, label=metric)
        for p in points["points"]:
            if p[1] == "best" and p[3][j] is not None:
                ax.plot([p[2]], [p[3][j]], marker="*", markersize=14, color=f"C{j}", linestyle="")
    ax.set_xlabel("training step (base model = 0; * = best/)")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{primary} and others by checkpoint")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
