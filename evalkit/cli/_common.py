"""Argument groups shared by several subcommands, so every command reads data and models the
same way. Each flag maps onto a keyword argument of the public API."""

from __future__ import annotations

import argparse
from typing import Any


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """Flags describing how to parse a data source (the same for convert, encode, evaluate, train)."""
    g = parser.add_argument_group("parsing the data source")
    g.add_argument(
        "--format",
        choices=["parquet", "csv", "tsv", "json", "jsonl", "orc", "arrow", "feather", "ipc"],
        default=None,
        help="source format (default: from the file extension)",
    )
    g.add_argument(
        "--column-names",
        default=None,
        metavar="A,B,C",
        help="CSV/TSV without a header row: comma-separated names for its columns",
    )
    g.add_argument(
        "--delimiter",
        default=None,
        help="CSV field delimiter (default: ',' for .csv, tab for .tsv/.txt)",
    )
    g.add_argument(
        "--no-quoting",
        action="store_true",
        help="treat quote characters in CSV/TSV as ordinary text (e.g. MRPC's TSV)",
    )


def source_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of evalkit.data.readers.open_source() that the flags above describe."""
    names = args.column_names.split(",") if args.column_names else None
    return {
        "format": args.format,
        "column_names": [n.strip() for n in names] if names else None,
        "delimiter": _unescape(args.delimiter) if args.delimiter else None,
        "quoting": not args.no_quoting,
    }


def _unescape(delimiter: str) -> str:
    return {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(delimiter, delimiter)


def add_model_args(
    parser: argparse.ArgumentParser, *, batch_size: int = 64, model: bool = True
) -> None:
    """Flags choosing the model (unless `model=False`: the command names its models itself),
    device and embedding store."""
    g = parser.add_argument_group("model and embedding store")
    if model:
        g.add_argument(
            "--model",
            default=None,
            help="sentence-transformers model directory (default: the packaged all-MiniLM-L6-v2)",
        )
    g.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="embedding store directory (default: $EVALKIT_CACHE, else ./cache)",
    )
    g.add_argument(
        "--no-cache", action="store_true", help="encode everything; do not read or write the store"
    )
    g.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help="encoding batch size (default: %(default)s)",
    )


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments (model, cache, device, batch_size) that add_model_args() describes;
    `--no-cache` becomes cache=False, which every public function reads as "no store"."""
    return {
        "model": getattr(args, "model", None),
        "cache": False if args.no_cache else args.cache,
        "device": args.device,
        "batch_size": args.batch_size,
    }


def add_results_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the results store (evaluation results remembered by identity)."""
    g = parser.add_argument_group("results store")
    g.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="results store folder (default: $EVALKIT_RESULTS, else beside the embedding store: "
        "CACHE-results; none with --no-cache)",
    )
    g.add_argument(
        "--no-results", action="store_true", help="do not read or write the results store"
    )
    g.add_argument(
        "--recompute",
        action="store_true",
        help="evaluate again even when the results store has this result (and store the new one)",
    )


def results_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments (results, recompute) that add_results_args() describes."""
    return {
        "results": False if args.no_results else args.results,
        "recompute": args.recompute,
    }


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value
