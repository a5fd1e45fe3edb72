"""`evalkit sweep` end to end on a real 3-checkpoint tiny-model run (STS-B train), swept on STS-B
dev and a SciFact subset: the table, identical weights evaluated once, the numbers train logged,
the results store on a rerun (nothing read, no model loaded), --watch against a run in another
process, only complete checkpoints, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from _run_util import ROOT, STSB_COLUMNS, run_fresh, stsb_flags, train_args  # noqa: E402

from evalkit.cli import main as cli_main
from evalkit.jobs import runs
from evalkit.jobs.sweep import sweep
from evalkit.jobs.tasks import PairsTask, RetrievalTask


@pytest.fixture(scope="session")
def tiny_run(shared_data, tiny_model_dir, stsb_dev_small, tmp_path_factory):
    """A finished 3-checkpoint tiny-model run that evaluated on `stsb_dev_small` every 10 steps."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    assert cli_main(train_args(shared_data, tiny_model_dir, out, stsb_dev_small)) == 0
    return out


def _pairs_task(path) -> PairsTask:
    return PairsTask(
        path, left="sentence1", right="sentence2", label="score",
        column_names=STSB_COLUMNS.split(","),
    )  # fmt: skip


def test_sweep_pairs_table_train_equality_and_rerun(
    tiny_run, stsb_dev_small, tmp_path, capsys, caplog
):
    """Wrong results guarded: a sweep number that differs from what training logged for the same
    step; best/ evaluated twice; a stale or recomputed rerun; a rerun that loads a model."""
    out, store = tmp_path / "sweep", tmp_path / "results"
    args = ["sweep", str(tiny_run), *stsb_flags(stsb_dev_small), "--out", str(out), "--quiet",
            "--results", str(store), "--resamples", "999"]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr()
    report = json.loads((out / "sweep.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["base", "step-10", "step-20", "step-30", "best"]
    rows = {r["label"]: r for r in report["rows"]}
    best_step = json.loads((tiny_run / "result.json").read_text())["best_step"]
    assert rows["best"]["same_as"] == f"step-{best_step}" and rows["best"]["step"] == best_step
    assert "best has the weights of step-30; not evaluated again" in caplog.text
    evals = sorted(p.name for p in (out / "evals").iterdir())
    assert evals == ["base", "best", "step-10", "step-20", "step-30"]
    best_eval = json.loads((out / "evals" / "best" / "metrics.json").read_text())
    assert best_eval["model"]["path"] == str(tiny_run / "best")
    assert best_eval["metrics"] == rows[f"step-{best_step}"]["metrics"]
    # the numbers `evalkit train --eval-data --eval-every 10` logged, exactly
    logged = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    logged_evals = {r["step"]: r["eval"] for r in logged if "eval" in r}
    assert sorted(logged_evals) == [10, 20, 30]
    for step, scores in logged_evals.items():
        metrics = rows[f"step-{step}"]["metrics"]
        assert {f"eval_{k}": v for k, v in metrics.items()} == scores
    # vs base: a paired test per model, Holm-adjusted, stated in the summary
    assert rows["base"]["vs_base"] is None
    for label in ("step-10", "step-20", "step-30"):
        vs = rows[label]["vs_base"]
        assert vs["metric"] == "spearman_cosine" and vs["p_holm"] >= vs["p_value"]
        assert vs["difference"] == pytest.approx(
            rows[label]["metrics"]["spearman_cosine"] - rows["base"]["metrics"]["spearman_cosine"]
        )
    summary = (out / "summary.md").read_text()
    assert f"| * | {report['best']} |" in summary and "Holm" in summary
    assert (out / "metric_vs_step.png").read_bytes()[:4] == b"\x89PNG"
    assert "spearman_cosine" in printed.out and "best" in printed.out

    # the same command in a fresh process: served from the results store, no model loaded
    code, stdout, stderr, heavy = run_fresh(args)
    assert code == 0, stderr
    assert heavy == [], f"a rerun imported {heavy}"
    assert "4 of 5 from results store" in stdout and "from results store" in stderr
    again = json.loads((out / "sweep.json").read_text())
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in report["rows"]]
    assert [r["vs_base"] for r in again["rows"]] == [r["vs_base"] for r in report["rows"]]
    assert all(r["from_results_store"] for r in again["rows"] if not r["same_as"])


def test_sweep_retrieval_on_scifact(tiny_run, scifact_small, tmp_path, monkeypatch):
    """Retrieval sweep: qrels, queries and corpus ids parsed once for all models, per-query files
    whose means are the metrics, a permutation test vs base, and a compare of two of its folders
    that agrees with the sweep's row."""
    from evalkit.data import beir
    from evalkit.jobs.compare import compare
    from evalkit.jobs.results import read_table

    calls = []
    for name in ("load_qrels", "load_queries", "count_corpus"):
        original = getattr(beir, name)

        def counted(*a, _f=original, _n=name, **k):
            calls.append(_n)
            return _f(*a, **k)

        monkeypatch.setattr(beir, name, counted)
    folder = scifact_small[0]
    task = RetrievalTask(folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels.tsv")
    out = tmp_path / "sweep"
    report = sweep([tiny_run], task, out=out, progress=False, results=tmp_path / "r", resamples=999)
    assert report["primary_metric"] == "cosine_ndcg@10" and report["task"] == "retrieval"
    rows = {r["label"]: r for r in report["rows"]}
    assert "permutation" in rows["step-30"]["vs_base"]["test"]
    assert sum(not r["same_as"] for r in report["rows"]) == 4  # four models evaluated ...
    assert sorted(calls) == ["count_corpus", "load_qrels", "load_queries"]  # ... data parsed once
    result = json.loads((out / "evals" / "step-30" / "metrics.json").read_text())
    table = read_table(
        {**result["per_query"], "path": str(out / "evals/step-30/per_query.parquet")}
    )
    assert table.num_rows == 25
    for key, value in result["metrics"].items():
        assert sum(table.column(key).to_pylist()) / 25 == pytest.approx(value, abs=1e-12)
    cmp = compare(out / "evals" / "base", out / "evals" / "step-30", resamples=999,
                  results=tmp_path / "r")  # fmt: skip
    ndcg = next(c for c in cmp["comparisons"] if c["metric"] == "cosine_ndcg@10")
    assert ndcg == {k: v for k, v in rows["step-30"]["vs_base"].items() if k != "p_holm"}
    assert len(cmp["comparisons"]) == 30  # 6 families x 5 cut-offs


def test_watch_follows_a_run_in_another_process(
    shared_data, tiny_model_dir, stsb_dev_small, tmp_path
):
    """--watch evaluates each checkpoint once it is complete while `evalkit train` runs in another
    process (started before the run folder exists) and stops when the run writes result.json."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evalkit", *train_args(shared_data, tiny_model_dir, run)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        report = sweep(
            [run], _pairs_task(stsb_dev_small), out=tmp_path / "sweep", watch=True, poll=0.2,
            watch_timeout=600, progress=False, results=tmp_path / "r", resamples=199,
        )  # fmt: skip
    finally:
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert report["finished"] is True
    labels = sorted(r["label"] for r in report["rows"])
    assert labels == ["base", "best", "step-10", "step-20", "step-30"]
    best = next(r for r in report["rows"] if r["label"] == "best")
    assert best["same_as"] == "step-30"  # no evaluator: best/ is the final model


def test_only_complete_checkpoints_are_taken(tiny_model_dir, tmp_path):
    """A half-written checkpoint is never evaluated: evalkit's temp folders and step-N without
    its trainer state are skipped; another trainer's checkpoint-N needs weights, config,
    trainer_state.json and, while watching, the same files on two polls."""
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-10.tmp-123").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, run / "checkpoints" / "step-20" / "model")  # no trainer state
    assert runs.checkpoints(run) == []
    (run / "checkpoints" / "step-20" / "trainer_state.pt").write_bytes(b"x")
    assert [c.label for c in runs.checkpoints(run)] == ["step-20"]

    hf = tmp_path / "hf-run"
    shutil.copytree(tiny_model_dir, hf / "checkpoint-5")
    assert runs.is_run_dir(hf) and runs.checkpoints(hf) == []  # no trainer_state.json yet
    (hf / "checkpoint-5" / "trainer_state.json").write_text("{}")
    assert [c.step for c in runs.checkpoints(hf)] == [5]
    stable = runs.Stability()
    assert runs.checkpoints(hf, stable) == []  # first look
    assert [c.step for c in runs.checkpoints(hf, stable)] == [5]  # same files on the second
    with open(hf / "checkpoint-5" / "trainer_state.json", "a") as f:
        f.write(" ")
    assert runs.checkpoints(hf, stable) == []  # still being written


def test_bad_input_gives_one_clear_line(tiny_run, stsb_dev_small, tmp_path, capsys):
    def error(args):
        code = cli_main(["sweep", *args, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1, err
        return err

    pairs = stsb_flags(stsb_dev_small)
    assert "does not exist" in error([str(tmp_path / "nope"), *pairs, "--out", str(tmp_path / "o")])
    assert "not both" in error([str(tiny_run), *pairs, "--corpus", "c", "--queries", "q",
                                "--qrels", "r", "--out", str(tmp_path / "o")])  # fmt: skip
    assert "say what to evaluate" in error([str(tiny_run), "--out", str(tmp_path / "o")])
    (tmp_path / "file").write_text("x")
    assert "is a file" in error([str(tiny_run), *pairs, "--out", str(tmp_path / "file")])
    (tmp_path / "empty").mkdir()
    err = error([str(tmp_path / "empty"), *pairs, "--out", str(tmp_path / "o")])
    assert "is neither a training run folder" in err and "nor a model folder" in err
    err = error([str(tiny_run), *pairs[:-2], "--label", "nope", "--out", str(tmp_path / "o")])
    assert "nope" in err
