"""`evalkit encode DATA --column text --out DIR`: the resumable precompute job
(evalkit.jobs.precompute.run_precompute). Importing this module is cheap: torch and
sentence-transformers load only when the command runs."""

from __future__ import annotations

import argparse
import sys

from evalkit.cli._common import (
    add_model_args,
    add_source_args,
    model_options,
    positive_int,
    source_options,
)
from evalkit.errors import EvalkitError

EPILOG = """examples:
  evalkit encode ../shared/data/beir-scifact/corpus.jsonl --column text --id-column _id --out emb/scifact
  evalkit encode corpus.parquet --column text --out emb/ --shard 3/8      # job 3 of 8 (Slurm array, k8s)
  evalkit encode corpus.parquet --column text --out emb/ --dtype float16 --device cuda
  evalkit encode corpus.parquet --column text --out emb/ --workers 2             # 2 processes, cores split
  evalkit encode corpus.parquet --column text --out emb/ --devices cuda:0,cuda:1  # one worker per GPU
  evalkit encode s3://b/corpus.parquet --column text --out s3://b/emb/ --ray auto # a running Ray cluster
  evalkit encode corpus.parquet --column text --out emb/ --ray --workers 2        # a local 2-actor cluster

A killed job resumes when rerun with the same arguments: finished shards are verified and skipped,
the interrupted ones are written again. The output's bytes do not depend on --workers, --ray or
kills; the job puts its vectors into the embedding store when all its shards are written.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "encode",
        help="precompute embeddings of a text column into Arrow shards (resumable, cached)",
        description=(
            "Encode one text column of DATA (Parquet/CSV/TSV/JSON Lines/ORC/Arrow, local or remote) "
            "into Arrow IPC shards under DIR (columns id, embedding), aligned with the input rows, "
            "plus manifest.json (model and input fingerprints, row ranges, dim, dtype, counts). "
            "Texts already in the embedding store are served from it, and the job puts its vectors "
            "there once all its shards are written, so later jobs reuse them."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA", help="input file, directory, glob or URI")
    parser.add_argument(
        "--column",
        required=True,
        help="text column to encode; title+text joins two columns the way BEIR/evaluate do "
        "(title + ' ' + text, stripped)",
    )
    parser.add_argument(
        "--id-column",
        default=None,
        help="column copied into the output as id (default: the row number)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_source_args(parser)
    add_model_args(parser, batch_size=64)
    g = parser.add_argument_group("output")
    g.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="stored precision (default: %(default)s)",
    )
    g.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="encode only part I of N (0-based): disjoint, complete row ranges (default: %(default)s)",
    )
    g.add_argument(
        "--rows-per-shard",
        type=positive_int,
        default=100_000,
        metavar="N",
        help="rows per output file; the unit of resumption (default: %(default)s)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR's shards even if made by another model/input",
    )
    g.add_argument(
        "--prompt", default=None, help="prompt text prepended to every input (default: none)"
    )
    g.add_argument("--prompt-name", default=None, help="name of one of the model's prompts")
    g.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    g.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    _add_scale_args(parser)
    parser.set_defaults(func=run)
    return parser


def _add_scale_args(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("scaling out (same output bytes as one process)")
    s.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="worker processes on this node (default: one per --devices entry); with --ray, "
        "the number of actors (default: one per GPU, else one per node)",
    )
    s.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="devices of the workers, e.g. cuda:0,cuda:1 (default: every visible GPU, else cpu "
        "with the cores split between the workers)",
    )
    s.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster: ADDRESS (auto, HOST:PORT, ray://...), else $RAY_ADDRESS, "
        "else a local cluster on 127.0.0.1; each node uses its own store at --cache",
    )


def _job(args: argparse.Namespace):
    """The job function the flags ask for, with its extra keyword arguments."""
    if args.ray is not None:
        if args.devices:
            raise EvalkitError("--devices is for --workers on this node; Ray places its actors")
        from evalkit.jobs.precompute_ray import run_precompute_ray

        return run_precompute_ray, {"address": args.ray or None, "workers": args.workers}
    if args.workers not in (None, 1) or args.devices or "://" in args.out:
        from evalkit.jobs.precompute_workers import run_precompute_workers

        return run_precompute_workers, {"workers": args.workers, "devices": args.devices}
    from evalkit.jobs.precompute import run_precompute

    return run_precompute, {}


def run(args: argparse.Namespace) -> int:
    job, extra = _job(args)
    manifest = job(
        args.data,
        column=args.column,
        out=args.out,
        id_column=args.id_column,
        **model_options(args),
        dtype=args.dtype,
        shard=args.shard,
        overwrite=args.overwrite,
        rows_per_shard=args.rows_per_shard,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
        normalize=args.normalize,
        progress=not args.no_progress,
        **extra,
        **source_options(args),
    )
    if args.json:
        from evalkit._io import dumps_json

        print(dumps_json(manifest, indent=1))
    print(summary(manifest), file=sys.stderr)
    return 0


def summary(manifest: dict) -> str:
    run = manifest["last_run"]
    looked = run["hits"] + run["misses"]
    rate = f"{100 * run['hits'] / looked:.1f}%" if looked else "n/a"
    state = "complete" if manifest["complete"] else "INCOMPLETE"
    start, end = manifest["row_range"]
    lines = [
        f"encoded rows {start}..{end} of {manifest['rows']} -> {manifest['dim']}-d {manifest['dtype']} ({state})",
        f"this run: {run['rows']} rows, {run['hits']} cache hits, {run['misses']} encoded "
        f"(hit rate {rate}), {run['duplicates']} duplicate rows, "
        f"{run['written_shards']} shards written, {run['skipped_shards']} already done, "
        f"{run.get('resumed_rows', 0)} rows resumed from a killed run, "
        f"{run.get('imported_rows', 0)} rows put into the store, {run['seconds']:.1f} s",
        f"model fingerprint {manifest['model_fingerprint']}",
    ]
    if run.get("reencoded_shards"):
        lines.append(
            f"re-encoded {len(run['reencoded_shards'])} finished shards whose input rows changed "
            f"since they were written: {', '.join(run['reencoded_shards'])}"
        )
    return "\n".join(lines)
