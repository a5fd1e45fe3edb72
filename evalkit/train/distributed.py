"""Processes for torchrun DDP: join the group, and the few collectives the fit loop needs.

1) `setup_distributed` joins the process group under torchrun (nccl on GPU, gloo on CPU), each
   process on cuda:LOCAL_RANK; without torchrun it is rank 0 of 1;
2) `barrier`, `gather` (picklable objects: RNG states for checkpoints), `all_reduce_mean`
   (gradients of the loss's own weights) and `mean_across` (the logged loss: one host sync);
3) `put_model_in_loss` points a loss's `.model` at the DDP wrapper and back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    initialized_here: bool = False


def setup_distributed(device: str | None = "auto") -> tuple[DistContext, torch.device]:
    """-> (rank, world size, whether this call made the process group), device for this process.

    Under torchrun (WORLD_SIZE > 1) join the process group (nccl on GPU, gloo on CPU) unless it
    is already joined; each process takes cuda:LOCAL_RANK. Otherwise rank 0 of 1 on `device`."""
    import torch

    from evalkit.embed.models import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), torch.device(resolve_device(device))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = resolve_device(device)
    dev = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), here), dev


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    if ctx.world == 1:
        return [obj]
    import torch.distributed as dist

    objs: list[Any] = [None] * ctx.world
    dist.all_gather_object(objs, obj)
    return objs


def all_reduce_mean(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
        t.div_(ctx.world)


def mean_across(values: list[torch.Tensor], ctx: DistContext) -> float:
    """Mean of this process's step losses, averaged over all processes (one host sync)."""
    import torch

    mean = torch.stack(values).mean()
    if ctx.world > 1:
        import torch.distributed as dist

        dist.all_reduce(mean)
        mean = mean / ctx.world
    return float(mean)


def put_model_in_loss(loss: torch.nn.Module, new: Any, original: Any) -> None:
    """Point every `.model` the loss (or a wrapped inner loss) holds at `new` (the DDP wrapper)."""
    for name, child in list(loss.named_children()):
        if name == "model" and (child is original or getattr(child, "module", None) is original):
            if new is not original:
                for attr in ("preprocess", "get_embedding_dimension", "similarity_fct"):
                    if hasattr(original, attr) and not hasattr(new, attr):
                        setattr(new, attr, getattr(original, attr))
            loss.model = new
        elif name != "model":
            put_model_in_loss(child, new, original)
