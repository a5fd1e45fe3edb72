"""No plausible number from meaningless input, and no `NaN` in any JSON evalkit writes.

Guards against: an `inf` gold score giving pearson 1.0 with exit 0; a single-class
classification set reporting accuracy 1.0 and `roc_auc: NaN` (invalid JSON that strict parsers
reject); undefined metrics written as NaN; relevant documents missing from the corpus silently
lowering recall."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evalkit import _io
from evalkit.cli import main as cli_main
from evalkit.data.pairs import iter_pair_batches
from evalkit.errors import DataError, EvalkitError
from evalkit.jobs.evaluate import evaluate_pairs, evaluate_retrieval
from evalkit.metrics import SimilarityMetrics


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as RFC 8259 parsers (JavaScript, Go, jq) do."""

    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _pairs_file(tmp_path, left, right, gold, name="pairs.parquet"):
    path = tmp_path / name
    pq.write_table(pa.table({"a": left, "b": right, "score": gold}), path)
    return path


# ------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_labels_are_refused_with_file_and_row(tmp_path, bad):
    """Before: an inf gold score made pearson 1.0 (exit 0)."""
    gold = [1.0, 2.0, 3.0, bad, 4.0]
    path = _pairs_file(tmp_path, list("abcde"), list("vwxyz"), gold)
    with pytest.raises(DataError, match=rf"pairs\.parquet: row 3 has label 'score' = {bad}"):
        list(iter_pair_batches(path, left="a", right="b", label="score", batch_size=2))


def test_similarity_metric_refuses_infinite_gold():
    """The library entry point refuses what the file reader refuses."""
    with pytest.raises(EvalkitError, match="gold contains inf at row 1"):
        SimilarityMetrics().update({"cosine": np.zeros(3)}, [1.0, np.inf, 2.0])
    with pytest.raises(EvalkitError, match=r"scores\['cosine'\] contains -inf at row 2"):
        SimilarityMetrics().update({"cosine": np.array([0.1, 0.2, -np.inf])}, [1.0, 2.0, 3.0])


def test_inf_label_is_reported_before_the_model_loads(tmp_path, capsys):
    """The data error is the one reported: the model path would not even load."""
    path = _pairs_file(tmp_path, ["x", "y"], ["p", "q"], [1.0, np.inf])
    argv = ["evaluate", "pairs", str(path), "--left", "a", "--right", "b", "--label", "score"]
    argv += ["--model", str(tmp_path / "missing-model"), "--no-cache", "--quiet"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 1 has label 'score' = inf" in err


def test_single_class_and_constant_gold_are_refused(tmp_path, tiny_model_dir):
    """Before: one class gave accuracy 1.0, AP 1.0 and roc_auc NaN, with exit 0."""
    path = _pairs_file(tmp_path, ["a", "b", "c"], ["d", "e", "f"], [1.0, 1.0, 1.0])
    with pytest.raises(DataError, match="all 3 pairs have label 1; classification metrics need"):
        evaluate_pairs(path, left="a", right="b", label="score", task="classification",
                       model=tiny_model_dir, cache=False, progress=False)  # fmt: skip
    with pytest.raises(DataError, match="all 3 pairs have gold score 1; a correlation"):
        evaluate_pairs(path, left="a", right="b", label="score", model=tiny_model_dir,
                       cache=False, progress=False)  # fmt: skip


def test_undefined_metric_is_null_in_every_output(tmp_path, tiny_model_dir, capsys, caplog):
    """Identical texts on both sides give every pair cosine 1.0: Pearson is undefined. Before, it
    was written as NaN, which strict JSON parsers reject; now null, with a warning."""
    path = _pairs_file(tmp_path, ["same"] * 4, ["same"] * 4, [0.0, 1.0, 2.0, 3.0])
    out = tmp_path / "out"
    argv = ["evaluate", "pairs", str(path), "--left", "a", "--right", "b", "--label", "score"]
    argv += ["--model", str(tiny_model_dir), "--no-cache", "--quiet", "--no-plots", "--json"]
    with caplog.at_level(logging.WARNING, logger="evalkit"):
        assert cli_main([*argv, "--out", str(out)]) == 0
    printed = strict_loads(capsys.readouterr().out)
    written = strict_loads((out / "metrics.json").read_text())
    assert printed["metrics"]["pearson_cosine"] is None
    assert written["metrics"]["pearson_cosine"] is None
    assert "undefined (written as null)" in caplog.text and "pearson_cosine" in caplog.text


# ---------------------------------------------------------------------------- strict JSON


def test_jsonable_maps_non_finite_to_null():
    obj = {"a": float("nan"), "b": [np.float32("inf"), -np.inf], "c": np.array([1.0, np.nan])}
    assert _io.jsonable(obj) == {"a": None, "b": [None, None], "c": [1.0, None]}
    assert strict_loads(_io.dumps_json(obj)) == {"a": None, "b": [None, None], "c": [1.0, None]}


def _writers(tmp_path):
    """Every JSON writer evalkit has, each given a NaN and an inf; -> (name, path written)."""
    from evalkit.embed.shards import _atomic_write_json
    from evalkit.jobs.report import write_report
    from evalkit.search.index import _write_json
    from evalkit.train.checkpoint import append_log

    value = {"x": float("nan"), "y": np.float64(np.inf), "z": 0.5}
    write_report({"metrics": dict(value), "task": "t"}, tmp_path / "report")
    _atomic_write_json(tmp_path / "manifest.json", dict(value))
    _write_json(tmp_path / "index.json", dict(value))
    append_log(tmp_path / "log.jsonl", {"step": 1, **value})
    _io.write_json_atomic(tmp_path / "result.json", dict(value))
    return [
        tmp_path / "report" / "metrics.json",
        tmp_path / "manifest.json",
        tmp_path / "index.json",
        tmp_path / "log.jsonl",
        tmp_path / "result.json",
    ]


def test_every_json_writer_is_strict(tmp_path):
    """Before: write_json_atomic used allow_nan=True and the others json.dumps' default (NaN)."""
    for path in _writers(tmp_path):
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [None]:
            parsed = strict_loads(line if line is not None else path.read_text())
            found = parsed.get("metrics", parsed)
            assert found["x"] is None and found["y"] is None and found["z"] == 0.5, path


# Modules whose json.dumps only build canonical key strings (compared, hashed), never output.
CANONICAL_ONLY = {"evalkit/embed/memo.py"}


def test_no_json_is_written_outside_the_strict_writer():
    """Every json.dump/json.dumps in evalkit is either _io's strict one, feeds a hash
    (`json.dumps(...).encode()`) or builds a key (CANONICAL_ONLY): a new writer with the default
    allow_nan=True would put NaN in a file or a --json print again."""
    import ast
    from pathlib import Path

    root = Path(_io.__file__).resolve().parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if (path.name == "_io.py" and path.parent == root) or str(
            path.relative_to(root.parent)
        ) in CANONICAL_ONLY:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hashed = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "encode"
        }
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if (
                isinstance(node, ast.Call)
                and isinstance(func, ast.Attribute)
                and func.attr in ("dump", "dumps")
                and getattr(func.value, "id", None) == "json"
                and id(node) not in hashed
            ):
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert offenders == [], f"use evalkit._io.dumps_json / write_json_atomic: {offenders}"


# --------------------------------------------------------------- qrels naming absent docs


def test_qrels_naming_absent_documents_warn_with_count_and_example(
    tmp_path, tiny_model_dir, caplog
):
    """Before: the missing relevant documents silently lowered recall (exit 0, no word)."""
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(5)),
        encoding="utf-8",
    )
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "doc 1"}) + "\n" + json.dumps({"_id": "q2", "text": "x"})
        + "\n",
        encoding="utf-8",
    )  # fmt: skip
    qrels = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tgone-1\t1\nq2\tgone-2\t2\nq2\td3\t0\n"
    (tmp_path / "qrels.tsv").write_text(qrels, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="evalkit"):
        result = evaluate_retrieval(
            tmp_path / "corpus.jsonl", tmp_path / "queries.jsonl", tmp_path / "qrels.tsv",
            model=tiny_model_dir, cache=False, progress=False, k_values=[1, 3],
        )  # fmt: skip
    assert "qrels name 2 relevant document(s) that are not in" in caplog.text
    assert "'gone-1'" in caplog.text and "2 judged queries affected" in caplog.text
    assert result["metrics"]["cosine_recall@3"] <= 0.25  # half of q1's, none of q2's
