"""The fit loop: train a sentence-transformers model on a map-style dataset with any ST loss.

`fit` is a loop over named steps (methods of `_Run`):
 1) setup: processes and devices (`distributed`), seeds, the data plan (`batches`), model,
    optimizer, LR schedule (warmup, then linear decay to zero) and GradScaler (`step`); restored
    from a checkpoint when resuming, exactly where it stopped;
 2) train_step: one optimizer step from `grad_accum` micro-batches (`step.StepEngine`: autocast,
    accumulation, DDP gradient sync on the last micro-batch only, clipping); on CPU each forward
    runs in groups of similar length (`padding.SplitForward`), so padding is not computed;
 3) log: every `log_every` steps append a record to DIR/log.jsonl (the only host syncs of a step);
 4) evaluate: every `eval_every` steps run the evaluator and keep the best model by its primary
    metric in DIR/best/;
 5) checkpoint: every `checkpoint_every` steps write DIR/checkpoints/step-N/ (model + optimizer,
    scheduler, scaler, data position and RNG states of every rank) to a temporary directory, then
    rename it; Ctrl-C saves one at the last finished step;
 6) finish: DIR/best/ (the final model without an evaluator) and DIR/result.json.
Only rank 0 writes.

Run under `torchrun --nproc_per_node K` and the same call trains with DistributedDataParallel
(nccl on GPU, gloo on CPU); `batch_size` is per process, so the global batch is K x batch_size.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalkit._io import out_dir_problem, write_json_atomic
from evalkit.errors import EvalkitError
from evalkit.train import checkpoint as ckpt
from evalkit.train.batches import Collate, EpochBatchSampler, make_loader
from evalkit.train.distributed import barrier, gather, mean_across, setup_distributed
from evalkit.train.padding import SplitForward
from evalkit.train.step import PRECISIONS, StepEngine, adamw, param_groups, resolve_precision

if TYPE_CHECKING:
    import torch

__all__ = ["Collate", "EpochBatchSampler", "FitResult", "fit", "setup_distributed"]

logger = logging.getLogger(__name__)


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


@dataclass
class _Options:
    """fit()'s keyword arguments, as given (see fit's docstring)."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    seed: int = 42
    shuffle: bool = True
    evaluator: Callable[..., dict[str, float]] | None = None
    eval_every: int | None = None
    metric: str | None = None
    greater_is_better: bool | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    out: str | os.PathLike | None = None
    resume: bool | str | os.PathLike = False
    num_workers: int = 0
    precision: str = "auto"
    device: str | None = "auto"
    label_scale: float | None = None
    log_every: int = 10
    optimizer: Callable[[list[dict[str, Any]]], Any] | None = None
    callback: Callable[[dict[str, Any]], None] | None = None
    progress: bool = True
    split_padding: bool | None = None


def fit(model: Any, train_dataset: Any, loss: torch.nn.Module, **options: Any) -> FitResult:
    """Train `model` on `train_dataset` with `loss` (any sentence-transformers loss built on `model`).

    Keyword arguments:
        train_dataset: map-style dataset of InputExample-like samples (evalkit.PairDataset, a
            list of InputExample, ...).
        epochs / max_steps: run `max_steps` optimizer steps if given, else `epochs` full epochs.
        batch_size: micro-batch size per process; the effective batch per optimizer step is
            batch_size x grad_accum x processes.
        lr, weight_decay: AdamW's (no decay on biases and LayerNorm, as sentence-transformers).
        warmup: warmup steps (>= 1) or a fraction of all steps (< 1); LR then decays linearly to 0.
        max_grad_norm: clip the global gradient norm to this (None or 0: no clipping).
        seed, shuffle: the data order (a seeded permutation per epoch) and every RNG.
        evaluator: a sentence-transformers SentenceEvaluator (e.g. evalkit's streaming ones),
            run every `eval_every` steps and at the end; the model with the best `metric`
            (default: evaluator.primary_metric; higher is better unless `greater_is_better` or the
            evaluator's own attribute says otherwise) is kept in OUT/best. Without one, best = final.
        checkpoint_every: write OUT/checkpoints/step-N every N steps and at the end;
            `keep_checkpoints` keeps only the newest K. Ctrl-C saves one at the last finished step.
        out: the run's folder (log.jsonl, checkpoints/, best/, result.json).
        resume: True continues from the newest checkpoint in OUT/checkpoints (a fresh start if
            there is none); a path resumes from that checkpoint. Data order, optimizer, scheduler,
            scaler and RNG states continue exactly where they were.
        num_workers: DataLoader worker processes.
        precision: "auto" (bf16 on CUDA when supported, else fp16; fp32 on CPU), "fp32", "bf16", "fp16".
        device: "auto", "cpu", "cuda", ...; under torchrun each process takes cuda:LOCAL_RANK.
        label_scale: divide float labels by this (e.g. 5 for STS-B's 0-5 scores with
            CosineSimilarityLoss, whose targets are cosines).
        log_every: append a record to OUT/log.jsonl every N steps.
        optimizer: factory taking parameter groups (with their weight decay) -> optimizer;
            default AdamW(lr=lr).
        callback: called with each step's record (dict) at the end of the step.
        progress: a progress bar on rank 0.
        split_padding: forward each micro-batch in groups of similar length so padding is not
            computed (evalkit.train.padding; same batch, same loss up to float rounding).
            None (default): on CPU, where padded tokens cost as much as real ones.
    """
    known = {f.name for f in fields(_Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"fit() got unexpected keyword arguments: {', '.join(unknown)}")
    opts = _Options(**options)
    _check_options(opts, train_dataset)
    run = _Run(model, train_dataset, loss, opts)
    try:
        while run.state["step"] < run.total_steps:
            run.train_epoch()
    except KeyboardInterrupt:
        run.save_on_interrupt()
        raise
    finally:
        run.close()
    return run.finish()


class _Run:
    """The state of one fit() call and its named steps."""

    def __init__(self, model: Any, dataset: Any, loss: Any, opts: _Options) -> None:
        self.model, self.dataset, self.loss, self.o = model, dataset, loss, opts
        self.out = Path(opts.out) if opts.out is not None else None
        self.ckpt_root = self.out / "checkpoints" if self.out is not None else None
        self.log_path = self.out / "log.jsonl" if self.out is not None else None
        self.metric = opts.metric
        self.greater = opts.greater_is_better
        if self.greater is None:
            self.greater = getattr(opts.evaluator, "greater_is_better", True)
        self._setup_processes()
        self._setup_training()
        self._restore()
        self.splitter = None
        if opts.split_padding or (opts.split_padding is None and self.dev.type == "cpu"):
            self.splitter = SplitForward.install(model)
        self.collate = Collate(model, opts.label_scale)
        self.start_time, self.start_samples = time.perf_counter(), self.state["samples"]
        self.last_loss: float | None = None
        self.running: list[Any] = []
        self.rng_at_step = ckpt.rng_state() if opts.checkpoint_every else None
        self.bar = _progress(self.total_steps, self.state["step"], self.o.progress and self.is_main)

    # 1) setup ------------------------------------------------------------------------------

    def _setup_processes(self) -> None:
        o = self.o
        self.ddp, self.dev = setup_distributed(o.device)
        self.is_main = self.ddp.rank == 0
        self.precision = resolve_precision(o.precision, self.dev)
        if o.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _seed_everything(o.seed)
        self.n_rows = len(self.dataset)
        self.sampler_args = dict(
            seed=o.seed, rank=self.ddp.rank, world_size=self.ddp.world, shuffle=o.shuffle
        )
        micro = EpochBatchSampler(
            self.n_rows, o.batch_size, **self.sampler_args
        ).batches_per_epoch()
        self.steps_per_epoch = math.ceil(micro / o.grad_accum)
        self.total_steps = o.max_steps if o.max_steps else o.epochs * self.steps_per_epoch

    def _setup_training(self) -> None:
        import torch
        from transformers import get_linear_schedule_with_warmup

        o = self.o
        warmup = int(o.warmup) if o.warmup >= 1 else int(round(o.warmup * self.total_steps))
        self.model.to(self.dev)
        self.loss.to(self.dev)
        self.model.train()
        self.loss.train()
        groups = param_groups(self.loss, o.weight_decay)
        opt = o.optimizer(groups) if o.optimizer is not None else adamw(groups, o.lr)
        self.engine = StepEngine(
            self.model, self.loss, opt, get_linear_schedule_with_warmup(opt, warmup, self.total_steps),
            torch.amp.GradScaler(self.dev.type, enabled=self.precision == "fp16"), self.precision,
            o.max_grad_norm, self.ddp, self.dev,
        )  # fmt: skip
        self.config = {"n_rows": self.n_rows, "batch_size": o.batch_size, "grad_accum": o.grad_accum,
                       "world_size": self.ddp.world, "seed": o.seed, "shuffle": o.shuffle}  # fmt: skip
        self.state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "samples": 0, "best": None}

    def _restore(self) -> None:
        resume = self.o.resume
        self.last_ckpt = ckpt.find_resume(resume, self.ckpt_root) if resume else None
        if self.last_ckpt is not None:
            saved = ckpt.load_checkpoint(self.last_ckpt, self.model, self.config)
            self.engine.load_state_dict(saved)
            self.state.update({k: saved[k] for k in self.state})
            ckpt.set_rng_state(saved["rng"][self.ddp.rank])
            logger.info("resuming from %s at step %d", self.last_ckpt, self.state["step"])
        if self.is_main and self.log_path is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.trim_log(self.log_path, self.state["step"])
        self.engine.wrap()

    # 2) the loop ---------------------------------------------------------------------------

    def train_epoch(self) -> None:
        """The rest of the current epoch (or until the last step): `grad_accum` micro-batches a step."""
        o, state = self.o, self.state
        if state["step_in_epoch"] >= self.steps_per_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        sampler = EpochBatchSampler(self.n_rows, o.batch_size, epoch=state["epoch"],
                                    start=state["step_in_epoch"] * o.grad_accum, **self.sampler_args)  # fmt: skip
        loader = make_loader(
            self.dataset, sampler, self.collate, o.num_workers, self.dev, o.seed + state["epoch"]
        )
        micro_left, batches = len(sampler), iter(loader)
        while state["step"] < self.total_steps and micro_left > 0:
            n_micro = min(o.grad_accum, micro_left)
            micro_left -= n_micro
            self.train_step(batches, n_micro)

    def train_step(self, batches: Any, n_micro: int) -> None:
        o, state = self.o, self.state
        step_loss, rows, grad_norm = self.engine.step(batches, n_micro)
        state["step"] += 1
        state["step_in_epoch"] += 1
        state["samples"] += rows * self.ddp.world
        self.running.append(step_loss)
        if o.checkpoint_every:
            self.rng_at_step = ckpt.rng_state()
        final = state["step"] == self.total_steps
        record = self.log(final, grad_norm)
        self.bar.update(1)
        if o.evaluator is not None and (
            final or (o.eval_every and state["step"] % o.eval_every == 0)
        ):
            self.evaluate()
        if o.checkpoint_every and (final or state["step"] % o.checkpoint_every == 0):
            self.checkpoint()
        if o.callback is not None:
            record["loss"] = float(step_loss) if record["loss"] is None else record["loss"]
            o.callback(record)

    # 3) log ----------------------------------------------------------------------------------

    def log(self, final: bool, grad_norm: Any) -> dict[str, Any]:
        state = self.state
        rate = (state["samples"] - self.start_samples) / max(
            time.perf_counter() - self.start_time, 1e-9
        )
        record = {
            "step": state["step"], "loss": None,
            "epoch": round(state["epoch"] + state["step_in_epoch"] / self.steps_per_epoch, 4),
            "lr": self.engine.scheduler.get_last_lr()[0], "grad_norm": None,
            "samples": state["samples"], "samples_per_s": rate,
        }  # fmt: skip
        if state["step"] % self.o.log_every == 0 or final:  # the only host syncs of a step
            record["loss"] = self.last_loss = mean_across(self.running, self.ddp)
            record["grad_norm"] = float(grad_norm) if grad_norm is not None else None
            self.running.clear()
            if self.is_main:
                ckpt.append_log(self.log_path, record)
            self.bar.set_postfix(
                loss=f"{self.last_loss:.4f}", samples_s=f"{rate:.0f}", refresh=False
            )
        return record

    # 4) evaluate -----------------------------------------------------------------------------

    def evaluate(self) -> None:
        import torch

        state, evaluator = self.state, self.o.evaluator
        if self.is_main:
            self.model.eval()
            with torch.no_grad():
                output_path = str(self.out / "eval") if self.out is not None else None
                scores = evaluator(
                    self.model, output_path=output_path, epoch=state["epoch"], steps=state["step"]
                )
            self.model.train()
            self.metric, value = _pick_metric(
                scores, self.metric or getattr(evaluator, "primary_metric", None)
            )
            best = state["best"]
            improved = best is None or (
                value > best["value"] if self.greater else value < best["value"]
            )
            if improved:
                state["best"] = {"metric": self.metric, "value": value, "step": state["step"]}
                if self.out is not None:
                    ckpt.save_model_atomic(self.model, self.out / "best")
            ckpt.append_log(
                self.log_path,
                {"step": state["step"], "eval": _jsonable(scores), "best": state["best"]},
            )
            self.bar.write(
                f"step {state['step']}: {self.metric} = {value:.4f}"
                + (" (best)" if improved else "")
            )
        barrier(self.ddp)

    # 5) checkpoint ---------------------------------------------------------------------------

    def checkpoint(self, rng: dict[str, Any] | None = None) -> None:
        rngs = gather(rng or ckpt.rng_state(), self.ddp)
        if self.is_main:
            payload = {**self.state, "config": self.config, "rng": rngs, **self.engine.state_dict()}
            self.last_ckpt = ckpt.write_checkpoint(
                self.ckpt_root, self.state["step"], self.model, payload, self.o.keep_checkpoints
            )
        barrier(self.ddp)

    def save_on_interrupt(self) -> None:
        if (
            self.ddp.world == 1
            and self.o.checkpoint_every
            and self.state["step"]
            and self.rng_at_step is not None
        ):
            logger.warning("interrupted: saving a checkpoint at step %d", self.state["step"])
            self.engine.opt.zero_grad(set_to_none=True)
            self.checkpoint(self.rng_at_step)

    def close(self) -> None:
        self.bar.close()
        self.engine.unwrap()
        if self.splitter is not None:
            self.splitter.remove()

    # 6) finish -------------------------------------------------------------------------------

    def finish(self) -> FitResult:
        state, evaluator = self.state, self.o.evaluator
        best_dir = self.out / "best" if self.out is not None else None
        if self.is_main and best_dir is not None and (evaluator is None or not best_dir.exists()):
            ckpt.save_model_atomic(self.model, best_dir)
        barrier(self.ddp)
        elapsed = time.perf_counter() - self.start_time
        best = state["best"] or {}
        result = FitResult(
            steps=state["step"],
            epoch=state["epoch"],
            samples=state["samples"],
            final_loss=self.last_loss,
            metric=best.get("metric"),
            best_metric=best.get("value"),
            best_step=best.get("step") if evaluator is not None else state["step"],
            best_dir=str(best_dir) if best_dir is not None else None,
            last_checkpoint=str(self.last_ckpt) if self.last_ckpt is not None else None,
            log_path=str(self.log_path) if self.log_path is not None else None,
            seconds=elapsed,
            samples_per_second=(state["samples"] - self.start_samples) / max(elapsed, 1e-9),
            precision=self.precision,
            world_size=self.ddp.world,
        )
        if self.is_main and self.out is not None:
            write_json_atomic(self.out / "result.json", result.to_dict(), default=str)
        if self.ddp.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
        return result


def _check_options(o: _Options, dataset: Any) -> None:
    for name in ("batch_size", "grad_accum", "log_every"):
        value = getattr(o, name)
        if not isinstance(value, int) or value < 1:
            raise EvalkitError(f"{name} must be a positive integer; got {value!r}")
    if o.max_steps is not None and (not isinstance(o.max_steps, int) or o.max_steps < 1):
        raise EvalkitError(f"max_steps must be a positive integer; got {o.max_steps!r}")
    if o.max_steps is None and (not isinstance(o.epochs, int) or o.epochs < 1):
        raise EvalkitError(f"epochs must be a positive integer; got {o.epochs!r}")
    if not o.lr > 0:
        raise EvalkitError(f"lr must be positive; got {o.lr!r}")
    if o.warmup < 0:
        raise EvalkitError(
            f"warmup must be >= 0 (steps, or a fraction of all steps); got {o.warmup!r}"
        )
    if o.precision not in PRECISIONS:
        raise EvalkitError(f"precision must be one of {', '.join(PRECISIONS)}; got {o.precision!r}")
    if len(dataset) == 0:
        raise EvalkitError("the training data has no rows")
    out = Path(o.out) if o.out is not None else None
    if out is not None and (problem := out_dir_problem(out)):
        raise EvalkitError(problem)
    if (o.checkpoint_every or o.resume) and out is None:
        raise EvalkitError("checkpoint_every and resume need an output directory (out=...)")
    existing = ckpt.list_checkpoints(out / "checkpoints") if out is not None else []
    if not o.resume and existing:
        raise EvalkitError(
            f"{out} already holds checkpoints ({existing[-1].name}); "
            "resume to continue that run, or give another output directory"
        )


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", disable=not enabled, smoothing=0.1
    )


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
