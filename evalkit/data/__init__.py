"""data: files and URIs -> Arrow record batches; conversion to Arrow IPC; memory-mapped datasets.

Owns reading any tabular source (local, s3://, fsspec, in-memory, HF datasets), row filters,
`convert` to an Arrow IPC file, the memory-mapped `ArrowDataset`/`PairDataset`, BEIR-layout
loaders (corpus, queries, qrels), labelled-pair batches, data fingerprints, and the integrity of
what is read: text columns as strict UTF-8 text (`text`), Arrow sources fully validated.
May import: `evalkit.errors`, `evalkit._imports`, `evalkit._io`. Knows nothing of models or
embeddings.
"""
