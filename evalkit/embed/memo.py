"""The fingerprint memo: serve a run from the store without loading the model.

A model fingerprint needs the loaded model (its weights and tokenizer). A second evaluation of
the same model folder whose texts are all in the store should not pay for loading it, so:

1) `memo_key` digests what decides the fingerprint without loading anything: every byte of the
   model folder (not its path or mtimes), the fingerprint scheme version, the library versions,
   the encode settings (store dtype, prompt, normalisation, truncation, precision), the device,
   the host, and the float32 matmul precision flags (TF32, ...) when torch is already imported
   (a process that has not imported torch runs with its defaults, bar the TF32 environment
   variables, which are hashed too);
2) `lookup(key)` returns the fingerprint remembered for that key, if any;
3) `remember(key, fp)` records it after the model was loaded and fingerprinted (last 256 kept),
   in `$EVALKIT_FINGERPRINT_MEMO` (default ~/.cache/evalkit/model-fingerprints.json).

Any changed byte of the folder gives another key, so an edited checkpoint is always loaded.
Reading MiniLM's 88 MB and hashing it with xxh3-128 costs ~0.02 s warm in the page cache.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from evalkit._io import write_json_atomic
from evalkit.embed.fingerprint import FINGERPRINT_VERSION, numerics

logger = logging.getLogger(__name__)
_KEEP = 256


def memo_path() -> Path:
    env = os.environ.get("EVALKIT_FINGERPRINT_MEMO")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "evalkit" / "model-fingerprints.json"


def _numerics() -> dict[str, Any]:
    """The precision flags of this process, without importing torch for them."""
    env = {
        k: os.environ.get(k) for k in ("NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
    }
    if "torch" not in sys.modules:
        return {"env": env}
    return {"env": env, "cpu": numerics("cpu"), "cuda": numerics("cuda")}


def memo_key(path: str, settings: dict[str, Any]) -> str:
    """Digest of a model folder's bytes plus everything else that decides its fingerprint."""
    import xxhash

    h = xxhash.xxh3_128()
    h.update(f"{FINGERPRINT_VERSION}\n".encode())  # a new fingerprint scheme invalidates memos
    for pkg in ("sentence-transformers", "transformers", "torch", "tokenizers"):
        try:
            h.update(f"{pkg}={version(pkg)}\n".encode())
        except PackageNotFoundError:
            h.update(f"{pkg}=-\n".encode())
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(_numerics(), sort_keys=True, default=str).encode())
    h.update(f"|{platform.node()}|{cuda}\n".encode())
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            h.update(f"{os.path.getsize(full)}\0".encode())
            with open(full, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def _read() -> dict[str, str]:
    try:
        data = json.loads(memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(key: str) -> str | None:
    value = _read().get(key)
    return value if isinstance(value, str) else None


def remember(key: str, fingerprint: str) -> None:
    memo = _read()
    memo[key] = fingerprint
    try:
        write_json_atomic(memo_path(), dict(list(memo.items())[-_KEEP:]))
    except OSError as exc:  # a read-only home only costs the fast path
        logger.debug("cannot write the fingerprint memo: %s", exc)
