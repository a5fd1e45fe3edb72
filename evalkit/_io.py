"""Atomic file writes, strict JSON and output-path checks, shared by every part that writes results.

1) write to a temp file in the destination's folder, flush and fsync it;
2) os.replace it over the destination (readers see the old file or the new one, never half);
3) on any failure remove the temp file and re-raise.
JSON is always strict (RFC 8259): `jsonable` turns NaN and +-inf into null, and `dumps_json`
refuses anything else a strict parser would reject, so no file evalkit writes holds `NaN`.
`out_dir_problem` / `out_file_problem` say, before any work, why an output path cannot be
written (a file where a folder is wanted or the reverse, a read-only folder), or None.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder and os.replace (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def dumps_json(
    obj: Any, *, indent: int | None = 2, sort_keys: bool = False, default: Any = None
) -> str:
    """Strict JSON text of `obj`: numpy values as Python ones, NaN/inf as null; any other object
    raises TypeError unless `default` (e.g. str) converts it."""
    return json.dumps(
        jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False, default=default
    )


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, sort_keys: bool = False, default: Any = None
) -> Path:
    text = dumps_json(obj, sort_keys=sort_keys, default=default) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN or infinity; an undefined number is null
    if isinstance(obj, Path):
        return str(obj)
    return obj


def out_dir_problem(path: str | os.PathLike, flag: str = "--out") -> str | None:
    """Why `path` cannot be written as an output folder (one line), or None if it can: it must be
    a folder or not exist yet, and its nearest existing folder must be writable. Creates nothing.
    (Callers raise EvalkitError with it; this base module imports nothing of evalkit.)"""
    path = Path(os.fspath(path))
    if path.exists() and not path.is_dir():
        return f"{flag} {path} is a file; give a folder (it is created if absent)"
    return _parent_problem(path, flag, "folder")


def out_file_problem(path: str | os.PathLike, flag: str = "DEST") -> str | None:
    """Why `path` cannot be written as an output file (one line), or None if it can (an existing
    file is replaced atomically, so its folder must be writable). Creates nothing."""
    path = Path(os.fspath(path))
    if path.is_dir() or os.fspath(path).endswith(os.sep):
        return f"{flag} {path} is a folder; give a file path"
    return _parent_problem(path.parent if path.exists() else path, flag, "file")


def _parent_problem(path: Path, flag: str, what: str) -> str | None:
    """The nearest existing folder at or above `path` must be a folder we may write in."""
    probe = path.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot create {flag} {path}: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return (
            f"cannot write {flag} {path}: {probe} is not writable (read-only folder or file "
            f"system); choose another {what}"
        )
    return None
