"""`evaluate retrieval --corpus-embeddings DIR`: a precompute output in place of encoding the corpus.

Served only when it is exactly what encoding the corpus would give:

1. at the door (before the model loads): DIR is a complete format-2 output (it has the key
   column) with one row per corpus document;
2. `check_model`: the evaluated model, given DIR's recorded settings (dtype, prompt, normalize),
   has DIR's model fingerprint: same weights, same compute precision;
3. `blocks`: DIR's rows are read in order alongside the corpus (ids and texts, in the order
   evaluate reads them: title + " " + text); every row's id must be the corpus id and its store
   key `make_keys(fingerprint, text)` the key of the corpus text, so a vector of another text,
   another document order or another corpus is refused, never scored. The texts are hashed,
   never encoded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from evalkit.errors import DataError, FingerprintMismatchError, StoreError


def open_checked(path: str | os.PathLike, n_docs: int) -> dict:
    """DIR's manifest, after the checks that need no model (step 1)."""
    from evalkit.embed.shards import FORMAT, load_manifest

    manifest = load_manifest(path)
    if not manifest.get("complete"):
        raise StoreError(f"--corpus-embeddings {path} is incomplete; rerun its encode job first")
    if manifest.get("format") != FORMAT:
        raise StoreError(
            f"--corpus-embeddings {path} has format {manifest.get('format')!r} without store keys, "
            "so its texts cannot be checked against the corpus; re-encode it with this evalkit"
        )
    if manifest["rows"] != n_docs:
        raise DataError(
            f"--corpus-embeddings {path} has {manifest['rows']} rows, the corpus {n_docs} "
            "documents; encode the same corpus"
        )
    return manifest


def check_model(encoder: Any, manifest: dict, path: Any) -> None:
    """Refuse DIR unless the evaluated model with DIR's settings has DIR's fingerprint (step 2)."""
    from evalkit.embed.encoder import StreamingEncoder

    probe = StreamingEncoder(
        encoder.model,
        store=None,
        dtype=manifest["dtype"],
        prompt=manifest.get("prompt"),
        normalize=bool(manifest.get("normalize")),
        device=encoder.device,
    )
    mine, theirs = probe.fingerprint, manifest["model_fingerprint"]
    if mine != theirs:
        raise FingerprintMismatchError(
            f"--corpus-embeddings {path} was made by model {theirs[:12]}... "
            f"({manifest['dtype']}, prompt {manifest.get('prompt')!r}, normalize "
            f"{manifest.get('normalize')}), but the evaluated model gives {mine[:12]}... with "
            "those settings; encode the corpus with this model (and device precision)"
        )


def checked_blocks(encoder: Any, path: Any, manifest: dict, corpus_batches: Any) -> Iterator:
    """Steps 2 and 3: check the model now, then the rows as they are read."""
    check_model(encoder, manifest, path)
    return blocks(path, manifest, corpus_batches)


def blocks(
    path: Any, manifest: dict, corpus_batches: Iterator[tuple[list[str], list[str]]]
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, float32 vectors) blocks of DIR, each row checked against the corpus (step 3)."""
    from evalkit.embed.shards import iter_embeddings
    from evalkit.embed.store import make_keys

    fp = manifest["model_fingerprint"]
    rows = _Rows(corpus_batches)
    row = 0
    for ids, keys, vectors in iter_embeddings(path, with_keys=True):
        ids = [str(i) for i in ids]
        doc_ids, texts = rows.take(len(ids))
        if doc_ids != ids:
            i = next(j for j, (a, b) in enumerate(zip(ids, doc_ids, strict=False)) if a != b)
            raise DataError(
                f"--corpus-embeddings {path}: row {row + i} has id {ids[i]!r}, the corpus "
                f"{doc_ids[i] if i < len(doc_ids) else None!r}; encode the corpus with --id-column _id"
            )
        wanted = make_keys(fp, texts)
        if wanted != keys:
            i = next(j for j, (a, b) in enumerate(zip(keys, wanted, strict=True)) if a != b)
            raise DataError(
                f"--corpus-embeddings {path}: the vector of document {ids[i]!r} (row {row + i}) "
                "is not of its corpus text as evaluate reads it (title + ' ' + text); encode "
                "with --column title+text, from this corpus"
            )
        row += len(ids)
        yield ids, np.asarray(vectors, dtype=np.float32)


class _Rows:
    """Row cursor over (ids, texts) batches: take(n) -> the next n ids and texts."""

    def __init__(self, batches: Iterator[tuple[list[str], list[str]]]) -> None:
        self._batches = iter(batches)
        self._ids: list[str] = []
        self._texts: list[str] = []

    def take(self, n: int) -> tuple[list[str], list[str]]:
        while len(self._ids) < n:
            nxt = next(self._batches, None)
            if nxt is None:
                break
            self._ids.extend(nxt[0])
            self._texts.extend(nxt[1])
        ids, texts = self._ids[:n], self._texts[:n]
        self._ids, self._texts = self._ids[n:], self._texts[n:]
        return ids, texts
