"""Benchmark: retrieval evaluation over a >= 1,000,000-document corpus in bounded memory, and
parity with sentence-transformers' InformationRetrievalEvaluator on a subset both can hold.

1) Build a BEIR-layout corpus from the real WordNet glosses (../shared/data), repeated with a
   row id and a deterministic word rotation until it has --rows documents; sample --queries
   queries (lemmas + the start of the gloss) whose known positives are every copy of their synset.
2) Run evalkit.evaluate_retrieval over it with a tiny local random BERT (the memory figure does
   not depend on model quality) through the embedding store, sampling RssAnon from
   /proc/self/status every 20 ms: print peak RssAnon and documents/s.
3) On a --subset-docs corpus, run the packaged all-MiniLM-L6-v2 through both
   InformationRetrievalEvaluator and evalkit (same k lists) and print every metric's difference.

Usage: .venv/bin/python scripts/bench_evaluate.py [--rows 1000000] [--queries 1000]
       [--subset-docs 3000] [--workdir /tmp/evalkit-bench-evaluate] [--no-cache]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLOSSES = ROOT.parent / "shared" / "data" / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv"
KS = [1, 3, 5, 10, 100]


class PeakRssAnon:
    """Samples RssAnon of this process in a thread; .peak in bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def read_glosses(path: Path) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(row[0], row[2].replace("|", ", "), row[3]) for row in reader]


def _rotate(words: list[str], r: int) -> str:
    if not words:
        return ""
    r %= len(words)
    return " ".join(words[r:] + words[:r])


def build_beir(glosses, folder: Path, rows: int, n_queries: int, seed: int) -> dict[str, Path]:
    """corpus.jsonl with `rows` docs (copy c of synset s has id s#c), queries.jsonl, qrels.tsv."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "corpus": folder / "corpus.jsonl",
        "queries": folder / "queries.jsonl",
        "qrels": folder / "qrels.tsv",
    }
    n = len(glosses)
    copies: dict[int, int] = {}
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        for i in range(rows):
            s, c = i % n, i // n
            synset, lemmas, gloss = glosses[s]
            text = gloss if c == 0 else f"{_rotate(gloss.split(), c)} ({c})"
            f.write(json.dumps({"_id": f"{synset}#{c}", "title": lemmas, "text": text}) + "\n")
            copies[s] = c + 1
    rng = random.Random(seed)
    picked = rng.sample(range(min(n, rows)), min(n_queries, n, rows))
    with (
        open(paths["queries"], "w", encoding="utf-8") as fq,
        open(paths["qrels"], "w", encoding="utf-8") as fr,
    ):
        fr.write("query-id\tcorpus-id\tscore\n")
        for s in picked:
            synset, lemmas, gloss = glosses[s]
            fq.write(
                json.dumps(
                    {"_id": f"q{synset}", "text": f"{lemmas}: {' '.join(gloss.split()[:6])}"}
                )
                + "\n"
            )
            for c in range(copies[s]):
                fr.write(f"q{synset}\t{synset}#{c}\t1\n")
    return paths


def tiny_model_dir(workdir: Path, max_seq_length: int) -> Path:
    """tests/conftest.py's tiny random BERT, with max_seq_length set (glosses are short)."""
    target = workdir / "tiny-model" / "model"
    if not target.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tiny_model_dir

        build_tiny_model_dir(workdir / "tiny-model")
    config = target / "sentence_bert_config.json"
    data = json.loads(config.read_text())
    data["max_seq_length"] = max_seq_length
    config.write_text(json.dumps(data))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="corpus documents")
    parser.add_argument("--queries", type=int, default=1000, help="queries for the big run")
    parser.add_argument(
        "--subset-docs", type=int, default=3000, help="corpus size of the parity run"
    )
    parser.add_argument("--subset-queries", type=int, default=200, help="queries of the parity run")
    parser.add_argument(
        "--corpus-block", type=int, default=16_384, help="documents per encode/search block"
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="encoding batch size of the big run"
    )
    parser.add_argument(
        "--max-seq-length", type=int, default=32, help="tiny model's max tokens per text"
    )
    parser.add_argument(
        "--workdir", default="/tmp/evalkit-bench-evaluate", help="where corpus, model and store go"
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="big run without the embedding store"
    )
    parser.add_argument("--skip-parity", action="store_true", help="only the big run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("EVALKIT_FINGERPRINT_MEMO", str(Path(args.workdir) / "fingerprints.json"))
    workdir = Path(args.workdir)

    glosses = read_glosses(GLOSSES)
    t = time.perf_counter()
    big = build_beir(glosses, workdir / f"corpus-{args.rows}", args.rows, args.queries, args.seed)
    print(
        f"built {args.rows:,}-doc corpus from {len(glosses):,} WordNet glosses in {time.perf_counter() - t:.1f} s"
    )
    model_dir = tiny_model_dir(workdir, args.max_seq_length)
    del glosses

    from evalkit.jobs.evaluate import evaluate_retrieval

    cache = False if args.no_cache else workdir / "cache"
    with PeakRssAnon() as mem:
        start_anon = mem.peak
        t = time.perf_counter()
        result = evaluate_retrieval(
            big["corpus"], big["queries"], big["qrels"], model=model_dir, cache=cache, device="cpu",
            corpus_block=args.corpus_block, batch_size=args.batch_size, progress=True, plots=False,
            results=False,  # measure the evaluation, never a stored result
        )  # fmt: skip
        wall = time.perf_counter() - t
    timings = result["timings"]
    print(
        f"\n== evalkit evaluate_retrieval, {result['data']['rows']:,} docs x {result['data']['queries']} queries (tiny random BERT, CPU)"
    )
    print(
        f"peak RssAnon        {mem.peak / 2**20:,.0f} MiB  (at start {start_anon / 2**20:,.0f} MiB; limit 1,536 MiB)"
    )
    print(
        f"wall                {wall:,.1f} s   docs/s (encode+search) {timings['docs_per_s']:,.0f}   docs/s overall {args.rows / wall:,.0f}"
    )
    print(
        f"cache               {result['cache']['hits']:,} hits / {result['cache']['misses']:,} misses"
    )
    print(
        f"cosine_ndcg@10      {result['metrics']['cosine_ndcg@10']:.5f}   cosine_recall@100 {result['metrics']['cosine_recall@100']:.5f}"
    )
    ok = mem.peak < 1.5 * 2**30

    if not args.skip_parity:
        ok = parity(args, workdir) and ok
    return 0 if ok else 1


def parity(args, workdir: Path) -> bool:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from evalkit.data import beir
    from evalkit.embed.models import load_model
    from evalkit.jobs.evaluate import evaluate_retrieval

    glosses = read_glosses(GLOSSES)
    sub = build_beir(
        glosses,
        workdir / f"subset-{args.subset_docs}",
        args.subset_docs,
        args.subset_queries,
        args.seed + 1,
    )
    corpus = {
        i: t
        for ids, texts in beir.iter_corpus(sub["corpus"])
        for i, t in zip(ids, texts, strict=True)
    }
    qids, qtexts = beir.load_queries(sub["queries"])
    qrels = beir.load_qrels(sub["qrels"])
    model = load_model(None, device="cpu")
    t = time.perf_counter()
    ref = InformationRetrievalEvaluator(
        dict(zip(qids, qtexts, strict=True)), corpus, {q: set(d) for q, d in qrels.items()},
        accuracy_at_k=KS, precision_recall_at_k=KS, mrr_at_k=KS, ndcg_at_k=KS, map_at_k=KS, write_csv=False,
    )(model)  # fmt: skip
    st_s = time.perf_counter() - t
    t = time.perf_counter()
    ours = evaluate_retrieval(
        sub["corpus"],
        sub["queries"],
        sub["qrels"],
        model=model,
        cache=False,
        results=False,
        k_values=KS,
        progress=False,
    )
    ours_s = time.perf_counter() - t
    diffs = {k: abs(ours["metrics"][k] - v) for k, v in ref.items()}
    worst = max(diffs, key=diffs.get)
    print(f"\n== parity on {len(corpus):,} docs x {len(qids)} queries, all-MiniLM-L6-v2 (CPU)")
    print(
        f"InformationRetrievalEvaluator {st_s:.1f} s, evalkit {ours_s:.1f} s; {len(diffs)} metrics compared"
    )
    for key in (
        "cosine_ndcg@10",
        "cosine_mrr@10",
        "cosine_map@100",
        "cosine_recall@100",
        "cosine_accuracy@1",
    ):
        print(
            f"  {key:<22} ST {ref[key]:.6f}   evalkit {ours['metrics'][key]:.6f}   diff {diffs[key]:.1e}"
        )
    print(f"max |difference| over all metrics: {diffs[worst]:.1e} ({worst})")
    return diffs[worst] == 0.0


if __name__ == "__main__":
    sys.exit(main())
