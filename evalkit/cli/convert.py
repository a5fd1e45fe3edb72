"""`evalkit convert SRC... DEST`: stream any table source into an Arrow IPC file (evalkit.data.readers.convert).

Importing this module is cheap: pyarrow loads only when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from evalkit.cli._common import add_source_args, positive_int, source_options
from evalkit.errors import EvalkitError

EPILOG = """examples:
  evalkit convert stsb-en-test.csv stsb.arrow --column-names sentence1,sentence2,score
  evalkit convert msr_paraphrase_test.txt mrpc.arrow --no-quoting \\
      --columns "#1 String,#2 String,Quality" --rename "#1 String:sentence1,#2 String:sentence2"
  evalkit convert 's3://bucket/shards/*.parquet' train.arrow --filter "score >= 2.5"
  (s3:// honours AWS_ENDPOINT_URL and the usual AWS credentials; other schemes go through fsspec)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="stream Parquet/CSV/TSV/JSON Lines/ORC/Arrow (local, s3://, fsspec) into an Arrow file",
        description=(
            "Stream a table source into an Arrow IPC file that evalkit (and HF datasets) can "
            "memory-map, never holding the data in memory. SRC is a file, directory, glob or URI "
            "(several may be given); DEST is written atomically: a failure leaves no partial file."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", nargs="+", metavar="SRC", help="source file(s), directory, glob or URI"
    )
    parser.add_argument("dest", metavar="DEST", help="Arrow IPC file to write (local path)")
    add_source_args(parser)
    g = parser.add_argument_group("what to write")
    g.add_argument(
        "--columns",
        default=None,
        metavar="A,B",
        help="keep only these source columns, in this order",
    )
    g.add_argument(
        "--rename",
        default=None,
        metavar="OLD:NEW,...",
        help="rename source columns in the output (e.g. '#1 String:sentence1')",
    )
    g.add_argument(
        "--filter",
        action="append",
        default=None,
        metavar="'COL OP VALUE'",
        help=(
            "keep rows where COL OP VALUE holds (source or renamed column; OP: == != < <= > >=; "
            "quote text values that look like numbers; repeat to require several)"
        ),
    )
    g.add_argument(
        "--on-null",
        choices=["keep", "error", "skip", "empty"],
        default="keep",
        help="null in a text column: keep it, stop with an error naming the row, skip the row, "
        "or write empty text (default: %(default)s)",
    )
    g.add_argument(
        "--text-columns",
        default=None,
        metavar="A,B",
        help="the text columns --on-null applies to (default: every string column)",
    )
    g.add_argument(
        "--stream",
        action="store_true",
        help="write the Arrow IPC stream format (what datasets.Dataset.from_file reads) "
        "instead of the random-access file format",
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=65536,
        help="rows per record batch read and written (default: %(default)s)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bar")
    out.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from evalkit.data.convert import convert

    result = convert(
        args.src[0] if len(args.src) == 1 else args.src,
        args.dest,
        columns=_names(args.columns),
        rename=_rename(args.rename),
        filter=args.filter,
        on_null=args.on_null,
        text_columns=_names(args.text_columns),
        batch_size=args.batch_size,
        progress=not args.no_progress,
        stream=args.stream,
        **source_options(args),
    )
    if args.json:
        from evalkit._io import dumps_json

        print(dumps_json(result.to_dict()))
    else:
        rate = f"{result.rows_per_second:,.0f} rows/s" if result.seconds > 0 else "instant"
        print(
            f"wrote {result.rows:,} rows x {len(result.columns)} columns "
            f"({', '.join(result.columns)}) to {result.dest}: {_size(result.bytes)} "
            f"in {result.seconds:.2f} s ({rate})",
            file=sys.stdout,
        )
    return 0


def _names(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


def _rename(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    mapping = {}
    for item in text.split(","):
        old, sep, new = item.rpartition(":")
        if not sep or not old.strip() or not new.strip():
            raise EvalkitError(f"--rename takes OLD:NEW pairs separated by commas; got {item!r}")
        mapping[old.strip()] = new.strip()
    return mapping


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"
