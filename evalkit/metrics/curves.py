"""Fixed-size streaming summaries drawn as plots: score histograms and recall@k curves.

1) `ScoreHistogram.update` counts scores into equal bins per label bucket (O(bins x labels)
   memory whatever the number of pairs); `precision_recall` reads a binned PR curve from them;
2) `RecallCurve.update` sums per-query recall at every cut-off 1..max_k (O(max_k) memory);
3) both merge by adding their counts, so partial passes combine exactly.
"""

from __future__ import annotations

import math

import numpy as np


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
