"""`evalkit cache info|clear|check [--cache DIR]`: inspect and maintain the embedding store
(evalkit.embed.store.EmbeddingStore). Importing this module is cheap (no torch)."""

from __future__ import annotations

import argparse
import json
import sys

from evalkit.errors import EvalkitError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cache",
        help="embedding store: entries per model, clear, consistency check",
        description=(
            "Inspect and maintain the embedding store. Entries are keyed by (model fingerprint, "
            "text); nothing is ever evicted automatically, so use `clear` to free space."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("action", choices=["info", "clear", "check"], help="what to do")
    parser.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="store directory (default: $EVALKIT_CACHE, else ./cache)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="FINGERPRINT",
        help="clear: only this model fingerprint's entries",
    )
    parser.add_argument(
        "--fix", action="store_true", help="check: delete bad entries, repair counters"
    )
    parser.add_argument("--json", action="store_true", help="info/check: print JSON")
    parser.set_defaults(func=run)
    return parser


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args: argparse.Namespace) -> int:
    from evalkit.embed.store import EmbeddingStore, default_cache_dir

    store = EmbeddingStore(args.cache or default_cache_dir(), create=False)
    if args.action == "info":
        info = store.info()
        if args.json:
            json.dump(info, sys.stdout, indent=1)
            print()
            return 0
        print(
            f"{info['directory']}: {info['entries']} entries, {_size(info['bytes'])} of vectors, {_size(info['disk_bytes'])} on disk"
        )
        for fp, m in sorted(info["models"].items(), key=lambda kv: -kv[1]["entries"]):
            print(
                f"  {fp}  {m['entries']:>10} entries  {_size(m['bytes']):>10}  dim {m['dim']} {m['dtype']}"
            )
        return 0
    if args.action == "clear":
        if args.model and not store.has_model(args.model):
            raise EvalkitError(
                f"no entries for model fingerprint {args.model} in {store.directory}; see `evalkit cache info`"
            )
        removed = store.clear(model=args.model)
        print(
            f"removed {removed} entries"
            + (f" of model {args.model}" if args.model else "")
            + f" from {store.directory}"
        )
        return 0
    problems = store.check(fix=args.fix)
    if args.json:
        json.dump(
            {"directory": str(store.directory), "problems": problems, "fixed": args.fix},
            sys.stdout,
            indent=1,
        )
        print()
    elif problems:
        for p in problems:
            print(p)
        print(
            f"{len(problems)} problem(s) in {store.directory}"
            + (" (fixed)" if args.fix else "; rerun with --fix")
        )
    else:
        print(f"{store.directory}: ok ({store.count()} entries)")
    return 1 if problems and not args.fix else 0
