"""Fault injection on the encoder + store: encoders racing on one store."""

from __future__ import annotations

import copy

import numpy as np

from evalkit.embed.encoder import StreamingEncoder


def test_two_encoders_writing_one_store_at_once(tiny_model, tmp_path):
    """Guards against: two encoders writing one store at the same time (each with its own model
    copy and store handle, as two processes would) mixing up vectors: each must get the vectors
    of its own texts, and a later reader must be served vectors equal to the model's."""
    import threading

    from evalkit.embed.store import EmbeddingStore

    texts = [f"sentence number {i} about cats" for i in range(300)]
    truth = tiny_model.encode(texts, batch_size=16, convert_to_numpy=True)
    orders = {"forward": list(range(300)), "backward": list(range(299, -1, -1))}
    results, errors = {}, []

    def run(name: str) -> None:
        try:
            model = copy.deepcopy(tiny_model)
            store = EmbeddingStore(tmp_path / "store")
            with StreamingEncoder(model, store=store, batch_size=16, window=25) as enc:
                results[name] = enc.encode([texts[i] for i in orders[name]])
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, order in orders.items():
        np.testing.assert_allclose(results[name], truth[order], atol=1e-5, rtol=0)
    with StreamingEncoder(tiny_model, store=tmp_path / "store", window=25) as enc:
        warm = enc.encode(texts)
    assert enc.stats.hits == 300 and enc.stats.misses == 0
    np.testing.assert_allclose(warm, truth, atol=1e-5, rtol=0)
