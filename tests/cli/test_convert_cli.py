"""`evalkit convert`: flags map onto evalkit.data.readers.convert, results print as a summary or JSON,
and bad input exits non-zero with one line."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evalkit.cli import main
from evalkit.data.readers import open_ipc


@pytest.fixture
def pairs(tmp_path):
    t = pa.table(
        {
            "sentence1": ["a", "b", None, "d"],
            "sentence2": ["w", "x", "y", "z"],
            "score": [0.5, 2.5, 3.0, 4.5],
        }
    )
    path = tmp_path / "pairs.parquet"
    pq.write_table(t, path)
    return path


def test_must_show_stsb_to_pair_dataset(tmp_path, shared_data, capsys):
    src = shared_data / "stsb" / "stsb-en-test.csv"
    out = tmp_path / "OUT.arrow"
    code = main(["convert", str(src), str(out), "--column-names", "sentence1,sentence2,score"])
    assert code == 0
    assert "wrote 1,379 rows x 3 columns (sentence1, sentence2, score)" in capsys.readouterr().out
    with open(src, newline="", encoding="utf-8") as fh:
        first = next(csv.reader(fh))
    from evalkit.data.dataset import PairDataset

    data = PairDataset(out, ["sentence1", "sentence2"], "score", as_dict=True)
    assert len(data) == 1379
    item = data[0]
    assert [item["sentence1"], item["sentence2"], float(item["score"])] == [
        first[0],
        first[1],
        float(first[2]),
    ]


def test_mrpc_no_quoting(tmp_path, shared_data, capsys):
    src = shared_data / "mrpc" / "msr_paraphrase_test.txt"
    out = tmp_path / "mrpc.arrow"
    argv = ["convert", str(src), str(out), "--no-quoting", "--json", "--no-progress"]
    argv += ["--columns", "#1 String,#2 String,Quality", "--rename", "#1 String:s1,#2 String:s2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 1725 and result["columns"] == ["s1", "s2", "Quality"]
    assert open_ipc(out).num_rows == 1725


def test_filter_rename_on_null_and_json(tmp_path, pairs, capsys):
    out = tmp_path / "o.arrow"
    argv = ["convert", str(pairs), str(out), "--filter", "score >= 1", "--filter", "score != 4.5"]
    argv += ["--rename", "score:label", "--on-null", "empty", "--json", "--batch-size", "1"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 2 and result["dest"] == str(out) and result["bytes"] > 0
    assert open_ipc(out).to_pydict() == {
        "sentence1": ["b", ""],
        "sentence2": ["x", "y"],
        "label": [2.5, 3.0],
    }
    assert main(["convert", str(pairs), str(out), "--on-null", "skip", "--stream"]) == 0
    assert open_ipc(out).column("sentence1").to_pylist() == ["a", "b", "d"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--columns", "sentence3"], "column 'sentence3' not in"),
        (["--on-null", "error"], "row 2 of .* column 'sentence1' is null"),
        (["--filter", "score ~ 3"], "cannot parse filter"),
        (["--rename", "score"], "--rename takes OLD:NEW"),
        (["--text-columns", "score", "--on-null", "skip"], "holds double, not text"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path, pairs, capsys, extra, message):
    out = tmp_path / "o.arrow"
    assert main(["convert", str(pairs), str(out), "--no-progress", *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("evalkit convert: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]


def test_missing_file_and_corrupt_file(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.parquet"), str(tmp_path / "o.arrow")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"ARROW1\x00\x00garbage")
    assert main(["convert", str(bad), str(tmp_path / "o.arrow")]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err


def test_several_sources_and_help(tmp_path, pairs):
    out = tmp_path / "two.arrow"
    assert main(["convert", str(pairs), str(pairs), str(out), "--no-progress"]) == 0
    assert open_ipc(out).num_rows == 8
    done = subprocess.run(
        [sys.executable, "-m", "evalkit", "convert", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "--on-null" in done.stdout and "default: keep" in done.stdout
    probe = "import sys, evalkit.cli.convert; print('pyarrow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "False"  # the CLI module stays cheap to import
