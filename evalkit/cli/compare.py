"""`evalkit compare A B [--data F ... | --corpus F ...]`: every metric's difference (B - A) with a
95% interval and a paired p-value (evalkit.jobs.compare.compare). Thin: parse flags, call the
job, print the table."""

from __future__ import annotations

import argparse

from evalkit.cli._common import add_model_args, add_results_args, model_options, results_options
from evalkit.cli._task import add_significance_args, add_task_args, task_from_args

EPILOG = """examples:
  evalkit compare eval/base eval/tuned                   (two `evaluate --out` folders)
  evalkit compare default runs/stsb/best --data stsb-en-test.csv \\
      --column-names sentence1,sentence2,score --left sentence1 --right sentence2 --label score
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="is B better than A? difference, 95%% CI and paired p-value for every metric",
        description=(
            "Compare two evaluations item by item (B - A). A and B are evaluation output folders "
            "(`evalkit evaluate ... --out`, or a sweep's evals/<model>/), or two models with the "
            "data flags. Pair metrics (Spearman, Pearson, AP): paired bootstrap over pairs; "
            "retrieval metrics: paired permutation test over queries, bootstrap interval. "
            "Fixed seed: the same inputs give the same numbers."
        ),
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("a", metavar="A", help="evaluation folder, or model (with the data flags)")
    p.add_argument("b", metavar="B", help="evaluation folder, or model (with the data flags)")
    p.add_argument(
        "--metrics", default=None, metavar="M,M,...",
        help="only these metrics (default: every metric with a paired test)",
    )  # fmt: skip
    p.add_argument("--out", default=None, metavar="DIR", help="write compare.json and compare.md")
    p.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    add_task_args(p)
    add_significance_args(p)
    add_results_args(p)
    add_model_args(p, model=False)
    p.set_defaults(func=run)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _has_data(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.data, args.corpus, args.queries, args.qrels))


def run(args: argparse.Namespace) -> int:
    from evalkit.jobs.compare import compare, format_compare

    task = task_from_args(args) if _has_data(args) else None
    options = model_options(args)
    options.pop("model")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    report = compare(
        args.a, args.b, task=task, metrics=metrics, resamples=args.resamples, seed=args.seed,
        confidence=args.confidence, out=args.out, progress=not args.quiet,
        results=results_options(args)["results"], **options,
    )  # fmt: skip
    if args.json:
        from evalkit._io import dumps_json

        print(dumps_json(report))  # strict: an undefined number is null, never NaN
    else:
        print(format_compare(report))
    return 0
