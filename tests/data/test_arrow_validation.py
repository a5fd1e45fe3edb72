"""Arrow IPC files whose offsets are corrupt (header intact, so cheap validation passes) are
refused at the door by every reader, never read out of bounds.

Before: `evaluate` segfaulted on such a file, `convert` copied the corruption into a new file
with exit 0, and `PairDataset` served '' (or neighbouring bytes) for the damaged row."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from evalkit.data.convert import convert
from evalkit.data.dataset import ArrowDataset, PairDataset
from evalkit.data.readers import iter_batches, open_ipc
from evalkit.errors import DataError

N = 1000


def _texts(prefix: str) -> list[str]:
    return [f"{prefix} text {i}" for i in range(N)]


def corrupt_arrow(path, *, stream: bool = False, bad_slot: int = 500):
    """An IPC file (or stream) of 2 text columns + score, whose sentence1 offset at `bad_slot`
    points 2 GB past its data buffer. `Table.validate()` (cheap) still passes."""
    table = pa.table(
        {"sentence1": _texts("left"), "sentence2": _texts("right"), "score": np.linspace(0, 5, N)}
    )
    with pa.OSFile(str(path), "wb") as sink:
        new = pa.ipc.new_stream if stream else pa.ipc.new_file
        with new(sink, table.schema) as writer:
            writer.write_table(table)
    data = bytearray(path.read_bytes())
    offsets = np.cumsum([0] + [len(t.encode()) for t in _texts("left")]).astype(np.int32)
    at = bytes(data).find(offsets[:16].tobytes())
    assert at > 0
    offsets[bad_slot] = 2_000_000_000
    data[at : at + offsets.nbytes] = offsets.tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(params=["file", "stream"])
def corrupt(tmp_path, request):
    path = corrupt_arrow(tmp_path / "corrupt.arrow", stream=request.param == "stream")
    # the damage is invisible to cheap validation: only full validation sees it
    reader = pa.ipc.open_file if request.param == "file" else pa.ipc.open_stream
    table = reader(pa.memory_map(str(path))).read_all()
    table.validate()
    with pytest.raises(pa.ArrowInvalid, match="out of bounds"):
        table.validate(full=True)
    return path


@pytest.mark.parametrize(
    "options",
    [{}, {"filter": "score > 1"}, {"columns": ["sentence1", "score"]}, {"batch_size": 7}],
)
def test_iter_batches_refuses_corrupt_offsets(corrupt, options):
    """Before: batches were handed on; reading sentence1's texts segfaulted."""
    with pytest.raises(DataError, match=r"corrupt\.arrow is a corrupt Arrow file.*out of bounds"):
        for _ in iter_batches(corrupt, **options):
            pass


def test_columns_not_read_are_not_blamed(corrupt):
    rows = sum(b.num_rows for b in iter_batches(corrupt, columns=["sentence2", "score"]))
    assert rows == N


def test_convert_refuses_instead_of_copying_the_corruption(corrupt, tmp_path):
    """Before: convert wrote a 'valid-looking' copy with exit 0."""
    dest = tmp_path / "copy.arrow"
    with pytest.raises(DataError, match="corrupt Arrow file"):
        convert(corrupt, dest, progress=False)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt.arrow"]


def test_open_ipc_and_mapped_datasets_refuse_at_open(corrupt):
    """Before: PairDataset served '' for row 500 and open_ipc returned the damaged table."""
    with pytest.raises(DataError, match=r"corrupt Arrow file: column .sentence1.*out of bounds"):
        open_ipc(corrupt)
    with pytest.raises(DataError, match=r"corrupt Arrow file: column 'sentence1'.*out of bounds"):
        PairDataset(corrupt, ["sentence1", "sentence2"], "score")
    with pytest.raises(DataError, match="column 'sentence1'"):
        ArrowDataset(corrupt, ["sentence2"])  # the file is refused as a whole


def test_evaluate_reports_one_line_instead_of_segfaulting(tmp_path):
    """The CLI in a fresh process: before, it died with SIGSEGV (exit -11)."""
    path = corrupt_arrow(tmp_path / "corrupt.arrow")
    argv = ["evaluate", "pairs", str(path), "--left", "sentence1", "--right", "sentence2"]
    argv += ["--label", "score", "--model", str(tmp_path / "no-model"), "--no-cache", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "evalkit", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "corrupt Arrow file" in proc.stderr
