"""The fit loop: train a sentence-transformers model on a map-style dataset with any ST loss.

Per optimizer step:
 1) plan the epoch: a seeded permutation of the rows (seed + epoch), padded and strided across
    ranks exactly like torch's DistributedSampler, cut into micro-batches; on resume, skip the
    micro-batches already consumed;
 2) a DataLoader gathers each micro-batch (`__getitems__` on memory-mapped datasets, workers,
    pinned memory on CUDA) and a collate tokenises every text column with the model's own
    tokenizer -> (list of sentence features, labels), the inputs every ST loss takes;
 3) for each of the step's micro-batches (`grad_accum`, fewer at the end of an epoch): forward the
    loss under autocast (bf16, or fp16 with a GradScaler; fp32 on CPU), scale it by
    1/micro-batches and back-propagate; under DDP gradients are all-reduced on the last one only;
 4) unscale, clip the gradient norm, optimizer step (AdamW), scheduler step (warmup, then
    linear decay to zero);
 5) every `log_every` steps append a record to DIR/log.jsonl; every `eval_every` steps run the
    evaluator and keep the best model by its primary metric in DIR/best/; every
    `checkpoint_every` steps write DIR/checkpoints/step-N/ (model + optimizer, scheduler, scaler,
    data position and RNG states of every rank) to a temporary directory, then rename it.
    Only rank 0 writes.

Run under `torchrun --nproc_per_node K` and the same call trains with DistributedDataParallel
(nccl on GPU, gloo on CPU); `batch_size` is per process, so the global batch is K x batch_size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalkit import _checkpoint as ckpt
from evalkit.errors import EvalkitError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class FitResult:
    """What a run did and where it left things (paths are None when `out` was not given)."""

    steps: int
    epoch: int
    samples: int
    final_loss: float | None
    metric: str | None
    best_metric: float | None
    best_step: int | None
    best_dir: str | None
    last_checkpoint: str | None
    log_path: str | None
    seconds: float
    samples_per_second: float
    precision: str
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def fit(
    model: Any,
    train_dataset: Any,
    loss: torch.nn.Module,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 32,
    grad_accum: int = 1,
    lr: float = 2e-5,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    seed: int = 42,
    shuffle: bool = True,
    evaluator: Callable[..., dict[str, float]] | None = None,
    eval_every: int | None = None,
    metric: str | None = None,
    greater_is_better: bool | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = None,
    out: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    num_workers: int = 0,
    precision: str = "auto",
    device: str | None = "auto",
    label_scale: float | None = None,
    log_every: int = 10,
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train `model` on `train_dataset` with `loss` (any sentence-transformers loss built on `model`).

    Args:
        train_dataset: map-style dataset of InputExample-like samples (evalkit.dataset.PairDataset,
            a list of InputExample, ...).
        epochs / max_steps: run `max_steps` optimizer steps if given, else `epochs` full epochs.
        batch_size: micro-batch size per process; the effective batch per optimizer step is
            batch_size x grad_accum x processes.
        warmup: warmup steps (>= 1) or a fraction of all steps (< 1); LR then decays linearly to 0.
        max_grad_norm: clip the global gradient norm to this (None or 0: no clipping).
        evaluator: a sentence-transformers SentenceEvaluator (e.g. evalkit.evaluator's streaming
            ones), run every `eval_every` steps and at the end; the model with the best `metric`
            (default: evaluator.primary_metric; higher is better unless `greater_is_better` or the
            evaluator's own attribute says otherwise) is kept in OUT/best. Without one, best = final.
        checkpoint_every: write OUT/checkpoints/step-N every N steps and at the end;
            `keep_checkpoints` keeps only the newest K. Ctrl-C saves one at the last finished step.
        resume: True continues from the newest checkpoint in OUT/checkpoints (a fresh start if
            there is none); a path resumes from that checkpoint. Data order, optimizer, scheduler,
            scaler and RNG states continue exactly where they were.
        precision: "auto" (bf16 on CUDA when supported, else fp16; fp32 on CPU), "fp32", "bf16", "fp16".
        label_scale: divide float labels by this (e.g. 5 for STS-B's 0-5 scores with
            CosineSimilarityLoss, whose targets are cosines).
        optimizer: factory taking parameter groups (with their weight decay) -> optimizer;
            default AdamW(lr=lr).
        callback: called with each step's record (dict) at the end of the step.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    _check_args(epochs, max_steps, batch_size, grad_accum, lr, warmup, precision, log_every)
    if len(train_dataset) == 0:
        raise EvalkitError("the training data has no rows")
    out_dir = Path(out) if out is not None else None
    if (checkpoint_every or resume) and out_dir is None:
        raise EvalkitError("checkpoint_every and resume need an output directory (out=...)")
    ckpt_root = out_dir / "checkpoints" if out_dir is not None else None
    if not resume and ckpt.list_checkpoints(ckpt_root):
        raise EvalkitError(
            f"{out_dir} already holds checkpoints ({ckpt.list_checkpoints(ckpt_root)[-1].name}); "
            "resume to continue that run, or give another output directory"
        )
    if greater_is_better is None:
        greater_is_better = getattr(evaluator, "greater_is_better", True)

    # 1) processes, devices, seeds, the data plan
    ddp, dev = setup_distributed(device)
    is_main = ddp.rank == 0
    precision = _resolve_precision(precision, dev)
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _seed_everything(seed)
    n_rows = len(train_dataset)
    sampler_args = dict(seed=seed, rank=ddp.rank, world_size=ddp.world, shuffle=shuffle)
    micro_per_epoch = EpochBatchSampler(n_rows, batch_size, **sampler_args).batches_per_epoch()
    steps_per_epoch = math.ceil(micro_per_epoch / grad_accum)
    total_steps = max_steps if max_steps else epochs * steps_per_epoch
    warmup_steps = int(warmup) if warmup >= 1 else int(round(warmup * total_steps))

    # 2) model, optimizer, schedule, scaler; restored from a checkpoint when resuming
    model.to(dev)
    loss.to(dev)
    model.train()
    loss.train()
    groups = _param_groups(loss, weight_decay)
    opt = optimizer(groups) if optimizer is not None else _adamw(groups, lr)
    engine = _Engine(
        model, loss, opt, get_linear_schedule_with_warmup(opt, warmup_steps, total_steps),
        torch.amp.GradScaler(dev.type, enabled=precision == "fp16"), precision, max_grad_norm,
        ddp, dev,
    )  # fmt: skip
    config = {"n_rows": n_rows, "batch_size": batch_size, "grad_accum": grad_accum,
              "world_size": ddp.world, "seed": seed, "shuffle": shuffle}  # fmt: skip
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "samples": 0, "best": None}
    resume_from = ckpt.find_resume(resume, ckpt_root) if resume else None
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from, model, config)
        engine.load_state_dict(saved)
        state.update({k: saved[k] for k in state})
        ckpt.set_rng_state(saved["rng"][ddp.rank])
        logger.info("resuming from %s at step %d", resume_from, state["step"])
    log_path = out_dir / "log.jsonl" if out_dir is not None else None
    if is_main and log_path is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.trim_log(log_path, state["step"])
    engine.wrap()

    collate = Collate(model, label_scale)
    start_time, start_samples = time.perf_counter(), state["samples"]
    last_loss: float | None = None
    running: list[torch.Tensor] = []
    last_ckpt: Path | None = resume_from
    rng_at_step = ckpt.rng_state() if checkpoint_every else None
    bar = _progress(total_steps, state["step"], enabled=progress and is_main)

    def save_checkpoint(rng: dict[str, Any] | None = None) -> None:
        nonlocal last_ckpt
        rngs = _gather(rng or ckpt.rng_state(), ddp)
        if is_main:
            payload = {**state, "config": config, "rng": rngs, **engine.state_dict()}
            last_ckpt = ckpt.write_checkpoint(
                ckpt_root, state["step"], model, payload, keep_checkpoints
            )
        _barrier(ddp)

    def run_eval() -> None:
        nonlocal metric
        if is_main:
            model.eval()
            with torch.no_grad():
                output_path = str(out_dir / "eval") if out_dir is not None else None
                scores = evaluator(
                    model, output_path=output_path, epoch=state["epoch"], steps=state["step"]
                )
            model.train()
            metric, value = _pick_metric(
                scores, metric or getattr(evaluator, "primary_metric", None)
            )
            best = state["best"]
            improved = best is None or (
                value > best["value"] if greater_is_better else value < best["value"]
            )
            if improved:
                state["best"] = {"metric": metric, "value": value, "step": state["step"]}
                if out_dir is not None:
                    ckpt.save_model_atomic(model, out_dir / "best")
            ckpt.append_log(
                log_path, {"step": state["step"], "eval": _jsonable(scores), "best": state["best"]}
            )
            bar.write(
                f"step {state['step']}: {metric} = {value:.4f}" + (" (best)" if improved else "")
            )
        _barrier(ddp)

    # 3) the loop: epochs of micro-batches, `grad_accum` of them per optimizer step
    try:
        while state["step"] < total_steps:
            if state["step_in_epoch"] >= steps_per_epoch:
                state["epoch"] += 1
                state["step_in_epoch"] = 0
            sampler = EpochBatchSampler(n_rows, batch_size, epoch=state["epoch"],
                                        start=state["step_in_epoch"] * grad_accum, **sampler_args)  # fmt: skip
            loader = _loader(
                train_dataset, sampler, collate, num_workers, dev, seed + state["epoch"]
            )
            micro_left, batches = len(sampler), iter(loader)
            while state["step"] < total_steps and micro_left > 0:
                n_micro = min(grad_accum, micro_left)
                micro_left -= n_micro
                step_loss, rows, grad_norm = engine.step(batches, n_micro)
                state["step"] += 1
                state["step_in_epoch"] += 1
                state["samples"] += rows * ddp.world
                running.append(step_loss)
                if checkpoint_every:
                    rng_at_step = ckpt.rng_state()
                final = state["step"] == total_steps
                rate = (state["samples"] - start_samples) / max(
                    time.perf_counter() - start_time, 1e-9
                )
                record = {
                    "step": state["step"], "loss": None,
                    "epoch": round(state["epoch"] + state["step_in_epoch"] / steps_per_epoch, 4),
                    "lr": engine.scheduler.get_last_lr()[0], "grad_norm": None,
                    "samples": state["samples"], "samples_per_s": rate,
                }  # fmt: skip
                if state["step"] % log_every == 0 or final:  # the only host syncs of a step
                    record["loss"] = last_loss = _mean_across(running, ddp)
                    record["grad_norm"] = float(grad_norm) if grad_norm is not None else None
                    running.clear()
                    if is_main:
                        ckpt.append_log(log_path, record)
                    bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                if evaluator is not None and (
                    final or (eval_every and state["step"] % eval_every == 0)
                ):
                    run_eval()
                if checkpoint_every and (final or state["step"] % checkpoint_every == 0):
                    save_checkpoint()
                if callback is not None:
                    record["loss"] = float(step_loss) if record["loss"] is None else record["loss"]
                    callback(record)
            del batches, loader
    except KeyboardInterrupt:
        if ddp.world == 1 and checkpoint_every and state["step"] and rng_at_step is not None:
            logger.warning("interrupted: saving a checkpoint at step %d", state["step"])
            engine.opt.zero_grad(set_to_none=True)
            save_checkpoint(rng_at_step)
        raise
    finally:
        bar.close()
        engine.unwrap()

    # 4) the best model (= the final one without an evaluator) and the result
    best_dir = out_dir / "best" if out_dir is not None else None
    if is_main and best_dir is not None and (evaluator is None or not best_dir.exists()):
        ckpt.save_model_atomic(model, best_dir)
    _barrier(ddp)
    elapsed = time.perf_counter() - start_time
    best = state["best"] or {}
    result = FitResult(
        steps=state["step"],
        epoch=state["epoch"],
        samples=state["samples"],
        final_loss=last_loss,
        metric=best.get("metric"),
        best_metric=best.get("value"),
        best_step=best.get("step") if evaluator is not None else state["step"],
        best_dir=str(best_dir) if best_dir is not None else None,
        last_checkpoint=str(last_ckpt) if last_ckpt is not None else None,
        log_path=str(log_path) if log_path is not None else None,
        seconds=elapsed,
        samples_per_second=(state["samples"] - start_samples) / max(elapsed, 1e-9),
        precision=precision,
        world_size=ddp.world,
    )
    if is_main and out_dir is not None:
        ckpt.write_json_atomic(out_dir / "result.json", result.to_dict())
    if ddp.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


class _Engine:
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
        _put_model_in_loss(self.loss, self.wrapped, self.model)

    def unwrap(self) -> None:
        if self.wrapped is not self.model:
            _put_model_in_loss(self.loss, self.model, self.model)
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
            features = [{k: _to(v, self.dev) for k, v in f.items()} for f in features]
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
            _all_reduce_mean([p.grad for p in self.extra if p.grad is not None], self.ddp)
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


# ---------------------------------------------------------------------------- set-up helpers


def _check_args(
    epochs, max_steps, batch_size, grad_accum, lr, warmup, precision, log_every
) -> None:
    for name, value in (
        ("batch_size", batch_size),
        ("grad_accum", grad_accum),
        ("log_every", log_every),
    ):
        if not isinstance(value, int) or value < 1:
            raise EvalkitError(f"{name} must be a positive integer; got {value!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise EvalkitError(f"max_steps must be a positive integer; got {max_steps!r}")
    if max_steps is None and (not isinstance(epochs, int) or epochs < 1):
        raise EvalkitError(f"epochs must be a positive integer; got {epochs!r}")
    if not lr > 0:
        raise EvalkitError(f"lr must be positive; got {lr!r}")
    if warmup < 0:
        raise EvalkitError(
            f"warmup must be >= 0 (steps, or a fraction of all steps); got {warmup!r}"
        )
    if precision not in PRECISIONS:
        raise EvalkitError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    initialized_here: bool = False


def setup_distributed(device: str | None = "auto") -> tuple[_Dist, torch.device]:
    """-> (rank, world size, whether this call made the process group), device for this process.

    Under torchrun (WORLD_SIZE > 1) join the process group (nccl on GPU, gloo on CPU) unless it
    is already joined; each process takes cuda:LOCAL_RANK. Otherwise rank 0 of 1 on `device`."""
    import torch

    from evalkit.models import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), torch.device(resolve_device(device))
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
    return _Dist(dist.get_rank(), dist.get_world_size(), here), dev


def _resolve_precision(precision: str, dev: torch.device) -> str:
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


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _unique_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    params = []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _param_groups(loss: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where torch can (CPU and CUDA, torch >= 2.4): on
    CPU the default per-tensor loop costs a sixth of a small model's step."""
    import torch

    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


def _put_model_in_loss(loss: torch.nn.Module, new: Any, original: Any) -> None:
    """Point every `.model` the loss (or a wrapped inner loss) holds at `new` (the DDP wrapper)."""
    for name, child in list(loss.named_children()):
        if name == "model" and (child is original or getattr(child, "module", None) is original):
            if new is not original:
                for attr in ("preprocess", "get_embedding_dimension", "similarity_fct"):
                    if hasattr(original, attr) and not hasattr(new, attr):
                        setattr(new, attr, getattr(original, attr))
            loss.model = new
        elif name != "model":
            _put_model_in_loss(child, new, original)


def _loader(dataset, sampler, collate, num_workers: int, dev, seed: int):
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


def _progress(total: int, initial: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", disable=not enabled, smoothing=0.1
    )


# ---------------------------------------------------------------------------- distributed helpers


def _barrier(ctx: _Dist) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather(obj: Any, ctx: _Dist) -> list[Any]:
    if ctx.world == 1:
        return [obj]
    import torch.distributed as dist

    objs: list[Any] = [None] * ctx.world
    dist.all_gather_object(objs, obj)
    return objs


def _all_reduce_mean(tensors: list[torch.Tensor], ctx: _Dist) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
        t.div_(ctx.world)


def _mean_across(values: list[torch.Tensor], ctx: _Dist) -> float:
    """Mean of this process's step losses, averaged over all processes (one host sync)."""
    import torch

    mean = torch.stack(values).mean()
    if ctx.world > 1:
        import torch.distributed as dist

        dist.all_reduce(mean)
        mean = mean / ctx.world
    return float(mean)


# ---------------------------------------------------------------------------- evaluation results


def _pick_metric(scores: dict[str, float], name: str | None) -> tuple[str, float]:
    """-> (key, value) of `name` in the evaluator's results (which may prefix it with its name)."""
    if name in scores:
        return name, float(scores[name])
    matches = [k for k in scores if name and k.endswith(f"_{name}")]
    if len(matches) == 1:
        return matches[0], float(scores[matches[0]])
    raise EvalkitError(
        f"metric {name!r} is not among the evaluator's results: {', '.join(sorted(scores))}"
    )


def _jsonable(scores: dict[str, Any]) -> dict[str, Any]:
    return {
        k: float(v) if isinstance(v, int | float) or hasattr(v, "item") else v
        for k, v in scores.items()
    }
