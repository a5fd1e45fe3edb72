"""Streaming exact metrics (numpy only): pair similarity/classification and retrieval.

Each metric object has ``update(...)``, ``merge(other)`` and ``compute()``; results use
sentence-transformers' key names without an evaluator prefix (``spearman_cosine``,
``cosine_ap``, ``cosine_ndcg@10``).
"""

from __future__ import annotations

from evalkit.metrics.pairs import ClassificationMetrics, SimilarityMetrics, pair_scores
from evalkit.metrics.retrieval import RetrievalMetrics

__all__ = ["ClassificationMetrics", "RetrievalMetrics", "SimilarityMetrics", "pair_scores"]
