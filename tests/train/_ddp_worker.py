"""Worker for tests/test_train.py's DDP test, launched as
`python -m torch.distributed.run --nproc_per_node 2 tests/train/_ddp_worker.py MODEL DATA OUT BATCH STEPS`.
Every rank trains with evalkit.train.fit.fit (gloo on CPU); rank 0 writes OUT."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    model_dir, data, out, batch_size, steps = sys.argv[1:6]
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    from evalkit.data.dataset import PairDataset
    from evalkit.train.fit import fit

    model = SentenceTransformer(model_dir, device="cpu")
    dataset = PairDataset(data, ["s1", "s2"], "score")
    result = fit(
        model,
        dataset,
        CosineSimilarityLoss(model),
        max_steps=int(steps),
        batch_size=int(batch_size),
        grad_accum=2,
        lr=1e-3,
        warmup=1,
        seed=7,
        out=out,
        log_every=1,
        device="cpu",
        progress=False,
    )
    assert result.world_size == int(os.environ["WORLD_SIZE"]), result


if __name__ == "__main__":
    main()
