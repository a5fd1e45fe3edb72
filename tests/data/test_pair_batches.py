"""Labelled pair batches: exactly `batch_size` rows per batch whatever the source's own chunking,
so the texts encoded together (and the floats of their embeddings) depend only on the rows, not
on whether they came from a CSV block, a Parquet row group or an Arrow copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest

from evalkit.data.pairs import iter_pair_batches
from evalkit.errors import DataError


def _rows(n: int) -> dict:
    return {
        "a": [f"left {i}" for i in range(n)],
        "b": [f"right {i}" for i in range(n)],
        "y": [float(i % 6) for i in range(n)],
    }


@pytest.mark.parametrize("chunk", [1, 3, 7, 25, 100])
@pytest.mark.parametrize("batch", [1, 7, 25, 1000])
def test_batches_have_exact_sizes_whatever_the_chunking(tmp_path, chunk, batch):
    data = _rows(25)
    table = pa.table(data)
    path = tmp_path / "pairs.arrow"
    with pa.ipc.new_file(path, table.schema) as writer:
        for b in table.to_batches(max_chunksize=chunk):
            writer.write_batch(b)
    got = list(iter_pair_batches(path, left="a", right="b", label="y", batch_size=batch))
    sizes = [len(g[0]) for g in got]
    assert sizes == [batch] * (25 // batch) + ([25 % batch] if 25 % batch else [])
    assert [t for g in got for t in g[0]] == data["a"]
    assert [t for g in got for t in g[1]] == data["b"]
    np.testing.assert_array_equal(np.concatenate([g[2] for g in got]), data["y"])


def test_a_null_is_reported_with_its_row(tmp_path):
    data = _rows(10)
    data["b"][7] = None
    path = tmp_path / "pairs.arrow"
    table = pa.table(data)
    with pa.ipc.new_file(path, table.schema) as writer:
        for b in table.to_batches(max_chunksize=3):
            writer.write_batch(b)
    with pytest.raises(DataError, match="row 7 has a null 'b'"):
        list(iter_pair_batches(path, left="a", right="b", label="y", batch_size=4))
