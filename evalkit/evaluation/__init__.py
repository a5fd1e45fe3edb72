"""evaluation: streaming passes over pairs and retrieval sets, and the SentenceEvaluator classes.

Owns `engine` (pairs_pass, retrieval_pass: encode through the encoder, score, fold into the
streaming metrics), `evaluators` (sentence-transformers evaluators built on the engine, usable
in any training loop) and `significance` (paired bootstrap / permutation tests of two systems'
per-item values, on scipy.stats).
May import: `errors`, `_imports`, `_io`, `data`, `metrics`, `embed`, `search`.
"""
