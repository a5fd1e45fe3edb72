"""The streaming evaluators behave as sentence-transformers SentenceEvaluators: the ST call
signature, primary_metric, name prefixes, CSV output, and the same numbers as ST's evaluators."""

from __future__ import annotations

import csv
import importlib
import subprocess
import sys

import pytest

import evalkit.evaluation.evaluators as ev


def _stsb(shared_data, n=60):
    with open(shared_data / "stsb" / "stsb-en-test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[:n]
    return [r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows]


def test_import_is_cheap_and_classes_subclass_sentence_evaluator():
    code = "import sys, evalkit.evaluation.evaluators; print('sentence_transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]
    base = ev._sentence_evaluator_base()
    for name in ("StreamingPairEvaluator", "StreamingSimilarityEvaluator",
                 "StreamingBinaryClassificationEvaluator", "StreamingRetrievalEvaluator"):  # fmt: skip
        cls = getattr(ev, name)
        assert issubclass(cls, base) and cls.__module__ == "evalkit.evaluation.evaluators"
        assert (
            getattr(importlib.import_module("evalkit.evaluation.evaluators"), name) is cls
        )  # pickles by name
    with pytest.raises(AttributeError):
        ev.NoSuchEvaluator  # noqa: B018


def test_similarity_evaluator_with_the_st_signature(shared_data, tiny_model, tmp_path):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    s1, s2, gold = _stsb(shared_data)
    evaluator = ev.StreamingSimilarityEvaluator(
        sentences1=s1, sentences2=s2, labels=gold, name="sts", read_batch_size=16
    )
    assert evaluator.greater_is_better is True
    metrics = evaluator(tiny_model, output_path=str(tmp_path), epoch=1, steps=10)
    assert evaluator.primary_metric == "sts_spearman_cosine"
    ref = EmbeddingSimilarityEvaluator(s1, s2, gold, name="sts", write_csv=False)(tiny_model)
    assert metrics["sts_spearman_cosine"] == pytest.approx(ref["sts_spearman_cosine"], abs=1e-6)
    assert metrics["sts_pearson_cosine"] == pytest.approx(ref["sts_pearson_cosine"], abs=1e-6)
    evaluator(tiny_model, output_path=str(tmp_path), epoch=2, steps=-1)
    rows = list(csv.reader(open(tmp_path / "pairs_evaluation_sts_results.csv", encoding="utf-8")))
    assert rows[0][:3] == ["epoch", "steps", "pearson_cosine"] and [r[:2] for r in rows[1:]] == [
        ["1", "10"],
        ["2", "-1"],
    ]
    assert evaluator.primary_metric == "sts_spearman_cosine"  # not prefixed twice


def test_pair_evaluator_streams_a_file(shared_data, tiny_model):
    evaluator = ev.StreamingPairEvaluator(
        shared_data / "stsb" / "stsb-en-test.csv", column_names=["sentence1", "sentence2", "score"]
    )
    metrics = evaluator(tiny_model)
    assert evaluator.primary_metric == "spearman_cosine" and "spearman_cosine" in metrics
    from evalkit.errors import DataError

    with pytest.raises(DataError, match="sentence3"):
        ev.StreamingPairEvaluator(
            shared_data / "stsb" / "stsb-en-test.csv",
            column_names=["sentence1", "sentence3", "score"],
            right="sentence2",
        )


def test_binary_classification_evaluator(shared_data, tiny_model):
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator

    lines = (
        (shared_data / "mrpc" / "msr_paraphrase_test.txt")
        .read_text(encoding="utf-8-sig")
        .splitlines()[1:61]
    )
    rows = [line.split("\t") for line in lines]
    s1, s2, labels = [r[3] for r in rows], [r[4] for r in rows], [int(r[0]) for r in rows]
    evaluator = ev.StreamingBinaryClassificationEvaluator(
        sentences1=s1, sentences2=s2, labels=labels
    )
    metrics = evaluator(tiny_model)
    ref = BinaryClassificationEvaluator(s1, s2, labels, write_csv=False)(tiny_model)
    assert evaluator.primary_metric == "cosine_ap"
    for key, value in ref.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_retrieval_evaluator_with_dicts_and_files(shared_data, tiny_model, tmp_path):
    import json

    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from evalkit.data import beir

    src = shared_data / "beir-scifact"
    qrels = beir.load_qrels(src / "qrels" / "test.tsv")
    qids = sorted(qrels)[:25]
    qrels = {q: qrels[q] for q in qids}
    qid_all, qtext_all = beir.load_queries(src / "queries.jsonl")
    queries = {q: t for q, t in zip(qid_all, qtext_all, strict=True) if q in qrels}
    wanted = {d for q in qids for d in qrels[q]}
    corpus = {}
    for ids, texts in beir.iter_corpus(src / "corpus.jsonl"):
        for i, t in zip(ids, texts, strict=True):
            if i in wanted or len(corpus) < 150:
                corpus[i] = t
    evaluator = ev.StreamingRetrievalEvaluator(
        queries, corpus, {q: set(d) for q, d in qrels.items()}, name="sf", corpus_block=40
    )
    metrics = evaluator(tiny_model, epoch=0, steps=3)
    assert evaluator.primary_metric == "sf_cosine_ndcg@10"
    ref = InformationRetrievalEvaluator(
        queries, corpus, {q: set(d) for q, d in qrels.items()}, name="sf", write_csv=False
    )(tiny_model)
    for key, value in ref.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    # the same from BEIR files, streamed from disk
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in corpus.items())
    )
    (tmp_path / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items())
    )
    (tmp_path / "qrels.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{q}\t{d}\t{g}\n" for q in qids for d, g in qrels[q].items())
    )
    from_files = ev.StreamingRetrievalEvaluator(
        tmp_path / "queries.jsonl", tmp_path / "corpus.jsonl", tmp_path / "qrels.tsv", name="sf"
    )(tiny_model)
    assert from_files == pytest.approx(metrics, abs=1e-6)


def test_evaluator_inside_sequential_evaluator(shared_data, tiny_model):
    from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator

    s1, s2, gold = _stsb(shared_data, 30)
    seq = SequentialEvaluator(
        [ev.StreamingSimilarityEvaluator(sentences1=s1, sentences2=s2, labels=gold, name="a")]
    )
    out = seq(tiny_model)
    assert "a_spearman_cosine" in out


def test_bad_arguments():
    from evalkit.errors import DataError, EvalkitError

    with pytest.raises(EvalkitError, match="either data="):
        ev.StreamingPairEvaluator(sentences1=["a"], labels=[1.0])
    with pytest.raises(EvalkitError, match="one length"):
        ev.StreamingPairEvaluator(sentences1=["a"], sentences2=["b", "c"], labels=[1.0])
    with pytest.raises(DataError, match="'q9'"):
        ev.StreamingRetrievalEvaluator({"q1": "x"}, {"d1": "y"}, {"q9": {"d1"}})
