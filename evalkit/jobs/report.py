"""Result files for people and programs: metrics.json, summary.md and PNG plots.

Algorithm:
1) While an evaluation streams, `evalkit.metrics.curves` keeps a score histogram and a
   recall@k curve in fixed memory.
2) `write_report` then writes, each atomically (temp file in the same folder, then os.replace):
   metrics.json (the full result dict), summary.md (a short table), and the plots
   (score distribution per label, precision-recall curve, recall@k curve) with matplotlib's Agg
   backend, imported only here so nothing else pays for it.
3) `format_summary` gives the few lines the CLI prints.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from evalkit._io import write_bytes_atomic, write_json_atomic, write_text_atomic
from evalkit.metrics.curves import ScoreHistogram

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed; skipping plots (pip install 'evalkit[plots]')")
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return write_bytes_atomic(path, buf.getvalue())


def plot_score_distribution(
    hist: ScoreHistogram, path: str | os.PathLike, *, title: str
) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    groups = [(label, c) for label, c in hist.groups() if c.sum() > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if groups:
        # merge the fine counting bins into display bins: ~2 sqrt(n) over the range in use
        used = np.flatnonzero(sum(c for _, c in groups) > 0)
        first, last = int(used[0]), int(used[-1]) + 1
        smallest = min(int(c.sum()) for _, c in groups)
        target = int(np.clip(2 * np.sqrt(smallest), 8, 60))
        factor = max(1, -(-(last - first) // target))
        starts = np.arange(first, last, factor)
        edges = hist.edges[np.append(starts, min(starts[-1] + factor, hist.bins))]
        for label, counts in groups:
            merged = np.add.reduceat(counts, starts)[: len(starts)]
            merged[-1] = counts[starts[-1] : last].sum()
            density = merged / counts.sum() / np.diff(edges)
            ax.stairs(density, edges, label=f"{label} (n={int(counts.sum())})", linewidth=1.4)
        ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_precision_recall(
    hist: ScoreHistogram, path: str | os.PathLike, *, title: str, ap: float | None = None
) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    precision, recall = hist.precision_recall()
    fig, ax = plt.subplots(figsize=(5.0, 4.5))
    label = f"AP = {ap:.4f}" if ap is not None else None
    ax.plot(recall, precision, drawstyle="steps-post", label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    if label:
        ax.legend(loc="lower left")
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_recall_at_k(
    curve: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str,
    marks: Mapping[int, float] | None = None,
) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    ks = np.arange(1, len(curve) + 1)
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(ks, curve, linewidth=1.5)
    for k, value in sorted((marks or {}).items()):
        ax.plot([k], [value], "o", color="C1")
        ax.annotate(
            f"@{k}: {value:.3f}",
            (k, value),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    if len(ks) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- text outputs


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5f}" if math.isfinite(value) else str(value)
    return str(value)


def format_summary(result: Mapping[str, Any], *, keys: list[str] | None = None) -> str:
    """A few lines for the terminal: headline metrics, rows, cache hits, time."""
    metrics = result.get("metrics", {})
    keys = keys or list(metrics)[:8]
    lines = [f"{result.get('task', 'evaluation')}: {result.get('data', {}).get('rows', '?')} rows"]
    lines += [f"  {k:<28} {_fmt(metrics[k])}" for k in keys if k in metrics]
    cache = result.get("cache") or {}
    stored = result.get("results_store") or {}
    if stored.get("hit"):
        lines.append(f"  from results store (key {stored['key']}; --recompute to evaluate again)")
    elif cache:
        lines.append(
            f"  cache: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses"
            f" ({100 * cache.get('hit_rate', 0.0):.1f}% hits)"
        )
    timings = result.get("timings") or {}
    if "total_s" in timings:
        lines.append(f"  time: {timings['total_s']:.1f} s")
    if result.get("out"):
        lines.append(f"  results: {result['out']}")
    return "\n".join(lines)


def summary_markdown(result: Mapping[str, Any]) -> str:
    """summary.md: what was evaluated, with which model, and the metrics as a table."""
    task = result.get("task", "evaluation")
    model = result.get("model", {})
    data = result.get("data", {})
    cache = result.get("cache") or {}
    timings = result.get("timings") or {}
    out = [f"# evalkit {task} evaluation", ""]
    out.append(
        f"- model: `{model.get('path')}` (fingerprint `{str(model.get('fingerprint'))[:16]}`)"
    )
    for name, value in (data.get("paths") or {}).items():
        out.append(f"- {name}: `{value}`")
    out.append(f"- rows: {data.get('rows')}")
    for key in ("dialect", "similarity"):
        if result.get(key):
            out.append(f"- {key}: {result[key]}")
    stored = result.get("results_store") or {}
    if stored.get("hit"):
        out.append(f"- from results store: key `{stored['key']}` in `{stored.get('dir')}`")
    elif cache:
        out.append(
            f"- embedding store: {cache.get('hits', 0)} hits / {cache.get('misses', 0)} misses"
            f" ({100 * cache.get('hit_rate', 0.0):.1f}% hits) in `{cache.get('dir')}`"
        )
    timings = {k: v for k, v in timings.items() if isinstance(v, int | float)}
    spans = {k: v for k, v in timings.items() if "_per_" not in k}
    rates = {k: v for k, v in timings.items() if "_per_" in k}
    if spans:
        out.append(
            "- time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in spans.items())
        )
    if rates:
        out.append(
            "- speed: "
            + ", ".join(f"{v:,.1f} {k.replace('_per_s', '/s')}" for k, v in rates.items())
        )
    out += ["", "| metric | value |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in result.get("metrics", {}).items()]
    plots = result.get("plots") or []
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    versions = result.get("versions") or {}
    if versions:
        out += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(out) + "\n"


def write_report(result: dict[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """Write metrics.json and summary.md into `out` (plots are already listed in result['plots'])."""
    out = Path(out)
    result = dict(result)
    result["out"] = str(out)
    write_json_atomic(out / "metrics.json", result)
    write_text_atomic(out / "summary.md", summary_markdown(result))
    return result


# ------------------------------------------------------------------------------ job endings


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (read from metadata: no imports)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("evalkit", "sentence-transformers", "transformers", "torch", "numpy", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def pair_plots(
    hist: ScoreHistogram, out: str | os.PathLike, *, task: str, name: str, ap: float | None = None
) -> list[str]:
    """score_distribution.png (and precision_recall.png for classification) in `out`."""
    out = Path(out)
    paths = [
        plot_score_distribution(
            hist, out / "score_distribution.png", title=f"cosine by label: {name}"
        )
    ]
    if task == "classification":
        paths.append(
            plot_precision_recall(
                hist, out / "precision_recall.png", title=f"precision-recall: {name}", ap=ap
            )
        )
    return [str(p) for p in paths if p is not None]


def retrieval_plots(
    curve: np.ndarray, out: str | os.PathLike, *, dialect: str, marks: Mapping[int, float]
) -> list[str]:
    """recall_at_k.png in `out`."""
    path = plot_recall_at_k(
        curve, Path(out) / "recall_at_k.png", title=f"recall@k ({dialect})", marks=marks
    )
    return [str(path)] if path is not None else []


def finish(result: dict[str, Any], out: str | os.PathLike | None) -> dict[str, Any]:
    """Write the report files when `out` is given; return the result (with "out" set)."""
    return result if out is None else write_report(result, out)
