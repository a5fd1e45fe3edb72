"""Data fingerprints: equal for the same bytes wherever the file lives, different after an edit."""

from __future__ import annotations

import shutil

import pytest

from evalkit.data.fingerprint import data_fingerprint
from evalkit.errors import DataError


def test_data_fingerprint(tmp_path, shared_data):
    src = shared_data / "stsb" / "stsb-en-dev.csv"
    a = tmp_path / src.name
    shutil.copy(src, a)
    fp = data_fingerprint(a)
    assert fp == data_fingerprint(src)  # same name and bytes; mtime/location do not matter
    assert data_fingerprint(a, content=True) == data_fingerprint(src, content=True)
    assert data_fingerprint(a, content=True) != fp
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 1
    a.write_bytes(bytes(data))
    assert data_fingerprint(a, content=True) != data_fingerprint(src, content=True)
    assert data_fingerprint(tmp_path) != data_fingerprint(shared_data / "stsb")
    assert data_fingerprint([src]) == data_fingerprint(src)
    with pytest.raises(DataError, match="does not exist"):
        data_fingerprint(tmp_path / "missing.csv")


def test_data_fingerprint_samples_large_files(tmp_path):
    big = tmp_path / "big.bin"
    payload = bytearray(b"x" * (4 << 20))
    big.write_bytes(bytes(payload))
    sampled = data_fingerprint(big)
    payload[0] = ord("y")  # the head block is always sampled
    big.write_bytes(bytes(payload))
    assert data_fingerprint(big) != sampled


def test_data_fingerprint_of_a_table():
    import pyarrow as pa

    t = pa.table({"text": ["a", "b"]})
    assert data_fingerprint(t) == data_fingerprint(pa.table({"text": ["a", "b"]}))
    assert data_fingerprint(t) != data_fingerprint(pa.table({"text": ["a", "c"]}))
