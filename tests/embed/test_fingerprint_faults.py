"""Fault injection on the model fingerprint: a model edited by any route must never be served the
vectors its old self put in the store.

Each test edits a loaded model the way real code does (weight surgery through `.data`, a state
dict load, dynamic quantisation, tokenizer settings changed after loading, TF32 switched on) and
checks that the fingerprint, hence every store key, changes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from evalkit.embed.encoder import StreamingEncoder
from evalkit.embed.fingerprint import model_fingerprint
from evalkit.errors import EvalkitError

TEXTS = [
    "a cat sat on the mat",
    "the quick brown fox jumps over the lazy dog",
    "stocks fell sharply on tuesday",
    "Der schnelle braune Fuchs",
]
LONG = " ".join(f"word{i} alpha beta gamma" for i in range(60))  # > 128 tokens: truncated


@pytest.fixture()
def model(tiny_model):
    return copy.deepcopy(tiny_model)


def _served(model, store) -> tuple[np.ndarray, int]:
    with StreamingEncoder(model, store=store, batch_size=8) as enc:
        vectors = enc.encode(TEXTS + [LONG])
    return vectors, enc.stats.hits


def _assert_fresh(model, store) -> None:
    """Encode through the store after an edit: nothing may hit, the vectors are the model's."""
    served, hits = _served(model, store)
    truth = model.encode(TEXTS + [LONG], batch_size=8, convert_to_numpy=True)
    assert hits == 0
    np.testing.assert_allclose(served, truth, atol=1e-5, rtol=0)


def test_edit_through_data_that_bypasses_the_version_counter(model, tmp_path):
    """Guards against: `param.data[i] = ...` (pruning/surgery code) leaves autograd's version
    counter and the sampled values alone, so a memoised weights digest was reused and the store
    served the vectors of the old weights (cosine 0.79-0.89 to the true vectors here), exit 0."""
    store = tmp_path / "store"
    _served(model, store)
    emb = model[0].auto_model.embeddings.word_embeddings.weight
    ids = model.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    version = emb._version
    for row in {i for seq in ids for i in seq}:
        emb.data[row] = -emb.data[row]  # rows the texts use; not at the sampled positions
    assert emb._version == version  # the edit really bypassed the version counter
    _assert_fresh(model, store)


def test_load_state_dict_of_other_weights(model, tmp_path):
    """Guards against: weights replaced by `load_state_dict` keeping the old store keys."""
    from conftest import build_tiny_model_dir
    from sentence_transformers import SentenceTransformer

    store = tmp_path / "store"
    _served(model, store)
    other = SentenceTransformer(str(build_tiny_model_dir(tmp_path, seed=7)), device="cpu")
    model.load_state_dict(other.state_dict())
    _assert_fresh(model, store)


def _quantized(model, per_channel: bool):
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with torch.no_grad():
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qconfig})


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_dynamically_quantized_weights_are_hashed(model, tmp_path, per_channel):
    """Guards against: quantize_dynamic moves Linear weights into packed params, which are not
    parameters or buffers; two quantized models that differ only there had one fingerprint, so
    the store served one model's vectors for the other."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other[0].auto_model.encoder.layer:
            layer.attention.self.query.weight.mul_(-1.0)
    qa, qb = _quantized(model, per_channel), _quantized(other, per_channel)
    assert not np.allclose(qa.encode(TEXTS), qb.encode(TEXTS), atol=1e-4)  # really other vectors
    assert model_fingerprint(qa) != model_fingerprint(qb)
    store = tmp_path / "store"
    _served(qa, store)
    _assert_fresh(qb, store)


class _BackendSession:
    """Stands in for optimum's ORTModel / OVModel: the weights live in a file the session loaded
    (`model_path`, in `model_save_dir`), not in torch tensors."""

    def __init__(self, path: Path | None) -> None:
        self.model_path = path
        self.model_save_dir = path.parent if path is not None else None


class _BackendModule(torch.nn.Module):
    def __init__(self, path: Path | None, backend: str = "onnx") -> None:
        super().__init__()
        self.backend = backend
        self.model = _BackendSession(path)


class _BackendModel(torch.nn.Sequential):
    """The few members of a SentenceTransformer the encoder reads before encoding."""

    device = torch.device("cpu")

    def get_sentence_embedding_dimension(self) -> int:
        return 4


def test_onnx_and_openvino_weight_files_are_hashed(tmp_path):
    """Guards against: an ONNX/OpenVINO backend holds its weights outside torch, so two models
    with different weight files hashed alike (nothing but configs was in the key)."""
    fps = []
    for name, data in (("a", b"weights-one"), ("b", b"weights-two")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"graph")
        (folder / "model.onnx_data").write_bytes(data)  # external data file of the same model
        fps.append(model_fingerprint(_BackendModel(_BackendModule(folder / "model.onnx"))))
    assert fps[0] != fps[1]
    ov = tmp_path / "ov"
    ov.mkdir()
    (ov / "openvino_model.xml").write_bytes(b"<net/>")
    (ov / "openvino_model.bin").write_bytes(b"weights-one")
    module = _BackendModule(None, backend="openvino")
    module.model.model_save_dir = ov  # OVModel: only the folder is known
    before = model_fingerprint(_BackendModel(module))
    (ov / "openvino_model.bin").write_bytes(b"weights-two")
    assert model_fingerprint(_BackendModel(module)) != before


def test_nothing_to_hash_refuses_the_store(tmp_path):
    """Guards against: a model whose weights cannot be found was keyed on its configs alone, so
    any other model of that architecture was served its vectors. It must refuse in one line."""
    unhashable = _BackendModel(_BackendModule(None))
    with pytest.raises(EvalkitError, match="no-cache"):
        model_fingerprint(unhashable)
    with pytest.raises(EvalkitError, match="no-cache"):
        model_fingerprint(_BackendModel(torch.nn.Identity()))
    enc = StreamingEncoder(unhashable, store=tmp_path / "store")
    with pytest.raises(EvalkitError, match="no-cache"):
        enc.fingerprint  # noqa: B018
    assert StreamingEncoder(unhashable).model_info()["fingerprint"] is None  # no store: no key


def _lowercase_off(tok) -> None:
    from tokenizers.normalizers import BertNormalizer

    tok.backend_tokenizer.normalizer = BertNormalizer(lowercase=False)


TOKENIZER_EDITS = {
    "truncation_side": lambda tok: setattr(tok, "truncation_side", "left"),
    "padding_side": lambda tok: setattr(tok, "padding_side", "left"),
    "model_max_length": lambda tok: setattr(tok, "model_max_length", 16),
    "normaliser_lowercase": _lowercase_off,
    "do_lower_case": lambda tok: setattr(tok, "do_lower_case", False),
    "special_tokens": lambda tok: tok.add_special_tokens({"additional_special_tokens": ["[ZQX]"]}),
}


@pytest.mark.parametrize("edit", sorted(TOKENIZER_EDITS))
def test_live_tokenizer_settings_are_in_the_key(model, edit):
    """Guards against: tokenizer settings changed after loading (truncation side, max length,
    lower-casing, special tokens) change the token ids but not the fingerprint."""
    before = model_fingerprint(model)
    TOKENIZER_EDITS[edit](model.tokenizer)
    assert model_fingerprint(model) != before


def test_left_truncation_is_not_served_stale(model, tmp_path):
    """Guards against: `tokenizer.truncation_side = "left"` keeps the other end of a long text,
    yet the store served the right-truncated vector for it."""
    store = tmp_path / "store"
    _served(model, store)
    model.tokenizer.truncation_side = "left"
    _assert_fresh(model, store)


@pytest.fixture()
def restore_numerics():
    """Leave torch's global precision flags as they were (legacy API only: mixing the legacy and
    the new `fp32_precision` API makes torch refuse to read them)."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
    )
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32 = saved[1]
    torch.backends.cudnn.allow_tf32 = saved[2]
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = saved[3]


def test_cuda_tf32_and_matmul_precision_are_in_the_key(model, monkeypatch, restore_numerics):
    """Guards against: TF32 matmuls (10-bit mantissa) on CUDA change vectors far beyond float32
    rounding, yet float32 vectors computed with and without TF32 shared keys. Simulated on CPU:
    the model is reported to be on CUDA."""
    from evalkit.embed import fingerprint

    monkeypatch.setattr(fingerprint, "_device_type", lambda model: "cuda")
    seen = {model_fingerprint(model)}
    torch.backends.cuda.matmul.allow_tf32 = True
    seen.add(model_fingerprint(model))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32
    seen.add(model_fingerprint(model))
    torch.set_float32_matmul_precision("medium")
    seen.add(model_fingerprint(model))
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    seen.add(model_fingerprint(model))
    assert len(seen) == 5


def test_cuda_flags_do_not_split_cpu_keys(model, restore_numerics):
    """CUDA-only flags do not touch a CPU model's numerics, so they must not split its keys
    (a needless miss is not wrong, but every run would re-encode)."""
    before = model_fingerprint(model)
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32
    assert model_fingerprint(model) == before
