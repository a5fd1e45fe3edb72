"""Model and data fingerprints: equal for the same model/settings, different after any change."""

from __future__ import annotations

import copy
import shutil

import pytest

from evalkit.errors import DataError
from evalkit.fingerprint import data_fingerprint, model_fingerprint, weights_digest
from evalkit.store import make_keys


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
    # `.data` edits bypass the version counter; the sampled values still catch whole-tensor edits
    param.data.mul_(0.5)
    assert model_fingerprint(model_copy) != edited
    # a full rehash agrees with what the cache says
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


def test_data_fingerprint(tmp_path, shared_data):
    src = shared_data / "stsb" / "stsb-en-dev.csv"
    a = tmp_path / src.name
    shutil.copy(src, a)
    fp = data_fingerprint(a)
    assert fp == data_fingerprint(src)  # same name and bytes; mtime/location do not matter
    assert data_fingerprint(a, content=True) == data_fingerprint(src, content=True)
    assert data_fingerprint(a, content=True) != fp
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 1
    a.write_bytes(bytes(data))
    assert data_fingerprint(a, content=True) != data_fingerprint(src, content=True)
    assert data_fingerprint(tmp_path) != data_fingerprint(shared_data / "stsb")
    assert data_fingerprint([src]) == data_fingerprint(src)
    with pytest.raises(DataError, match="does not exist"):
        data_fingerprint(tmp_path / "missing.csv")


def test_data_fingerprint_samples_large_files(tmp_path):
    big = tmp_path / "big.bin"
    payload = bytearray(b"x" * (4 << 20))
    big.write_bytes(bytes(payload))
    sampled = data_fingerprint(big)
    payload[0] = ord("y")  # the head block is always sampled
    big.write_bytes(bytes(payload))
    assert data_fingerprint(big) != sampled


def test_data_fingerprint_of_a_table():
    import pyarrow as pa

    t = pa.table({"text": ["a", "b"]})
    assert data_fingerprint(t) == data_fingerprint(pa.table({"text": ["a", "b"]}))
    assert data_fingerprint(t) != data_fingerprint(pa.table({"text": ["a", "c"]}))


def test_fingerprint_is_stable_across_the_first_encode_call(tiny_model_dir):
    """HF tokenizers switch their padding state on the first encode; that must not change keys."""
    from sentence_transformers import SentenceTransformer

    from evalkit.fingerprint import model_fingerprint

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    before = model_fingerprint(model, refresh=True)
    model.encode(["a short text", "a somewhat longer text to pad against"], batch_size=2)
    assert model_fingerprint(model, refresh=True) == before
