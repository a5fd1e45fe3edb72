"""The results store: a rerun with nothing changed is served without parsing data or loading a
model; a changed byte of the data or of the weights, or a damaged stored file, is never served;
per-item files hold exactly the values behind the metrics. Guards against a stale metric printed
with exit code 0."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.stats as ss
from _run_util import STSB_COLUMNS, run_fresh

from evalkit.cli import main as cli_main
from evalkit.data.fingerprint import data_fingerprint
from evalkit.jobs.evaluate import evaluate_pairs, evaluate_retrieval
from evalkit.jobs.results import ResultsStore, read_table, results_dir


@pytest.fixture(autouse=True)
def _memo(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALKIT_FINGERPRINT_MEMO", str(tmp_path / "memo.json"))


def _pairs(path, model, **kw):
    return evaluate_pairs(
        path, left="sentence1", right="sentence2", label="score", model=model,
        column_names=STSB_COLUMNS.split(","), progress=False, **kw,
    )  # fmt: skip


def test_rerun_is_served_without_model_or_parsing(stsb_dev_small, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    args = ["evaluate", "pairs", str(stsb_dev_small), "--column-names", STSB_COLUMNS, "--left",
            "sentence1", "--right", "sentence2", "--label", "score", "--model",
            str(tiny_model_dir), "--cache", str(cache), "--quiet"]  # fmt: skip
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    code, stdout, stderr, heavy = run_fresh([*args, "--out", str(tmp_path / "two")])
    assert code == 0, stderr
    assert heavy == [], f"served result imported {heavy}"
    assert "from results store" in stdout and "from results store" in stderr
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["metrics"] == one["metrics"] and two["results_store"]["hit"] is True
    assert two["per_query"]["blake2b"] == one["per_query"]["blake2b"]
    assert (tmp_path / "two" / "score_distribution.png").is_file()  # redrawn from per-pair rows
    assert results_dir(None, cache) == tmp_path / "cache-results"  # beside, not inside, the cache
    assert cli_main(["cache", "check", "--fix", "--cache", str(cache)]) == 0
    assert any((tmp_path / "cache-results").rglob("*.parquet"))  # `cache check --fix` kept it
    again = _pairs(stsb_dev_small, tiny_model_dir, cache=cache, recompute=True)
    assert again["results_store"]["hit"] is False and again["metrics"] == one["metrics"]


def test_a_changed_byte_of_data_is_never_served(stsb_dev_small, tiny_model_dir, tmp_path):
    """A same-size edit between the sampled blocks of the cheap data fingerprint (which that
    fingerprint misses) must still change the results store key."""
    data = tmp_path / "pairs.csv"
    data.write_bytes(stsb_dev_small.read_bytes() * 100)  # 1.4 MB: sampled, not hashed whole
    size = data.stat().st_size
    starts = [0, size - 65536] + [size * i // 17 for i in range(1, 17)]
    covered = np.zeros(size, dtype=bool)
    for s in starts:
        covered[s : s + 65536] = True
    raw = bytearray(data.read_bytes())
    pos = next(i for i in range(size) if not covered[i] and chr(raw[i]).isalpha())
    cache = tmp_path / "cache"
    first = _pairs(data, tiny_model_dir, cache=cache)
    sampled = data_fingerprint(data)
    raw[pos] = ord("x") if raw[pos] != ord("x") else ord("y")
    data.write_bytes(bytes(raw))
    assert data_fingerprint(data) == sampled  # the sampled fingerprint cannot see this edit
    second = _pairs(data, tiny_model_dir, cache=cache)
    assert second["results_store"]["hit"] is False and second["cache"]["misses"] > 0
    assert second["data"]["fingerprint"] != first["data"]["fingerprint"]


def test_changed_weights_or_a_damaged_entry_are_never_served(
    stsb_dev_small, tiny_model_dir, tmp_path, caplog
):
    cache, results = tmp_path / "cache", tmp_path / "results"
    first = _pairs(stsb_dev_small, tiny_model_dir, cache=cache, results=results)
    model = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x01  # one bit of the last weight
    weights.write_bytes(bytes(raw))
    edited = _pairs(stsb_dev_small, model, cache=cache, results=results)
    assert edited["results_store"]["hit"] is False
    assert edited["model"]["fingerprint"] != first["model"]["fingerprint"]
    # a stored per-item file damaged in place (same size): a miss with a warning, then rewritten
    stored = first["per_query"]["path"]
    raw = bytearray(open(stored, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(stored, "wb").write(bytes(raw))
    again = _pairs(stsb_dev_small, tiny_model_dir, cache=cache, results=results)
    assert again["results_store"]["hit"] is False and "missing or changed" in caplog.text
    assert again["metrics"] == first["metrics"]
    assert _pairs(stsb_dev_small, tiny_model_dir, cache=cache, results=results)["results_store"][
        "hit"
    ]


def test_an_entry_answers_only_its_own_identity(tmp_path):
    store = ResultsStore(tmp_path / "r")
    per_item = tmp_path / "x.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pair": [0, 1]}), per_item)
    from evalkit.jobs.results import file_digest

    info = {"path": str(per_item), "blake2b": file_digest(per_item), "rows": 2}
    identity = {"model": "a", "data": "d"}
    record = store.put(identity, {"metrics": {"m": 1.0}}, info)
    assert store.get(identity)["result"]["metrics"] == {"m": 1.0}
    other = {"model": "b", "data": "d"}
    from evalkit.jobs.results import digest_key

    # a copy of the entry under another key's name does not answer that key
    key_b = digest_key(other)
    target = tmp_path / "r" / key_b[:2]
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(
        tmp_path / "r" / record["key"][:2] / f"{record['key']}.json", target / f"{key_b}.json"
    )
    shutil.copy(record["per_query"]["path"], target / f"{key_b}.parquet")
    assert store.get(other) is None


def test_per_item_files_hold_the_values_behind_the_metrics(
    stsb_dev_small, scifact_small, tiny_model_dir, tmp_path
):
    pairs = _pairs(stsb_dev_small, tiny_model_dir, out=tmp_path / "p", plots=False)
    table = read_table(pairs["per_query"])
    assert table.num_rows == 200 and table.column("pair").to_pylist() == list(range(200))
    gold = [float(line.rsplit(",", 1)[1]) for line in stsb_dev_small.read_text().splitlines()]
    assert table.column("label").to_pylist() == gold
    for score in ("cosine", "dot", "euclidean", "manhattan"):
        x = table.column(score).to_numpy()
        rho = ss.spearmanr(x, gold).statistic
        assert pairs["metrics"][f"spearman_{score}"] == pytest.approx(rho, abs=1e-9)
    folder = scifact_small[0]
    result = evaluate_retrieval(
        folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels.tsv",
        model=tiny_model_dir, dialect="trec_eval", out=tmp_path / "r", progress=False, plots=False,
    )  # fmt: skip
    table = read_table(result["per_query"])
    assert sorted(table.column("query_id").to_pylist()) == sorted(scifact_small[3])
    for key, value in result["metrics"].items():
        assert float(np.mean(table.column(key).to_numpy())) == pytest.approx(value, abs=1e-12)


def test_a_stale_memoised_fingerprint_never_keys_a_result(stsb_dev_small, tiny_model_dir, tmp_path):
    """A fingerprint memo entry that lies (as after a fingerprint scheme change) must not become
    the key of a result computed with the real weights: the result is keyed by the fingerprint
    confirmed on the loaded model."""
    from evalkit.embed import memo
    from evalkit.embed.encoder import StreamingEncoder

    cache, results = tmp_path / "cache", tmp_path / "results"
    encoder = StreamingEncoder(str(tiny_model_dir), store=cache)
    memo.remember(encoder._memo_key, "0" * 32)
    assert StreamingEncoder(str(tiny_model_dir), store=cache).known_fingerprint == "0" * 32
    result = _pairs(stsb_dev_small, tiny_model_dir, cache=cache, results=results)
    assert result["model"]["fingerprint"] != "0" * 32
    stored = list(results.rglob("*.json"))
    assert len(stored) == 1
    assert json.loads(stored[0].read_text())["identity"]["model"] == result["model"]["fingerprint"]
    again = _pairs(stsb_dev_small, tiny_model_dir, cache=cache, results=results)
    assert again["results_store"]["hit"] is True  # the memo now holds the confirmed fingerprint
