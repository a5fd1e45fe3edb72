"""Fault injection on the precompute job: inputs edited between runs, and kill -9 in every phase.

Each test states the wrong result it guards against. The kill tests run the job in a subprocess
(tiny model, paced so a kill lands where intended) and compare the resumed output byte for byte
with an uninterrupted run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from evalkit.cli.encode import summary
from evalkit.data.fingerprint import _BLOCK, _N_BLOCKS, data_fingerprint
from evalkit.embed.shards import iter_embeddings
from evalkit.jobs.precompute import run_precompute

ROOT = Path(__file__).resolve().parents[2]
WORDS = "river stone light music paper garden window silver market winter forest engine".split()


def _write_corpus(path: Path, rows: int, pad: int = 2000) -> list[str]:
    """JSON Lines with `gid`, a short `text` (`NNNNN alpha ...`) and `pad`: `pad` bytes that are
    never encoded but make the file large enough (> 1.2 MB) to be fingerprinted by sampling."""
    rng = random.Random(0)
    texts = [" ".join([f"{i:05d}", "alpha", *rng.choices(WORDS, k=8)]) for i in range(rows)]
    path.write_text(
        "".join(
            json.dumps({"gid": f"g{i}", "text": t, "pad": "p" * pad}) + "\n"
            for i, t in enumerate(texts)
        ),
        encoding="utf-8",
    )
    return texts


def _unsampled(path: Path, token: bytes) -> tuple[int, int]:
    """The first row whose `token` lies outside every block the data fingerprint samples;
    returns (row, byte offset of the token)."""
    size = path.stat().st_size
    starts = [0, size - _BLOCK] + [size * i // (_N_BLOCKS + 1) for i in range(1, _N_BLOCKS + 1)]
    offset = 0
    for row, line in enumerate(path.read_bytes().splitlines(keepends=True)):
        at = offset + line.index(token)
        if all(not (s <= at < s + _BLOCK + len(token)) for s in starts):
            return row, at
        offset += len(line)
    raise AssertionError("no row outside the sampled blocks; make the corpus larger")


def _overwrite(path: Path, at: int, data: bytes) -> None:
    fp_before = data_fingerprint(path)
    with open(path, "r+b") as fh:  # same size, in place
        fh.seek(at)
        fh.write(data)
    assert data_fingerprint(path) == fp_before  # the sampled fingerprint cannot see it


def _run(corpus, out, model, cache, **kw):
    return run_precompute(corpus, column="text", id_column="gid", out=out, model=model,
                          cache=cache, batch_size=32, rows_per_shard=150, progress=False, **kw)  # fmt: skip


def test_same_size_edit_outside_sampled_blocks_is_reencoded(tiny_model, tmp_path):
    """Guards against: a same-size in-place edit of the input between runs, outside the blocks
    the (sampled) data fingerprint reads, kept the finished shard of the old text: the output
    held a vector of a text the input no longer has, and the run said "complete", exit 0."""
    corpus = tmp_path / "corpus.jsonl"
    texts = _write_corpus(corpus, rows=600)
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = _run(corpus, out, tiny_model, cache)
    assert first["complete"] and len(first["shards"]) == 4

    row, at = _unsampled(corpus, b"alpha")
    _overwrite(corpus, at, b"omega")
    texts[row] = texts[row].replace("alpha", "omega", 1)

    again = _run(corpus, out, tiny_model, cache)
    vectors = np.concatenate([v for _, v in iter_embeddings(out)])
    truth = tiny_model.encode([texts[row]], convert_to_numpy=True)[0]
    np.testing.assert_allclose(vectors[row], truth, atol=1e-5, rtol=0)
    assert again["last_run"]["reencoded_shards"] == [again["shards"][row // 150]["file"]]
    assert again["last_run"]["skipped_shards"] == 3 and again["last_run"]["misses"] == 1
    assert "re-encoded 1 finished shards whose input rows changed" in summary(
        again
    )  # the CLI says so
    # and the output equals a fresh run over the edited input, byte for byte
    fresh = _run(corpus, tmp_path / "fresh", tiny_model, tmp_path / "cache2")
    for a, b in zip(again["shards"], fresh["shards"], strict=True):
        assert a["blake2b"] == b["blake2b"] and a["input_xxh128"] == b["input_xxh128"]
    # a third run over the unchanged input keeps everything
    third = _run(corpus, out, tiny_model, cache)
    assert third["last_run"]["reencoded_shards"] == [] and third["last_run"]["rows"] == 0


def test_edited_ids_are_reencoded_too(tiny_model, tmp_path):
    """Guards against: an edited id column (texts unchanged) kept a shard with the old ids, so
    vectors were joined to the wrong documents downstream."""
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus, rows=600)
    out, cache = tmp_path / "out", tmp_path / "cache"
    _run(corpus, out, tiny_model, cache)
    row, at = _unsampled(corpus, b': "g')
    _overwrite(corpus, at + 3, b"x")
    again = _run(corpus, out, tiny_model, cache)
    ids = [i for b, _ in iter_embeddings(out) for i in b]
    assert ids[row] == f"x{row}"
    assert again["last_run"]["reencoded_shards"] == [again["shards"][row // 150]["file"]]
    assert again["last_run"]["misses"] == 0  # same texts: all from the store
