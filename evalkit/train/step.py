"""One optimizer step from several micro-batches, and what a checkpoint needs to resume it.

For each of the step's micro-batches: forward the loss under autocast (bf16, or fp16 with a
GradScaler; fp32 on CPU), scale it by 1/micro-batches and back-propagate; under DDP gradients
are all-reduced on the last one only. Then unscale, clip the gradient norm, optimizer step
(fused AdamW where torch has it), scheduler step (skipped with the optimizer step when an fp16
overflow skipped it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from evalkit.errors import EvalkitError
from evalkit.train.batches import to_device
from evalkit.train.distributed import all_reduce_mean, put_model_in_loss

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class StepEngine:
    """One optimizer step from `n_micro` micro-batches, and the state a checkpoint needs."""

    def __init__(self, model, loss, opt, scheduler, scaler, precision, max_grad_norm, ddp, dev):
        self.model, self.loss, self.opt, self.scheduler, self.scaler = (
            model,
            loss,
            opt,
            scheduler,
            scaler,
        )
        self.max_grad_norm, self.ddp, self.dev = max_grad_norm, ddp, dev
        self.autocast = _autocast(precision, dev)
        self.trainable = [p for g in opt.param_groups for p in g["params"]]
        own = {id(p) for p in model.parameters()}
        self.extra = [p for p in self.trainable if id(p) not in own]  # the loss's own weights
        # GradCache losses run their second forward inside backward(): keep it under autocast.
        self.cached = bool(getattr(loss, "uses_gradient_cache", False)) or hasattr(
            loss, "forward_cached"
        )
        self.wrapped = model

    def wrap(self) -> None:
        if self.ddp.world == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        # Sentence-transformers models routinely hold weights no loss reaches (a BERT pooler under
        # mean pooling), and losses call the model once per text column: DDP must find the unused.
        self.wrapped = DistributedDataParallel(
            self.model,
            device_ids=[self.dev.index] if self.dev.type == "cuda" else None,
            find_unused_parameters=True,
        )
        put_model_in_loss(self.loss, self.wrapped, self.model)

    def unwrap(self) -> None:
        if self.wrapped is not self.model:
            put_model_in_loss(self.loss, self.model, self.model)
            self.wrapped = self.model

    def step(
        self, batches: Iterator, n_micro: int
    ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """-> (mean loss over the micro-batches, rows seen, gradient norm before clipping)."""
        import torch

        total, rows = torch.zeros((), device=self.dev), 0
        for i in range(n_micro):
            features, labels = next(batches)
            labels = labels.to(self.dev, non_blocking=True)
            features = [{k: to_device(v, self.dev) for k, v in f.items()} for f in features]
            # under DDP, all-reduce the gradients once per step: on the last micro-batch
            last = self.ddp.world == 1 or i == n_micro - 1
            with contextlib.nullcontext() if last else self.wrapped.no_sync():
                with self.autocast:
                    value = self.loss(features, labels)
                    if isinstance(value, dict):  # losses that report their components
                        value = torch.stack(list(value.values())).sum()
                    scaled = self.scaler.scale(value / n_micro)
                    if self.cached:
                        scaled.backward()
                if not self.cached:
                    scaled.backward()
            total += value.detach().float() / n_micro
            rows += len(labels)
        if self.ddp.world > 1 and self.extra:
            all_reduce_mean([p.grad for p in self.extra if p.grad is not None], self.ddp)
        self.scaler.unscale_(self.opt)
        norm = None
        if self.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.opt)
        self.scaler.update()
        if scale_before is None or self.scaler.get_scale() >= scale_before:
            self.scheduler.step()  # an fp16 overflow skipped the optimizer step: skip this too
        self.opt.zero_grad(set_to_none=True)
        return total, rows, norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "extra_params": [p.detach().cpu() for p in self.extra],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for p, t in zip(self.extra, saved["extra_params"], strict=True):
            p.data.copy_(t.to(p.device))
        self.opt.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])


def resolve_precision(precision: str, dev: torch.device) -> str:
    import torch

    if dev.type != "cuda":
        if precision == "fp16":
            raise EvalkitError("precision fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
        return "fp32" if precision == "auto" else precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def _autocast(precision: str, dev: torch.device) -> contextlib.AbstractContextManager:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=dev.type, dtype=dtype)


def param_groups(loss: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as sentence-transformers builds them: no decay on biases and LayerNorm."""
    decay, no_decay, seen = [], [], set()
    for name, p in loss.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = "bias" in name or "LayerNorm" in name or "layer_norm" in name
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where torch can (CPU and CUDA, torch >= 2.4): on
    CPU the default per-tensor loop costs a sixth of a small model's step."""
    import torch

    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)
