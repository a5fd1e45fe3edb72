"""What one rank trains on: the epoch's micro-batches of rows, gathered and tokenised.

1) `EpochBatchSampler` permutes the rows with a seeded generator (seed + epoch), pads and strides
   them across ranks exactly like torch's DistributedSampler, and cuts micro-batches; `start`
   skips the micro-batches already consumed (resume mid-epoch);
2) `make_loader` gathers each micro-batch through a DataLoader (`__getitems__` on memory-mapped
   datasets, workers, pinned memory on CUDA);
3) `Collate` tokenises every text column with the model's own tokenizer -> (list of sentence
   features, labels), the inputs every sentence-transformers loss takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class EpochBatchSampler:
    """Micro-batches of row indices for one epoch on one rank.

    The rows are `torch.randperm(n)` seeded with `seed + epoch` (or 0..n-1 without shuffling),
    padded by wrapping around to a multiple of `world_size` and strided by rank: the very indices
    `torch.utils.data.DistributedSampler` yields, kept as one int64 tensor rather than a Python
    list. `start` skips that many micro-batches (resume mid-epoch).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world_size, self.shuffle, self.start = rank, world_size, shuffle, start
        self.per_rank = math.ceil(n / world_size)

    def indices(self) -> torch.Tensor:
        import torch

        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g)
        else:
            idx = torch.arange(self.n)
        total = self.per_rank * self.world_size
        if total > self.n:  # wrap around, as DistributedSampler does
            idx = torch.cat([idx] * math.ceil(total / self.n))[:total]
        return idx[self.rank : total : self.world_size]

    def batches_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.indices()
        for b in range(self.start, self.batches_per_epoch()):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class Collate:
    """Micro-batch of InputExample-like samples -> (one feature dict per text column, labels).

    Samples are objects with `.texts` and `.label` (sentence_transformers.InputExample) or dicts
    with "texts" and "label"; each text column is tokenised with the model's own preprocessing,
    as sentence-transformers' fit() did. Float labels are divided by `label_scale`.
    """

    def __init__(self, model: Any, label_scale: float | None = None) -> None:
        self.preprocess = getattr(model, "preprocess", None) or model.tokenize
        self.label_scale = label_scale

    def __call__(self, batch: Sequence[Any]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        import torch

        if isinstance(batch[0], dict):
            texts = [b["texts"] for b in batch]
            labels = [b.get("label") for b in batch]
        else:
            texts = [b.texts for b in batch]
            labels = [b.label for b in batch]
        features = [self.preprocess(list(column)) for column in zip(*texts, strict=True)]
        if all(label is None for label in labels):
            return features, torch.zeros(len(batch))
        tensor = torch.tensor(labels)
        if tensor.is_floating_point():
            tensor = tensor.float()
            if self.label_scale:
                tensor = tensor / self.label_scale
        return features, tensor


def make_loader(dataset, sampler, collate, num_workers: int, dev, seed: int):
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(seed)  # workers' base seed comes from here, not from the global RNG
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        generator=g,
        persistent_workers=False,
    )


def _to(value: Any, dev: torch.device) -> Any:
    return value.to(dev, non_blocking=True) if hasattr(value, "to") else value


def to_device(value: Any, dev: torch.device) -> Any:
    return value.to(dev, non_blocking=True) if hasattr(value, "to") else value
