"""`evalkit ann-check`: how much an ANN index loses against exact search, before you trust it.

Thin: parse flags, call evalkit.search.ann.ann_check (imported only when the command runs), print the
summary. Exit codes: 0 ok, 1 bad input, 3 when no setting of the sweep reaches --min-recall.
"""

from __future__ import annotations

import argparse

from evalkit.cli._common import (
    add_model_args,
    add_source_args,
    model_options,
    positive_int,
    source_options,
)

EXIT_RECALL_NOT_REACHED = 3


def recall_target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number in (0, 1], e.g. 0.9; got {text!r}"
        ) from None
    return value  # the range (0, 1] is checked by evalkit.search.ann.check_min_recall (exit 1, one line)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ann-check",
        help="compare an ANN index with exact search: recall, QPS, change in retrieval metrics",
        description=(
            "Build (or load) a FAISS index over a corpus and compare it with exact search on your "
            "queries (or on corpus rows held out as queries): k-recall@k, 1-recall@k, QPS and "
            "latency over a sweep of nprobe/efSearch, the cheapest setting reaching --min-recall, "
            "and with --qrels the change in nDCG@10, MRR@10 and Recall@100 (ANN minus exact). "
            "Writes OUT/ann.json, OUT/summary.md, OUT/recall_qps.png. Exits 3 when no setting "
            "reaches --min-recall. Example: evalkit ann-check --corpus scifact/corpus.jsonl "
            "--queries scifact/queries.jsonl --qrels scifact/qrels/test.tsv --index HNSW32 "
            "--min-recall 0.9 --out ann/"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_and_index_args(p)
    _add_run_and_output_args(p)
    add_model_args(p)
    add_source_args(p)
    p.set_defaults(func=_run)


def _add_data_and_index_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--corpus",
        metavar="F",
        help="corpus.jsonl (_id, title, text) or a table with those columns",
    )
    src.add_argument(
        "--embeddings", metavar="DIR", help="output folder of `evalkit encode` (precompute job)"
    )
    p.add_argument(
        "--queries",
        metavar="F",
        default=None,
        help="queries.jsonl (_id, text); default: sample corpus rows and hold them out",
    )
    p.add_argument(
        "--qrels",
        metavar="F",
        default=None,
        help="qrels TSV: also report the change in nDCG@10, MRR@10, Recall@100",
    )
    p.add_argument(
        "--index",
        default="auto",
        metavar="SPEC",
        help="FAISS factory string (HNSW32, IVF1024,Flat, ...), auto, or a folder from `evalkit index build`",
    )
    p.add_argument(
        "--k", type=positive_int, default=10, help="neighbours compared per query (recall@k)"
    )
    p.add_argument(
        "--min-recall",
        type=recall_target,
        default=None,
        metavar="R",
        help="target recall@k in (0, 1]; exit 3 if no setting reaches it",
    )
    p.add_argument(
        "--sample-queries",
        dest="n_queries",
        type=positive_int,
        default=1000,
        metavar="N",
        help="queries sampled from the corpus when --queries is not given",
    )
    p.add_argument(
        "--memory-budget",
        default="4G",
        metavar="SIZE",
        help="memory the index may use (auto choice)",
    )
    p.add_argument(
        "--metric",
        choices=["cosine", "dot"],
        default="cosine",
        help="similarity of the exact search and the index",
    )


def _add_run_and_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--latency-queries",
        type=positive_int,
        default=200,
        metavar="N",
        help="queries timed one by one for latency p50/p99",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the query sample")
    p.add_argument(
        "--force",
        action="store_true",
        help="use an index/embeddings made by another model fingerprint anyway",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for ann.json, summary.md and recall_qps.png",
    )
    p.add_argument("--no-plots", action="store_true", help="do not draw the recall-QPS curve")
    p.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print ann.json instead of the summary")


def _run(args: argparse.Namespace) -> int:
    from evalkit.jobs.ann_check import ann_check, format_ann_summary

    result = ann_check(
        args.corpus,
        args.queries,
        args.qrels,
        embeddings=args.embeddings,
        index=None if args.index in (None, "", "auto") else args.index,
        k=args.k,
        min_recall=args.min_recall,
        n_queries=args.n_queries,
        **model_options(args),
        memory_budget=args.memory_budget,
        metric=args.metric,
        force=args.force,
        seed=args.seed,
        latency_queries=args.latency_queries,
        out=args.out,
        plots=not args.no_plots,
        progress=not args.quiet,
        **source_options(args),
    )
    if args.json:
        from evalkit._io import dumps_json

        print(dumps_json(result))
    else:
        print(format_ann_summary(result))
    if result["passed"] is False:
        return EXIT_RECALL_NOT_REACHED
    return 0
