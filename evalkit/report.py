"""Result files for people and programs: metrics.json, summary.md and PNG plots.

Algorithm:
1) While an evaluation streams, `ScoreHistogram` counts scores into fixed bins per label bucket
   (O(bins x labels) memory whatever the number of pairs) and `RecallCurve` sums per-query
   recall at every cut-off 1..max_k (O(max_k) memory).
2) `write_report` then writes, each atomically (temp file in the same folder, then os.replace):
   metrics.json (the full result dict), summary.md (a short table), and the plots
   (score distribution per label, precision-recall curve, recall@k curve) with matplotlib's Agg
   backend, imported only here so nothing else pays for it.
3) `format_summary` gives the few lines the CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- atomic I/O


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder and os.replace (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=True) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------ streaming stats


class ScoreHistogram:
    """Counts of scores in `bins` equal bins over [lo, hi] per label bucket (label rounded to 0.1).

    Scores outside [lo, hi] land in the first/last bin. merge: add the count arrays key by key.
    """

    def __init__(self, bins: int = 400, lo: float = -1.0, hi: float = 1.0):
        self.bins, self.lo, self.hi = int(bins), float(lo), float(hi)
        self.counts: dict[float, np.ndarray] = {}  # merge: add per key

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        keys = np.round(np.asarray(labels, dtype=np.float64), 1)
        width = (self.hi - self.lo) / self.bins
        idx = np.clip(((scores - self.lo) / width).astype(np.int64), 0, self.bins - 1)
        for key in np.unique(keys):
            if math.isnan(key):
                continue
            counts = np.bincount(idx[keys == key], minlength=self.bins)
            k = float(key)
            self.counts[k] = self.counts.get(k, 0) + counts

    def merge(self, other: ScoreHistogram) -> None:
        assert (self.bins, self.lo, self.hi) == (other.bins, other.lo, other.hi)
        for k, c in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + c

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def groups(self, max_groups: int = 6) -> list[tuple[str, np.ndarray]]:
        """(legend label, counts) per label bucket, merged into <= max_groups equal-width ranges."""
        keys = sorted(self.counts)
        if len(keys) <= max_groups:
            return [(_fmt_label(k), self.counts[k]) for k in keys]
        lo, hi = keys[0], keys[-1]
        n = max_groups - 1
        width = (hi - lo) / n
        group = {k: min(int((k - lo) / width), n - 1) for k in keys}
        out = []
        for g in range(n):
            members = [k for k in keys if group[k] == g]
            if members:
                a, b = lo + g * width, lo + (g + 1) * width
                out.append((f"{a:g}-{b:g}", sum(self.counts[k] for k in members)))
        return out

    def precision_recall(self, positive_min: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Binned precision/recall curve treating labels >= positive_min as positives."""
        pos = sum((c for k, c in self.counts.items() if k >= positive_min), np.zeros(self.bins))
        neg = sum((c for k, c in self.counts.items() if k < positive_min), np.zeros(self.bins))
        tp = np.cumsum(pos[::-1])
        fp = np.cumsum(neg[::-1])
        keep = (tp + fp) > 0
        total = pos.sum()
        precision = tp[keep] / (tp[keep] + fp[keep])
        recall = tp[keep] / total if total else np.zeros(keep.sum())
        return precision, recall


def _fmt_label(key: float) -> str:
    return f"label {int(key)}" if float(key).is_integer() else f"label {key:g}"


class RecallCurve:
    """Mean recall@k for every k in 1..max_k (sentence-transformers' Recall@k: hits / |relevant|).

    merge: add the sums and the query counts.
    """

    def __init__(self, max_k: int):
        self.max_k = int(max_k)
        self.sums = np.zeros(self.max_k, dtype=np.float64)  # merge: add
        self.queries = 0  # merge: add

    def update(self, hits: np.ndarray, n_relevant: np.ndarray) -> None:
        """hits[q, r] = 1 when the document at rank r of query q is relevant; n_relevant[q] > 0."""
        hits = np.asarray(hits, dtype=np.float64)
        if hits.shape[1] < self.max_k:  # fewer results than max_k: recall stays flat
            pad = np.zeros((hits.shape[0], self.max_k - hits.shape[1]))
            hits = np.concatenate([hits, pad], axis=1)
        cum = np.cumsum(hits[:, : self.max_k], axis=1) / np.asarray(n_relevant, np.float64)[:, None]
        self.sums += cum.sum(axis=0)
        self.queries += hits.shape[0]

    def merge(self, other: RecallCurve) -> None:
        self.sums += other.sums
        self.queries += other.queries

    def compute(self) -> np.ndarray:
        return self.sums / self.queries if self.queries else self.sums.copy()


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
    if cache:
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
    if cache:
        out.append(
            f"- embedding store: {cache.get('hits', 0)} hits / {cache.get('misses', 0)} misses"
            f" ({100 * cache.get('hit_rate', 0.0):.1f}% hits) in `{cache.get('dir')}`"
        )
    spans = {k: v for k, v in timings.items() if v is not None and "_per_" not in k}
    rates = {k: v for k, v in timings.items() if v is not None and "_per_" in k}
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
