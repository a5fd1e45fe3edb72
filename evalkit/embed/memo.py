"""The fingerprint memo: serve a run from the store without loading the model.

A model fingerprint needs the loaded model (its weights and tokenizer). A second evaluation of
the same model folder whose texts are all in the store should not pay for loading it, so:

1) `memo_key` digests what decides the fingerprint without loading anything: every byte of the
   model folder (not its path or mtimes), the fingerprint scheme version, the library versions,
   the encode settings (store dtype, prompt, normalisation, truncation, precision), the device and
   the host;
2) `lookup(key)` returns the fingerprint remembered for that key, if any;
3) `remember(key, fp)` records it after the model was loaded and fingerprinted (last 256 kept),
   in `$EVALKIT_FINGERPRINT_MEMO` (default ~/.cache/evalkit/model-fingerprints.json).

Any changed byte of the folder gives another key, so an edited checkpoint is always loaded.
Reading MiniLM's 88 MB costs ~0.1 s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from evalkit._io import write_json_atomic
from evalkit.embed.fingerprint import FINGERPRINT_VERSION

logger = logging.getLogger(__name__)
_KEEP = 256


def memo_path() -> Path:
    env = os.environ.get("EVALKIT_FINGERPRINT_MEMO")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "evalkit" / "model-fingerprints.json"


def memo_key(path: str, settings: dict[str, Any]) -> str:
    """Digest of a model folder's bytes plus everything else that decides its fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{FINGERPRINT_VERSION}\n".encode())  # a new fingerprint scheme invalidates memos
    for pkg in ("sentence-transformers", "transformers", "torch", "tokenizers"):
        try:
            h.update(f"{pkg}={version(pkg)}\n".encode())
        except PackageNotFoundError:
            h.update(f"{pkg}=-\n".encode())
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(f"|{platform.node()}|{cuda}\n".encode())
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
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
