"""Total orders for ranked lists: by descending score, ties broken by document id.

1) turn ids into an integer sort key (numbers as they are; strings/objects by their rank in
   ``np.unique``, which orders them as Python does), negated for a descending tie-break;
2) ``np.lexsort`` each row by (-score, id key).

Dialects: sentence-transformers breaks ties by id ascending; trec_eval (pytrec_eval, BEIR, MTEB)
by id descending, comparing ids as strings, after casting scores to float32.
"""

from __future__ import annotations

import numpy as np

TIES = ("id_asc", "id_desc")


def id_key(ids: np.ndarray, ties: str) -> np.ndarray:
    """An integer/float array ordering ``ids`` as the tie-break wants (smaller key ranks first)."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iub":
        key = ids.astype(np.int64) if ids.dtype.kind != "u" else ids.astype(np.float64)
    elif ids.dtype.kind == "f":
        key = ids.astype(np.float64)
    else:
        _, inverse = np.unique(ids.ravel(), return_inverse=True)
        key = inverse.reshape(ids.shape).astype(np.int64)
    return -key if ties == "id_desc" else key


def order_rows(scores: np.ndarray, ids: np.ndarray, ties: str) -> np.ndarray:
    """Per row, the column order by (-score, id) under ``ties``; shape of ``scores``."""
    scores = np.asarray(scores)
    if scores.shape[-1] == 0:
        return np.zeros(scores.shape, dtype=np.int64)
    return np.lexsort((id_key(ids, ties), -scores), axis=-1)


def take_rows(a: np.ndarray, order: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, order, axis=-1)
