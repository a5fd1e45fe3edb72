"""Result files for people and programs: metrics.json, summary.md and PNG plots.

Algorithm:
1) While an evaluation streams, `evalkit.metrics.curves` keeps a score histogram and a
   recall@k curve in fixed memory.
2) `write_report` then writes, each atomically (temp file in the same folder, then os.replace):
   metrics.json (the full result dict), summary.md (a short table), and the plots
   (score distribution per label, precision-recall curve, recall@k curve) with matplotlib's Agg
   backend, imported only here so nothing else pays for it; a plot that drew the same values
   before is copied from the plot cache beside the embedding store (`plotcache`), and then
   matplotlib is not imported at all.
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


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _save(fig, path: Path) -> Path:
    """Write `fig` as a PNG to `path` atomically (also used by the sweep and ANN reports)."""
    return write_bytes_atomic(path, _png(fig))


def _drawn(path: Path, cache: Path | None, kind: str, values: list, draw) -> Path | None:
    """Write the PNG `draw(plt) -> figure` makes to `path`, served from the plot cache when it
    drew these `values` before (see evalkit.jobs.plotcache); None without matplotlib."""
    from evalkit.jobs import plotcache

    plot_key = plotcache.key(kind, values) if cache is not None else None
    if plot_key is not None and (png := plotcache.get(cache, plot_key)) is not None:
        return write_bytes_atomic(path, png)
    plt = _pyplot()
    if plt is None:
        return None
    fig = draw(plt)
    try:
        png = _png(fig)
    finally:
        plt.close(fig)
    if plot_key is not None:
        plotcache.put(cache, plot_key, png)
    return write_bytes_atomic(path, png)


def plot_score_distribution(
    hist: ScoreHistogram, path: str | os.PathLike, *, title: str, cache: Path | None = None
) -> Path | None:
    groups = [(label, c) for label, c in hist.groups() if c.sum() > 0]
    values = [hist.edges, [(str(label), c) for label, c in groups], title]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        if groups:
            _stairs(ax, hist, groups)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.set_title(title)
        ax.legend(fontsize=8)
        return fig

    return _drawn(Path(path), cache, "score_distribution", values, draw)


def _stairs(ax, hist: ScoreHistogram, groups: list) -> None:
    """One density outline per label, the fine counting bins merged into ~2 sqrt(n) display
    bins over the range in use."""
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


def plot_precision_recall(
    hist: ScoreHistogram,
    path: str | os.PathLike,
    *,
    title: str,
    ap: float | None = None,
    cache: Path | None = None,
) -> Path | None:
    precision, recall = hist.precision_recall()
    label = f"AP = {ap:.4f}" if ap is not None else None

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5.0, 4.5))
        ax.plot(recall, precision, drawstyle="steps-post", label=label)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.01)
        ax.set_title(title)
        if label:
            ax.legend(loc="lower left")
        return fig

    values = [np.asarray(precision), np.asarray(recall), title, label]
    return _drawn(Path(path), cache, "precision_recall", values, draw)


def plot_recall_at_k(
    curve: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str,
    marks: Mapping[int, float] | None = None,
    cache: Path | None = None,
) -> Path | None:
    ks = np.arange(1, len(curve) + 1)
    points = sorted((int(k), float(v)) for k, v in (marks or {}).items())

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.0, 4.0))
        ax.plot(ks, curve, linewidth=1.5)
        for k, value in points:
            ax.plot([k], [value], "o", color="C1")
            ax.annotate(f"@{k}: {value:.3f}", (k, value), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)  # fmt: skip
        if len(ks) > 20:
            ax.set_xscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        return fig

    return _drawn(Path(path), cache, "recall_at_k", [np.asarray(curve), points, title], draw)


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
    hist: ScoreHistogram,
    out: str | os.PathLike,
    *,
    task: str,
    name: str,
    ap: float | None = None,
    cache: Path | None = None,
) -> list[str]:
    """score_distribution.png (and precision_recall.png for classification) in `out`; `cache`:
    the plot cache folder (evalkit.jobs.plotcache), None to always draw."""
    out = Path(out)
    title = f"cosine by label: {name}"
    paths = [
        plot_score_distribution(hist, out / "score_distribution.png", title=title, cache=cache)
    ]
    if task == "classification":
        title = f"precision-recall: {name}"
        paths.append(
            plot_precision_recall(
                hist, out / "precision_recall.png", title=title, ap=ap, cache=cache
            )
        )
    return [str(p) for p in paths if p is not None]


def retrieval_plots(
    curve: np.ndarray,
    out: str | os.PathLike,
    *,
    dialect: str,
    marks: Mapping[int, float],
    cache: Path | None = None,
) -> list[str]:
    """recall_at_k.png in `out` (`cache`: as in pair_plots)."""
    title = f"recall@k ({dialect})"
    path = plot_recall_at_k(curve, Path(out) / "recall_at_k.png", title=title, marks=marks,
                            cache=cache)  # fmt: skip
    return [str(path)] if path is not None else []


def finish(result: dict[str, Any], out: str | os.PathLike | None) -> dict[str, Any]:
    """Write the report files when `out` is given; return the result (with "out" set)."""
    return result if out is None else write_report(result, out)
