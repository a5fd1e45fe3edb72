"""Drawn plots remembered by what they draw, so a warm re-evaluation imports no matplotlib.

Importing matplotlib and rendering one PNG costs ~0.45 s on a 2-core CPU: most of a warm
`evaluate pairs` run whose vectors all come from the embedding store. A PNG is a pure function
of the numbers it draws and of the code and library that draw it, so it is cached like an
embedding: by content.

1. key: BLAKE2b-128 over FORMAT, the bytes of the drawing code (`report.py`: any edit to it is
   a new key, nobody has to remember to bump a version), matplotlib's version (read from package
   metadata, no import), the plot kind and every value drawn, canonically encoded (arrays as
   dtype | shape | bytes, everything else as its repr);
2. where: the folder `<store>-plots` beside the embedding store's folder `<store>` (as the
   results store is `<store>-results`: diskcache owns every file inside the store's folder), one
   file `<key>-<xxh3-64 of the PNG>.png` per plot; `evalkit cache clear` removes them with the
   store's vectors and `cache check` verifies them;
3. get: the file for the key whose bytes hash to the checksum in its name; a file that fails
   the check is removed (the plot is drawn again) and never served;
4. put: temp file in the same folder, fsync, rename; a folder that cannot be written only loses
   the cache (one debug log line), never the result.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = b"evalkit-plots-1"
SUFFIX = "-plots"
_CODE: dict[str, bytes] = {}


def folder_of(store: Any) -> Path | None:
    """The plot cache of an embedding store (an EmbeddingStore or its folder; None: no cache)."""
    directory = getattr(store, "directory", store)
    if directory is None:
        return None
    directory = Path(directory)
    return directory.with_name(directory.name + SUFFIX)


def _code_digest() -> bytes:
    """Digest of the drawing code and of matplotlib's version (memoised per process)."""
    if "code" not in _CODE:
        from importlib.metadata import PackageNotFoundError, version

        try:
            mpl = version("matplotlib")
        except PackageNotFoundError:
            mpl = "none"
        source = (Path(__file__).with_name("report.py")).read_bytes()
        _CODE["code"] = hashlib.blake2b(source + b"\x00" + mpl.encode(), digest_size=16).digest()
    return _CODE["code"]


def _encode(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return f"a|{arr.dtype.str}|{arr.shape}|".encode() + arr.tobytes()
    if isinstance(value, (list, tuple)):
        return b"l|%d|" % len(value) + b"".join(_encode(v) + b"\x1f" for v in value)
    return f"v|{type(value).__name__}|{value!r}".encode()


def key(kind: str, values: Iterable[Any]) -> str:
    """The cache key of a plot of `kind` drawing `values`."""
    h = hashlib.blake2b(FORMAT + b"\x00" + _code_digest() + kind.encode(), digest_size=16)
    for value in values:
        h.update(_encode(value) + b"\x1e")
    return h.hexdigest()


def _checksum(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)


def get(folder: Path | None, plot_key: str) -> bytes | None:
    """The cached PNG for `plot_key`, verified against the checksum in its file name."""
    if folder is None or not folder.is_dir():
        return None
    for path in folder.glob(f"{plot_key}-*.png"):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if path.stem == f"{plot_key}-{_checksum(data)}":
            return data
        logger.warning("plot cache: %s fails its checksum; removing it", path.name)
        path.unlink(missing_ok=True)
    return None


def put(folder: Path | None, plot_key: str, data: bytes) -> None:
    """Remember `data` (a PNG) under `plot_key`; failures only cost the cache."""
    if folder is None:
        return
    path = folder / f"{plot_key}-{_checksum(data)}.png"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("plot cache: cannot store %s: %s", path.name, exc)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def check(folder: Path, fix: bool = False) -> list[str]:
    """Problems of a plot cache: files whose bytes do not match their name (removed with fix)."""
    problems = []
    if not folder.is_dir():
        return problems
    for path in sorted(folder.iterdir()):
        parts = path.stem.split("-")
        ok = path.suffix == ".png" and len(parts) == 2 and path.is_file()
        if ok:
            try:
                ok = parts[1] == _checksum(path.read_bytes())
            except OSError:
                ok = False
        if not ok:
            problems.append(f"plot cache: {path.name} is damaged or not a cached plot")
            if fix:
                path.unlink(missing_ok=True)
    return problems


def wipe(folder: Path) -> int:
    """Remove every cached plot (and leftover temp file); returns the number of files removed."""
    removed = 0
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and (path.suffix == ".png" or ".tmp-" in path.name):
                path.unlink()
                removed += 1
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed
