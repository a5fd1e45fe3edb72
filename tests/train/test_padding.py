"""evalkit.train.padding: padding-aware sub-batches give the padded forward's answer."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import build_tiny_model_dir  # noqa: E402
from sentence_transformers import InputExample, SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402

from evalkit.train.fit import fit  # noqa: E402
from evalkit.train.padding import SplitForward, plan_groups  # noqa: E402

TEXTS = [
    "a",
    "a man is playing a guitar on the street near the old red car",
    "dogs",
    "the cat sat on the mat",
    "a small bird is singing in a tree in the park this morning while people walk by",
    "hi there",
    "two children play with a ball",
    "x y",
]


@pytest.fixture(scope="module")
def nodrop_dir(tmp_path_factory):
    base = build_tiny_model_dir(tmp_path_factory.mktemp("tiny-pad"))
    nodrop = base.parent / "nodrop"
    shutil.copytree(base, nodrop)
    config = json.loads((nodrop / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (nodrop / "config.json").write_text(json.dumps(config))
    return nodrop


def _brute(lengths, overhead):
    n, best = len(lengths), None
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            ends = [*cuts, n]
            cost, start = 0.0, 0
            for end in ends:
                cost += (end - start) * lengths[end - 1] + overhead
                start = end
            if best is None or cost < best[0]:
                best = (cost, ends)
    return best[0]


@pytest.mark.parametrize("overhead", [0.0, 3.0, 50.0])
def test_plan_groups_is_optimal(overhead):
    """Guards the dynamic programme: its cut must cost no more than the best of every cut."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = np.sort(rng.integers(1, 40, size=rng.integers(1, 8)))
        ends = plan_groups(lengths, overhead)
        cost, start = 0.0, 0
        for end in ends:
            cost += (end - start) * lengths[end - 1] + overhead
            start = end
        assert ends[-1] == len(lengths)
        assert cost == pytest.approx(_brute(lengths, overhead))


def test_split_forward_equals_the_padded_forward_and_its_gradients(nodrop_dir):
    """Guards against sub-batching changing the model's answer or gradient: rows put back in
    the wrong order, padding trimmed from real tokens, or token outputs misaligned."""
    results = []
    for split in (False, True):
        model = SentenceTransformer(str(nodrop_dir), device="cpu")
        model.train()
        splitter = SplitForward.install(model, overhead=0.0) if split else None
        features = model.preprocess(TEXTS)
        out = model(features)
        emb = out["sentence_embedding"]
        (emb * torch.arange(emb.numel()).reshape(emb.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((emb.detach(), out["token_embeddings"].detach(), out, grads))
        if splitter is not None:
            assert splitter.split_calls == 1 and splitter.tokens_run < splitter.tokens_padded
            splitter.remove()
            assert "forward" not in model.__dict__
    (e0, t0, o0, g0), (e1, t1, o1, g1) = results
    torch.testing.assert_close(e1, e0, rtol=0, atol=1e-6)
    mask = o0["attention_mask"].bool()
    torch.testing.assert_close(t1[mask], t0[mask], rtol=0, atol=1e-6)  # real tokens agree
    assert (t1[~mask] == 0).all()
    assert torch.equal(o1["attention_mask"], o0["attention_mask"])
    assert torch.equal(o1["input_ids"], o0["input_ids"])
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-4)


def test_left_padded_inputs_are_not_split(nodrop_dir):
    """Guards against trimming the wrong side: a left-padded batch goes through whole."""
    model = SentenceTransformer(str(nodrop_dir), device="cpu")
    splitter = SplitForward.install(model, overhead=0.0)
    features = model.preprocess(TEXTS)
    features = {k: (v.flip(1) if k in ("input_ids", "attention_mask", "token_type_ids") else v)
                for k, v in features.items()}  # fmt: skip
    model(features)
    assert splitter.calls == 1 and splitter.split_calls == 0
    splitter.remove()


def test_fit_with_and_without_split_padding_trains_the_same_weights(nodrop_dir):
    """Guards the training path end to end: the same batches, the same steps, the same weights
    (up to float rounding) whether padding is split away or computed."""
    rng = np.random.default_rng(1)
    examples = [
        InputExample(texts=[TEXTS[i], TEXTS[j]], label=float(rng.random()))
        for i, j in rng.integers(0, len(TEXTS), size=(32, 2))
    ]
    weights = []
    for split in (False, True):
        model = SentenceTransformer(str(nodrop_dir), device="cpu")
        fit(model, examples, losses.CosineSimilarityLoss(model), max_steps=4, batch_size=8,
            seed=2, progress=False, device="cpu", split_padding=split)  # fmt: skip
        assert "forward" not in model.__dict__  # the wrapper is gone after fit
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6)
