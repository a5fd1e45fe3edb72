"""The sweep with the real default model (slow: MiniLM trains and encodes at ~150 sentences/s on
2 cores): a 3-checkpoint MiniLM run on STS-B train swept on STS-B dev and a SciFact subset, the
rerun served from the results store without loading a model, and base vs best compared."""

from __future__ import annotations

import json

import pytest
from _run_util import STSB_COLUMNS, run_fresh, stsb_flags

from evalkit.cli import main as cli_main
from evalkit.jobs.compare import compare
from evalkit.jobs.sweep import sweep
from evalkit.jobs.tasks import RetrievalTask


@pytest.mark.slow
def test_minilm_run_sweep_rerun_and_compare(shared_data, scifact_small, tmp_path):
    run = tmp_path / "run"
    train = [
        "train", str(shared_data / "stsb" / "stsb-en-train.csv"), "--column-names", STSB_COLUMNS,
        "--left", "sentence1", "--right", "sentence2", "--label", "score", "--loss", "cosine",
        "--max-steps", "30", "--checkpoint-every", "10", "--out", str(run), "--no-progress",
    ]  # fmt: skip
    assert cli_main(train) == 0
    dev = shared_data / "stsb" / "stsb-en-dev.csv"
    args = ["sweep", str(run), *stsb_flags(dev), "--out", str(tmp_path / "sweep"), "--quiet",
            "--results", str(tmp_path / "results")]  # fmt: skip
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["base", "step-10", "step-20", "step-30", "best"]
    assert rows["best"]["same_as"] == "step-30"
    assert rows["base"]["metrics"]["spearman_cosine"] > 0.8  # MiniLM, not a random model
    code, stdout, stderr, heavy = run_fresh(args)
    assert code == 0 and heavy == [], stderr
    assert "4 of 5 from results store" in stdout

    folder = scifact_small[0]
    task = RetrievalTask(folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels.tsv",
                         dialect="trec_eval")  # fmt: skip
    retrieval = sweep([run], task, out=tmp_path / "scifact", results=tmp_path / "results",
                      progress=False)  # fmt: skip
    assert [r["label"] for r in retrieval["rows"]][-1] == "best"
    assert all(r["vs_base"] for r in retrieval["rows"] if r["role"] != "base")

    cmp = compare(tmp_path / "sweep" / "evals" / "base", tmp_path / "sweep" / "evals" / "step-30",
                  results=tmp_path / "results")  # fmt: skip
    c = next(c for c in cmp["comparisons"] if c["metric"] == "spearman_cosine")
    assert c["difference"] == pytest.approx(
        rows["step-30"]["metrics"]["spearman_cosine"] - rows["base"]["metrics"]["spearman_cosine"]
    )
    assert c["ci_low"] <= c["difference"] <= c["ci_high"] and 0 < c["p_value"] <= 1
