"""`evalkit index build|info`: build a FAISS index over embeddings, or describe a built one.

Thin: parse flags, call evalkit.search.build.build_index / evalkit.jobs.ann_check.build_corpus_index (imported only
when the command runs), print what was built and why.
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


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build a FAISS index over embeddings (auto-chosen or any factory string)",
        description="Build FAISS indexes over precomputed embeddings or a corpus, and inspect them.",
    )
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = sub.add_parser(
        "build",
        help="build an index and save it (index.faiss, ids.arrow, index.json) in --out",
        description=(
            "Build a FAISS index in bounded memory: trained on a sample, vectors added in chunks, "
            "the data's ids kept in an Arrow table beside it and a sidecar index.json (spec, "
            "metric, dim, rows, model fingerprint, build parameters). Without --index the index "
            "is chosen from the row count, dimension and --memory-budget, and the reason printed. "
            "Example: evalkit index build --embeddings emb/ --out idx/ --index HNSW32"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--embeddings", metavar="DIR", help="output folder of `evalkit encode` (precompute job)"
    )
    src.add_argument(
        "--corpus",
        metavar="F",
        help="corpus to encode first (corpus.jsonl or a table with _id, title, text)",
    )
    b.add_argument(
        "--index",
        default="auto",
        metavar="SPEC",
        help="FAISS factory string (Flat, HNSW32, IVF4096,Flat, OPQ16,IVF4096,PQ16, ...) or auto",
    )
    b.add_argument(
        "--memory-budget",
        default="4G",
        metavar="SIZE",
        help="memory the index may use (auto choice, training sample)",
    )
    b.add_argument(
        "--metric",
        choices=["cosine", "dot", "l2"],
        default="cosine",
        help="cosine normalises vectors and searches by inner product",
    )
    b.add_argument(
        "--chunk-size", type=positive_int, default=65536, metavar="N", help="rows added per chunk"
    )
    b.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for index.faiss, ids.arrow and index.json",
    )
    b.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bars")
    add_model_args(b)
    add_source_args(b)
    b.set_defaults(func=_build)

    i = sub.add_parser("info", help="print a built index's sidecar (index.json)")
    i.add_argument("path", metavar="DIR", help="index folder")
    i.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    spec = None if args.index in (None, "", "auto") else args.index
    if args.embeddings:
        from evalkit.search.build import build_index

        built = build_index(
            args.embeddings,
            spec=spec,
            metric=args.metric,
            memory_budget=args.memory_budget,
            chunk_size=args.chunk_size,
            out=args.out,
            progress=not args.quiet,
        )
    else:
        from evalkit.jobs.ann_check import build_corpus_index

        built = build_corpus_index(
            args.corpus,
            args.out,
            spec=spec,
            **model_options(args),
            memory_budget=args.memory_budget,
            metric=args.metric,
            progress=not args.quiet,
            **source_options(args),
        )
    m = built.meta
    print(
        f"built {m['spec']} over {m['rows']:,} rows x {m['dim']} ({m['metric']}) in {m['build_seconds']:.1f} s -> {args.out}"
    )
    if m.get("auto"):
        print(f"why: {m['choice_reason']}")
    print(
        f"default search parameters: {m['search_params'] or 'none'}; check recall with `evalkit ann-check`"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from evalkit._io import dumps_json
    from evalkit.search.index import load_index

    idx = load_index(args.path)
    print(dumps_json(idx.meta, sort_keys=True))
    return 0
