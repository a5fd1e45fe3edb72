"""The plot cache: a plot that drew the same values is copied, never drawn again (no matplotlib);
different values, drawing code or a damaged file are drawn afresh; `cache check/clear` see it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalkit.cli import main
from evalkit.jobs import plotcache, report
from evalkit.metrics.curves import ScoreHistogram

PNG = b"\x89PNG\r\n\x1a\n"


def _hist(seed: int = 0) -> ScoreHistogram:
    rng = np.random.default_rng(seed)
    hist = ScoreHistogram()
    hist.update(rng.uniform(-1, 1, 300), rng.integers(0, 2, 300))
    return hist


def _no_matplotlib(monkeypatch):
    def refuse():
        raise AssertionError("matplotlib was imported for a plot the cache holds")

    monkeypatch.setattr(report, "_pyplot", refuse)


def test_same_values_are_served_without_matplotlib(tmp_path, monkeypatch):
    """Guards against: a warm evaluation paying matplotlib's import for a picture it has."""
    cache = plotcache.folder_of(tmp_path / "store")
    first = report.plot_score_distribution(_hist(), tmp_path / "a.png", title="t", cache=cache)
    assert first.read_bytes()[:8] == PNG and len(list(cache.glob("*.png"))) == 1
    _no_matplotlib(monkeypatch)
    second = report.plot_score_distribution(_hist(), tmp_path / "b.png", title="t", cache=cache)
    assert second.read_bytes() == first.read_bytes()
    curve = np.linspace(0.1, 0.9, 50)
    with pytest.raises(AssertionError, match="matplotlib was imported"):  # not cached yet
        report.plot_recall_at_k(curve, tmp_path / "r.png", title="t", cache=cache)


@pytest.mark.parametrize(
    "change",
    ["counts", "title", "code"],
)
def test_any_change_in_what_is_drawn_draws_again(tmp_path, monkeypatch, change):
    """Guards against: a cached picture of other numbers (or of older drawing code) served for
    this result."""
    cache = plotcache.folder_of(tmp_path / "s")
    report.plot_score_distribution(_hist(), tmp_path / "a.png", title="t", cache=cache)
    hist, title = _hist(), "t"
    if change == "counts":
        hist.update(np.array([0.5]), np.array([1]))  # one more pair
    elif change == "title":
        title = "t2"
    else:
        monkeypatch.setitem(plotcache._CODE, "code", b"edited drawing code")
    report.plot_score_distribution(hist, tmp_path / "b.png", title=title, cache=cache)
    assert len(list(cache.glob("*.png"))) == 2


def test_a_damaged_cached_plot_is_removed_and_drawn_again(tmp_path):
    """Guards against: corrupted bytes in the plot cache copied into a result folder."""
    cache = plotcache.folder_of(tmp_path / "s")
    good = report.plot_score_distribution(_hist(), tmp_path / "a.png", title="t", cache=cache)
    cached = next(cache.glob("*.png"))
    data = bytearray(cached.read_bytes())
    data[100] ^= 0xFF
    cached.write_bytes(bytes(data))
    again = report.plot_score_distribution(_hist(), tmp_path / "b.png", title="t", cache=cache)
    assert again.read_bytes() == good.read_bytes()
    assert next(cache.glob("*.png")).read_bytes() == good.read_bytes()


def test_an_unwritable_cache_only_costs_the_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    path = report.plot_score_distribution(_hist(), tmp_path / "a.png", title="t", cache=blocker)
    assert path.read_bytes()[:8] == PNG


def test_evaluate_serves_plots_from_the_store_folder(
    stsb_dev_small, tiny_model_dir, tmp_path, monkeypatch
):
    """A second `evaluate pairs` (results store bypassed) copies its PNG from the plot cache of
    the embedding store, byte-identical, without importing matplotlib."""
    from evalkit.jobs.evaluate import evaluate_pairs

    monkeypatch.setenv("EVALKIT_FINGERPRINT_MEMO", str(tmp_path / "memo.json"))
    kw = dict(left="sentence1", right="sentence2", label="score", model=tiny_model_dir,
              column_names=["sentence1", "sentence2", "score"], progress=False,
              cache=tmp_path / "cache", results=False)  # fmt: skip
    evaluate_pairs(stsb_dev_small, out=tmp_path / "one", **kw)
    assert len(list(plotcache.folder_of(tmp_path / "cache").glob("*.png"))) == 1
    _no_matplotlib(monkeypatch)
    second = evaluate_pairs(stsb_dev_small, out=tmp_path / "two", **kw)
    png = "score_distribution.png"
    assert (tmp_path / "two" / png).read_bytes() == (tmp_path / "one" / png).read_bytes()
    assert second["plots"] == [str(tmp_path / "two" / png)]


def test_cache_check_and_clear_cover_plots(stsb_dev_small, tiny_model_dir, tmp_path, capsys):
    """Guards against: `cache check` passing a damaged cached plot, `clear` leaving plots."""
    from evalkit.jobs.evaluate import evaluate_pairs

    store = tmp_path / "cache"
    evaluate_pairs(
        stsb_dev_small, left="sentence1", right="sentence2", label="score", model=tiny_model_dir,
        column_names=["sentence1", "sentence2", "score"], progress=False, cache=store,
        results=False, out=tmp_path / "out",
    )  # fmt: skip
    assert main(["cache", "check", "--cache", str(store)]) == 0
    capsys.readouterr()
    cached = next(plotcache.folder_of(store).glob("*.png"))
    cached.write_bytes(cached.read_bytes()[:-10])
    assert main(["cache", "check", "--json", "--cache", str(store)]) == 1
    assert any("plot cache" in p for p in json.loads(capsys.readouterr().out)["problems"])
    assert main(["cache", "check", "--fix", "--cache", str(store)]) == 0
    assert not cached.exists()
    report.plot_score_distribution(_hist(), tmp_path / "a.png", title="t",
                                   cache=plotcache.folder_of(store))  # fmt: skip
    assert main(["cache", "clear", "--cache", str(store)]) == 0
    assert not plotcache.folder_of(store).exists()
