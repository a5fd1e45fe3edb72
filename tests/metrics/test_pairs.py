"""Pair metrics: exact against scipy/sklearn/sentence-transformers, streaming-invariant, RAM-bounded."""

from __future__ import annotations

import csv
import threading
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score, matthews_corrcoef, roc_auc_score

from evalkit.errors import EvalkitError
from evalkit.metrics import ClassificationMetrics, SimilarityMetrics, pair_scores
from evalkit.metrics.pairs import SCORE_NAMES

CLASS_METRICS = ("accuracy", "accuracy_threshold", "f1", "precision", "recall", "f1_threshold")
CLASS_METRICS += ("ap", "mcc")


# ---------------------------------------------------------------- references (in memory)


def reference_similarity(scores: dict, gold) -> dict:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input -> nan, as scipy warns
        for name, s in scores.items():
            out[f"pearson_{name}"] = pearsonr(gold, s)[0]
            out[f"spearman_{name}"] = spearmanr(gold, s)[0]
    return out


def reference_classification(scores: dict, labels) -> dict:
    """sentence-transformers' own static search functions + sklearn, as its evaluator calls them."""
    from sentence_transformers.sentence_transformer.evaluation import (
        BinaryClassificationEvaluator as BCE,
    )

    labels = np.asarray(labels)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, s in scores.items():
            better = name in ("cosine", "dot")
            s = s if better else -s  # ST scores distances as positive numbers
            acc, acc_t = BCE.find_best_acc_and_threshold(s, labels, better)
            f1, p, r, f1_t = BCE.find_best_f1_and_threshold(s, labels, better)
            signed = s * (1 if better else -1)
            pred = (s >= f1_t) if better else (s <= f1_t)
            values = dict(accuracy=acc, accuracy_threshold=acc_t, f1=f1, precision=p, recall=r)
            values.update(f1_threshold=f1_t, ap=average_precision_score(labels, signed))
            values.update(mcc=matthews_corrcoef(labels, pred))
            both = 0 < labels.sum() < len(labels)
            values["roc_auc"] = roc_auc_score(labels, signed) if both else float("nan")
            out.update({f"{name}_{k}": float(v) for k, v in values.items()})
    return out


def assert_same(got: dict, want: dict, tol: float = 1e-6):
    for key, value in want.items():
        assert key in got, key
        if np.isnan(value):
            assert np.isnan(got[key]), (key, got[key])
        else:
            assert got[key] == pytest.approx(value, abs=tol), (key, got[key], value)


def synthetic(n=500, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 16)).astype(np.float32)
    b = (a + rng.normal(size=(n, 16)) * 1.5).astype(np.float32)
    b[::9] = a[::9]  # identical pairs: cosine 1, distance 0 (a tied group)
    scores = pair_scores(a, b)
    if ties:
        scores = {k: np.round(v, 1).astype(np.float32) for k, v in scores.items()}
    gold = np.round(rng.uniform(0, 5, n) * 2) / 2  # STS-like gold with many ties
    labels = (gold + rng.normal(size=n) > 2.5).astype(int)
    return scores, gold, labels


def feed(metric, scores, target, block):
    for start in range(0, len(target), block):
        metric.update(
            {k: v[start : start + block] for k, v in scores.items()}, target[start : start + block]
        )
    return metric


# ---------------------------------------------------------------- streaming == in memory


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_similarity_streaming_equals_scipy(block):
    scores, gold, _ = synthetic(ties=True)
    metric = feed(SimilarityMetrics(run_rows=50, chunk_rows=16), scores, gold, block)
    assert_same(metric.compute(), reference_similarity(scores, gold), tol=1e-9)


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_classification_streaming_equals_reference(block):
    scores, _, labels = synthetic(ties=True)
    metric = feed(ClassificationMetrics(run_rows=50, chunk_rows=16), scores, labels, block)
    assert_same(metric.compute(), reference_classification(scores, labels), tol=1e-9)


def test_untied_scores_and_merge_of_split_states():
    scores, gold, labels = synthetic(n=700, seed=3, ties=False)
    parts_s = [SimilarityMetrics(run_rows=64, chunk_rows=32) for _ in range(3)]
    parts_c = [ClassificationMetrics(run_rows=64, chunk_rows=32) for _ in range(3)]
    for i, (lo, hi) in enumerate([(0, 100), (100, 450), (450, 700)]):
        sl = {k: v[lo:hi] for k, v in scores.items()}
        parts_s[i].update(sl, gold[lo:hi])
        parts_c[i].update(sl, labels[lo:hi])
    for parts in (parts_s, parts_c):
        parts[2].merge(parts[0])  # merge order does not change an exact metric
        parts[1].merge(parts[2])
    assert_same(parts_s[1].compute(), reference_similarity(scores, gold), tol=1e-9)
    assert_same(parts_c[1].compute(), reference_classification(scores, labels), tol=1e-9)


@pytest.mark.parametrize(
    "case",
    ["constant_scores", "all_positive", "all_negative", "two_pairs", "one_pair", "constant_gold"],
)
def test_adversarial_cases(case):
    scores, gold, labels = synthetic(n=60, seed=5)
    if case == "constant_scores":
        scores = {k: np.full(60, 0.5, np.float32) for k in scores}
    elif case == "all_positive":
        labels = np.ones(60, int)
    elif case == "all_negative":
        labels = np.zeros(60, int)
    elif case == "constant_gold":
        gold = np.full(60, 3.0)
    elif case in ("two_pairs", "one_pair"):
        n = 2 if case == "two_pairs" else 1
        scores = {k: v[:n] for k, v in scores.items()}
        gold, labels = gold[:n], labels[:n]
    c = feed(ClassificationMetrics(run_rows=8, chunk_rows=4), scores, labels, 7)
    assert_same(c.compute(), reference_classification(scores, labels), tol=1e-9)
    if len(gold) >= 2:
        s = feed(SimilarityMetrics(run_rows=8, chunk_rows=4), scores, gold, 7)
        assert_same(s.compute(), reference_similarity(scores, gold), tol=1e-9)


def test_pair_scores_match_sentence_transformers():
    import torch
    from sentence_transformers import util

    rng = np.random.default_rng(0)
    a, b = (
        rng.normal(size=(50, 24)).astype(np.float32),
        rng.normal(size=(50, 24)).astype(np.float32),
    )
    a[0] = 0.0  # zero vector: cosine 0 thanks to the clamped norm
    got = pair_scores(a, b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    want = {
        "cosine": util.pairwise_cos_sim(ta, tb),
        "dot": util.pairwise_dot_score(ta, tb),
        "euclidean": util.pairwise_euclidean_sim(ta, tb),
        "manhattan": util.pairwise_manhattan_sim(ta, tb),
    }
    for name in SCORE_NAMES:
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name].numpy(), rtol=2e-6, atol=2e-6)
    # a pair's score does not depend on the batch it comes in
    one = pair_scores(a[7:8], b[7:8])
    assert all(one[k][0] == got[k][7] for k in SCORE_NAMES)


def test_records_are_spilled_to_disk_not_held():
    scores, gold, labels = synthetic(n=5000, seed=1)
    metric = ClassificationMetrics(run_rows=1000)
    feed(metric, scores, labels, 300)
    spill = metric._spill
    assert spill._buffered < 1000 and len(spill._files) == 4  # 4 x 1200 rows on disk, 200 in RAM
    assert sum(f.stat().st_size for f in spill._files) > 4800 * 17  # label + 4 float32 scores
    assert metric.count == 5000
    first = metric.compute()
    assert metric.compute() == first  # compute() leaves the state as it was
    leftovers = {p.name for p in spill.directory.iterdir()}
    assert leftovers == {f.name for f in spill._files}  # sort scratch space is removed


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon")


def test_memory_stays_bounded_for_millions_of_pairs():
    """1M pairs (in RAM they would need >= 1M x (gold + score + 2 ranks + positions) ~ 36 MB)."""
    n, batch = 1_000_000, 100_000
    rng = np.random.default_rng(0)
    metric = SimilarityMetrics(run_rows=1 << 16, chunk_rows=1 << 14)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon_kib())
            time.sleep(0.002)

    base = _rss_anon_kib()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        for _ in range(n // batch):
            gold = rng.integers(0, 50, batch).astype(np.float64)
            cos = (gold / 50 + rng.normal(size=batch) * 0.1).astype(np.float32)
            metric.update({"cosine": cos}, gold)
        result = metric.compute()
    finally:
        stop.set()
        thread.join()
    assert 0.5 < result["spearman_cosine"] < 1.0
    grew_mib = (peak[0] - base) / 1024
    assert grew_mib < 20, f"RssAnon grew {grew_mib:.0f} MiB for {n} pairs"


def test_bad_input_is_one_clear_error():
    with pytest.raises(EvalkitError, match="labels must be 0 or 1; row 1 has 2"):
        ClassificationMetrics().update({"cosine": np.zeros(2)}, [1, 2])
    with pytest.raises(EvalkitError, match=r"scores\['cosine'\] has shape"):
        SimilarityMetrics().update({"cosine": np.zeros(3)}, [1.0, 2.0])
    with pytest.raises(EvalkitError, match="NaN at row 1"):
        SimilarityMetrics().update({"cosine": np.array([0.1, np.nan])}, [1.0, 2.0])
    with pytest.raises(EvalkitError, match="at least 2 pairs"):
        SimilarityMetrics().compute()
    m = SimilarityMetrics()
    m.update({"cosine": np.zeros(2)}, [1.0, 2.0])
    with pytest.raises(EvalkitError, match="earlier batches"):
        m.update({"dot": np.zeros(2)}, [1.0, 2.0])


# ---------------------------------------------------------------- parity on real data


class StubModel:
    """Stands in for a SentenceTransformer: encode() returns fixed, precomputed vectors."""

    similarity_fn_name = "cosine"

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.model_card_data = SimpleNamespace(set_evaluation_metrics=lambda *a, **k: None)

    def encode(self, sentences, convert_to_tensor=False, **kwargs):
        import torch

        vectors = np.stack([self.table[s] for s in sentences])
        return torch.from_numpy(vectors) if convert_to_tensor else vectors


@pytest.fixture(scope="module")
def stsb(shared_data, tiny_model):
    s1, s2, gold = load_stsb(shared_data)
    return s1, s2, gold, _embed(tiny_model, s1 + s2, dtype=np.float32)


@pytest.fixture(scope="module")
def mrpc(shared_data, tiny_model):
    s1, s2, labels = load_mrpc(shared_data)
    return s1, s2, labels, _embed(tiny_model, s1 + s2, dtype=np.float32)


def _as64(table):
    """Float64 copies of the model's float32 embeddings: both sides then score in float64, so
    1-ulp float32 rounding differences between torch and numpy kernels cannot reorder near-tied
    pairs (a random tiny model crowds its cosines near 1, where such flips move Spearman/AP by
    ~1e-6). ``test_*_float32_scores`` covers the float32 path with ST's own torch scores."""
    return {text: vector.astype(np.float64) for text, vector in table.items()}


def _embed(model, texts, dtype=np.float32):
    unique = sorted(set(texts))
    vectors = model.encode(unique, batch_size=128, convert_to_numpy=True).astype(dtype)
    return dict(zip(unique, vectors, strict=True))


def _torch_scores(e1, e2):
    """sentence-transformers' own pairwise scores (its evaluators' code path)."""
    import torch
    from sentence_transformers import util

    a, b = torch.from_numpy(e1), torch.from_numpy(e2)
    return {
        "cosine": util.pairwise_cos_sim(a, b).numpy(),
        "dot": util.pairwise_dot_score(a, b).numpy(),
        "euclidean": util.pairwise_euclidean_sim(a, b).numpy(),
        "manhattan": util.pairwise_manhattan_sim(a, b).numpy(),
    }


def load_stsb(root):
    with open(root / "stsb" / "stsb-en-test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


def load_mrpc(root):
    path = root / "mrpc" / "msr_paraphrase_test.txt"
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[3] for r in rows], [r[4] for r in rows], np.array([int(r[0]) for r in rows])


def test_parity_stsb_with_embedding_similarity_evaluator(stsb):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    s1, s2, gold, table = stsb
    assert len(gold) == 1379
    table = _as64(table)
    evaluator = EmbeddingSimilarityEvaluator(
        s1, s2, gold.tolist(), similarity_fn_names=list(SCORE_NAMES), write_csv=False
    )
    want = evaluator(StubModel(table))
    e1, e2 = np.stack([table[s] for s in s1]), np.stack([table[s] for s in s2])
    metric = SimilarityMetrics(include_max=True, run_rows=500, chunk_rows=128)
    for start in range(0, len(gold), 300):
        metric.update_embeddings(
            e1[start : start + 300], e2[start : start + 300], gold[start : start + 300]
        )
    got = metric.compute()
    assert set(got) == set(want)
    assert_same(got, want, tol=1e-6)


def test_parity_mrpc_with_binary_classification_evaluator(mrpc):
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator

    s1, s2, labels, table = mrpc
    assert len(labels) == 1725
    table = _as64(table)
    evaluator = BinaryClassificationEvaluator(
        s1, s2, labels.tolist(), similarity_fn_names=list(SCORE_NAMES), write_csv=False
    )
    want = evaluator(StubModel(table))
    e1, e2 = np.stack([table[s] for s in s1]), np.stack([table[s] for s in s2])
    metric = ClassificationMetrics(include_max=True, run_rows=400, chunk_rows=100)
    for start in range(0, len(labels), 250):
        sl = slice(start, start + 250)
        metric.update_embeddings(e1[sl], e2[sl], labels[sl])
    got = metric.compute()
    st_keys = {k for k in got if not k.endswith("roc_auc")}
    assert st_keys == set(want)
    assert_same(got, want, tol=1e-6)
    scores = pair_scores(e1, e2)
    for name in SCORE_NAMES:
        assert got[f"{name}_roc_auc"] == pytest.approx(
            roc_auc_score(labels, scores[name]), abs=1e-9
        )
