"""`evalkit sweep RUN|MODEL... --data F ... | --corpus F ... --out DIR [--watch]`: evaluate every
checkpoint of a training run (evalkit.jobs.sweep.sweep). Thin: parse flags, call the job, print
the table."""

from __future__ import annotations

import argparse

from evalkit.cli._common import add_model_args, add_results_args, model_options, results_options
from evalkit.cli._task import add_significance_args, add_task_args, task_from_args

EPILOG = """examples:
  evalkit sweep runs/stsb --data stsb-en-test.csv --column-names sentence1,sentence2,score \\
      --left sentence1 --right sentence2 --label score --out sweeps/stsb
  evalkit sweep runs/msmarco --corpus corpus.jsonl --queries queries.jsonl --qrels qrels/dev.tsv \\
      --dialect trec_eval --out sweeps/msmarco --watch        (while the run is training)
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="evaluate every checkpoint of a training run; best checkpoint, change vs base",
        description=(
            "Evaluate the base model, every complete checkpoint and best/ of a training run (or "
            "any model folders) on one task, the data parsed once. Results are remembered by "
            "identity (model fingerprint, data bytes, settings): a rerun with nothing changed "
            "reads them back, and identical weights are evaluated once. Each model is compared "
            "with the base by a paired test (Holm-adjusted). Writes OUT/sweep.json, "
            "OUT/summary.md, OUT/metric_vs_step.png and OUT/evals/<model>/."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("targets", nargs="+", metavar="RUN|MODEL", help="run folders or model folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--base", default=None, metavar="MODEL",
        help="the base model to compare with (default: the one the run recorded; 'none': no base)",
    )  # fmt: skip
    p.add_argument(
        "--watch", action="store_true",
        help="keep evaluating new complete checkpoints until the run finishes (result.json)",
    )  # fmt: skip
    p.add_argument(
        "--poll", type=float, default=10.0, metavar="S", help="--watch: seconds between looks"
    )
    p.add_argument(
        "--watch-timeout", type=float, default=None, metavar="S",
        help="--watch: stop after S seconds without a new checkpoint (runs that write no result.json)",
    )  # fmt: skip
    p.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print sweep.json instead of the table")
    add_task_args(p)
    add_significance_args(p)
    add_results_args(p)
    add_model_args(p, model=False)
    p.set_defaults(func=run)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def run(args: argparse.Namespace) -> int:
    from evalkit.jobs.sweep import sweep
    from evalkit.jobs.sweep_report import format_table

    task = task_from_args(args)
    options = model_options(args)
    options.pop("model")
    report = sweep(
        args.targets, task, out=args.out, base=False if args.base is None else args.base,
        watch=args.watch, poll=args.poll, watch_timeout=args.watch_timeout,
        resamples=args.resamples, seed=args.seed, confidence=args.confidence,
        progress=not args.quiet, **options, **results_options(args),
    )  # fmt: skip
    if args.json:
        from evalkit._io import dumps_json

        print(dumps_json(report))  # strict: an undefined number is null, never NaN
        return 0
    served = sum(r["from_results_store"] for r in report["rows"])
    print(f"sweep {report['task']}: {len(report['rows'])} models, best {report['best']}")
    print(format_table(report))
    if served:
        print(f"{served} of {len(report['rows'])} from results store")
    print(f"results: {args.out}")
    return 0
