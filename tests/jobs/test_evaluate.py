"""The evaluation job end to end with a tiny random model on small real subsets: result structure,
equality with sentence-transformers' evaluators and pytrec_eval, the store on a second run, and
one clear error line (non-zero exit) for bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from evalkit.cli import main as cli_main
from evalkit.jobs.evaluate import evaluate_pairs, evaluate_retrieval

STSB_COLUMNS = "sentence1,sentence2,score"


@pytest.fixture(autouse=True)
def _memo(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALKIT_FINGERPRINT_MEMO", str(tmp_path / "memo.json"))


@pytest.fixture(scope="module")
def stsb_small(shared_data, tmp_path_factory):
    """The first 80 STS-B test pairs, headerless like the original."""
    lines = (shared_data / "stsb" / "stsb-en-test.csv").read_text(encoding="utf-8").splitlines(True)
    path = tmp_path_factory.mktemp("stsb") / "stsb-small.csv"
    path.write_text("".join(lines[:80]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stsb_rows(stsb_small):
    with open(stsb_small, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows]


@pytest.fixture(scope="module")
def mrpc_small(shared_data, tmp_path_factory):
    lines = (
        (shared_data / "mrpc" / "msr_paraphrase_test.txt")
        .read_text(encoding="utf-8-sig")
        .splitlines(True)
    )
    path = tmp_path_factory.mktemp("mrpc") / "mrpc-small.tsv"
    path.write_text("".join(lines[:81]), encoding="utf-8")
    rows = [line.rstrip("\n").split("\t") for line in lines[1:81]]
    return path, [r[3] for r in rows], [r[4] for r in rows], [int(r[0]) for r in rows]


def _pairs(path, model, **kw):
    return evaluate_pairs(
        path, left="sentence1", right="sentence2", label="score", model=model,
        column_names=STSB_COLUMNS.split(","), progress=False, **kw,
    )  # fmt: skip


def _retrieval(folder, model, **kw):
    return evaluate_retrieval(
        folder / "corpus.jsonl",
        folder / "queries.jsonl",
        folder / "qrels.tsv",
        model=model,
        progress=False,
        **kw,
    )


def test_pairs_result_structure_and_files(stsb_small, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = _pairs(stsb_small, tiny_model_dir, cache=tmp_path / "cache", out=out)
    written = json.loads((out / "metrics.json").read_text())
    metrics = written["metrics"]
    for score in ("cosine", "dot", "euclidean", "manhattan"):
        assert -1 <= metrics[f"spearman_{score}"] <= 1 and -1 <= metrics[f"pearson_{score}"] <= 1
    assert written["primary_metric"] == "spearman_cosine"
    assert written["model"]["path"] == str(tiny_model_dir.resolve())
    assert len(written["model"]["fingerprint"]) == 32
    assert written["data"]["rows"] == 80 and written["data"]["paths"]["data"] == str(stsb_small)
    assert written["data"]["fingerprint"]
    assert written["cache"]["hits"] + written["cache"]["misses"] > 0
    assert {"total_s", "encode_s", "model_load_s"} <= set(written["timings"])
    assert {"sentence-transformers", "numpy", "python"} <= set(written["versions"])
    assert (out / "summary.md").read_text().count("spearman_cosine") == 1
    assert (out / "score_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert result["metrics"] == metrics


def test_pairs_similarity_equals_sentence_transformers(stsb_small, stsb_rows, tiny_model):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    s1, s2, gold = stsb_rows
    ref = EmbeddingSimilarityEvaluator(
        s1,
        s2,
        gold,
        similarity_fn_names=["cosine", "dot", "euclidean", "manhattan"],
        write_csv=False,
    )(tiny_model)
    ours = _pairs(stsb_small, tiny_model, cache=False, read_batch_size=7)["metrics"]
    for key in ("pearson", "spearman"):
        for score in ("cosine", "dot", "euclidean", "manhattan"):
            assert ours[f"{key}_{score}"] == pytest.approx(ref[f"{key}_{score}"], abs=1e-6)


def test_pairs_classification_equals_sentence_transformers(mrpc_small, tiny_model, tmp_path):
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator

    path, s1, s2, labels = mrpc_small
    ref = BinaryClassificationEvaluator(
        s1, s2, labels, similarity_fn_names=["cosine", "dot"], write_csv=False
    )(tiny_model)
    result = evaluate_pairs(
        path, left="#1 String", right="#2 String", label="Quality", task="classification", model=tiny_model,
        cache=False, quoting=False, out=tmp_path, progress=False,
    )  # fmt: skip
    compared = [k for k in ref if not k.startswith("max_")]
    assert len(compared) == 16
    for key in compared:
        assert result["metrics"][key] == pytest.approx(ref[key], abs=1e-6), key
    assert (tmp_path / "precision_recall.png").exists()


# Retrieval parity runs the real MiniLM: a random tiny model packs all cosines within ~1e-3 of
# each other, so float noise between torch and numpy matmuls could swap deep ranks.
def test_retrieval_equals_information_retrieval_evaluator(scifact_small, minilm, tmp_path):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    folder, corpus, queries, qrels = scifact_small
    ks = [1, 3, 5, 10, 100]
    ref = InformationRetrievalEvaluator(
        queries, corpus, {q: set(d) for q, d in qrels.items()}, accuracy_at_k=ks, precision_recall_at_k=ks,
        mrr_at_k=ks, ndcg_at_k=ks, map_at_k=ks, corpus_chunk_size=50, write_csv=False,
    )(minilm)  # fmt: skip
    result = _retrieval(folder, minilm, cache=False, corpus_block=7, out=tmp_path)
    assert set(ref) <= set(result["metrics"])
    for key, value in ref.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert result["data"]["queries"] == 25 and result["data"]["rows"] == len(corpus)
    assert (tmp_path / "recall_at_k.png").exists()


def test_retrieval_trec_eval_dialect_equals_pytrec_eval(scifact_small, minilm):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    from sentence_transformers.util import cos_sim

    folder, corpus, queries, qrels = scifact_small
    ids = list(corpus)
    doc = minilm.encode([corpus[i] for i in ids], convert_to_tensor=True)
    qry = minilm.encode(list(queries.values()), convert_to_tensor=True)
    scores = cos_sim(qry, doc).numpy()  # as BEIR/MTEB score a run
    run = {
        q: {ids[j]: float(scores[qi, j]) for j in range(len(ids))} for qi, q in enumerate(queries)
    }
    measures = {"ndcg_cut.1,10,100", "map_cut.10,100", "recall.10,100", "P.5"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    ours = _retrieval(folder, minilm, cache=False, corpus_block=33, dialect="trec_eval")["metrics"]
    pairs = {
        "cosine_ndcg@10": "ndcg_cut_10", "cosine_ndcg@100": "ndcg_cut_100", "cosine_map@10": "map_cut_10",
        "cosine_map@100": "map_cut_100", "cosine_recall@10": "recall_10", "cosine_recall@100": "recall_100",
        "cosine_precision@5": "P_5",
    }  # fmt: skip
    for ours_key, trec_key in pairs.items():
        ref = np.mean([v[trec_key] for v in per_query.values()])
        assert ours[ours_key] == pytest.approx(ref, abs=1e-6), ours_key


def test_second_run_is_served_by_the_store(scifact_small, stsb_small, tiny_model_dir, tmp_path):
    """The embedding store alone (results store off): a second run encodes nothing."""
    folder = scifact_small[0]
    cache = tmp_path / "cache"
    first = _retrieval(folder, tiny_model_dir, cache=cache, results=False)
    assert first["cache"]["misses"] > 0 and first["cache"]["model_loaded"]
    second = _retrieval(folder, tiny_model_dir, cache=cache, results=False)
    assert second["cache"]["misses"] == 0 and second["cache"]["hit_rate"] == 1.0
    assert not second["cache"]["model_loaded"]  # fingerprint from the memo, vectors from the store
    assert second["metrics"] == first["metrics"]
    assert second["model"]["fingerprint"] == first["model"]["fingerprint"]
    p1 = _pairs(stsb_small, tiny_model_dir, cache=cache, results=False)
    p2 = _pairs(stsb_small, tiny_model_dir, cache=cache, results=False)
    assert p2["cache"]["misses"] == 0 and p2["metrics"] == p1["metrics"]


def test_cli_runs_and_prints_a_summary(stsb_small, tiny_model_dir, tmp_path, capsys):
    code = cli_main(
        ["evaluate", "pairs", str(stsb_small), "--column-names", STSB_COLUMNS, "--left", "sentence1",
         "--right", "sentence2", "--label", "score", "--model", str(tiny_model_dir), "--no-cache",
         "--out", str(tmp_path), "--quiet", "--no-plots"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "spearman_cosine" in out and "80 rows" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["cache"]["enabled"] is False
    assert not list(tmp_path.glob("*.png"))


def _cli_error(args, capsys) -> str:
    code = cli_main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_clear_line(
    stsb_small, scifact_small, tiny_model_dir, tmp_path, capsys
):
    model = ["--model", str(tiny_model_dir), "--no-cache", "--quiet"]
    err = _cli_error(
        ["evaluate", "pairs", str(stsb_small), "--column-names", STSB_COLUMNS, "--left", "sentence1",
         "--right", "sentence3", "--label", "score", *model],
        capsys,
    )  # fmt: skip
    assert "sentence3" in err and "sentence1, sentence2, score" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("sentence1,sentence2,score\n", encoding="utf-8")
    err = _cli_error(
        [
            "evaluate",
            "pairs",
            str(empty),
            "--left",
            "sentence1",
            "--right",
            "sentence2",
            "--label",
            "score",
            *model,
        ],
        capsys,
    )
    assert "no rows" in err
    err = _cli_error(
        ["evaluate", "pairs", str(stsb_small), "--column-names", STSB_COLUMNS, "--left", "sentence1",
         "--right", "sentence2", "--label", "score", "--task", "classification", *model],
        capsys,
    )  # fmt: skip
    assert "0/1 labels" in err
    folder = scifact_small[0]
    bad_qrels = tmp_path / "qrels.tsv"
    bad_qrels.write_text(
        (folder / "qrels.tsv").read_text() + "no-such-query\t123\t1\n", encoding="utf-8"
    )
    err = _cli_error(
        ["evaluate", "retrieval", "--corpus", str(folder / "corpus.jsonl"), "--queries",
         str(folder / "queries.jsonl"), "--qrels", str(bad_qrels), *model],
        capsys,
    )  # fmt: skip
    assert "'no-such-query'" in err and "not in" in err
    empty_corpus = tmp_path / "corpus.jsonl"
    empty_corpus.write_text("", encoding="utf-8")
    err = _cli_error(
        ["evaluate", "retrieval", "--corpus", str(empty_corpus), "--queries", str(folder / "queries.jsonl"),
         "--qrels", str(folder / "qrels.tsv"), *model],
        capsys,
    )  # fmt: skip
    assert "no documents" in err


def test_bad_arguments_raise_at_the_door(stsb_small, tiny_model_dir):
    from evalkit.errors import EvalkitError

    with pytest.raises(EvalkitError, match="task must be one of"):
        _pairs(stsb_small, tiny_model_dir, task="regression")
    with pytest.raises(EvalkitError, match="k_values must be positive"):
        evaluate_retrieval("c", "q", "r", k_values=[0, 10])
    with pytest.raises(EvalkitError, match="dialect must be one of"):
        evaluate_retrieval("c", "q", "r", dialect="beir")
