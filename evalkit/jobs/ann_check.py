"""The `evalkit ann-check` and `evalkit index build --corpus` jobs: files in, report out.

`ann_check`:
1) read queries (and qrels) in full — they are few; check the recall target at the door;
2) corpus embeddings: a precompute output directory is streamed as it is; a corpus file is
   encoded once through the embedding store into a memory-mapped scratch .npy (out of core,
   re-read by every later pass without encoding again);
3) queries: encoded with the same model and, for a precompute directory, the settings its
   embeddings were made with (dtype, prompt, normalisation, truncation: the fingerprints must
   then match exactly), or `n_queries` corpus rows sampled and held out;
4) `evalkit.search.ann.check_index` does the comparison; `write_ann_report` writes OUT/ann.json,
   OUT/summary.md and OUT/recall_qps.png (matplotlib Agg, imported only then).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.errors import DataError, EvalkitError, FingerprintMismatchError
from evalkit.search.ann import Blocks, check_index, check_min_recall
from evalkit.search.build import build_index
from evalkit.search.index import EmbeddingIndex

log = logging.getLogger(__name__)


def _memmap_corpus(
    corpus: Any, encoder: Any, scratch: Path, block: int, progress: bool, ids: Any = None,
    **source_options,
):  # fmt: skip
    """Encode the corpus once (through the store) into a memory-mapped scratch .npy; returns
    (ids as a numpy object array, the memmap). `ids`: its corpus_ids, if already read."""
    from evalkit.data import beir

    ids = beir.corpus_ids(corpus, **source_options) if ids is None else ids
    if not len(ids):
        raise DataError(f"corpus {corpus} has no documents")
    mm, row = None, 0
    bar = _bar(progress, len(ids), "encoding corpus")
    for _, texts in beir.iter_corpus(corpus, batch_size=block, **source_options):
        emb = encoder(texts)
        if mm is None:
            path = scratch / "corpus_embeddings.npy"
            mm = np.lib.format.open_memmap(
                path, mode="w+", dtype=np.float32, shape=(len(ids), emb.shape[1])
            )
        mm[row : row + len(emb)] = emb
        row += len(emb)
        bar.update(len(emb))
    bar.close()
    mm.flush()
    return ids.to_numpy(zero_copy_only=False), mm


def _bar(enabled: bool, total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="rows", unit_scale=True, disable=not enabled, leave=False
    )


def ann_check(
    corpus: str | os.PathLike | None = None,
    queries: str | os.PathLike | None = None,
    qrels: str | os.PathLike | None = None,
    *,
    embeddings: str | os.PathLike | None = None,
    index: str | os.PathLike | None = None,
    k: int = 10,
    min_recall: float | None = None,
    n_queries: int = 1000,
    model: Any = None,
    cache: Any = None,
    device: str = "auto",
    batch_size: int = 64,
    memory_budget: str | int = "4G",
    metric: str = "cosine",
    force: bool = False,
    seed: int = 0,
    corpus_block: int = 16_384,
    latency_queries: int = 200,
    out: str | os.PathLike | None = None,
    plots: bool = True,
    progress: bool = True,
    **source_options: Any,
) -> dict[str, Any]:
    """`evalkit ann-check`: compare an index with exact search on a corpus file (BEIR corpus.jsonl
    or a table with _id/text, encoded through the store) or a precompute output directory
    (`embeddings`). Queries come from `queries` (with optional `qrels`) or are `n_queries` corpus
    rows held out. Writes OUT/ann.json, OUT/summary.md, OUT/recall_qps.png. See check_index."""
    import tempfile

    _check_args(corpus, embeddings, queries, qrels, k, n_queries, min_recall)
    door_ids = _check_at_door(out, corpus, source_options)
    judged, qids, qtexts = _read_queries(queries, qrels)
    encoder, fingerprint = None, None
    if corpus is not None or queries is not None:
        encoder = _make_encoder(model, cache, device, batch_size, embeddings)
        fingerprint = encoder.fingerprint

    with (
        tempfile.TemporaryDirectory(
            prefix="evalkit-ann-", dir=out if out and Path(out).is_dir() else None
        ) as scratch,
        encoder or contextlib.nullcontext(),
    ):
        if embeddings is not None:
            blocks, n_rows, fingerprint = _embedding_blocks(embeddings, fingerprint, force)
        else:
            blocks, n_rows = _encoded_blocks(corpus, encoder.encode, Path(scratch), corpus_block,
                                             progress, door_ids, **source_options)  # fmt: skip
        holdout, sample_ids = None, None
        if queries is None:
            holdout, q_emb, sample_ids = _sample_queries(blocks, n_rows, n_queries, seed)
        else:
            q_emb = encoder.encode(qtexts)
        result = check_index(
            blocks,
            q_emb,
            query_ids=qids if qids is not None else sample_ids,
            qrels=judged,
            holdout=holdout,
            index=index,
            k=k,
            min_recall=min_recall,
            metric=metric,
            memory_budget=memory_budget,
            model_fingerprint=fingerprint,
            force=force,
            latency_queries=latency_queries,
            progress=progress,
        )
    result["data"] = {
        "corpus": str(corpus) if corpus is not None else None,
        "embeddings": str(embeddings) if embeddings is not None else None,
        "queries": str(queries) if queries is not None else None,
        "qrels": str(qrels) if qrels is not None else None,
    }
    if out is not None:
        write_ann_report(result, out, plots=plots)
    return result


def _check_args(corpus, embeddings, queries, qrels, k, n_queries, min_recall) -> None:
    """Step 1's checks at the door, before any file is read or model loaded."""
    check_min_recall(min_recall)
    if (corpus is None) == (embeddings is None):
        raise EvalkitError("give exactly one of --corpus FILE or --embeddings DIR")
    if qrels is not None and queries is None:
        raise EvalkitError("--qrels needs --queries (the qrels judge those queries)")
    if not isinstance(k, int) or k <= 0:
        raise EvalkitError(f"k must be a positive integer; got {k!r}")
    if queries is None and n_queries <= 0:
        raise EvalkitError(f"n_queries must be a positive integer; got {n_queries!r}")


def _read_queries(queries, qrels) -> tuple[dict | None, list | None, list | None]:
    """Step 1: (qrels, query ids, query texts), keeping only judged queries when qrels are given."""
    from evalkit.data import beir

    judged = beir.load_qrels(qrels) if qrels is not None else None
    qids, qtexts = beir.load_queries(queries) if queries is not None else (None, None)
    if judged is not None:
        keep = [i for i, qid in enumerate(qids) if qid in judged]
        qids, qtexts = [qids[i] for i in keep], [qtexts[i] for i in keep]
        if not qids:
            raise DataError(
                f"no query in {queries} is judged in {qrels}; are they from the same dataset?"
            )
    return judged, qids, qtexts


def _make_encoder(model: Any, cache: Any, device: str, batch_size: int, embeddings: Any = None):
    """The StreamingEncoder (texts -> float32 vectors through the store), and so the fingerprint
    of the settings actually used: those the precompute directory `embeddings` was made with
    (its manifest's dtype, prompt, normalisation, truncation) when given, else the defaults."""
    from evalkit.embed.encoder import StreamingEncoder
    from evalkit.embed.models import load_model
    from evalkit.embed.shards import load_manifest

    st_model = (
        load_model(model, device=device)
        if model is None or isinstance(model, str | os.PathLike)
        else model
    )
    made = load_manifest(embeddings) if embeddings is not None else {}
    dtype = made.get("dtype") or "float32"
    return StreamingEncoder(
        st_model,
        store=None if cache is False else _open_store(cache, dtype),
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        prompt=made.get("prompt"),
        normalize=bool(made.get("normalize")),
        truncate_dim=made.get("truncate_dim"),
    )


def _embedding_blocks(embeddings, fingerprint: str | None, force: bool):
    """Step 2, precompute output: (blocks, rows, fingerprint); the queries' model must be the one
    that made the embeddings (unless forced)."""
    from evalkit.embed.shards import iter_embeddings, load_manifest

    manifest = load_manifest(embeddings)
    built_with = manifest.get("model_fingerprint")
    if fingerprint and built_with and fingerprint != built_with:
        msg = (
            f"embeddings in {embeddings} were made by model {built_with[:12]}..., but queries "
            f"would be encoded by {fingerprint[:12]}...; use the same --model, or --force"
        )
        if not force:
            raise FingerprintMismatchError(msg)
        log.warning("%s (forced)", msg)

    def blocks():
        return iter(iter_embeddings(embeddings))

    return blocks, int(manifest["rows"]), built_with or fingerprint


def _encoded_blocks(corpus, encoder, scratch: Path, corpus_block: int, progress, ids, **options):
    """Step 2, corpus file: encoded once into a scratch memmap; (blocks over it, rows)."""
    ids, mm = _memmap_corpus(corpus, encoder, scratch, corpus_block, progress, ids, **options)
    n_rows = len(mm)

    def blocks():
        for s in range(0, n_rows, corpus_block):
            yield ids[s : s + corpus_block], mm[s : s + corpus_block]

    return blocks, n_rows


def _sample_queries(blocks: Blocks, n_rows: int, n_queries: int, seed: int):
    """Step 3 without query files: (held-out rows, their vectors, their ids)."""
    if n_rows < 2:
        raise DataError("the corpus needs at least 2 rows to hold out queries")
    n_q = min(n_queries, n_rows // 2)
    holdout = np.sort(np.random.default_rng(seed).choice(n_rows, n_q, replace=False))
    q_emb, sample_ids = _gather(blocks, holdout)
    return holdout, q_emb, sample_ids


def _check_at_door(out: Any, corpus: Any, source_options: dict[str, Any]) -> Any:
    """Checks that can fail fast, before any model loads: OUT can be written, the corpus reads
    (every id, once: -> the ids, handed to _memmap_corpus; its first document)."""
    from evalkit._io import out_dir_problem
    from evalkit.data import beir

    if out is not None and (problem := out_dir_problem(out)):
        raise EvalkitError(problem)
    if corpus is None:
        return None
    ids = beir.corpus_ids(corpus, **source_options)
    beir.check_corpus(corpus, **source_options)
    return ids


def _open_store(cache: Any, dtype: str = "float32"):
    from evalkit.embed.store import EmbeddingStore, default_cache_dir

    if isinstance(cache, EmbeddingStore):
        return cache
    return EmbeddingStore(cache or default_cache_dir(), dtype=dtype)


def _gather(blocks: Blocks, rows: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """The vectors and ids of the given (sorted) corpus rows, in one pass."""
    vecs, ids, row = [], [], 0
    for block_ids, v in blocks():
        v = np.asarray(v)
        lo, hi = np.searchsorted(rows, [row, row + len(v)])
        if hi > lo:
            local = rows[lo:hi] - row
            vecs.append(np.array(v[local], dtype=np.float32))
            ids.extend(np.asarray(block_ids, dtype=object)[local].tolist())
        row += len(v)
    return np.concatenate(vecs), ids


def _fmt_params(params: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items()) or "-"


def format_ann_summary(result: dict[str, Any]) -> str:
    """The few lines `evalkit ann-check` prints."""
    k = result["k"]
    lines = [
        f"index {result['index']} over {result['rows']:,} rows x {result['dim']} ({result['metric']}), "
        f"{result['queries']:,} {'held-out sampled' if result['queries_sampled'] else 'given'} queries"
    ]
    if result.get("index_auto"):
        lines.append(f"  auto choice: {result['index_reason']}")
    for row in result["sweep"]:
        lines.append(
            f"  {_fmt_params(row['params']):>14}  recall@{k} {row[f'recall@{k}']:.4f}  "
            f"1-recall@{k} {row[f'1-recall@{k}']:.4f}  {row['qps']:>10,.0f} QPS  "
            f"p50 {row['latency_ms_p50']:.2f} ms  p99 {row['latency_ms_p99']:.2f} ms"
        )
    t = result["target_recall"]
    verdict = "reached" if result["reached"] else "NOT reached by any setting"
    lines.append(
        f"chosen {_fmt_params(result['params'])}: recall@{k}={result[f'recall@{k}']:.4f} "
        f"qps={result['qps']:,.0f} (target recall@{k} >= {t}: {verdict}; exact search: "
        f"{result['timings']['exact_qps'] or 0:,.0f} QPS streamed)"
    )
    if result.get("metric_deltas"):
        deltas = ", ".join(f"{key} {v:+.4f}" for key, v in result["metric_deltas"].items())
        lines.append(
            f"metric change, ANN minus exact ({result['judged_queries']} judged queries): {deltas}"
        )
        for w in result.get("worst_queries", [])[:3]:
            lines.append(f"  worst: query {w['query_id']} nDCG@10 {w['delta']:+.4f}")
    return "\n".join(lines)


def write_ann_report(result: dict[str, Any], out: str | os.PathLike, *, plots: bool = True) -> Path:
    """OUT/ann.json, OUT/summary.md and (plots) OUT/recall_qps.png, each written atomically."""
    from evalkit._io import write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        png = plot_recall_qps(result, out / "recall_qps.png")
        result["plots"] = [str(png)] if png else []
    k = result["k"]
    md = [f"# ANN check: {result['index']}", "", "```", format_ann_summary(result), "```", ""]
    md += [
        f"| setting | recall@{k} | 1-recall@{k} | QPS | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["sweep"]:
        md.append(
            f"| {_fmt_params(r['params'])} | {r[f'recall@{k}']:.4f} | {r[f'1-recall@{k}']:.4f} | "
            f"{r['qps']:,.0f} | {r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} |"
        )
    if result.get("metric_deltas"):
        md += ["", "| metric | exact | ANN | ANN - exact |", "|---|---|---|---|"]
        for key, d in result["metric_deltas"].items():
            md.append(
                f"| {key} | {result['metrics_exact'][key]:.5f} | {result['metrics_ann'][key]:.5f} | {d:+.5f} |"
            )
    if result.get("worst_queries"):
        md += ["", "Queries whose nDCG@10 dropped most:", "", "| query | delta |", "|---|---|"]
        md += [f"| {w['query_id']} | {w['delta']:+.4f} |" for w in result["worst_queries"]]
    write_text_atomic(out / "summary.md", "\n".join(md) + "\n")
    write_json_atomic(out / "ann.json", result)
    return out


def plot_recall_qps(result: dict[str, Any], path: Path) -> Path | None:
    """Recall@k (x) against QPS (y, log scale) over the sweep, the target as a vertical line."""
    from evalkit.jobs.report import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return None
    k, sweep = result["k"], result["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r[f"recall@{k}"] for r in sweep]
    y = [r["qps"] for r in sweep]
    ax.plot(x, y, "o-", label=result["index"])
    for r, xi, yi in zip(sweep, x, y, strict=True):
        ax.annotate(
            _fmt_params(r["params"]),
            (xi, yi),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axvline(
        result["target_recall"],
        color="grey",
        linestyle="--",
        label=f"target {result['target_recall']}",
    )
    ax.set_xlabel(f"recall@{k} (vs exact search)")
    ax.set_ylabel("queries per second")
    ax.set_yscale("log")
    ax.set_title(f"{result['index']}: recall-QPS over {result['rows']:,} rows")
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def build_corpus_index(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    *,
    spec: str | None = None,
    model: Any = None,
    cache: Any = None,
    device: str = "auto",
    batch_size: int = 64,
    memory_budget: str | int = "4G",
    metric: str = "cosine",
    corpus_block: int = 16_384,
    progress: bool = True,
    **source_options: Any,
) -> EmbeddingIndex:
    """`evalkit index build --corpus F`: encode a corpus through the store into a memory-mapped
    scratch file, then build and save the index (ids = the corpus ids, fingerprint = the model's)."""
    import tempfile

    door_ids = _check_at_door(out, corpus, source_options)
    Path(out).mkdir(parents=True, exist_ok=True)
    with (
        _make_encoder(model, cache, device, batch_size) as encoder,
        tempfile.TemporaryDirectory(prefix=".evalkit-index-", dir=out) as scratch,
    ):
        ids, mm = _memmap_corpus(
            corpus,
            encoder.encode,
            Path(scratch),
            corpus_block,
            progress,
            door_ids,
            **source_options,
        )
        return build_index(
            mm,
            ids=ids,
            spec=spec,
            metric=metric,
            memory_budget=memory_budget,
            model_fingerprint=encoder.fingerprint,  # the one its vectors are keyed by
            out=out,
            progress=progress,
        )
