"""evalkit: out-of-core training, embedding, evaluation and ANN checks for sentence-transformers.

Importing evalkit is cheap: public names are resolved lazily, so torch, sentence-transformers
and faiss load only when the code that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "DataError": "evalkit.errors",
    "EvalkitError": "evalkit.errors",
    "FingerprintMismatchError": "evalkit.errors",
    "MissingExtraError": "evalkit.errors",
    "StoreError": "evalkit.errors",
    "load_model": "evalkit.models",
}

__all__ = sorted(["__version__", *_LAZY])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'evalkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
