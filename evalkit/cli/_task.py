"""The task and data flags shared by `evalkit sweep` and `evalkit compare`: the same data and
settings as `evalkit evaluate pairs` / `evaluate retrieval`, with the pairs file as `--data F`
(the positional arguments name the models). `task_from_args` builds the jobs.tasks object."""

from __future__ import annotations

import argparse
from typing import Any

from evalkit.cli._common import add_source_args, positive_int, source_options
from evalkit.cli.evaluate import DEFAULT_K, k_list
from evalkit.errors import EvalkitError


def add_task_args(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("pairs (as `evaluate pairs`)")
    p.add_argument("--data", metavar="F", help="pairs file/dir/glob/URI (any format convert reads)")
    p.add_argument("--left", metavar="COL", help="column with the first text of each pair")
    p.add_argument("--right", metavar="COL", help="column with the second text of each pair")
    p.add_argument("--label", metavar="COL", help="column with the gold score or 0/1 label")
    p.add_argument(
        "--task",
        choices=["similarity", "classification"],
        default="similarity",
        help="similarity: correlation with a graded gold score; classification: 0/1 labels",
    )
    r = parser.add_argument_group("retrieval (as `evaluate retrieval`)")
    r.add_argument("--corpus", metavar="F", help="corpus.jsonl (_id, title, text) or a table")
    r.add_argument("--queries", metavar="F", help="queries.jsonl (_id, text)")
    r.add_argument("--qrels", metavar="F", help="qrels TSV (query-id, corpus-id, score)")
    r.add_argument(
        "--dialect",
        choices=["sentence-transformers", "trec_eval"],
        default="sentence-transformers",
        help="metric conventions (see `evalkit evaluate retrieval --help`)",
    )
    r.add_argument(
        "--k", dest="k_values", type=k_list, default=k_list(DEFAULT_K), metavar="K,K,...",
        help=f"cut-offs (default: {DEFAULT_K})",
    )  # fmt: skip
    r.add_argument(
        "--corpus-block", type=positive_int, default=16_384, metavar="N",
        help="documents encoded and searched per block (bounds memory)",
    )  # fmt: skip
    r.add_argument(
        "--ignore-identical-ids", action="store_true",
        help="drop a document whose id equals the query id from its results",
    )  # fmt: skip
    add_source_args(parser)


def task_from_args(args: argparse.Namespace) -> Any:
    """A PairsTask (--data) or RetrievalTask (--corpus/--queries/--qrels) from the flags."""
    from evalkit.jobs.tasks import PairsTask, RetrievalTask

    retrieval = [args.corpus, args.queries, args.qrels]
    if args.data is not None and any(retrieval):
        raise EvalkitError("give either --data (pairs) or --corpus/--queries/--qrels, not both")
    if args.data is not None:
        missing = [f"--{n}" for n in ("left", "right", "label") if getattr(args, n) is None]
        if missing:
            raise EvalkitError(f"pairs (--data) need {', '.join(missing)}")
        return PairsTask(
            args.data, left=args.left, right=args.right, label=args.label, task=args.task,
            **source_options(args),
        )  # fmt: skip
    if not all(retrieval):
        raise EvalkitError(
            "say what to evaluate on: --data F --left COL --right COL --label COL (pairs), or "
            "--corpus F --queries F --qrels F (retrieval)"
        )
    return RetrievalTask(
        args.corpus, args.queries, args.qrels, dialect=args.dialect, k_values=args.k_values,
        ignore_identical_ids=args.ignore_identical_ids, corpus_block=args.corpus_block,
        **source_options(args),
    )  # fmt: skip


def add_significance_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("significance (paired tests, scipy.stats)")
    g.add_argument(
        "--resamples", type=positive_int, default=9999,
        help="bootstrap / permutation resamples",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="random seed (results are reproducible)")
    g.add_argument(
        "--confidence", type=_fraction, default=0.95, help="confidence level of the intervals"
    )


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1; got {text}")
    return value
