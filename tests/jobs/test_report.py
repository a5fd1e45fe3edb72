"""Report outputs: atomic writes, streaming histogram/recall curve against in-memory answers,
summary text, and real PNG files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from evalkit.jobs import report
from evalkit.metrics import curves


def test_atomic_json_write_leaves_no_temp_and_replaces(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    report.write_json_atomic(path, {"metrics": {"a": np.float32(0.5), "b": np.arange(2)}})
    assert json.loads(path.read_text()) == {"metrics": {"a": 0.5, "b": [0, 1]}}
    report.write_json_atomic(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert os.listdir(path.parent) == ["metrics.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    report.write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        report.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_histogram_streaming_equals_in_memory(block):
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1.2, 1.2, 500)
    labels = rng.integers(0, 2, 500)
    whole = curves.ScoreHistogram(bins=50)
    whole.update(scores, labels)
    parts = [curves.ScoreHistogram(bins=50) for _ in range(0, 500, block)]
    for part, start in zip(parts, range(0, 500, block), strict=True):
        part.update(scores[start : start + block], labels[start : start + block])
    merged = curves.ScoreHistogram(bins=50)
    for part in parts:
        merged.merge(part)
    assert sorted(merged.counts) == [0.0, 1.0]
    for key in whole.counts:
        np.testing.assert_array_equal(merged.counts[key], whole.counts[key])
    clipped = np.clip(scores, -1, 1 - 1e-12)
    expected, _ = np.histogram(clipped[labels == 1], bins=50, range=(-1, 1))
    np.testing.assert_array_equal(whole.counts[1.0], expected)


def test_precision_recall_from_histogram_matches_sklearn_at_bin_edges():
    from sklearn.metrics import precision_recall_curve

    # scores on bin centres so binning loses nothing
    rng = np.random.default_rng(1)
    hist = curves.ScoreHistogram(bins=20)
    centres = -1 + 0.05 + 0.1 * rng.integers(0, 20, 300)
    labels = rng.integers(0, 2, 300)
    hist.update(centres, labels)
    precision, recall = hist.precision_recall()
    p_ref, r_ref, _ = precision_recall_curve(labels, centres)
    ref = set(zip(np.round(r_ref[:-1], 9), np.round(p_ref[:-1], 9), strict=True))
    ours = set(zip(np.round(recall, 9), np.round(precision, 9), strict=True))
    assert ours == ref


def test_histogram_groups_many_labels_into_ranges():
    hist = curves.ScoreHistogram(bins=10)
    gold = np.linspace(0, 5, 51)
    hist.update(np.zeros(51), gold)
    groups = hist.groups(max_groups=6)
    assert len(groups) == 5
    assert sum(int(c.sum()) for _, c in groups) == 51


def test_recall_curve():
    curve = curves.RecallCurve(4)
    hits = np.array([[1, 0, 1], [0, 0, 0]])
    curve.update(hits, np.array([2, 1]))
    np.testing.assert_allclose(curve.compute(), [0.25, 0.25, 0.5, 0.5])


def test_summary_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    result = {
        "task": "retrieval",
        "metrics": {"cosine_ndcg@10": 0.5, "cosine_recall@100": 0.9},
        "model": {"path": "m", "fingerprint": "abc"},
        "data": {"paths": {"corpus": "c.jsonl"}, "rows": 3},
        "cache": {"hits": 3, "misses": 1, "hit_rate": 0.75, "dir": "cache"},
        "timings": {"total_s": 1.5},
    }
    hist = curves.ScoreHistogram()
    hist.update(np.array([0.1, 0.5, 0.9]), np.array([0, 1, 1]))
    pngs = [
        report.plot_score_distribution(hist, tmp_path / "dist.png", title="t"),
        report.plot_precision_recall(hist, tmp_path / "pr.png", title="t", ap=0.9),
        report.plot_recall_at_k(
            np.linspace(0.1, 0.9, 100), tmp_path / "r.png", title="t", marks={10: 0.2}
        ),
    ]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result["plots"] = [str(p) for p in pngs]
    written = report.write_report(result, tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "| cosine_ndcg@10 | 0.50000 |" in md and "![dist](dist.png)" in md
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == result["metrics"]
    text = report.format_summary(written)
    assert "cosine_ndcg@10" in text and "75.0% hits" in text
