"""evalkit.search.ann: exact ground truth vs brute force, tie-aware recall, the sweep, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evalkit.errors import DataError, EvalkitError

faiss = pytest.importorskip("faiss")

from _faiss_util import clustered, one_faiss_thread  # noqa: E402, F401

from evalkit.cli import main  # noqa: E402
from evalkit.search.ann import (  # noqa: E402
    ann_search,
    check_index,
    check_min_recall,
    exact_ground_truth,
    recall_at_k,
)


def blocks_of(x: np.ndarray, ids, size: int):
    def blocks():
        for s in range(0, len(x), size):
            yield ids[s : s + size], x[s : s + size]

    return blocks


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_exact_ground_truth_equals_brute_force(block):
    x = clustered(300, seed=1)
    x[10] = x[11]  # an exact tie: broken by the smaller id
    q = clustered(9, seed=2)
    q[0] = x[10]
    scores, ids = exact_ground_truth(q, blocks_of(x, np.arange(len(x)), block)(), 12)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ xn.T
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), s.shape), -s), axis=1)[:, :12]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(s, order, 1), atol=1e-6)
    assert list(ids[0, :2]) == [10, 11]


def test_recall_at_k_hand_computed_and_ties():
    gt_pos = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])
    gt_scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.5, 0.5, 0.1]])
    ann = np.array([[0, 2, 9], [5, 7, -1]])
    kr, one = recall_at_k(ann, gt_pos, gt_scores, 2)
    # query 0: top-2 truth {0, 1}; ANN top-2 = [0, 2] -> 1/2; nearest (0) found
    # query 1: 6 and 7 tie at the 2nd score, so either counts; ANN [5, 7] -> 2/2
    np.testing.assert_allclose(kr, [0.5, 1.0])
    np.testing.assert_allclose(one, [1.0, 1.0])
    kr, one = recall_at_k(np.array([[1, 2], [6, 7]]), gt_pos, gt_scores, 2)
    np.testing.assert_allclose(kr, [0.5, 1.0])
    np.testing.assert_allclose(one, [0.0, 0.0])


def test_check_min_recall():
    assert (
        check_min_recall(None) is None
        and check_min_recall(1) == 1.0
        and check_min_recall("0.9") == 0.9
    )
    for bad in (0, 1.5, -0.1, math.nan, "high"):
        with pytest.raises(EvalkitError, match=r"min_recall must"):
            check_min_recall(bad)


@pytest.fixture(scope="module")
def corpus():
    x = clustered(4000, dim=24, seed=3, centers=40)
    ids = np.array([f"d{i}" for i in range(len(x))], dtype=object)
    return x, ids


def test_flat_is_exact_and_held_out_queries_never_find_themselves(corpus):
    x, ids = corpus
    hold = np.sort(np.random.default_rng(0).choice(len(x), 50, replace=False))
    r = check_index(
        blocks_of(x, ids, 333), x[hold], holdout=hold, index="Flat", k=10, latency_queries=5
    )
    assert r["recall@10"] == 1.0 and r["1-recall@10"] == 1.0 and r["rows"] == len(x) - 50
    assert r["reached"] and r["passed"] is None and r["params"] == {}
    idx_ids = set(
        ann_search(
            x[hold], blocks_of(np.delete(x, hold, 0), np.delete(ids, hold), 500), 5, index="Flat"
        )[1].ravel()
    )
    assert not idx_ids & set(ids[hold])


def test_ivf_sweep_picks_cheapest_setting_and_reports_deltas(corpus):
    x, ids = corpus
    rng = np.random.default_rng(1)
    hold = np.sort(rng.choice(len(x), 60, replace=False))
    qids = [f"q{i}" for i in range(len(hold))]
    # each query is relevant to the corpus row nearest to it (by exact search), plus one random row
    kept = np.delete(np.arange(len(x)), hold)
    _, nearest = exact_ground_truth(x[hold], [(kept, np.delete(x, hold, 0))], 1)
    qrels = {
        q: {ids[n]: 1, ids[kept[rng.integers(len(kept))]]: 1}
        for q, n in zip(qids, nearest[:, 0], strict=True)
    }
    r = check_index(
        blocks_of(x, ids, 1000),
        x[hold],
        query_ids=qids,
        qrels=qrels,
        holdout=hold,
        index="IVF32,Flat",
        k=10,
        min_recall=0.9,
        latency_queries=5,
    )
    recalls = [row["recall@10"] for row in r["sweep"]]
    first = next(i for i, v in enumerate(recalls) if v >= 0.9)
    assert r["params"] == r["sweep"][first]["params"] and r["passed"] is True
    assert set(r["metric_deltas"]) == {"cosine_ndcg@10", "cosine_mrr@10", "cosine_recall@100"}
    for key, delta in r["metric_deltas"].items():
        assert delta == pytest.approx(r["metrics_ann"][key] - r["metrics_exact"][key])
    assert r["metrics_exact"]["cosine_mrr@10"] == pytest.approx(1.0)  # the nearest row is relevant
    assert all(w["delta"] < 0 for w in r["worst_queries"])


def test_unreachable_target_and_bad_inputs(corpus):
    x, ids = corpus
    hold = np.arange(0, 40)
    r = check_index(
        blocks_of(x, ids, 1000),
        x[hold],
        holdout=hold,
        index="PQ4x4",
        min_recall=0.99999,
        latency_queries=5,
    )
    assert r["passed"] is False and r["reached"] is False and r["recall@10"] < 0.99999
    with pytest.raises(DataError, match="dimension 8 but the index"):
        check_index(blocks_of(x, ids, 1000), np.ones((3, 8), np.float32), index="Flat")
    with pytest.raises(EvalkitError, match="larger than the corpus"):
        check_index(blocks_of(x[:20], ids[:20], 1000), x[:3], index="Flat", k=50)
    with pytest.raises(EvalkitError, match="min_recall must be in"):
        check_index(blocks_of(x, ids, 1000), x[:3], index="Flat", min_recall=1.5)


# ----------------------------------------------------------------------------- CLI, tiny model

WORDS = (
    "protein cell gene virus cancer brain heart blood drug dose trial mouse patient tissue "
    "immune signal receptor enzyme liver lung bone muscle sleep diet risk"
).split()


@pytest.fixture(scope="module")
def beir_set(tmp_path_factory):
    """A BEIR-layout corpus (600 docs), 40 queries and qrels, from a fixed random vocabulary."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("beir")
    docs = [" ".join(rng.choice(WORDS, 8)) for _ in range(600)]
    with open(root / "corpus.jsonl", "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"_id": f"doc{i}", "title": "", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f, open(root / "qrels.tsv", "w") as g:
        g.write("query-id\tcorpus-id\tscore\n")
        for i in range(40):
            d = int(rng.integers(600))
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(docs[d].split()[:4])}) + "\n")
            g.write(f"q{i}\tdoc{d}\t1\n")
    return root


def run_cli(beir_set, tiny_model_dir, tmp_path, *extra):
    return main(
        [
            "ann-check",
            "--corpus", str(beir_set / "corpus.jsonl"),
            "--queries", str(beir_set / "queries.jsonl"),
            "--qrels", str(beir_set / "qrels.tsv"),
            "--model", str(tiny_model_dir),
            "--cache", str(tmp_path / "cache"),
            "--device", "cpu",
            "--latency-queries", "5",
            "--quiet",
            "--out", str(tmp_path / "out"),
            *extra,
        ]
    )  # fmt: skip


def test_cli_exit_codes_for_min_recall(beir_set, tiny_model_dir, tmp_path, capsys):
    assert (
        run_cli(beir_set, tiny_model_dir, tmp_path, "--index", "IVF8,Flat", "--min-recall", "0.9")
        == 0
    )
    out = capsys.readouterr().out
    assert "metric change, ANN minus exact" in out and "cosine_ndcg@10" in out
    result = json.loads((tmp_path / "out" / "ann.json").read_text())
    assert (
        result["recall@10"] >= 0.9 and result["passed"] is True and result["index"] == "IVF8,Flat"
    )
    assert set(result["metric_deltas"]) == {"cosine_ndcg@10", "cosine_mrr@10", "cosine_recall@100"}
    assert "nprobe" in result["params"] and result["qps"] > 0
    assert (tmp_path / "out" / "summary.md").is_file() and (
        tmp_path / "out" / "recall_qps.png"
    ).is_file()

    assert (
        run_cli(beir_set, tiny_model_dir, tmp_path, "--index", "PQ4x4", "--min-recall", "0.99999")
        == 3
    )
    assert "NOT reached" in capsys.readouterr().out
    for bad in ("1.5", "0"):
        assert run_cli(beir_set, tiny_model_dir, tmp_path, "--min-recall", bad) == 1
        assert "min_recall must be in (0, 1]" in capsys.readouterr().err


def test_cli_index_build_then_check_against_it(beir_set, tiny_model_dir, tmp_path, capsys):
    corpus = str(beir_set / "corpus.jsonl")
    common = [
        "--model",
        str(tiny_model_dir),
        "--cache",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        "--quiet",
    ]
    assert (
        main(["index", "build", "--corpus", corpus, "--out", str(tmp_path / "idx"), *common]) == 0
    )
    out = capsys.readouterr().out
    assert "built Flat over 600 rows" in out and "why:" in out
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["model_fingerprint"] and meta["id_type"] == "large_string"
    code = main(
        ["ann-check", "--corpus", corpus, "--queries", str(beir_set / "queries.jsonl"),
         "--index", str(tmp_path / "idx"), "--latency-queries", "3", *common]
    )  # fmt: skip
    assert code == 0 and "recall@10 1.0000" in capsys.readouterr().out


def test_ann_search_is_a_drop_in_for_exact_search(corpus, tmp_path):
    x, ids = corpus
    q = clustered(12, dim=24, seed=9)
    str_ids = ids.astype(str)
    ex_scores, ex_ids = exact_ground_truth(q, blocks_of(x, str_ids, 700)(), 10)
    # a one-shot generator, as evaluate_retrieval streams its corpus
    scores, found = ann_search(q, blocks_of(x, str_ids, 700)(), 10, index="Flat", score="cosine")
    np.testing.assert_array_equal(found, ex_ids)
    np.testing.assert_allclose(scores, ex_scores, atol=1e-5)
    # a built index directory returns its stored ids; missing results are ""
    from evalkit.search.build import build_index

    build_index(x, ids=ids, spec="IVF16,Flat", out=tmp_path / "ivf")
    _, found = ann_search(q, None, 1500, index=tmp_path / "ivf", params={"nprobe": 1})
    assert (found == "").any() and set(found[found != ""]) <= set(ids)
    with pytest.raises(EvalkitError, match="cosine, dot and euclidean"):
        ann_search(q, blocks_of(x, ids, 700), 5, score="manhattan")


def test_precomputed_embeddings_index_build_and_sampled_check(tiny_model_dir, tmp_path, capsys):
    from evalkit.embed.shards import load_manifest
    from evalkit.jobs.precompute import run_precompute
    from evalkit.search.index import load_index

    rng = np.random.default_rng(3)
    with open(tmp_path / "texts.csv", "w") as f:
        f.write("id,text\n")
        for i in range(500):
            f.write(f"t{i},{' '.join(rng.choice(WORDS, 6))} {i}\n")
    emb = tmp_path / "emb"
    run_precompute(
        str(tmp_path / "texts.csv"), column="text", id_column="id", out=emb,
        model=str(tiny_model_dir), cache=str(tmp_path / "cache"), device="cpu",
    )  # fmt: skip
    fp = load_manifest(emb)["model_fingerprint"]
    assert (
        main(
            [
                "index",
                "build",
                "--embeddings",
                str(emb),
                "--index",
                "HNSW8",
                "--out",
                str(tmp_path / "idx"),
                "--quiet",
            ]
        )
        == 0
    )
    idx = load_index(tmp_path / "idx", model_fingerprint=fp)
    assert idx.meta["model_fingerprint"] == fp and idx.rows == 500
    assert idx.ids_of(idx.search(idx.index.reconstruct_n(0, 3), 1)[1])[:, 0].tolist() == [
        "t0",
        "t1",
        "t2",
    ]
    code = main(
        ["ann-check", "--embeddings", str(emb), "--index", "IVF4,Flat", "--sample-queries", "50",
         "--min-recall", "0.5", "--latency-queries", "3", "--out", str(tmp_path / "out"), "--quiet"]
    )  # fmt: skip
    result = json.loads((tmp_path / "out" / "ann.json").read_text())
    assert (
        code == 0
        and result["queries_sampled"]
        and result["rows"] == 450
        and result["queries"] == 50
    )
    assert result["model_fingerprint"] == fp


def test_evaluate_retrieval_with_an_index(beir_set, tiny_model_dir, tmp_path):
    """`evalkit evaluate retrieval --index SPEC`: Flat reproduces exact search; HNSW is close."""
    from evalkit.embed.models import load_model
    from evalkit.jobs.evaluate import evaluate_retrieval

    model = load_model(str(tiny_model_dir), device="cpu")
    paths = [str(beir_set / name) for name in ("corpus.jsonl", "queries.jsonl", "qrels.tsv")]
    kw = {
        "model": model,
        "cache": str(tmp_path / "cache"),
        "progress": False,
        "k_values": [10, 100],
    }
    exact = evaluate_retrieval(*paths, **kw)
    flat = evaluate_retrieval(*paths, index="Flat", **kw)
    assert flat["search"] == "ann:Flat" and exact["search"] == "exact"
    for key, value in exact["metrics"].items():
        assert flat["metrics"][key] == pytest.approx(value, abs=1e-9), key
    hnsw = evaluate_retrieval(*paths, index="HNSW16", **kw)
    assert abs(hnsw["metrics"]["cosine_ndcg@10"] - exact["metrics"]["cosine_ndcg@10"]) < 0.1
