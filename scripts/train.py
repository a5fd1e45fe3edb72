#!/usr/bin/env python3
"""Fine-tune a sentence-transformers model: the same job as `evalkit train` (see --help).

    python scripts/train.py stsb-en-train.csv --column-names sentence1,sentence2,score \\
        --left sentence1 --right sentence2 --label score --loss cosine --max-steps 30 --out runs/x
    torchrun --nproc_per_node 2 scripts/train.py ...     (DDP)
"""

from __future__ import annotations

import sys

from evalkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
