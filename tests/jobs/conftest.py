"""Fixtures shared by the job tests: small real subsets (BEIR SciFact, STS-B) and a tiny
3-checkpoint `evalkit train` run."""

from __future__ import annotations

import json
import random

import pytest
from _run_util import train_args


@pytest.fixture(scope="session")
def scifact_small(shared_data, tmp_path_factory):
    """25 judged SciFact test queries, their relevant docs and 50 other docs (BEIR layout)."""
    src = shared_data / "beir-scifact"
    qrels = {}
    with open(src / "qrels" / "test.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")
            qrels.setdefault(q, {})[d] = int(s)
    qids = sorted(qrels)[:25]
    relevant = {d for q in qids for d in qrels[q]}
    docs = [json.loads(line) for line in open(src / "corpus.jsonl", encoding="utf-8")]
    others = [d for d in docs if d["_id"] not in relevant]
    random.Random(0).shuffle(others)
    keep = [d for d in docs if d["_id"] in relevant][:-2] + others[:50]  # 2 relevant docs missing
    out = tmp_path_factory.mktemp("scifact")
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in keep), encoding="utf-8")
    queries = {}
    for line in open(src / "queries.jsonl", encoding="utf-8"):
        row = json.loads(line)
        if row["_id"] in qids or len(queries) < 60:
            queries[row["_id"]] = row["text"]
    (out / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()),
        encoding="utf-8",
    )
    lines = ["query-id\tcorpus-id\tscore"] + [
        f"{q}\t{d}\t{s}" for q in qids for d, s in qrels[q].items()
    ]
    (out / "qrels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = {d["_id"]: (d["title"] + " " + d["text"]).strip() for d in keep}
    return out, corpus, {q: queries[q] for q in qids}, {q: qrels[q] for q in qids}


@pytest.fixture(scope="session")
def stsb_dev_small(shared_data, tmp_path_factory):
    """The first 200 STS-B dev pairs, headerless like the original."""
    lines = (shared_data / "stsb" / "stsb-en-dev.csv").read_text(encoding="utf-8").splitlines(True)
    path = tmp_path_factory.mktemp("stsb-dev") / "stsb-dev-small.csv"
    path.write_text("".join(lines[:200]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(shared_data, tiny_model_dir, stsb_dev_small, tmp_path_factory):
    """A finished 3-checkpoint tiny-model run that evaluated on `stsb_dev_small` every 10 steps."""
    from evalkit.cli import main as cli_main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    assert cli_main(train_args(shared_data, tiny_model_dir, out, stsb_dev_small)) == 0
    return out
