"""The ANN check over precomputed embeddings encodes its queries with the settings the embeddings
were made with, so their fingerprints agree exactly when the model is the same."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalkit.embed.shards import load_manifest
from evalkit.embed.store import EmbeddingStore, make_keys
from evalkit.errors import FingerprintMismatchError
from evalkit.jobs.ann_check import ann_check
from evalkit.jobs.precompute import run_precompute

pytest.importorskip("faiss")

WORDS = "river stone light music paper garden window silver market winter".split()


def test_queries_use_the_settings_the_embeddings_were_made_with(
    tiny_model_dir, tiny_model, tmp_path
):
    """Guards against: `ann-check --embeddings DIR --queries Q` compared the fingerprint of a
    float16 / prompt / normalised precompute with a fingerprint of default settings, raising a
    false FingerprintMismatchError for the very model that made it (teaching users --force, with
    which the queries were then encoded unlike the corpus)."""
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"gid": f"d{i}", "text": " ".join(rng.choice(WORDS, 6))}) + "\n"
            for i in range(120)
        )
    )
    queries = tmp_path / "queries.jsonl"
    qtexts = [" ".join(rng.choice(WORDS, 4)) for _ in range(6)]
    queries.write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(qtexts))
    )
    emb = tmp_path / "emb"
    run_precompute(corpus, column="text", id_column="gid", out=emb, model=str(tiny_model_dir),
                   cache=tmp_path / "pre", dtype="float16", normalize=True, prompt="passage: ",
                   progress=False)  # fmt: skip
    made = load_manifest(emb)["model_fingerprint"]

    cache = tmp_path / "cache"
    result = ann_check(embeddings=emb, queries=queries, model=str(tiny_model_dir), cache=cache,
                       index="Flat", k=5, latency_queries=2, plots=False, progress=False)  # fmt: skip
    assert result["model_fingerprint"] == made
    # the queries were encoded like the corpus: prompt, normalisation, float16, keyed under `made`
    vectors, found = EmbeddingStore(cache, dtype="float16").get_many(make_keys(made, qtexts))
    assert found.all()
    truth = tiny_model.encode(qtexts, prompt="passage: ", normalize_embeddings=True)
    np.testing.assert_allclose(vectors, truth.astype(np.float16), atol=1e-3, rtol=0)

    from conftest import build_tiny_model_dir

    other = build_tiny_model_dir(tmp_path / "other", seed=5)
    with pytest.raises(FingerprintMismatchError, match="same --model"):
        ann_check(embeddings=emb, queries=queries, model=str(other), cache=cache, index="Flat",
                  k=5, latency_queries=2, plots=False, progress=False)  # fmt: skip
