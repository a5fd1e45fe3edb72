"""Model fingerprints: what makes an embedding-cache key honest.

A model fingerprint is a digest over everything that changes an embedding:

1. every parameter and buffer, sorted by name, as exact bytes (with its name, dtype and shape);
2. the tokenizer (its full serialised state, or its vocabulary/config files) and each module's
   config (transformer config minus path/version noise, pooling, dense, normalize, ...);
3. the encode settings: max_seq_length, truncate_dim, normalisation, the prompt text, the output
   precision and the compute mode (e.g. CUDA autocast fp16).

Hashing MiniLM's 91 MB of weights with BLAKE2b takes ~0.25 s on one CPU core. The weights digest
is cached per loaded model and reused while a cheap check still matches: each tensor's data
pointer, autograd version counter (bumped by every in-place update: optimizer steps,
`load_state_dict`, `copy_` under no_grad), shape, dtype, and a strided sample of its values (which
also catches whole-tensor edits made through `.data`, which bypass the version counter). Pass
`refresh=True` to force a full rehash.

Data fingerprints (of input files) live in `evalkit.data.fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

FINGERPRINT_VERSION = "evalkit-fp-2"
_SAMPLE = 16  # values sampled per tensor for the cheap staleness check

# model -> (cheap check, weights digest); weak so a freed model frees its entry
_WEIGHTS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Config keys that record where/how a model was loaded, not what it computes.
_NOISE_KEYS = {"transformers_version", "name_or_path", "cache_dir", "local_files_only", "token"}


def _tensors(model: Any) -> list[tuple[str, Any]]:
    named = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        named.setdefault(name, buf)
    return sorted(named.items())


def _tensor_bytes(t: Any) -> memoryview:
    import torch

    flat = t.detach().reshape(-1).contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _cheap_check(tensors: list[tuple[str, Any]]) -> tuple:
    import torch

    parts = []
    samples = []
    for name, t in tensors:
        parts.append((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device)))
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // _SAMPLE)
            samples.append(flat[::step][:_SAMPLE].to(torch.float64))
    sample_bytes = b""
    if samples:
        sample_bytes = torch.cat([s.cpu() for s in samples]).numpy().tobytes()
    return tuple(parts), hashlib.blake2b(sample_bytes, digest_size=16).digest()


def weights_digest(model: Any, *, refresh: bool = False) -> str:
    """BLAKE2b over all parameters and buffers of `model` (sorted by name, exact bytes)."""
    tensors = _tensors(model)
    check = _cheap_check(tensors)
    cached = None if refresh else _WEIGHTS_CACHE.get(model)
    if cached is not None and cached[0] == check:
        return cached[1]
    h = hashlib.blake2b(digest_size=32)
    for name, t in tensors:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(_tensor_bytes(t))
    digest = h.hexdigest()
    try:
        _WEIGHTS_CACHE[model] = (check, digest)
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return digest


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


def _tokenizer_state(tokenizer: Any) -> str:
    """The tokenizer's full behaviour: its serialised state (vocab, normaliser, ...) and settings."""
    if tokenizer is None:
        return "none"
    h = hashlib.blake2b(digest_size=32)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Drop the per-call padding/truncation state: HF switches it on the first encode call
        # (saved "Fixed" padding -> "BatchLongest"), it does not change embeddings (attention
        # masks hide padding), and the truncation length is hashed as max_seq_length.
        state = json.loads(backend.to_str())
        state.pop("padding", None)
        state.pop("truncation", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    init = getattr(tokenizer, "init_kwargs", {}) or {}
    h.update(json.dumps(_clean(dict(init)), sort_keys=True, default=repr).encode())
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
        for attr in ("max_seq_length", "do_lower_case"):
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
    `compute` a non-default compute mode (e.g. "autocast-float16" on CUDA). The weights digest is
    cached per model (see the module docstring); `refresh=True` rehashes the weights.
    """
    state = {
        "version": FINGERPRINT_VERSION,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": weights_digest(model, refresh=refresh),
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
    }
    blob = json.dumps(state, sort_keys=True, default=repr).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()
