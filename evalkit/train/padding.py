"""Padding-aware sub-batches: the same micro-batch, forwarded in groups of similar length.

A micro-batch of texts is padded to its longest text; on STS-B with all-MiniLM-L6-v2 and batches
of 32 the padded tensors hold 2.5x the real tokens, and on a CPU every padded token costs as much
as a real one. `SplitForward` wraps the model's forward while `fit` trains:
1) the rows are sorted by real length (the attention mask's row sums);
2) `plan_groups` cuts the sorted rows into contiguous groups minimising
   sum(rows_g x longest_g) + overhead x groups (`overhead`: the fixed cost of one more forward
   call, in tokens, from `overhead_tokens`' cost model), by dynamic programming;
3) each group runs the model's own forward on its rows, trimmed to the group's longest row;
4) the outputs go back into the original row order: per-row tensors concatenated, token-level
   tensors (those that were [rows, length] on input, or [rows, length, ...]) padded back to the
   batch's length with zeros.
Only right-padded 2-D `attention_mask` inputs are split; anything else runs unchanged. Each row's
sentence embedding equals the padded forward's (padding is masked), so the batch, the loss and
the gradients are the same up to float rounding: only padding work is skipped. Token-level
outputs at padding positions are zeros instead of the transformer's values there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# Cost model on a CPU: one more forward+backward costs ~150 us per Linear layer (dispatch of the
# ops around it), a token ~6 x (non-embedding parameters) / 40 GFLOP/s; their ratio in tokens:
TOKENS_PER_LINEAR_PER_PARAM = 1e6


def overhead_tokens(model: Any) -> float:
    """The fixed cost of one more forward+backward pass, in tokens of this model (CPU): ~3 for
    all-MiniLM-L6-v2, ~500 for a 2-layer hidden-32 test model. Clamped to [1, 4096]."""
    import torch

    linear = params = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linear += 1
        if not isinstance(module, torch.nn.Embedding):
            params += sum(p.numel() for p in module.parameters(recurse=False))
    if not linear or not params:
        return 64.0
    return float(min(4096.0, max(1.0, TOKENS_PER_LINEAR_PER_PARAM * linear / params)))


def plan_groups(lengths: np.ndarray, overhead: float) -> list[int]:
    """Group ends (exclusive) over lengths sorted ascending: the cut minimising
    sum(len(group) * max(group)) + overhead * number of groups."""
    n = len(lengths)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    starts = np.arange(n)
    for j in range(1, n + 1):  # the last group is rows i..j-1; its longest row is j-1
        cost = best[:j] + (j - starts[:j]) * float(lengths[j - 1]) + overhead
        i = int(np.argmin(cost))
        best[j], cut[j] = cost[i], i
    ends, j = [], n
    while j > 0:
        ends.append(j)
        j = int(cut[j])
    return ends[::-1]


def _right_padded(mask: Any) -> bool:
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


class SplitForward:
    """Installed as `model.forward` (an instance attribute) for the duration of a fit."""

    def __init__(self, model: Any, overhead: float | None = None) -> None:
        self.model = model
        self.overhead = overhead_tokens(model) if overhead is None else overhead
        self.inner = model.forward  # the bound method of the model's class
        self.calls = self.split_calls = self.fallbacks = 0
        self.tokens_padded = self.tokens_run = 0

    @classmethod
    def install(cls, model: Any, overhead: float | None = None) -> SplitForward:
        split = cls(model, overhead)
        model.forward = split
        return split

    def remove(self) -> None:
        if self.model.__dict__.get("forward") is self:
            del self.model.forward

    def __call__(self, features: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        mask = features.get("attention_mask") if isinstance(features, Mapping) else None
        if mask is None or getattr(mask, "dim", lambda: 0)() != 2 or len(mask) < 2:
            return self.inner(features, *args, **kwargs)
        rows, width = mask.shape
        if not _right_padded(mask):
            return self.inner(features, *args, **kwargs)
        lengths = mask.sum(dim=1).cpu().numpy()
        order = np.argsort(lengths, kind="stable")
        ends = plan_groups(lengths[order], self.overhead)
        self.tokens_padded += rows * width
        if len(ends) == 1:
            self.tokens_run += rows * width
            return self.inner(features, *args, **kwargs)
        self.split_calls += 1
        return self._split(features, order, lengths, ends, args, kwargs)

    def _split(self, features, order, lengths, ends, args, kwargs) -> dict[str, Any]:
        import torch

        rows, width = features["attention_mask"].shape
        token_keys = {
            k for k, v in features.items() if torch.is_tensor(v) and v.shape[:2] == (rows, width)
        }
        row_keys = {
            k
            for k, v in features.items()
            if torch.is_tensor(v) and v.dim() >= 1 and len(v) == rows and k not in token_keys
        }
        outputs, start = [], 0
        device = features["attention_mask"].device
        for end in ends:
            idx = torch.as_tensor(order[start:end], device=device)
            longest = int(lengths[order[end - 1]])
            part = {}
            for k, v in features.items():
                if k in token_keys:
                    part[k] = v.index_select(0, idx)[:, :longest]
                elif k in row_keys:
                    part[k] = v.index_select(0, idx)
                else:
                    part[k] = v
            self.tokens_run += (end - start) * longest
            outputs.append((self.inner(part, *args, **kwargs), longest))
            start = end
        inverse = torch.as_tensor(np.argsort(order, kind="stable"), device=device)
        try:
            return _merge(outputs, inverse, rows, width, token_keys)
        except (RuntimeError, IndexError, ValueError):  # an output this merge cannot place
            self.fallbacks += 1
            return self.inner(features, *args, **kwargs)


def _merge(outputs, inverse, rows: int, width: int, token_keys: set[str]) -> dict[str, Any]:
    """Group outputs -> one output in the original row order (see the module docstring, 4)."""
    first = outputs[0][0]
    merged = {}
    for key in first:
        merged[key] = _merge_value(
            [(out[key], longest) for out, longest in outputs], inverse, width, key in token_keys
        )
    return merged


def _merge_value(parts, inverse, width: int, token_level: bool) -> Any:
    import torch
    import torch.nn.functional as F

    value = parts[0][0]
    if isinstance(value, list | tuple) and value and torch.is_tensor(value[0]):
        return type(value)(
            _merge_value([(p[i], n) for p, n in parts], inverse, width, token_level)
            for i in range(len(value))
        )
    if not torch.is_tensor(value) or value.dim() == 0:
        return value  # settings passed through (e.g. the modality name): the same for all groups
    if sum(len(t) for t, _ in parts) != len(inverse):
        raise ValueError("an output tensor is not one row per input row")
    pieces = []
    for tensor, longest in parts:
        if (token_level or tensor.dim() >= 3) and tensor.dim() >= 2 and tensor.shape[1] == longest:
            pad = [0, 0] * (tensor.dim() - 2) + [0, width - longest]
            tensor = F.pad(tensor, pad)
        pieces.append(tensor)
    return torch.cat(pieces, dim=0).index_select(0, inverse)
