#!/usr/bin/env python
"""Precompute embeddings into Arrow shards; the same job as `evalkit encode` (same flags).

    python scripts/precompute.py DATA --column text --out DIR [--shard I/N] [...]

Under a Slurm array: `--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`; rerun a killed task
with the same arguments and it resumes.
"""

from __future__ import annotations

import sys

from evalkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
