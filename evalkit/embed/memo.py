"""The fingerprint memo: serve a run from the store without loading the model.

A model fingerprint needs the loaded model (its weights and tokenizer). A second evaluation of
the same model folder whose texts are all in the store should not pay for loading it, so:

1) `memo_key` digests what decides the fingerprint without loading anything: every byte of the
   model folder (not its path or mtimes), the fingerprint scheme version, the library versions,
   the encode settings (store dtype, prompt, normalisation, truncation, precision), the device,
   the host and the TF32 environment variables;
2) `lookup(key)` returns the fingerprint remembered for that key, if any, and only while this
   process runs with torch's default float32 matmul flags (TF32, oneDNN modes, ...): a process
   that has not imported torch has them; one that has is compared with the defaults of a fresh
   interpreter (read once per torch version in a subprocess, cached beside the memo);
3) `remember(key, fp)` records it after the model was loaded and fingerprinted (last 256 kept),
   in `$EVALKIT_FINGERPRINT_MEMO` (default ~/.cache/evalkit/model-fingerprints.json), again only
   under the default flags. So a memo entry always means "this folder under default numerics",
   whichever process wrote or reads it; a process with other flags loads the model.

Any changed byte of the folder gives another key, so an edited checkpoint is always loaded.
Reading MiniLM's 88 MB and hashing it with xxh3-128 costs ~0.02 s warm in the page cache.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from evalkit._io import write_json_atomic, write_text_atomic
from evalkit.embed.fingerprint import FINGERPRINT_VERSION

logger = logging.getLogger(__name__)
_KEEP = 256


def memo_path() -> Path:
    env = os.environ.get("EVALKIT_FINGERPRINT_MEMO")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "evalkit" / "model-fingerprints.json"


_ENV = ("NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
_DEFAULTS: dict[str, str] = {}  # torch version -> its fresh-process numerics, as JSON
_NUMERICS_CODE = (
    "import json, torch\n"
    "from evalkit.embed.fingerprint import numerics\n"
    "print(json.dumps({'cpu': numerics('cpu'), 'cuda': numerics('cuda')}, sort_keys=True,"
    " default=str))"
)


def _flags_now() -> str:
    from evalkit.embed.fingerprint import numerics

    return json.dumps(
        {"cpu": numerics("cpu"), "cuda": numerics("cuda")}, sort_keys=True, default=str
    )


def _fresh_defaults() -> str | None:
    """torch's float32 matmul flags in a fresh interpreter (one subprocess per torch version)."""
    import torch

    ver = str(torch.__version__)
    if ver in _DEFAULTS:
        return _DEFAULTS[ver]
    cached = memo_path().with_name(f"torch-numerics-{ver}.json")
    try:
        text = json.dumps(json.loads(cached.read_text(encoding="utf-8")), sort_keys=True)
    except (OSError, ValueError):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            run = subprocess.run(
                [sys.executable, "-c", _NUMERICS_CODE],
                capture_output=True, text=True, timeout=300, env=env, check=True,
            )  # fmt: skip
            text = json.dumps(json.loads(run.stdout), sort_keys=True)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            logger.debug("cannot read torch's default numerics: %s", exc)
            return None
        try:
            write_text_atomic(cached, text + "\n")
        except OSError:
            pass
    _DEFAULTS[ver] = text
    return text


def _at_default_numerics() -> bool:
    """True when this process computes with torch's default float32 matmul flags."""
    if "torch" not in sys.modules:
        return True  # nothing could have changed them
    defaults = _fresh_defaults()
    return defaults is not None and _flags_now() == defaults


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
    h.update(json.dumps({k: os.environ.get(k) for k in _ENV}, sort_keys=True).encode())
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
    if not _at_default_numerics():
        return None
    value = _read().get(key)
    return value if isinstance(value, str) else None


def remember(key: str, fingerprint: str) -> None:
    if not _at_default_numerics():
        return
    memo = _read()
    memo[key] = fingerprint
    try:
        write_json_atomic(memo_path(), dict(list(memo.items())[-_KEEP:]))
    except OSError as exc:  # a read-only home only costs the fast path
        logger.debug("cannot write the fingerprint memo: %s", exc)
