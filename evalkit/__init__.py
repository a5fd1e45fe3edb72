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
    "ArrowDataset": "evalkit.dataset",
    "ClassificationMetrics": "evalkit.metrics.pairs",
    "ConvertResult": "evalkit.arrow",
    "DataError": "evalkit.errors",
    "EmbeddingStore": "evalkit.store",
    "EvalkitError": "evalkit.errors",
    "FingerprintMismatchError": "evalkit.errors",
    "MissingExtraError": "evalkit.errors",
    "PairDataset": "evalkit.dataset",
    "RetrievalMetrics": "evalkit.metrics.retrieval",
    "SimilarityMetrics": "evalkit.metrics.pairs",
    "StoreError": "evalkit.errors",
    "StreamingBinaryClassificationEvaluator": "evalkit.evaluator",
    "StreamingEncoder": "evalkit.encode",
    "StreamingPairEvaluator": "evalkit.evaluator",
    "StreamingRetrievalEvaluator": "evalkit.evaluator",
    "StreamingSimilarityEvaluator": "evalkit.evaluator",
    "TopK": "evalkit.search",
    "build_index": "evalkit.index",
    "convert": "evalkit.arrow",
    "data_fingerprint": "evalkit.fingerprint",
    "encode_texts": "evalkit.encode",
    "evaluate_pairs": "evalkit.evaluate",
    "evaluate_retrieval": "evalkit.evaluate",
    "exact_search": "evalkit.search",
    "fit": "evalkit.train",
    "iter_batches": "evalkit.arrow",
    "iter_embeddings": "evalkit.precompute",
    "iter_encode": "evalkit.encode",
    "load_index": "evalkit.index",
    "load_manifest": "evalkit.precompute",
    "load_model": "evalkit.models",
    "model_fingerprint": "evalkit.fingerprint",
    "open_ipc": "evalkit.arrow",
    "open_source": "evalkit.arrow",
    "run_precompute": "evalkit.precompute",
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
