"""Model fingerprints: what makes an embedding-cache key honest.

A model fingerprint is a digest over everything that changes an embedding beyond float32
rounding (docs/design.md, "What is in the key"):

1. the weights (`weights_digest`): every `state_dict()` entry plus the non-persistent buffers,
   sorted by name, as exact bytes with name, dtype and shape; quantized tensors (e.g. the packed
   params of `quantize_dynamic` Linear layers, which are no parameters) as their integer values,
   scales and zero points; for a module run by another backend (ONNX / OpenVINO through optimum)
   the weight files that backend loaded. When nothing can be hashed it raises EvalkitError:
   keying on configs alone would serve one model's vectors for another;
2. the tokenizer: its serialised state (vocabulary, normaliser, added tokens, ...) and its live
   settings (truncation and padding side, model_max_length, lower-casing, special tokens, ...),
   whether set at load or after; HF's per-call padding/truncation state is left out;
3. each module's config (transformer config minus path/version noise, pooling, dense, ...);
4. the encode settings: max_seq_length, truncate_dim, normalisation, the prompt text, the output
   precision and the compute mode (e.g. CUDA autocast fp16);
5. the float32 matmul precision flags of the model's device (`numerics`): TF32, matmul precision
   and reduced-precision reductions on CUDA, oneDNN bf16/tf32 matmuls on CPU.

Every call hashes every weight byte with xxh3-128 (~11 GB/s on one core: MiniLM's 91 MB in
~8 ms), so there is no memoised digest to go stale: an edit through `.data`, which bypasses
autograd's version counter, is seen like any other. Library versions and the device are recorded
with the store's entries, not keyed (they change vectors by float32 rounding only).

Data fingerprints (of input files) live in `evalkit.data.fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from evalkit.errors import EvalkitError

FINGERPRINT_VERSION = "evalkit-fp-3"
# Config keys that record where/how a model was loaded, not what it computes.
_NOISE_KEYS = {"transformers_version", "name_or_path", "cache_dir", "local_files_only", "token"}
# Tokenizer attributes that do not change token ids: load location, chat templates, logging, and
# flags HF flips by itself (on the first call, inside context managers).
_TOKENIZER_NOISE = _NOISE_KEYS | {
    "verbose",
    "chat_template",
    "response_template",
    "chat_control_tokens",
    "backend",
    "_in_target_context_manager",
    "_should_update_post_processor",
    "_processor_class",
}
# Files a non-torch backend keeps its weights in (ONNX + external data, OpenVINO IR).
_BACKEND_SUFFIXES = {".onnx", ".onnx_data", ".data", ".xml", ".bin"}
_BACKEND_STATES: dict[bytes, str] = {}  # xxh3-128 of a serialised tokenizer -> its state digest
_CUDA_ENV = ("NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")


def _refuse(why: str) -> EvalkitError:
    return EvalkitError(
        f"cannot fingerprint this model's weights ({why}), so the embedding store cannot key "
        "its vectors; run without the store (--no-cache, or cache=False)"
    )


# --------------------------------------------------------------------------------- weights


def _tensor_bytes(t: Any) -> memoryview:
    import torch

    flat = t.reshape(-1).contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _wrapper_subclass(t: Any) -> bool:
    try:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    except ImportError:  # older torch: no wrapper subclasses to flatten
        return False
    return is_traceable_wrapper_subclass(t)


def _hash_tensor(h: Any, name: str, t: Any) -> int:
    """Hash one tensor (quantized, wrapper-subclass or plain) into `h`; returns tensors hashed."""
    import torch

    t = t.detach()
    if t.device.type == "meta":
        raise _refuse(f"{name} is on the meta device: its values were never loaded")
    if _wrapper_subclass(t):  # e.g. torchao quantized weights: hash the parts
        inner, ctx = t.__tensor_flatten__()
        h.update(f"{name}|{type(t).__qualname__}|{ctx!r}\n".encode())
        return sum(_hash_tensor(h, f"{name}.{part}", getattr(t, part)) for part in inner) or 1
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    if t.is_quantized:
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            h.update(f"{t.qscheme()}|{t.q_scale()!r}|{t.q_zero_point()}\n".encode())
        else:
            h.update(f"{t.qscheme()}|axis {t.q_per_channel_axis()}\n".encode())
            h.update(_tensor_bytes(t.q_per_channel_scales().double()))
            h.update(_tensor_bytes(t.q_per_channel_zero_points().long()))
        t = t.int_repr()
    elif t.layout != torch.strided:
        t = t.to_dense()
    if t.numel():
        try:
            h.update(_tensor_bytes(t))
        except (RuntimeError, TypeError) as exc:
            raise _refuse(f"{name} ({type(t).__name__}) has no readable bytes: {exc}") from exc
    return 1


def _hash_value(h: Any, name: str, value: Any) -> int:
    """Hash a state_dict entry: a tensor, a (nested) tuple/list/dict of them (packed params), or
    a plain value (dtype, number, string); returns the number of tensors hashed."""
    import torch

    if isinstance(value, torch.Tensor):
        return _hash_tensor(h, name, value)
    if isinstance(value, (tuple, list)):
        h.update(f"{name}|{type(value).__name__}|{len(value)}\n".encode())
        return sum(_hash_value(h, f"{name}.{i}", v) for i, v in enumerate(value))
    if isinstance(value, dict):
        h.update(f"{name}|dict|{len(value)}\n".encode())
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return sum(_hash_value(h, f"{name}.{k}", v) for k, v in items)
    h.update(f"{name}|{type(value).__qualname__}|{value!r}\n".encode())
    return 0


def _state_items(model: Any) -> list[tuple[str, Any]]:
    """`state_dict()` (which unpacks quantized packed params) plus non-persistent buffers."""
    if not hasattr(model, "state_dict"):
        return []
    items = dict(model.state_dict(keep_vars=True))
    for name, buf in model.named_buffers():
        items.setdefault(name, buf)
    return sorted(items.items())


def _session_files(session: Any) -> list[Path]:
    """The weight files behind an optimum ORTModel (`model_path`: the .onnx file) or OVModel
    (`model_save_dir`: the IR .xml + .bin): the loaded file and every ONNX/IR/data file beside
    it (external data may have any name; sibling variants only cost hashing time)."""
    path = getattr(session, "model_path", None)
    folder = getattr(session, "model_save_dir", None) or getattr(session, "_model_save_dir", None)
    if isinstance(folder, tempfile.TemporaryDirectory):  # exported on the fly
        folder = folder.name
    files = set()
    if path is not None and Path(path).is_file():
        files.add(Path(path))
        folder = Path(path).parent
    if folder is not None and Path(folder).is_dir():
        files.update(
            p for p in Path(folder).iterdir() if p.is_file() and p.suffix in _BACKEND_SUFFIXES
        )
    return sorted(files)


def _backend_files(model: Any) -> list[tuple[str, Path]]:
    """(label, file) for every module that runs its weights outside torch (`backend` != torch)."""
    out = []
    named = model.named_modules() if hasattr(model, "named_modules") else []
    for name, module in named:
        backend = getattr(module, "backend", "torch")
        if not name or not isinstance(backend, str) or backend == "torch":
            continue
        files = _session_files(getattr(module, "model", None))
        if not files:
            raise _refuse(f"module {name!r} runs on the {backend} backend and its weight files "
                          "cannot be found")  # fmt: skip
        out += [(f"{name}/{p.name}", p) for p in files]
    return out


def weights_digest(model: Any, *, refresh: bool = False) -> str:
    """xxh3-128 over all weights of `model`: state_dict entries and buffers (sorted by name,
    exact bytes) and the weight files of non-torch backends. Every call reads every byte;
    `refresh` is accepted for compatibility. Raises EvalkitError when nothing can be hashed."""
    import xxhash

    h = xxhash.xxh3_128()
    hashed = sum(_hash_value(h, name, value) for name, value in _state_items(model))
    for label, path in _backend_files(model):
        h.update(f"file|{label}|{path.stat().st_size}\n".encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        hashed += 1
    if not hashed:
        raise _refuse(f"{type(model).__name__} has no tensors and no backend weight files")
    return h.hexdigest()


# -------------------------------------------------------------------------------- numerics


def _flag(obj: Any, attr: str) -> Any:
    try:
        return getattr(obj, attr, None)
    except RuntimeError as exc:  # torch refuses to read mixed legacy/new precision settings
        return f"unreadable ({str(exc)[:40]})"


def numerics(device_type: str) -> dict[str, Any]:
    """The global flags that change float32 matmul numerics on `device_type` beyond rounding.

    CUDA: TF32 in cuBLAS/cuDNN (legacy `allow_tf32` and the `fp32_precision` API),
    `torch.get_float32_matmul_precision()`, reduced-precision reductions under autocast, and the
    NVIDIA/torch TF32 override environment variables. CPU: oneDNN's bf16/tf32 matmul modes (set by
    `set_float32_matmul_precision` too). Other devices: the matmul precision."""
    import torch

    try:
        precision: Any = torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed legacy/new settings: the per-backend flags below still tell
        precision = "mixed"
    out: dict[str, Any] = {"float32_matmul_precision": precision}
    b = torch.backends
    if device_type == "cuda":
        for attr in (
            "allow_tf32",
            "fp32_precision",
            "allow_fp16_reduced_precision_reduction",
            "allow_bf16_reduced_precision_reduction",
            "allow_fp16_accumulation",
        ):
            out[f"cuda.matmul.{attr}"] = _flag(b.cuda.matmul, attr)
        out["cudnn.allow_tf32"] = _flag(b.cudnn, "allow_tf32")
        for part in ("conv", "rnn"):
            out[f"cudnn.{part}.fp32_precision"] = _flag(
                getattr(b.cudnn, part, None), "fp32_precision"
            )
        out["env"] = {k: os.environ.get(k) for k in _CUDA_ENV}
    elif device_type == "cpu":
        out["mkldnn.fp32_precision"] = _flag(b.mkldnn, "fp32_precision")
        for part in ("matmul", "conv", "rnn"):
            out[f"mkldnn.{part}.fp32_precision"] = _flag(
                getattr(b.mkldnn, part, None), "fp32_precision"
            )
    return _effective(out)


def _effective(flags: dict[str, Any]) -> dict[str, Any]:
    """Resolve `fp32_precision == "none"` ("not set: inherit") to what it inherits, ending in
    "ieee" (torch's default), so equal numerics give equal flags: `set_float32_matmul_precision
    ("highest")` writes "ieee" where a fresh interpreter reports "none"."""
    parent = {"mkldnn.matmul": "mkldnn", "mkldnn.conv": "mkldnn", "mkldnn.rnn": "mkldnn"}
    out = dict(flags)
    for key in sorted(out, key=lambda k: k.count(".")):
        if key.endswith("fp32_precision") and out[key] in (None, "none"):
            up = parent.get(key.rsplit(".", 1)[0])
            inherited = out.get(f"{up}.fp32_precision") if up else None
            out[key] = inherited if inherited not in (None, "none") else "ieee"
    return out


def _device_type(model: Any) -> str:
    device = getattr(model, "device", None)
    return str(getattr(device, "type", None) or device or "cpu").split(":")[0]


# ----------------------------------------------------------------------- tokenizer, configs


def _clean(obj: Any) -> Any:
    """JSON-able copy of a config with load-location noise removed."""
    if isinstance(obj, dict):
        return {
            str(k): _clean(v)
            for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
            if not str(k).startswith("_") and k not in _NOISE_KEYS
        }
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj) if not hasattr(obj, "to_dict") else _clean(obj.to_dict())


def _live_settings(obj: Any) -> dict[str, Any]:
    """The scalar attributes set on a tokenizer object, at load or after (truncation_side,
    padding_side, model_max_length, do_lower_case, add_bos/eos flags, ...), minus noise."""
    if obj is None or not hasattr(obj, "__dict__"):
        return {}
    return {
        k: v
        for k, v in sorted(vars(obj).items())
        if isinstance(v, (str, int, float, bool, type(None))) and k not in _TOKENIZER_NOISE
    }


def _backend_state(raw: str) -> str:
    """Digest of a `tokenizers` backend's serialised state without its per-call padding and
    truncation: HF switches them on the first encode call (saved "Fixed" padding ->
    "BatchLongest"); they do not change embeddings (attention masks hide padding) and the
    truncation length and side are hashed as live settings. Parsing MiniLM's 700 KB state costs
    ~50 ms, so results are kept per exact `raw` text (a content key: it cannot go stale)."""
    import xxhash

    key = xxhash.xxh3_128_digest(raw.encode())
    if key not in _BACKEND_STATES:
        state = json.loads(raw)
        state.pop("padding", None)
        state.pop("truncation", None)
        if len(_BACKEND_STATES) >= 16:
            _BACKEND_STATES.clear()
        _BACKEND_STATES[key] = hashlib.blake2b(
            json.dumps(state).encode(), digest_size=32
        ).hexdigest()
    return _BACKEND_STATES[key]


def _tokenizer_state(tokenizer: Any) -> str:
    """The tokenizer's full behaviour: its serialised state (vocab, normaliser, added tokens,
    post-processor, ...) and its live settings and special tokens."""
    if tokenizer is None:
        return "none"
    h = hashlib.blake2b(digest_size=32)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(_backend_state(backend.to_str()).encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    live = {
        "settings": _live_settings(tokenizer),
        "basic": _live_settings(getattr(tokenizer, "basic_tokenizer", None)),  # python tokenizers
        "special": _clean(getattr(tokenizer, "special_tokens_map", None)),
        "all_special": _clean(getattr(tokenizer, "all_special_tokens", None)),
        "init": _clean(dict(getattr(tokenizer, "init_kwargs", {}) or {})),
    }
    h.update(json.dumps(live, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def _module_configs(model: Any) -> list:
    configs = []
    children = list(model.children()) if hasattr(model, "children") else []
    for module in children:
        entry: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
        if hasattr(module, "get_config_dict"):
            try:
                entry["config"] = _clean(module.get_config_dict())
            except Exception:  # a custom module without a usable config still hashes its class
                entry["config"] = None
        auto = getattr(module, "auto_model", None)
        if auto is not None and hasattr(auto, "config"):
            entry["model_config"] = _clean(auto.config.to_dict())
        for attr in ("max_seq_length", "do_lower_case", "backend"):
            if hasattr(module, attr):
                entry[attr] = _clean(getattr(module, attr))
        configs.append(entry)
    return configs


def model_fingerprint(
    model: Any,
    *,
    prompt: str | None = None,
    precision: str = "float32",
    normalize: bool = False,
    truncate_dim: int | None = None,
    compute: str | None = None,
    refresh: bool = False,
) -> str:
    """Hex digest identifying exactly what `model.encode(text, ...)` returns for these settings.

    `prompt` is the prompt text prepended to every input, `precision` the stored output dtype,
    `normalize` whether encode() L2-normalises, `truncate_dim` (default: the model's), and
    `compute` a non-default compute mode (e.g. "autocast-float16" on CUDA). Every call hashes
    all weights (`refresh` is accepted for compatibility). Raises EvalkitError for a model whose
    weights cannot be hashed (see `weights_digest`).
    """
    state = {
        "version": FINGERPRINT_VERSION,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": weights_digest(model),
        "tokenizer": _tokenizer_state(getattr(model, "tokenizer", None)),
        "modules": _module_configs(model),
        "max_seq_length": getattr(model, "max_seq_length", None),
        "truncate_dim": truncate_dim
        if truncate_dim is not None
        else getattr(model, "truncate_dim", None),
        "normalize": bool(normalize),
        "prompt": prompt or "",
        "precision": str(precision),
        "compute": compute or "default",
        "numerics": numerics(_device_type(model)),
    }
    blob = json.dumps(state, sort_keys=True, default=repr).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()
