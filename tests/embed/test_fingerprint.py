"""Model fingerprints: equal for the same model/settings, different after any change."""

from __future__ import annotations

import copy

import pytest

from evalkit.embed.fingerprint import model_fingerprint, weights_digest
from evalkit.embed.store import make_keys


@pytest.fixture()
def model_copy(tiny_model):
    return copy.deepcopy(tiny_model)


def test_same_checkpoint_loaded_twice_is_equal(tiny_model_dir, tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    again = SentenceTransformer(str(tiny_model_dir), device="cpu")
    assert model_fingerprint(again) == model_fingerprint(tiny_model)
    # saved elsewhere and reloaded from another path: still the same model
    tiny_model.save(str(tmp_path / "copy"))
    moved = SentenceTransformer(str(tmp_path / "copy"), device="cpu")
    assert model_fingerprint(moved) == model_fingerprint(tiny_model)


def test_one_optimizer_step_changes_it(model_copy):
    import torch

    before = model_fingerprint(model_copy)
    model_copy.train()
    features = model_copy.tokenize(["a sentence", "another one"])
    out = model_copy(features)["sentence_embedding"]
    loss = out.pow(2).sum()
    opt = torch.optim.SGD(model_copy.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    after = model_fingerprint(model_copy)
    assert after != before
    assert model_fingerprint(model_copy) == after  # cached, and stable


def test_in_place_edits_are_never_served_stale(model_copy):
    import torch

    base = model_fingerprint(model_copy)
    param = next(model_copy.parameters())
    with torch.no_grad():  # bumps the version counter
        param.view(-1)[0] += 1.0
    edited = model_fingerprint(model_copy)
    assert edited != base
    # `.data` edits bypass the version counter; every call hashes every byte, so they show
    param.data.mul_(0.5)
    assert model_fingerprint(model_copy) != edited
    assert model_fingerprint(model_copy) == model_fingerprint(model_copy, refresh=True)


def test_a_different_model_differs(tiny_model, tmp_path):
    from conftest import build_tiny_model_dir
    from sentence_transformers import SentenceTransformer

    other = SentenceTransformer(str(build_tiny_model_dir(tmp_path, seed=1)), device="cpu")
    assert weights_digest(other) != weights_digest(tiny_model)
    assert model_fingerprint(other) != model_fingerprint(tiny_model)


def test_settings_change_the_fingerprint_and_keys(model_copy):
    base = model_fingerprint(model_copy)
    variants = {
        "prompt": model_fingerprint(model_copy, prompt="query: "),
        "normalize": model_fingerprint(model_copy, normalize=True),
        "precision": model_fingerprint(model_copy, precision="float16"),
        "truncate": model_fingerprint(model_copy, truncate_dim=16),
        "compute": model_fingerprint(model_copy, compute="autocast-float16"),
    }
    assert len({base, *variants.values()}) == len(variants) + 1
    model_copy.max_seq_length = 16
    assert model_fingerprint(model_copy) != base
    keys = {fp: make_keys(fp, ["same text"])[0] for fp in (base, *variants.values())}
    assert len(set(keys.values())) == len(keys)


def test_tokenizer_change_changes_it(model_copy):
    base = model_fingerprint(model_copy)
    model_copy.tokenizer.add_tokens(["zzqqxx"])
    assert model_fingerprint(model_copy) != base


def test_fingerprint_is_stable_across_the_first_encode_call(tiny_model_dir):
    """HF tokenizers switch their padding state on the first encode; that must not change keys."""
    from sentence_transformers import SentenceTransformer

    from evalkit.embed.fingerprint import model_fingerprint

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    before = model_fingerprint(model, refresh=True)
    model.encode(["a short text", "a somewhat longer text to pad against"], batch_size=2)
    assert model_fingerprint(model, refresh=True) == before
