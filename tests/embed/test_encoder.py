"""Streaming encoder: equal to SentenceTransformer.encode for any batch/window size, served from
the store on a second run, honest keys for prompts/normalisation, and no lookups on a cold run."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from evalkit.embed.encoder import EncodeStats
from evalkit.embed.oneshot import encode_texts, iter_encode
from evalkit.embed.store import EmbeddingStore
from evalkit.errors import DataError


@pytest.fixture(scope="module")
def texts(shared_data) -> list[str]:
    with open(shared_data / "stsb" / "stsb-en-dev.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    out = [r[0] for r in rows[:300]] + [r[1] for r in rows[:100]]
    # duplicates (within and across windows) and empty strings
    return out + out[:40] + ["", "", out[5]]


@pytest.mark.parametrize(("batch_size", "window"), [(1, 7), (7, 1), (16, 64), (64, 10_000)])
def test_streamed_equals_sentence_transformers(tiny_model, texts, tmp_path, batch_size, window):
    # tiny batches/windows on a subset (with its duplicates and empty strings) to keep this fast
    sub = texts if min(batch_size, window) > 1 else texts[:20] + texts[:3] + texts[-3:]
    reference = tiny_model.encode(sub, batch_size=batch_size, convert_to_numpy=True)
    store = EmbeddingStore(tmp_path)
    blocks = list(iter_encode(sub, tiny_model, store=store, batch_size=batch_size, window=window))
    assert all(len(b) <= window for b in blocks)
    got = np.concatenate(blocks)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    # warm: everything from the store, same vectors
    stats = EncodeStats()
    warm = np.concatenate(
        list(
            iter_encode(
                sub, tiny_model, store=store, batch_size=batch_size, window=window, stats=stats
            )
        )
    )
    np.testing.assert_array_equal(warm, got)
    assert stats.misses == 0 and stats.hits > 0 and stats.rows == len(sub)


def test_without_store_and_input_forms(tiny_model, texts):
    import pyarrow as pa

    reference = tiny_model.encode(texts[:200], batch_size=32)
    plain = encode_texts(texts[:200], tiny_model, batch_size=32)
    np.testing.assert_allclose(plain.embeddings, reference, atol=1e-5, rtol=0)
    chunked = pa.chunked_array([texts[:50], texts[50:200]])
    np.testing.assert_allclose(
        encode_texts(chunked, tiny_model, batch_size=32).embeddings, reference, atol=1e-5, rtol=0
    )
    batches = (texts[i : min(i + 33, 200)] for i in range(0, 200, 33))  # a generator of batches
    np.testing.assert_allclose(
        encode_texts(batches, tiny_model, batch_size=32, window=50).embeddings,
        reference,
        atol=1e-5,
        rtol=0,
    )
    empty = encode_texts([], tiny_model)
    assert empty.embeddings.shape == (0, 32)


def test_duplicates_and_empty_strings(tiny_model, tmp_path):
    data = ["", "same", "same", "", "other", "same"]
    result = encode_texts(data, tiny_model, store=EmbeddingStore(tmp_path), window=4)
    emb = result.embeddings
    np.testing.assert_array_equal(emb[1], emb[2])
    np.testing.assert_array_equal(emb[1], emb[5])
    np.testing.assert_array_equal(emb[0], emb[3])
    np.testing.assert_allclose(emb, tiny_model.encode(data), atol=1e-5, rtol=0)
    # window 1: ["", "same", "same", ""] -> 2 unique misses; window 2: ["other", "same"] -> 1 miss, 1 hit
    assert (result.misses, result.hits, result.stats.duplicates) == (3, 1, 2)


def test_null_text_names_its_row(tiny_model):
    with pytest.raises(DataError, match="row 3 is null"):
        encode_texts(["a", "b", "c", None], tiny_model)
    with pytest.raises(DataError, match="row 1 is a int"):
        encode_texts(["a", 5], tiny_model)


def test_prompt_and_normalisation_change_the_key(tiny_model, tmp_path):
    store = EmbeddingStore(tmp_path)
    data = ["a cat sits on the mat", "stock prices fell"]
    base = encode_texts(data, tiny_model, store=store)
    prompted = encode_texts(data, tiny_model, store=store, prompt="query: ")
    normed = encode_texts(data, tiny_model, store=store, normalize=True)
    assert base.misses == prompted.misses == normed.misses == 2
    assert len({base.fingerprint, prompted.fingerprint, normed.fingerprint}) == 3
    np.testing.assert_allclose(
        prompted.embeddings, tiny_model.encode(data, prompt="query: "), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(np.linalg.norm(normed.embeddings, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(base.embeddings, prompted.embeddings)
    assert set(store.info()["models"]) == {
        base.fingerprint,
        prompted.fingerprint,
        normed.fingerprint,
    }
    again = encode_texts(data, tiny_model, store=store, prompt="query: ")
    assert again.hits == 2 and again.misses == 0


def test_float16_store_serves_the_same_bytes_cold_and_warm(tiny_model, texts, tmp_path):
    store = EmbeddingStore(tmp_path, dtype="float16")
    cold = encode_texts(texts[:100], tiny_model, store=store)
    warm = encode_texts(texts[:100], tiny_model, store=store)
    assert warm.misses == 0
    np.testing.assert_array_equal(cold.embeddings, warm.embeddings)
    assert (
        cold.fingerprint != encode_texts(texts[:2], tiny_model).fingerprint
    )  # precision in the key


def test_cold_run_does_no_lookups(tiny_model, texts, tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path)
    asked: list[int] = []
    real = store.get_many

    def counting(keys, **kw):
        asked.append(len(keys))
        return real(keys, **kw)

    monkeypatch.setattr(store, "get_many", counting)
    unique = list(dict.fromkeys(texts[:300]))
    result = encode_texts(unique + unique[:10], tiny_model, store=store, window=100)
    # only the 10 repeats (written by this run, in an earlier window) were looked up
    assert sum(asked) == 10 and result.hits == 10
    asked.clear()
    encode_texts(unique, tiny_model, store=store, window=100)  # warm now: real lookups
    assert sum(asked) == len(unique)


def test_progress_bar_and_stats(tiny_model, texts, capsys):
    stats = EncodeStats()
    out = list(iter_encode(texts[:50], tiny_model, window=20, progress=True, stats=stats))
    assert [len(b) for b in out] == [20, 20, 10]
    assert stats.rows == 50 and stats.fingerprint
    assert "rows" in capsys.readouterr().err


def test_bad_arguments(tiny_model):
    from evalkit.errors import EvalkitError

    with pytest.raises(EvalkitError, match="batch_size must be a positive integer"):
        iter_encode(["a"], tiny_model, batch_size=0)
    with pytest.raises(EvalkitError, match="single string"):
        encode_texts("abc", tiny_model)


def test_minilm_matches_sentence_transformers(minilm, texts, tmp_path):
    sub = texts[:48]
    result = encode_texts(sub, minilm, store=EmbeddingStore(tmp_path), batch_size=16, window=20)
    np.testing.assert_allclose(
        result.embeddings, minilm.encode(sub, batch_size=16), atol=1e-5, rtol=0
    )


def test_model_folder_is_served_from_the_store_without_loading(
    tiny_model_dir, tiny_model, tmp_path
):
    """Guards against: the lazy path (model given as a folder, fingerprint from the memo) serving
    vectors that differ from what the loaded model computes, or loading the model when every
    text is already in the store."""
    from evalkit.embed.encoder import StreamingEncoder

    texts = ["alpha", "beta", "alpha", "gamma"]
    with StreamingEncoder(str(tiny_model_dir), store=tmp_path / "s") as cold:
        first = cold.encode(texts)
        assert cold.loaded and cold.stats.misses == 3 and cold.stats.duplicates == 1
    with StreamingEncoder(str(tiny_model_dir), store=tmp_path / "s") as warm:
        again = warm.encode(texts)
        assert not warm.loaded and warm.stats.hits == 3 and warm.stats.misses == 0
        assert warm.fingerprint == cold.fingerprint and not warm.loaded
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, tiny_model.encode(texts), atol=1e-5, rtol=0)


def test_a_wrong_memo_entry_is_confirmed_before_any_key_is_used(tiny_model_dir, tmp_path):
    """Guards against: a stale or tampered fingerprint memo making the encoder serve partial hits
    from, and write new vectors under, another model's fingerprint once the model must load."""
    from evalkit.embed import memo
    from evalkit.embed.encoder import StreamingEncoder
    from evalkit.embed.store import make_keys

    with StreamingEncoder(str(tiny_model_dir), store=tmp_path / "s") as enc:
        truth = enc.encode(["alpha", "gamma"])
        true_fp, key, dim = enc.fingerprint, enc._memo_key, enc.dim
    bogus = "f" * 32
    memo.remember(key, bogus)
    planted = np.full((1, dim), 7.0, dtype=np.float32)
    EmbeddingStore(tmp_path / "s").put_many(make_keys(bogus, ["alpha"]), planted, model=bogus)
    with StreamingEncoder(str(tiny_model_dir), store=tmp_path / "s") as enc:
        got = enc.encode(["alpha", "gamma"])  # 'gamma' is not under the bogus key: model loads
        assert enc.loaded and enc.fingerprint == true_fp
    np.testing.assert_array_equal(got, truth)
    assert memo.lookup(key) == true_fp  # the memo is repaired


def test_memo_is_used_only_under_default_numerics(tmp_path, monkeypatch):
    """Guards against: a fingerprint memoised under torch's default float32 matmul flags being
    served (model never loaded) in a process that changed them, whose vectors differ; and a memo
    key that depends on whether torch happened to be imported (a fresh CLI run missed it)."""
    import torch

    from evalkit.embed import memo

    monkeypatch.setenv("EVALKIT_FINGERPRINT_MEMO", str(tmp_path / "memo.json"))
    memo.remember("k", "fp")
    assert memo.lookup("k") == "fp"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert memo.lookup("k") is None
        memo.remember("k2", "fp2")
    finally:
        torch.set_float32_matmul_precision(before)
    assert memo.lookup("k2") is None and memo.lookup("k") == "fp"


def test_misses_are_batched_by_token_count_and_equal_plain_encode(tiny_model):
    """Guards against: batches ordered by characters (SentenceTransformer.encode's order), which
    pad short-but-many-token texts with long-but-few-token ones; and against the per-batch calls
    changing what is served (each row must equal plain encode's)."""
    from evalkit.embed.models import length_order

    texts = ["a b c d e f g h", "internationalization", "x", "a b c d e f g h i j k", "hello"]
    tokens = [len(ids) for ids in tiny_model.tokenizer(texts)["input_ids"]]
    order, by_tokens = length_order(tiny_model, texts)
    assert by_tokens and [tokens[i] for i in order] == sorted(tokens, reverse=True)
    assert order[:2] == [3, 0]  # 11 and 8 words: more tokens than the 20-letter word
    # no tokenizer: characters
    assert length_order(object(), ["ab", "abc", "a"]) == ([1, 0, 2], False)
    many = [f"{' '.join(['w'] * (i % 17))} text {i}" for i in range(150)]
    got = encode_texts(many, tiny_model, batch_size=16).embeddings
    np.testing.assert_allclose(got, tiny_model.encode(many, batch_size=16), atol=1e-5)


@pytest.mark.parametrize("by_tokens, calls", [(True, 10), (False, 1)])
def test_encode_calls_per_order(tiny_model, monkeypatch, by_tokens, calls):
    """Token order needs one encode() call per batch (encode() re-sorts by characters); an order
    by characters is encode()'s own, so it goes in slices of ~1,024 texts (per-call overhead
    dominated cheap models: +10% on precomputed vectors at 100k documents)."""
    from evalkit.embed import encoder as enc
    from evalkit.embed import models

    seen = []
    real = enc.StreamingEncoder._encode_slice
    monkeypatch.setattr(models, "length_order", lambda m, t, p: (list(range(len(t))), by_tokens))
    monkeypatch.setattr(enc.StreamingEncoder, "_encode_slice",
                        lambda self, *a: seen.append(len(a[1])) or real(self, *a))  # fmt: skip
    texts = [f"text {i}" for i in range(150)]
    got = encode_texts(texts, tiny_model, batch_size=16).embeddings
    assert len(seen) == calls and sum(seen) == 150
    np.testing.assert_allclose(got, tiny_model.encode(texts, batch_size=16), atol=1e-5)


def test_window_fast_paths_match_the_general_ones():
    """Guards the C-speed fast paths of the encoder's window plumbing: de-duplication of unique
    texts must give the identity (and with duplicates the first-seen order and indices), the
    type check must still accept str subclasses and refuse a non-string with its row (a wrong
    index would pair texts with the wrong vectors)."""
    from evalkit.embed._window import check_texts, dedupe
    from evalkit.errors import DataError

    uniq, inverse = dedupe(["b", "a", "c"])
    assert uniq == ["b", "a", "c"] and inverse.tolist() == [0, 1, 2]
    uniq, inverse = dedupe(["b", "a", "b", "c", "a"])
    assert uniq == ["b", "a", "c"] and inverse.tolist() == [0, 1, 0, 2, 1]

    class Text(str):
        pass

    check_texts(["x", Text("y")], 0)
    with pytest.raises(DataError, match="text at row 12 is null"):
        check_texts(["x", "y", None], 10)
    with pytest.raises(DataError, match="text at row 11 is a int"):
        check_texts(["x", 5], 10)
    from evalkit.embed._window import windows

    flat = [f"t{i}" for i in range(10)]
    assert list(windows(flat, 4)) == [flat[:4], flat[4:8], flat[8:]]
    assert list(windows(tuple(flat), 10)) == [flat]
    nested = [flat[:3], "x", np.array(flat[3:5]), Text("y")]  # batches: the general path
    assert list(windows(nested, 4)) == [flat[:3] + ["x"], flat[3:5] + ["y"]]
    assert all(type(t) is Text for t in next(windows([Text("a"), Text("b")], 2)))


@pytest.mark.parametrize("window", [1, 7, 64, 10_000])
def test_encode_texts_writes_every_window_into_one_array(tiny_model, texts, tmp_path, window):
    """encode_texts allocates its output once and each window is written into its slice (the
    store fills it directly): cold, warm and partly filled stores, duplicates within and across
    windows, and StreamingEncoder.encode the same way, all equal to plain encode()."""
    from evalkit.embed.encoder import StreamingEncoder

    sub = texts[:60] + texts[:5] + ["", texts[3]] if window < 7 else texts
    reference = tiny_model.encode(sub, batch_size=16, convert_to_numpy=True)
    half = EmbeddingStore(tmp_path / "half")
    encode_texts(sub[::2], tiny_model, store=half, batch_size=16, window=window)
    for store in (EmbeddingStore(tmp_path / "cold"), half):
        for _ in ("first", "again"):
            got = encode_texts(sub, tiny_model, store=store, batch_size=16, window=window)
            assert got.embeddings.shape == reference.shape and got.embeddings.flags.c_contiguous
            np.testing.assert_allclose(got.embeddings, reference, atol=1e-5, rtol=0)
        assert got.misses == 0
        with StreamingEncoder(tiny_model, store=store, batch_size=16, window=window) as enc:
            np.testing.assert_array_equal(enc.encode(sub), got.embeddings)


def test_iter_encode_blocks_are_slices_of_out(tiny_model, tmp_path):
    from evalkit.embed.encoder import StreamingEncoder

    sub = [f"sentence number {i}" for i in range(23)] + ["sentence number 3"]
    out = np.full((len(sub), 32), np.nan, dtype=np.float32)
    with StreamingEncoder(tiny_model, store=tmp_path, batch_size=8, window=5) as enc:
        blocks = list(enc.iter_encode(sub, out=out))
    assert all(np.shares_memory(b, out) for b in blocks)
    np.testing.assert_allclose(out, tiny_model.encode(sub, batch_size=8), atol=1e-5, rtol=0)


def test_get_many_fills_out_and_zeroes_what_it_does_not_find(tmp_path):
    from evalkit.embed.store import make_keys
    from evalkit.errors import StoreError

    store = EmbeddingStore(tmp_path)
    keys = make_keys("fp", ["a", "b", "c"])
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.put_many(keys[:2], vecs[:2], model="fp")
    out = np.full((3, 4), np.nan, dtype=np.float32)
    got, found = store.get_many(keys, dim=4, model="fp", out=out)
    assert got is out and found.tolist() == [True, True, False]
    np.testing.assert_array_equal(out, np.vstack([vecs[:2], np.zeros((1, 4), np.float32)]))
    nothing = np.full((1, 4), np.nan, dtype=np.float32)
    assert store.get_many(make_keys("fp", ["z"]), dim=4, out=nothing)[0] is nothing
    assert not nothing.any()
    for bad in (np.zeros((3, 5), np.float32), np.zeros((3, 4), np.float64), np.zeros((2, 4))):
        with pytest.raises(StoreError, match="out must be float32"):
            store.get_many(keys, dim=4, out=bad)
    with pytest.raises(StoreError, match="out must be float32"):
        store.get_many(keys, out=out)  # dim not given


def test_vectors_of_another_dimension_than_declared_are_refused(tiny_model, tmp_path, monkeypatch):
    """A model whose vectors are not the dimension it declares must fail loudly, never be
    broadcast into the output (one column copied 32 times) nor stored."""
    from evalkit.embed import encoder as enc
    from evalkit.errors import EvalkitError

    real = enc.StreamingEncoder._encode_slice
    monkeypatch.setattr(enc.StreamingEncoder, "_encode_slice",
                        lambda self, *a: real(self, *a)[:, :1])  # fmt: skip
    store = EmbeddingStore(tmp_path)
    with pytest.raises(EvalkitError, match="dimension 1, not the 32 it declares"):
        encode_texts(["a", "b", "a"], tiny_model, store=store)
    assert store.count() == 0
