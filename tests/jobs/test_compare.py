"""`evalkit compare`: A vs A gives 0 and p = 1, a model vs a clearly worse one (the random tiny
model vs MiniLM) gives p < 0.01, the numbers equal scipy's on the per-pair arrays, comparisons are
memoised, and what cannot be paired is refused with one line. Guards against a significance
claim computed on mismatched or foreign per-item files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _run_util import STSB_COLUMNS

from evalkit.cli import main as cli_main
from evalkit.errors import EvalkitError
from evalkit.evaluation.significance import Settings, compare_pairs
from evalkit.jobs.compare import compare
from evalkit.jobs.evaluate import evaluate_pairs
from evalkit.jobs.results import read_table
from evalkit.jobs.tasks import PairsTask


@pytest.fixture(scope="module")
def stsb_120(shared_data, tmp_path_factory):
    lines = (shared_data / "stsb" / "stsb-en-test.csv").read_text(encoding="utf-8").splitlines(True)
    path = tmp_path_factory.mktemp("stsb120") / "stsb-120.csv"
    path.write_text("".join(lines[:120]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def evaluated(stsb_120, tiny_model_dir, tmp_path_factory):
    """Evaluation folders of the random tiny model and of MiniLM on 120 STS-B test pairs."""
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for name, model in (("tiny", tiny_model_dir), ("minilm", None)):
        evaluate_pairs(
            stsb_120, left="sentence1", right="sentence2", label="score", model=model,
            column_names=STSB_COLUMNS.split(","), out=root / name, plots=False, progress=False,
            results=root / "results",
        )  # fmt: skip
        out[name] = root / name
    return root, out


def test_a_versus_a_and_a_clearly_worse_model(evaluated, tmp_path):
    root, folders = evaluated
    same = compare(folders["minilm"], folders["minilm"], resamples=999, results=False)
    assert [c["metric"] for c in same["comparisons"]] == [
        f"{f}_{s}"
        for f in ("spearman", "pearson")
        for s in ("cosine", "dot", "euclidean", "manhattan")
    ]
    for c in same["comparisons"]:
        assert (c["difference"], c["ci_low"], c["ci_high"], c["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    worse = compare(folders["tiny"], folders["minilm"], resamples=999, results=False, out=tmp_path)
    c = next(c for c in worse["comparisons"] if c["metric"] == "spearman_cosine")
    assert c["difference"] > 0.2 and c["p_value"] < 0.01 and c["ci_low"] > 0
    # the same numbers as compare_pairs (checked against scipy in test_significance) on the arrays
    ta = read_table({**json.loads((folders["tiny"] / "metrics.json").read_text())["per_query"],
                     "path": str(folders["tiny"] / "per_query.parquet")})  # fmt: skip
    tb = read_table({**json.loads((folders["minilm"] / "metrics.json").read_text())["per_query"],
                     "path": str(folders["minilm"] / "per_query.parquet")})  # fmt: skip
    gold = ta.column("label").to_numpy()
    want = compare_pairs(
        "spearman_cosine", "spearman", gold, ta.column("cosine").to_numpy().astype(np.float64),
        tb.column("cosine").to_numpy().astype(np.float64), Settings(resamples=999),
    )  # fmt: skip
    assert c == want.to_dict()
    assert "spearman_cosine" in (tmp_path / "compare.md").read_text()
    assert (
        json.loads((tmp_path / "compare.json").read_text())["comparisons"] == worse["comparisons"]
    )


def test_cli_prints_the_table_and_memoises(evaluated, tmp_path, capsys):
    root, folders = evaluated
    args = ["compare", str(folders["tiny"]), str(folders["minilm"]), "--results",
            str(root / "results"), "--resamples", "999", "--metrics", "spearman_cosine"]  # fmt: skip
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "spearman_cosine" in out and "B - A" in out and "95% CI" in out
    memo = list((root / "results" / "compare").glob("*.json"))
    assert len(memo) == 1
    assert cli_main(args) == 0
    assert capsys.readouterr().out == out  # the memoised comparison prints the same


def test_compare_two_models_with_data_flags(evaluated, stsb_120, tiny_model_dir):
    """Models with a task: evaluated through the results store (served here), then compared."""
    root, _ = evaluated
    task = PairsTask(stsb_120, left="sentence1", right="sentence2", label="score",
                     column_names=STSB_COLUMNS.split(","))  # fmt: skip
    report = compare(tiny_model_dir, "default", task=task, results=root / "results",
                     resamples=999, progress=False)  # fmt: skip
    assert report["a"]["results_key"] and report["b"]["results_key"]
    assert report["comparisons"][0]["metric"] == "spearman_cosine"


def test_what_cannot_be_paired_is_refused(evaluated, stsb_120, tiny_model_dir, tmp_path, capsys):
    root, folders = evaluated
    other = tmp_path / "other.csv"
    other.write_text("".join(stsb_120.read_text().splitlines(True)[:100]))
    evaluate_pairs(other, left="sentence1", right="sentence2", label="score", model=tiny_model_dir,
                   column_names=STSB_COLUMNS.split(","), out=tmp_path / "other", plots=False,
                   progress=False)  # fmt: skip
    with pytest.raises(EvalkitError, match="differ in data"):
        compare(folders["tiny"], tmp_path / "other", results=False)
    # A's folder holding B's per-pair file (digest updated to match): refused, not compared
    forged = tmp_path / "forged"
    shutil.copytree(folders["tiny"], forged)
    shutil.copy(folders["minilm"] / "per_query.parquet", forged / "per_query.parquet")
    meta = json.loads((forged / "metrics.json").read_text())
    meta["per_query"] = json.loads((folders["minilm"] / "metrics.json").read_text())["per_query"]
    (forged / "metrics.json").write_text(json.dumps(meta))
    with pytest.raises(EvalkitError, match="not from one evaluation"):
        compare(forged, folders["minilm"], results=False, resamples=199)
    # a damaged per-pair file
    damaged = tmp_path / "damaged"
    shutil.copytree(folders["tiny"], damaged)
    raw = bytearray((damaged / "per_query.parquet").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (damaged / "per_query.parquet").write_bytes(bytes(raw))
    with pytest.raises(EvalkitError, match="digest"):
        compare(damaged, folders["minilm"], results=False, resamples=199)
    code = cli_main(["compare", str(tmp_path), str(folders["minilm"])])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "no metrics.json" in err
