#!/usr/bin/env python3
"""Training throughput: evalkit.train.fit.fit vs sentence-transformers' SentenceTransformerTrainer, and
fit from the memory-mapped Arrow file vs from an in-memory list of InputExample.

Same tiny random BERT (tests/conftest.py's build_tiny_model_dir), same STS-B train pairs (scores
/ 5), CosineSimilarityLoss, batch size, steps, learning rate, fp32 on CPU, no workers, no
checkpoints or evaluation. Steps:
 1) convert STS-B train to an Arrow file; build the in-memory list and an HF datasets.Dataset;
 2) one untimed warm-up fit (first-call costs land on nobody);
 3) `--rounds` rounds, each timing the three contenders back to back (so load drift on a shared
    machine hits all of them alike); every contender starts from a fresh copy of the same model;
 4) report the median samples/s per contender and the ratios. The last line is
    `ratio_vs_st=X ratio_mmap_vs_list=Y` (targets: >= 1.0 and >= 0.95).

    python scripts/bench_train.py [--steps 150] [--batch-size 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        default=str(ROOT.parent / "shared/data/stsb/stsb-en-train.csv"),
        help="STS-B train CSV",
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    import torch
    from conftest import build_tiny_model_dir
    from sentence_transformers import InputExample, SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    from evalkit.data.convert import convert
    from evalkit.data.dataset import PairDataset
    from evalkit.train.fit import fit

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_dir = build_tiny_model_dir(tmp / "model")
    arrow = tmp / "train.arrow"
    names = ["sentence1", "sentence2", "score"]
    convert(args.data, arrow, column_names=names, progress=False)
    mmap = PairDataset(arrow, ["sentence1", "sentence2"], "score")
    with open(args.data, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    in_memory = [InputExample(texts=[a, b], label=float(s)) for a, b, s in rows]
    n_samples = args.steps * args.batch_size
    print(
        f"{len(rows):,} STS-B pairs; tiny BERT; batch {args.batch_size} x {args.steps} steps = "
        f"{n_samples:,} samples per run; torch threads {torch.get_num_threads()}; "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})"
    )

    def fresh() -> SentenceTransformer:
        return SentenceTransformer(str(model_dir), device="cpu")

    def run_fit(dataset, steps: int = args.steps) -> float:
        model = fresh()
        loss = losses.CosineSimilarityLoss(model)
        start = time.perf_counter()
        fit(model, dataset, loss, max_steps=steps, batch_size=args.batch_size, lr=args.lr,
            warmup=0.1, label_scale=5, seed=0, progress=False, device="cpu")  # fmt: skip
        return time.perf_counter() - start

    st_dataset = _hf_dataset(rows)

    def run_st() -> float:
        from sentence_transformers import (
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )

        model = fresh()
        training_args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp / "st"), max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_ratio=0.1,
            save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=True, seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = SentenceTransformerTrainer(
            model=model,
            args=training_args,
            train_dataset=st_dataset,
            loss=losses.CosineSimilarityLoss(model),
        )
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    run_fit(mmap, steps=5)  # warm-up
    contenders = {"evalkit mmap": lambda: run_fit(mmap), "sentence-transformers": run_st,
                  "evalkit list": lambda: run_fit(in_memory)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, run in contenders.items():
            times[name].append(run())
        print(
            f"round {r + 1}: "
            + ", ".join(f"{name} {n_samples / t[-1]:.0f} samples/s" for name, t in times.items())
        )
    rate = {name: n_samples / statistics.median(t) for name, t in times.items()}
    for name, value in rate.items():
        print(f"{name:>22}: {value:8.0f} samples/s (median of {args.rounds})")
    print(
        f"ratio_vs_st={rate['evalkit mmap'] / rate['sentence-transformers']:.3f} "
        f"ratio_mmap_vs_list={rate['evalkit mmap'] / rate['evalkit list']:.3f}"
    )


def _hf_dataset(rows: list[list[str]]):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "sentence1": [r[0] for r in rows],
            "sentence2": [r[1] for r in rows],
            "score": [float(r[2]) / 5 for r in rows],
        }
    )


if __name__ == "__main__":
    main()
