"""The post-training evaluation job as a script: the same flags as `evalkit evaluate`.

    python scripts/evaluate.py pairs ../shared/data/stsb/stsb-en-test.csv \
        --column-names sentence1,sentence2,score --left sentence1 --right sentence2 --label score \
        --out results/stsb
    python scripts/evaluate.py retrieval --corpus ../shared/data/beir-scifact/corpus.jsonl \
        --queries ../shared/data/beir-scifact/queries.jsonl \
        --qrels ../shared/data/beir-scifact/qrels/test.tsv --dialect trec_eval --out results/scifact

Writes OUT/metrics.json, OUT/summary.md and PNG plots; see evalkit.jobs.evaluate.evaluate_pairs and
evaluate_retrieval for the Python API behind every flag.
"""

from __future__ import annotations

import sys

from evalkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
