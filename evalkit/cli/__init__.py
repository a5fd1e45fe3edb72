"""cli: the `evalkit` command (may import every part; nothing imports it). Thin: each subcommand module in this package parses its arguments and
calls one public function. Modules here import nothing heavy at import time (no torch, no
sentence-transformers, no faiss), so `evalkit --help` is instant.

Each subcommand module defines `add_parser(subparsers)`, which registers a parser whose
`func` default takes the parsed namespace and returns an exit code (or None for 0).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from evalkit.errors import EvalkitError

# Order is the order shown in --help. A module that is not there yet is skipped.
SUBCOMMAND_MODULES = [
    "convert",
    "encode",
    "cache",
    "evaluate",
    "sweep",
    "compare",
    "index",
    "ann",
    "train",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evalkit",
        description=(
            "Out-of-core data, training, embedding, evaluation and ANN checks for "
            "sentence-transformers models. Run `evalkit COMMAND --help` for each command."
        ),
    )
    from evalkit import __version__

    parser.add_argument("--version", action="version", version=f"evalkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"evalkit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"evalkit.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def _one_line(text: str) -> str:
    """Control characters (a newline or carriage return quoted from a garbled file) escaped, so
    the message stays one line whatever it quotes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # evalkit's own messages at INFO; other libraries' (sentence-transformers' "Loading model
    # from ...", ...) only when they warn, unless --verbose.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("evalkit").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if getattr(args, "quiet", False) or getattr(args, "no_progress", False):
        # other libraries' bars too (transformers' "Loading weights"); huggingface_hub reads this
        # when it is first imported, which the lazy CLI has not done yet
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = args.func(args)
    except EvalkitError as exc:
        print(f"evalkit {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions changed mid-run, ...: one line, not a traceback
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        message = _one_line(f"{exc.strerror or exc}{where}")
        print(f"evalkit {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"evalkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
