"""`evalkit evaluate pairs|retrieval`: the post-training evaluation job.

Thin: parse flags, call evalkit.jobs.evaluate.evaluate_pairs / evaluate_retrieval (imported only when
the command runs), print the short summary. Every flag is a keyword argument of those functions.
"""

from __future__ import annotations

import argparse

from evalkit.cli._common import (
    add_model_args,
    add_results_args,
    add_source_args,
    model_options,
    positive_int,
    results_options,
    source_options,
)

DEFAULT_K = "1,3,5,10,100"


def k_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,3,10; got {text!r}"
        ) from None
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"every k must be a positive integer; got {text!r}")
    return values


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on pairs (STS / classification) or retrieval (BEIR layout)",
        description=(
            "Evaluate a sentence-transformers model with streaming, exact metrics that match "
            "sentence-transformers' evaluators (and trec_eval on request). Embeddings go through "
            "the embedding store, so a second run over the same texts and model encodes nothing; "
            "results are remembered by identity (model fingerprint, data bytes, settings), so a "
            "rerun with nothing changed is served from the results store. Writes "
            "OUT/metrics.json, OUT/summary.md, OUT/per_query.parquet and PNG plots."
        ),
    )
    sub = parser.add_subparsers(dest="evaluate_task", metavar="TASK", required=True)

    _add_pairs_parser(sub)
    _add_retrieval_parser(sub)


def _add_pairs_parser(sub) -> None:
    p = sub.add_parser(
        "pairs",
        help="sentence pairs with a gold score (similarity) or a 0/1 label (classification)",
        description=(
            "Pair evaluation, like EmbeddingSimilarityEvaluator (--task similarity: Pearson/Spearman "
            "of cosine, dot, euclidean, manhattan scores against gold) or BinaryClassificationEvaluator "
            "(--task classification: accuracy, F1, precision, recall, AP, MCC). Example: evalkit "
            "evaluate pairs stsb-en-test.csv --column-names sentence1,sentence2,score "
            "--left sentence1 --right sentence2 --label score"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "data", metavar="DATA", help="pairs file/dir/glob/URI in any format `evalkit convert` reads"
    )
    p.add_argument(
        "--left", required=True, metavar="COL", help="column with the first text of each pair"
    )
    p.add_argument(
        "--right", required=True, metavar="COL", help="column with the second text of each pair"
    )
    p.add_argument(
        "--label", required=True, metavar="COL", help="column with the gold score or 0/1 label"
    )
    p.add_argument(
        "--task",
        choices=["similarity", "classification"],
        default="similarity",
        help="similarity: correlation with a graded gold score; classification: binary labels",
    )
    _add_common(p)
    add_source_args(p)
    add_model_args(p)
    p.set_defaults(func=_run_pairs)


def _add_retrieval_parser(sub) -> None:
    r = sub.add_parser(
        "retrieval",
        help="queries against a corpus with relevance judgements (BEIR layout)",
        description=(
            "Retrieval evaluation like InformationRetrievalEvaluator (default dialect) or "
            "pytrec_eval/BEIR/MTEB (--dialect trec_eval). The corpus streams through exact top-k "
            "in blocks, so memory stays bounded whatever its size. Example: evalkit evaluate "
            "retrieval --corpus scifact/corpus.jsonl --queries scifact/queries.jsonl "
            "--qrels scifact/qrels/test.tsv --dialect trec_eval"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument(
        "--corpus",
        required=True,
        metavar="F",
        help="corpus.jsonl (_id, title, text) or a table with those columns",
    )
    r.add_argument("--queries", required=True, metavar="F", help="queries.jsonl (_id, text)")
    r.add_argument(
        "--qrels",
        required=True,
        metavar="F",
        help="qrels TSV (query-id, corpus-id, score; header) or TREC qrels",
    )
    r.add_argument(
        "--dialect",
        choices=["sentence-transformers", "trec_eval"],
        default="sentence-transformers",
        help="metric conventions: sentence-transformers' InformationRetrievalEvaluator, or trec_eval "
        "(pytrec_eval, BEIR, MTEB: float32 scores, ties by doc id descending, MAP over all relevant)",
    )
    r.add_argument(
        "--k",
        dest="k_values",
        type=k_list,
        default=k_list(DEFAULT_K),
        metavar="K,K,...",
        help=f"cut-offs (default: {DEFAULT_K})",
    )
    r.add_argument(
        "--corpus-block",
        type=positive_int,
        default=16_384,
        metavar="N",
        help="documents encoded and searched per block (bounds memory)",
    )
    r.add_argument(
        "--index",
        default=None,
        metavar="SPEC",
        help="search with a FAISS index instead of exact search: a factory string (HNSW32, "
        "IVF1024,Flat, ...), auto, or a folder from `evalkit index build`; check what it loses "
        "with `evalkit ann-check`",
    )
    r.add_argument(
        "--corpus-embeddings",
        default=None,
        metavar="DIR",
        help="use the vectors of an `evalkit encode --column title+text --id-column _id` output "
        "of this corpus instead of encoding it (refused unless its model fingerprint, ids and "
        "texts match)",
    )
    r.add_argument(
        "--ignore-identical-ids",
        action="store_true",
        help="drop a document whose id equals the query id from its results (BEIR/MTEB option)",
    )
    _add_common(r)
    add_source_args(r)
    add_model_args(r)
    r.set_defaults(func=_run_retrieval)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for metrics.json, summary.md and plots (default: none, print only)",
    )
    p.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    add_results_args(p)
    p.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--json", action="store_true", help="print the full result as JSON instead of the summary"
    )


def _model_kwargs(args: argparse.Namespace) -> dict:
    return {
        **model_options(args),
        "out": args.out,
        **results_options(args),
        "plots": not args.no_plots,
        "progress": not args.quiet,
    }


def _print(result: dict, args: argparse.Namespace) -> None:
    if args.json:
        from evalkit._io import dumps_json

        print(dumps_json(result))
    else:
        from evalkit.jobs.report import format_summary

        print(format_summary(result, keys=result.get("headline")))


def _run_pairs(args: argparse.Namespace) -> int:
    from evalkit.jobs.evaluate import evaluate_pairs

    result = evaluate_pairs(
        args.data,
        left=args.left,
        right=args.right,
        label=args.label,
        task=args.task,
        **_model_kwargs(args),
        **source_options(args),
    )
    _print(result, args)
    return 0


def _run_retrieval(args: argparse.Namespace) -> int:
    from evalkit.jobs.evaluate import evaluate_retrieval

    result = evaluate_retrieval(
        args.corpus,
        args.queries,
        args.qrels,
        dialect=args.dialect,
        k_values=args.k_values,
        corpus_block=args.corpus_block,
        ignore_identical_ids=args.ignore_identical_ids,
        index=args.index,
        corpus_embeddings=args.corpus_embeddings,
        **_model_kwargs(args),
        **source_options(args),
    )
    _print(result, args)
    return 0
