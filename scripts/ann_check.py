#!/usr/bin/env python
"""The ANN sanity-check job: `python scripts/ann_check.py ARGS` is `evalkit ann-check ARGS`.

Example (SciFact, MiniLM, HNSW32, fail the pipeline below 0.9 recall@10):
    python scripts/ann_check.py --corpus ../shared/data/beir-scifact/corpus.jsonl \
        --queries ../shared/data/beir-scifact/queries.jsonl \
        --qrels ../shared/data/beir-scifact/qrels/test.tsv --index HNSW32 --min-recall 0.9 --out ann/
Exit codes: 0 ok, 1 bad input, 3 no sweep setting reaches --min-recall.
"""

from __future__ import annotations

import sys

from evalkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["ann-check", *sys.argv[1:]]))
