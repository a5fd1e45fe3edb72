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
    "ArrowDataset": "evalkit.data.dataset",
    "ClassificationMetrics": "evalkit.metrics.pairs",
    "ConvertResult": "evalkit.data.convert",
    "DataError": "evalkit.errors",
    "EmbeddingStore": "evalkit.embed.store",
    "EvalkitError": "evalkit.errors",
    "FingerprintMismatchError": "evalkit.errors",
    "MissingExtraError": "evalkit.errors",
    "PairDataset": "evalkit.data.dataset",
    "PairsTask": "evalkit.jobs.tasks",
    "RetrievalMetrics": "evalkit.metrics.retrieval",
    "RetrievalTask": "evalkit.jobs.tasks",
    "SimilarityMetrics": "evalkit.metrics.pairs",
    "StoreError": "evalkit.errors",
    "StreamingBinaryClassificationEvaluator": "evalkit.evaluation.evaluators",
    "StreamingEncoder": "evalkit.embed.encoder",
    "StreamingPairEvaluator": "evalkit.evaluation.evaluators",
    "StreamingRetrievalEvaluator": "evalkit.evaluation.evaluators",
    "StreamingSimilarityEvaluator": "evalkit.evaluation.evaluators",
    "TopK": "evalkit.search.exact",
    "build_index": "evalkit.search.build",
    "compare": "evalkit.jobs.compare",
    "convert": "evalkit.data.convert",
    "data_fingerprint": "evalkit.data.fingerprint",
    "encode_texts": "evalkit.embed.oneshot",
    "evaluate_pairs": "evalkit.jobs.evaluate",
    "evaluate_retrieval": "evalkit.jobs.evaluate",
    "evaluate_task": "evalkit.jobs.evaluate",
    "exact_search": "evalkit.search.exact",
    "fit": "evalkit.train.fit",
    "import_into_store": "evalkit.embed.shards",
    "iter_batches": "evalkit.data.readers",
    "iter_embeddings": "evalkit.embed.shards",
    "iter_encode": "evalkit.embed.oneshot",
    "load_index": "evalkit.search.index",
    "load_manifest": "evalkit.embed.shards",
    "load_model": "evalkit.embed.models",
    "model_fingerprint": "evalkit.embed.fingerprint",
    "open_ipc": "evalkit.data.readers",
    "open_source": "evalkit.data.readers",
    "run_precompute": "evalkit.jobs.precompute",
    "sweep": "evalkit.jobs.sweep",
    "run_precompute_ray": "evalkit.jobs.precompute_ray",
    "run_precompute_workers": "evalkit.jobs.precompute_workers",
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
