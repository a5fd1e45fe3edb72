"""`evalkit train DATA --left COL --right COL --loss LOSS --out DIR`: the fit loop (evalkit.train.fit.fit).

Thin: 1) DATA that is not already an Arrow file is converted (streaming) into OUT/train.arrow;
2) the columns are checked against the loss (cosine targets in [-1, 1], contrastive labels 0/1);
3) the model, loss and optional streaming evaluator are built; 4) fit() runs. Nothing heavy is
imported until the command runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from evalkit.cli._common import add_source_args, positive_int, source_options
from evalkit.errors import DataError, EvalkitError

LOSSES = ("cosine", "mnrl", "cached-mnrl", "contrastive")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")

EPILOG = """examples:
  evalkit train stsb-en-train.csv --column-names sentence1,sentence2,score \\
      --left sentence1 --right sentence2 --label score --label-scale 5 --loss cosine \\
      --eval-data stsb-en-dev.csv --eval-every 200 --max-steps 2000 --out runs/stsb
  evalkit train pairs.parquet --left query --right positive --loss cached-mnrl \\
      --batch-size 1024 --mini-batch-size 64 --out runs/mnrl
  torchrun --nproc_per_node 4 -m evalkit train ...      (DDP; --batch-size is per process)
  evalkit train ... --resume                           (continue from OUT/checkpoints/step-N)
"""


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
    return value


def _label_scale(text: str) -> str | float:
    if text == "auto":
        return text
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive number; got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a sentence-transformers model on pairs (AMP, accumulation, resume, DDP)",
        description=(
            "Fine-tune a sentence-transformers model on sentence pairs read through a memory-mapped "
            "Arrow file (DATA in any format `evalkit convert` reads is converted to OUT/train.arrow "
            "first). Writes OUT/checkpoints/step-N/, OUT/best/ (a model directory), OUT/log.jsonl "
            "and OUT/result.json. Launch with torchrun for multi-GPU (or multi-process CPU) DDP."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("data", metavar="DATA", help="training pairs: file, dir, glob or URI")
    _add_data_args(parser)
    _add_optimisation_args(parser)
    _add_output_args(parser)
    parser.set_defaults(func=run)
    return parser


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data and loss")
    g.add_argument("--left", required=True, metavar="COL", help="column with the first text")
    g.add_argument("--right", required=True, metavar="COL", help="column with the second text")
    g.add_argument(
        "--label", default=None, metavar="COL", help="score/label column (cosine, contrastive)"
    )
    g.add_argument(
        "--loss",
        required=True,
        choices=LOSSES,
        help="cosine: CosineSimilarityLoss on scores; mnrl / cached-mnrl: MultipleNegativesRanking "
        "(in-batch negatives; cached = GradCache, big batches in bounded memory); contrastive: "
        "ContrastiveLoss on 0/1 labels",
    )
    g.add_argument(
        "--label-scale",
        type=_label_scale,
        default="auto",
        metavar="X",
        help="divide scores by X (e.g. 5 for STS-B's 0-5 gold with --loss cosine); auto: by the "
        "largest |score| when scores leave [-1, 1] (cosine targets), else 1",
    )
    g.add_argument(
        "--mini-batch-size",
        type=positive_int,
        default=32,
        help="cached-mnrl: rows embedded at once (memory bound)",
    )
    g.add_argument(
        "--model", default=None, help="model directory (default: the packaged all-MiniLM-L6-v2)"
    )
    add_source_args(parser)


def _add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    t = parser.add_argument_group("optimisation")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=1, help="passes over the data")
    length.add_argument(
        "--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)"
    )
    t.add_argument(
        "--batch-size", type=positive_int, default=32, help="micro-batch size per process"
    )
    t.add_argument(
        "--grad-accum",
        type=positive_int,
        default=1,
        help="micro-batches per optimizer step (effective batch = batch x accum x processes)",
    )
    t.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate")
    t.add_argument(
        "--warmup",
        type=non_negative_float,
        default=0.1,
        help="warmup steps (>= 1) or fraction of all steps (< 1); then linear decay to 0",
    )
    t.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW decay")
    t.add_argument(
        "--max-grad-norm", type=non_negative_float, default=1.0, help="clip norm (0: off)"
    )
    t.add_argument("--seed", type=int, default=42, help="seed for data order and initial RNGs")
    t.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 autocast on CUDA when supported, else fp16 + GradScaler; fp32 on CPU",
    )
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader worker processes (tokenising)"
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    o = parser.add_argument_group("evaluation, checkpoints and output")
    o.add_argument("--out", required=True, metavar="DIR", help="output directory")
    o.add_argument(
        "--eval-data",
        default=None,
        metavar="F",
        help="pairs to evaluate on (same columns and parsing flags as DATA)",
    )
    o.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help="steps between evaluations (and at the end)",
    )
    o.add_argument(
        "--eval-task",
        choices=["similarity", "classification"],
        default=None,
        help="default: classification for contrastive, else similarity",
    )
    o.add_argument(
        "--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints"
    )
    o.add_argument(
        "--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints (0: all)"
    )
    o.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in OUT"
    )
    o.add_argument("--log-every", type=positive_int, default=10, help="steps per log.jsonl record")
    o.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bar")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def run(args: argparse.Namespace) -> int:
    if args.loss in ("cosine", "contrastive") and not args.label:
        raise EvalkitError(f"--loss {args.loss} needs --label COL (the gold score or 0/1 label)")
    if args.eval_every and not args.eval_data:
        raise EvalkitError("--eval-every needs --eval-data F")
    from evalkit._io import dumps_json, out_dir_problem

    if problem := out_dir_problem(args.out):
        raise EvalkitError(problem)
    out = Path(args.out)
    from evalkit.train.fit import fit, setup_distributed

    ddp, _ = setup_distributed(args.device)
    main = ddp.rank == 0
    train_file, dataset, evaluator = _at_the_door(args, out, ddp)

    from evalkit.embed.models import load_model

    model = load_model(args.model, device="cpu")
    loss = _build_loss(args, model)
    if main:
        (out / "train_args.json").write_text(
            dumps_json({**vars(args), "func": None, "train_file": str(train_file)}, default=str)
            + "\n"
        )
    result = fit(
        model,
        dataset,
        loss,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None,
        seed=args.seed,
        evaluator=evaluator,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints or None,
        out=out,
        resume=args.resume,
        num_workers=args.num_workers,
        precision=args.precision,
        device=args.device,
        label_scale=args.label_scale,
        log_every=args.log_every,
        progress=not args.no_progress,
    )
    if main:
        _print_summary(result)
    if ddp.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _at_the_door(args: argparse.Namespace, out: Path, ddp: Any) -> tuple[Path, Any, Any]:
    """Every data check, before any model loads: convert, labels, nulls, the evaluation data.
    A failure removes the OUT folder this run created; notes print only once all checks pass.
    Under torchrun every process runs this: rank 0 converts the data, the rest wait."""
    from evalkit.data.dataset import PairDataset
    from evalkit.data.readers import count_rows

    main = ddp.rank == 0
    created = main and not out.exists()
    notes: list[str] = []
    try:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            train_file = _prepare_data(args, out, notes=notes)
            if count_rows(train_file) == 0:
                raise DataError(f"{args.data} has no rows to train on")
            args.label_scale = _check_labels(train_file, args, notes)
        if ddp.world > 1:
            import torch.distributed as dist

            scale = [args.label_scale]
            dist.broadcast_object_list(scale, src=0)
            args.label_scale = scale[0]
            if not main:
                train_file = _prepare_data(args, out, convert=False)
        dataset = PairDataset(train_file, [args.left, args.right], args.label)
        nulls = dataset.null_rows()
        if len(nulls):
            columns = ", ".join(c for c in (args.left, args.right, args.label) if c)
            raise DataError(
                f"row {int(nulls[0])} of {train_file} has a null in {columns} ({len(nulls)} such "
                "rows); drop them first (evalkit convert --on-null skip) or fill them"
            )
        evaluator = _build_evaluator(args)
    except EvalkitError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for note in notes:
        print(note, file=sys.stderr)
    return train_file, dataset, evaluator


def _prepare_data(
    args: argparse.Namespace, out: Path, *, convert: bool = True, notes: list[str] | None = None
) -> Path:
    """An Arrow IPC file is trained on in place; anything else is converted into OUT/train.arrow."""
    src = Path(args.data)
    if src.suffix.lower() in ARROW_SUFFIXES and src.is_file():
        return src
    dest = out / "train.arrow"
    if not convert:
        return dest
    notes = notes if notes is not None else []
    if args.resume and dest.is_file():
        notes.append(f"reusing {dest} (converted by the run being resumed)")
        return dest
    from evalkit.data.convert import convert as convert_source

    columns = [c for c in (args.left, args.right, args.label) if c]
    result = convert_source(
        args.data,
        dest,
        columns=columns,
        on_null="error",
        text_columns=[args.left, args.right],
        progress=not args.no_progress,
        **source_options(args),
    )
    notes.append(f"converted {result.rows:,} rows of {args.data} into {dest}")
    return dest


def _check_labels(path: Path, args: argparse.Namespace, notes: list[str]) -> float | None:
    """Fail at the door when labels cannot be what the loss expects; -> the label scale to use."""
    auto = args.label_scale == "auto"
    if not args.label or args.loss not in ("cosine", "contrastive"):
        return None if auto else args.label_scale
    import pyarrow.compute as pc

    from evalkit.data.readers import open_ipc

    table = open_ipc(path)
    if args.label not in table.column_names:
        raise DataError(
            f"column {args.label!r} not in {path}; columns are: {', '.join(table.column_names)}"
        )
    column = table.column(args.label)
    if not pa_is_numeric(column.type):
        raise DataError(f"--label {args.label} must be numeric; it is {column.type}")
    _check_finite(column, args.label, path)
    bounds = pc.min_max(column).as_py()
    low, high = bounds["min"], bounds["max"]
    if low is None:
        raise DataError(f"--label {args.label} has no values in {path}")
    if args.loss == "contrastive":
        if not set(pc.unique(column).to_pylist()) <= {0, 1}:
            raise DataError(
                f"--loss contrastive needs 0/1 labels; {args.label} ranges {low}..{high}"
            )
        return None if auto else args.label_scale
    if auto:
        if -1 <= low and high <= 1:
            return None
        scale = float(max(abs(low), abs(high)))
        notes.append(
            f"{args.label} ranges {low:g}..{high:g}; cosine targets lie in [-1, 1], so scores are "
            f"divided by {scale:g} (set --label-scale to choose)"
        )
        return scale
    if low / args.label_scale < -1 or high / args.label_scale > 1:
        raise DataError(
            f"--loss cosine fits cosine similarities in [-1, 1] but {args.label} ranges "
            f"{low:g}..{high:g}, {low / args.label_scale:g}..{high / args.label_scale:g} after "
            f"--label-scale {args.label_scale:g}; pass --label-scale {max(abs(low), abs(high)):g}"
        )
    return args.label_scale


def _check_finite(column: Any, label: str, path: Path) -> None:
    """A NaN or infinite label would poison the loss (and an inf would set --label-scale auto)."""
    import pyarrow.compute as pc
    import pyarrow.types as pt

    if not pt.is_floating(column.type):
        return
    bad = pc.invert(pc.fill_null(pc.is_finite(column), True))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise DataError(
            f"--label {label}: row {row} of {path} is {column[row].as_py()}; labels must be "
            "finite numbers (drop or fix that row)"
        )


def pa_is_numeric(t: Any) -> bool:
    import pyarrow.types as pt

    return pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t)


def _build_loss(args: argparse.Namespace, model: Any) -> Any:
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import losses

    if args.loss == "cosine":
        return losses.CosineSimilarityLoss(model)
    if args.loss == "mnrl":
        return losses.MultipleNegativesRankingLoss(model)
    if args.loss == "cached-mnrl":
        return losses.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=args.mini_batch_size
        )
    return losses.ContrastiveLoss(model)


def _build_evaluator(args: argparse.Namespace) -> Any:
    if not args.eval_data:
        return None
    from evalkit.evaluation.evaluators import StreamingPairEvaluator

    task = args.eval_task or ("classification" if args.loss == "contrastive" else "similarity")
    if not args.label:
        raise EvalkitError(
            "--eval-data needs --label COL (the gold column of the evaluation pairs)"
        )
    return StreamingPairEvaluator(
        args.eval_data,
        left=args.left,
        right=args.right,
        label=args.label,
        task=task,
        name="eval",
        cache=False,
        **source_options(args),
    )


def _print_summary(result: Any) -> None:
    from evalkit._io import dumps_json

    print(dumps_json(result.to_dict()))
    lines = [
        f"trained {result.steps} steps ({result.samples:,} samples, "
        f"{result.samples_per_second:.0f} samples/s, {result.precision}, {result.world_size} process(es))",
        f"final loss {result.final_loss:.4f}" if result.final_loss is not None else "",
    ]
    if result.best_metric is not None:
        lines.append(f"best {result.metric} = {result.best_metric:.4f} at step {result.best_step}")
    if result.best_dir:
        lines.append(f"best model: {result.best_dir}  (use it with --model {result.best_dir})")
    if result.last_checkpoint:
        lines.append(f"last checkpoint: {result.last_checkpoint}")
    if result.log_path:
        lines.append(f"log: {result.log_path}")
    print("\n".join(line for line in lines if line), file=sys.stderr)
