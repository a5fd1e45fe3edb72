"""`evalkit cache info|clear|check|import [--cache DIR]`: inspect and maintain the embedding store
(evalkit.embed.store.EmbeddingStore), and load a precompute output into it
(evalkit.embed.shards.import_into_store). Importing this module is cheap (no torch)."""

from __future__ import annotations

import argparse

from evalkit.errors import EvalkitError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cache",
        help="embedding store: entries per model, clear, consistency check",
        description=(
            "Inspect and maintain the embedding store. Entries are keyed by (model fingerprint, "
            "text); nothing is ever evicted automatically, so use `clear` to free space. "
            "`check` verifies every stored vector's checksum (and every cached plot's); "
            "`check --fix` rewrites damaged segments without their bad rows (they are re-encoded "
            "on use). `clear` (of every model) also removes the cached plots (the folder "
            "<DIR>-plots); on a store whose database is damaged it deletes the store's files."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "action",
        choices=["info", "clear", "check", "import"],
        help="what to do; import: put the vectors of an `evalkit encode --out` folder into the "
        "store (no model, no texts: the shards carry the store keys)",
    )
    parser.add_argument(
        "source",
        nargs="?",
        default=None,
        metavar="DIR",
        help="import: the precompute output folder (local or s3://)",
    )
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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_info(info: dict) -> None:
    print(
        f"{info['directory']} (store format {info['format']}): {info['entries']} entries, "
        f"{_size(info['bytes'])} of vectors, {_size(info['disk_bytes'])} on disk"
    )
    for fp, m in sorted(info["models"].items(), key=lambda kv: -kv[1]["entries"]):
        print(
            f"  {fp}  {m['entries']:>10} entries  {_size(m['bytes']):>10}  dim {m['dim']} "
            f"{m['dtype']}  {m['segments']} segment(s)"
        )
        meta = m.get("meta")
        if meta:
            libs = ", ".join(
                f"{k} {v}" for k, v in sorted(meta.items()) if k not in ("device", "gpu")
            )
            where = meta.get("device", "?") + (f" ({meta['gpu']})" if meta.get("gpu") else "")
            print(f"      first written on {where}" + (f" with {libs}" if libs else ""))
        if m.get("legacy_entries"):
            print(f"      + {m['legacy_entries']} format-1 entries (no checksum; never served)")
    if info.get("legacy_entries"):
        print(
            f"{info['legacy_entries']} format-1 entries are never served; "
            f"`evalkit cache check --fix` removes them"
        )


def _clear(args: argparse.Namespace, directory) -> int:
    from evalkit.embed._catalog import DamagedStoreError
    from evalkit.embed.store import EmbeddingStore, wipe
    from evalkit.jobs import plotcache

    try:
        store = EmbeddingStore(directory, create=False)
        if args.model and not store.has_model(args.model):
            raise EvalkitError(
                f"no entries for model fingerprint {args.model} in {store.directory}; "
                f"see `evalkit cache info`"
            )
        removed = store.clear(model=args.model)
    except DamagedStoreError:
        if args.model:
            raise
        print(f"{directory}: the store's database was damaged; removed its {wipe(directory)} "
              f"file(s): the store starts empty")  # fmt: skip
        plotcache.wipe(plotcache.folder_of(directory))
        return 0
    if not args.model:  # cached plots are drawn from this store's vectors: they go with them
        plotcache.wipe(plotcache.folder_of(store))
    model = f" of model {args.model}" if args.model else ""
    print(f"removed {removed} entries{model} from {store.directory}")


def _import(args: argparse.Namespace) -> int:
    from evalkit.embed.shards import import_into_store, load_manifest
    from evalkit.embed.store import EmbeddingStore, default_cache_dir

    if not args.source:
        raise EvalkitError("cache import needs the folder to import: evalkit cache import DIR")
    manifest = load_manifest(args.source)
    with EmbeddingStore(args.cache or default_cache_dir(), dtype=manifest["dtype"]) as store:
        got = import_into_store(args.source, store, manifest=manifest)
        where = store.directory
    done = sum(s["rows"] for s in manifest["shards"])
    state = (
        "" if got["complete"] else f" (the output is incomplete: {done} of {manifest['rows']} rows)"
    )
    print(
        f"imported {got['rows']} vectors ({got['shards']} shards) of model "
        f"{got['model_fingerprint']} into {where}{state}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from evalkit._io import dumps_json
    from evalkit.embed.store import EmbeddingStore, default_cache_dir

    if args.action == "import":
        return _import(args)
    if args.source:
        raise EvalkitError(f"cache {args.action} takes no DIR argument (use --cache DIR)")
    directory = args.cache or default_cache_dir()
    if args.action == "clear":
        return _clear(args, directory)
    store = EmbeddingStore(directory, create=False)
    if args.action == "info":
        info = store.info()
        if args.json:
            print(dumps_json(info, indent=1))  # strict: never NaN
        else:
            _print_info(info)
        return 0
    from evalkit.jobs import plotcache

    plots = plotcache.folder_of(store)

    def check(fix: bool) -> list[str]:
        return store.check(fix=fix) + plotcache.check(plots, fix=fix)

    problems = check(args.fix)
    remaining = check(False) if args.fix and problems else problems
    if args.json:
        report = {"directory": str(store.directory), "problems": problems, "fixed": args.fix,
                  "remaining": remaining}  # fmt: skip
        print(dumps_json(report, indent=1))
    elif problems:
        for p in problems:
            print(p)
        if not args.fix:
            print(f"{len(problems)} problem(s) in {store.directory}; rerun with --fix")
        elif remaining:
            print(f"{len(remaining)} problem(s) remain in {store.directory} after --fix")
        else:
            print(f"{len(problems)} problem(s) in {store.directory} (fixed)")
    else:
        print(f"{store.directory}: ok ({store.count()} entries)")
    return 1 if remaining else 0
