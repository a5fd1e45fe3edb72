"""Paired significance tests between two systems scored on the same items (scipy.stats).

Retrieval (per-query values of one metric for systems A and B, `compare_per_query`):
1) difference = mean(b) - mean(a);
2) 95% interval: `scipy.stats.bootstrap((a, b), mean(b) - mean(a), paired=True)` (BCa);
3) p-value: `scipy.stats.permutation_test((a, b), ..., permutation_type="samples")`, the paired
   randomisation test (each query's two values are swapped at random), two-sided; the bootstrap's
   own p-value (step 4 below) is reported beside it.

Pairs (gold labels and the per-pair scores of A and B, `compare_pairs`; Spearman, Pearson, AP):
1) difference = metric(b scores, gold) - metric(a scores, gold);
2) `scipy.stats.bootstrap((gold, a, b), ..., paired=True)` resamples pairs (the same pairs for both
   systems), computing both metrics on each resample (vectorised kernels below);
3) 95% interval from it (BCa); 4) two-sided p-value from the same bootstrap distribution, shifted to
   the null (Berg-Kirkpatrick et al. 2012): p = (1 + #{|d* - d| >= |d|}) / (B + 1).

Every call seeds a fresh `numpy.random.default_rng(seed)`, so a result depends only on its inputs
and settings (never on which other metrics were compared before). A degenerate bootstrap
distribution (A equals B on every item) gives the interval [d, d]; a BCa interval scipy cannot
compute falls back to the percentile interval of the same resamples (the method is reported).
`holm` adjusts a family of p-values (Holm-Bonferroni step-down).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from evalkit.errors import EvalkitError

DEFAULT_RESAMPLES = 9999
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95
_BATCH_ELEMENTS = 1 << 22  # resampled values held at once per array (bounds memory)
PAIR_METRICS = ("spearman", "pearson", "ap")


@dataclass
class Comparison:
    """One metric compared: B - A with its interval and p-value, and how they were computed."""

    metric: str
    n: int
    a: float
    b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    interval: str
    p_bootstrap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    """How a comparison is computed (part of a stored comparison's identity)."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    confidence: float = DEFAULT_CONFIDENCE

    def check(self) -> Settings:
        if not isinstance(self.resamples, int) or self.resamples < 99:
            raise EvalkitError(f"resamples must be an integer >= 99; got {self.resamples!r}")
        if not 0 < self.confidence < 1:
            raise EvalkitError(f"confidence must be between 0 and 1; got {self.confidence!r}")
        return self


def batch_size(n: int, resamples: int) -> int:
    """Resamples per batch so that one batch holds about 4M values per array."""
    return max(1, min(resamples, _BATCH_ELEMENTS // max(n, 1)))


# ------------------------------------------------------------------------ vectorised kernels


def pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson correlation along `axis` (NaN where one side is constant), in float64."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    y = np.moveaxis(np.asarray(y, np.float64), axis, -1)
    dx = x - x.mean(axis=-1, keepdims=True)
    dy = y - y.mean(axis=-1, keepdims=True)
    return _corr(np.sum(dx * dy, -1), np.sum(dx * dx, -1), np.sum(dy * dy, -1))


def _corr(sxy, sxx, syy):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman correlation along `axis`: Pearson of average ranks (scipy's ties)."""
    from scipy.stats import rankdata

    return pearson(rankdata(x, axis=axis), rankdata(y, axis=axis), axis=axis)


def average_precision(scores: np.ndarray, labels: np.ndarray, axis: int = -1) -> np.ndarray:
    """sklearn's average_precision_score along `axis` (labels 0/1, larger score = positive):
    sum over groups of tied scores of (recall step) x (precision at the group's end). NaN when a
    row has no positive."""
    s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    y = np.moveaxis(np.asarray(labels, np.float64), axis, -1)
    order = np.argsort(-s, axis=-1, kind="stable")
    s = np.take_along_axis(s, order, axis=-1)
    y = np.take_along_axis(y, order, axis=-1)
    n = s.shape[-1]
    tp = np.cumsum(y, axis=-1)
    end = np.ones(s.shape, dtype=bool)
    end[..., :-1] = s[..., :-1] != s[..., 1:]
    # the end of each element's tied group: the first group end at or after it
    idx = np.where(end, np.arange(n), n - 1)
    idx = np.flip(np.minimum.accumulate(np.flip(idx, axis=-1), axis=-1), axis=-1)
    precision_at_end = np.take_along_axis(tp, idx, axis=-1) / (idx + 1.0)
    positives = tp[..., -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(y * precision_at_end, -1) / np.where(positives > 0, positives, np.nan)


_KERNELS = {"spearman": spearman, "pearson": pearson, "ap": average_precision}


def pair_metric(kind: str, scores: np.ndarray, gold: np.ndarray) -> float:
    """One pair metric of `scores` against `gold` (Spearman, Pearson, or AP for 0/1 gold)."""
    return float(_KERNELS[kind](scores, gold))


class _Ties:
    """The tied groups of one value vector, to rank or cut any resample of it without sorting:
    a resample is a vector of counts (how often each item was drawn)."""

    def __init__(self, values: np.ndarray) -> None:
        self.order = np.argsort(values, kind="stable")
        ordered = values[self.order]
        first = np.ones(len(values), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        self.starts = np.flatnonzero(first)
        self.group = np.empty(len(values), dtype=np.int64)
        self.group[self.order] = np.cumsum(first) - 1

    def ranks(self, counts: np.ndarray) -> np.ndarray:
        """Average rank (1-based, ties share the mean) of each item within each resample."""
        totals = np.add.reduceat(counts[:, self.order], self.starts, axis=1)
        average = np.cumsum(totals, axis=1) - (totals - 1) / 2
        return average[:, self.group]

    def average_precision(self, counts: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """AP per resample, the values being -score (so ascending order = most similar first)."""
        c = counts[:, self.order]
        hits = c * labels[self.order]
        group_hits = np.add.reduceat(hits, self.starts, axis=1)
        ends = np.append(self.starts[1:], len(self.order)) - 1
        tp = np.cumsum(hits, axis=1)[:, ends]
        seen = np.cumsum(c, axis=1)[:, ends]
        precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)
        positives = tp[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sum(group_hits * precision, 1) / np.where(positives > 0, positives, np.nan)


def _weighted_corr(counts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of x and y over each resample (item i drawn counts[:, i] times)."""
    w = counts.sum(axis=1, keepdims=True)
    dx = x - np.sum(counts * x, 1, keepdims=True) / w
    dy = y - np.sum(counts * y, 1, keepdims=True) / w
    return _corr(
        np.sum(counts * dx * dy, 1), np.sum(counts * dx * dx, 1), np.sum(counts * dy * dy, 1)
    )


class PairDifference:
    """metric(B) - metric(A) on resamples of pair indices (the statistic scipy.stats.bootstrap
    calls with `data=(np.arange(n),)`, which is exactly how its `paired=True` resamples).

    Each resample becomes per-item counts; ranks and AP cuts come from the tied groups of the
    full data (`_Ties`), so a resample costs O(n) instead of a sort."""

    def __init__(self, kind: str, gold: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        self.kind, self.n = kind, len(gold)
        self.gold, self.a, self.b = gold, a, b
        if kind == "spearman":
            self.ties = [_Ties(v) for v in (gold, a, b)]
        elif kind == "ap":
            self.ties = [_Ties(-a), _Ties(-b)]

    def _one(self, counts: np.ndarray) -> np.ndarray:
        if self.kind == "pearson":
            return _weighted_corr(counts, self.b, self.gold) - _weighted_corr(
                counts, self.a, self.gold
            )
        if self.kind == "spearman":
            rg, ra, rb = (t.ranks(counts) for t in self.ties)
            return _weighted_corr(counts, rb, rg) - _weighted_corr(counts, ra, rg)
        ta, tb = self.ties
        return tb.average_precision(counts, self.gold) - ta.average_precision(counts, self.gold)

    def __call__(self, idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        flat = idx.reshape(-1, idx.shape[-1])
        rows = np.arange(len(flat))[:, None] * self.n
        counts = np.bincount((flat + rows).ravel(), minlength=len(flat) * self.n)
        out = self._one(counts.reshape(len(flat), self.n).astype(np.float64))
        return out.reshape(idx.shape[:-1])


# ------------------------------------------------------------------------------------ tests


def _interval(data, statistic, settings: Settings, *, n: int, observed: float, paired: bool):
    """scipy.stats.bootstrap (BCa) -> (low, high, method, bootstrap distribution)."""
    from scipy.stats import bootstrap

    kwargs = dict(
        paired=paired,
        vectorized=True,
        n_resamples=settings.resamples,
        batch=batch_size(n, settings.resamples),
        confidence_level=settings.confidence,
        rng=np.random.default_rng(settings.seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate data is handled below
        res = bootstrap(data, statistic, method="BCa", **kwargs)
    dist = np.asarray(res.bootstrap_distribution, np.float64)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.ptp(dist) == 0 and dist[0] == observed:
        return observed, observed, "BCa (degenerate: every resample equals the estimate)", dist
    if np.isnan(low) or np.isnan(high):
        kwargs.update(n_resamples=0, bootstrap_result=res)
        res = bootstrap(data, statistic, method="percentile", **kwargs)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        return low, high, "percentile (BCa undefined here)", dist
    return low, high, "BCa", dist


def bootstrap_p_value(distribution: np.ndarray, observed: float) -> float:
    """Two-sided p-value of `observed` from its bootstrap distribution shifted to the null:
    (1 + #{|d* - d| >= |d|}) / (B + 1)."""
    dist = np.asarray(distribution, np.float64)
    dist = dist[np.isfinite(dist)]
    if not np.isfinite(observed) or len(dist) == 0:
        return float("nan")
    extreme = int(np.count_nonzero(np.abs(dist - observed) >= abs(observed)))
    return min(1.0, (1 + extreme) / (len(dist) + 1))


def _check_paired(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape or a.ndim != 1:
        raise EvalkitError(
            f"{what}: A and B need one value per item each; got {a.shape}, {b.shape}"
        )
    if len(a) < 2:
        raise EvalkitError(f"{what}: a paired test needs at least 2 items; got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise EvalkitError(f"{what}: per-item values must be finite")


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(b, axis=axis) - np.mean(a, axis=axis)


def compare_per_query(
    metric: str, a: Sequence[float], b: Sequence[float], settings: Settings = Settings()
) -> Comparison:
    """Paired comparison of per-query values of one metric (B - A): permutation test p-value,
    bootstrap interval. See the module docstring for the exact scipy calls."""
    from scipy.stats import permutation_test

    settings.check()
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_paired(a, b, metric)
    n = len(a)
    observed = float(_mean_difference(a, b))
    low, high, method, dist = _interval(
        (a, b), _mean_difference, settings, n=n, observed=observed, paired=True
    )
    perm = permutation_test(
        (a, b),
        _mean_difference,
        permutation_type="samples",
        vectorized=True,
        n_resamples=settings.resamples,
        batch=batch_size(n, settings.resamples),
        alternative="two-sided",
        rng=np.random.default_rng(settings.seed),
    )
    return Comparison(
        metric=metric, n=n, a=float(np.mean(a)), b=float(np.mean(b)), difference=observed,
        ci_low=low, ci_high=high, p_value=float(perm.pvalue),
        test=f"paired permutation test (scipy.stats.permutation_test, {settings.resamples} resamples)",
        interval=f"paired bootstrap {method}, {settings.resamples} resamples, seed {settings.seed}",
        p_bootstrap=bootstrap_p_value(dist, observed),
    )  # fmt: skip


def compare_pairs(
    metric: str,
    kind: str,
    gold: Sequence[float],
    a: Sequence[float],
    b: Sequence[float],
    settings: Settings = Settings(),
) -> Comparison:
    """Paired bootstrap comparison (B - A) of one pair metric: `kind` is spearman, pearson or ap
    (of the scores against `gold`). See the module docstring for the exact scipy call."""
    if kind not in _KERNELS:
        raise EvalkitError(f"pair metric kind must be one of {', '.join(_KERNELS)}; got {kind!r}")
    settings.check()
    gold = np.asarray(gold, np.float64)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_paired(a, b, metric)
    _check_paired(gold, a, metric)
    statistic = PairDifference(kind, gold, a, b)
    va, vb = pair_metric(kind, a, gold), pair_metric(kind, b, gold)
    observed = float(statistic(np.arange(len(a))))
    low, high, method, dist = _interval(
        (np.arange(len(a)),), statistic, settings, n=len(a), observed=observed, paired=False
    )
    p = bootstrap_p_value(dist, observed)
    return Comparison(
        metric=metric, n=len(a), a=va, b=vb, difference=observed, ci_low=low, ci_high=high,
        p_value=p,
        test=f"paired bootstrap test (scipy.stats.bootstrap, {settings.resamples} resamples, "
        "shifted to the null)",
        interval=f"paired bootstrap {method}, {settings.resamples} resamples, seed {settings.seed}",
        p_bootstrap=p,
    )  # fmt: skip


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN stays NaN, not counted)."""
    p = np.asarray(p_values, np.float64)
    out = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
