"""embed: texts -> vectors, memoised by exact model.

Owns model loading, the model fingerprint (weights + every setting that changes a vector), the
content-addressed embedding store (diskcache), THE encoder (`StreamingEncoder`: windows, store
lookups, encoding misses, background writes, tallies), the fingerprint memo and the precompute
output format (shards + manifest).
May import: `errors`, `_imports`, `_io`, `data`, `metrics`.
"""
