"""Optional backends behind one helper: `faiss = require("faiss", extra="faiss")`."""

from __future__ import annotations

import importlib
from types import ModuleType

from evalkit.errors import MissingExtraError


def require(module: str, *, extra: str, package: str | None = None) -> ModuleType:
    """Import `module` or raise MissingExtraError telling the user which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pkg = package or module
        raise MissingExtraError(
            f"{pkg} is needed for this; install it with: pip install 'evalkit[{extra}]' ({exc})"
        ) from exc
