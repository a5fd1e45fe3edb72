"""Paired significance tests: the kernels equal scipy/sklearn, the intervals and p-values equal
what scipy.stats computes on the same arrays, and the tests behave at their extremes (A vs A,
a clearly worse system). Guards against a wrong interval or p-value printed with exit 0."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as ss
from sklearn.metrics import average_precision_score

from evalkit.errors import EvalkitError
from evalkit.evaluation import significance as sig


def _pairs(n, seed=0, noise_a=2.0, noise_b=1.0):
    rng = np.random.default_rng(seed)
    gold = np.round(rng.uniform(0, 5, n), 1)  # STS-like: many tied gold scores
    a = (gold + rng.normal(0, noise_a, n)).astype(np.float32).astype(np.float64)
    b = (gold + rng.normal(0, noise_b, n)).astype(np.float32).astype(np.float64)
    return gold, a, b


@pytest.mark.parametrize("n", [5, 37, 400])
def test_kernels_equal_scipy_and_sklearn(n):
    """The vectorised Spearman/Pearson/AP equal scipy's and sklearn's row by row, ties included."""
    rng = np.random.default_rng(n)
    x = np.round(rng.normal(size=(4, n)), 1)
    y = np.round(x + rng.normal(size=(4, n)), 1)
    labels = (rng.uniform(size=(4, n)) > 0.5).astype(float)
    labels[:, 0] = 1.0
    for i in range(4):
        assert sig.spearman(x, y)[i] == pytest.approx(ss.spearmanr(x[i], y[i]).statistic, abs=1e-12)
        assert sig.pearson(x, y)[i] == pytest.approx(ss.pearsonr(x[i], y[i]).statistic, abs=1e-12)
        ap = average_precision_score(labels[i], x[i])
        assert sig.average_precision(x, labels)[i] == pytest.approx(ap, abs=1e-12)


@pytest.mark.parametrize("kind", ["spearman", "pearson", "ap"])
def test_resample_statistic_equals_the_metric_on_resampled_values(kind):
    """PairDifference computes each resample from item counts (no sort); it must equal the metric
    computed on the resampled values themselves, for bootstrap and jackknife shapes."""
    gold, a, b = _pairs(60, seed=3)
    if kind == "ap":
        gold = (gold > 2.5).astype(float)
    stat = sig.PairDifference(kind, gold, a, b)
    kernel = {"spearman": sig.spearman, "pearson": sig.pearson, "ap": sig.average_precision}[kind]
    rng = np.random.default_rng(0)
    for idx in (
        rng.integers(0, 60, (25, 60)),
        np.array([np.delete(np.arange(60), i) for i in range(7)]),
    ):
        got = stat(idx)
        if kind == "ap":
            want = kernel(b[idx], gold[idx]) - kernel(a[idx], gold[idx])
        else:
            want = kernel(b[idx], gold[idx]) - kernel(a[idx], gold[idx])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert stat(np.arange(60)) == pytest.approx(float(kernel(b, gold) - kernel(a, gold)), abs=1e-12)


@pytest.mark.parametrize("kind", ["spearman", "pearson", "ap"])
def test_pair_interval_and_p_equal_scipy_bootstrap(kind):
    """compare_pairs' interval is scipy.stats.bootstrap(paired=True, BCa) on the same arrays with
    the documented settings; its p-value is the shifted-null share of scipy's distribution."""
    gold, a, b = _pairs(300, seed=1)
    if kind == "ap":
        gold = (gold > 2.5).astype(float)
    settings = sig.Settings(resamples=999, seed=7)
    ours = sig.compare_pairs("m", kind, gold, a, b, settings)
    kernel = sig._KERNELS[kind]

    def statistic(g, x, y, axis=-1):
        return kernel(y, g, axis=axis) - kernel(x, g, axis=axis)

    ref = ss.bootstrap(
        (gold, a, b), statistic, paired=True, vectorized=True, n_resamples=999,
        batch=sig.batch_size(300, 999), method="BCa", confidence_level=0.95,
        rng=np.random.default_rng(7),
    )  # fmt: skip
    assert ours.ci_low == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert ours.ci_high == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    observed = float(statistic(gold, a, b))
    assert ours.difference == pytest.approx(observed, abs=1e-12)
    dist = ref.bootstrap_distribution
    want_p = (1 + np.sum(np.abs(dist - observed) >= abs(observed))) / (len(dist) + 1)
    assert ours.p_value == pytest.approx(min(1.0, want_p), abs=1e-12)
    assert ours.a == pytest.approx(float(kernel(a, gold))) and ours.b == pytest.approx(
        float(kernel(b, gold))
    )


def test_per_query_p_and_interval_equal_scipy():
    """compare_per_query: p from scipy.stats.permutation_test (paired 'samples'), interval from
    scipy.stats.bootstrap (paired, BCa), both with a fresh default_rng(seed)."""
    rng = np.random.default_rng(5)
    a = rng.uniform(0, 1, 120)
    b = np.clip(a + rng.normal(0.03, 0.1, 120), 0, 1)
    ours = sig.compare_per_query("ndcg@10", a, b, sig.Settings(resamples=999, seed=3))

    def stat(x, y, axis=-1):
        return np.mean(y, axis=axis) - np.mean(x, axis=axis)

    perm = ss.permutation_test(
        (a, b), stat, permutation_type="samples", vectorized=True, n_resamples=999,
        batch=sig.batch_size(120, 999), rng=np.random.default_rng(3),
    )  # fmt: skip
    boot = ss.bootstrap(
        (a, b), stat, paired=True, vectorized=True, n_resamples=999,
        batch=sig.batch_size(120, 999), rng=np.random.default_rng(3),
    )  # fmt: skip
    assert ours.p_value == perm.pvalue
    assert (ours.ci_low, ours.ci_high) == (
        boot.confidence_interval.low,
        boot.confidence_interval.high,
    )
    assert ours.difference == pytest.approx(b.mean() - a.mean(), abs=1e-15)


def test_a_versus_a_gives_zero_and_p_one():
    gold, a, _ = _pairs(200)
    for kind in ("spearman", "pearson"):
        c = sig.compare_pairs("m", kind, gold, a, a, sig.Settings(resamples=199))
        assert (c.difference, c.ci_low, c.ci_high, c.p_value) == (0.0, 0.0, 0.0, 1.0)
    q = np.random.default_rng(0).uniform(size=50)
    c = sig.compare_per_query("m", q, q, sig.Settings(resamples=199))
    assert (c.difference, c.ci_low, c.ci_high, c.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_a_clearly_worse_system_gives_p_below_001():
    gold, a, b = _pairs(300, noise_a=6.0, noise_b=0.5)
    c = sig.compare_pairs("spearman_cosine", "spearman", gold, a, b)
    assert c.difference > 0.3 and c.p_value < 0.01 and c.ci_low > 0
    c = sig.compare_pairs("spearman_cosine", "spearman", gold, b, a)  # the other way round
    assert c.difference < -0.3 and c.p_value < 0.01 and c.ci_high < 0


def test_results_are_reproducible_and_seeded():
    gold, a, b = _pairs(100)
    one = sig.compare_pairs("m", "spearman", gold, a, b, sig.Settings(resamples=199, seed=1))
    two = sig.compare_pairs("m", "spearman", gold, a, b, sig.Settings(resamples=199, seed=1))
    other = sig.compare_pairs("m", "spearman", gold, a, b, sig.Settings(resamples=199, seed=2))
    assert one == two and (one.ci_low, one.ci_high) != (other.ci_low, other.ci_high)


def test_holm_matches_hand_computed_values():
    # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.5 (x1 = 0.5)
    assert sig.holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert sig.holm([0.04, 0.03]) == pytest.approx([0.06, 0.06])  # monotone: max with earlier
    assert sig.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    out = sig.holm([float("nan"), 0.2])
    assert np.isnan(out[0]) and out[1] == pytest.approx(0.2)


def test_bad_arguments_are_refused():
    with pytest.raises(EvalkitError, match="resamples"):
        sig.Settings(resamples=5).check()
    with pytest.raises(EvalkitError, match="confidence"):
        sig.Settings(confidence=1.5).check()
    with pytest.raises(EvalkitError, match="one value per item"):
        sig.compare_per_query("m", [1.0, 2.0], [1.0])
    with pytest.raises(EvalkitError, match="finite"):
        sig.compare_per_query("m", [1.0, np.nan], [1.0, 2.0])
    with pytest.raises(EvalkitError, match="kind"):
        sig.compare_pairs("m", "kendall", [1, 2], [1, 2], [2, 1])
