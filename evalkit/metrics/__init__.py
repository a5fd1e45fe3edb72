"""metrics: scores -> numbers. Streaming exact metrics, numpy only.

Owns pair similarity/classification metrics, retrieval metrics (both dialects), their private
kernels (ranking, disk spill) and fixed-size curves (score histogram, recall@k).
May import: `evalkit.errors` only.

Each metric object has ``update(...)``, ``merge(other)`` and ``compute()``; results use
sentence-transformers' key names without an evaluator prefix (``spearman_cosine``,
``cosine_ap``, ``cosine_ndcg@10``).
"""

from __future__ import annotations

from evalkit.metrics.pairs import ClassificationMetrics, SimilarityMetrics, pair_scores
from evalkit.metrics.retrieval import RetrievalMetrics

__all__ = ["ClassificationMetrics", "RetrievalMetrics", "SimilarityMetrics", "pair_scores"]
