"""`evalkit cache info|check|clear`: what the store holds per model (with the library versions
and device of its first write), checks that exit non-zero on damage, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalkit.cli import main
from evalkit.embed.store import EmbeddingStore, make_keys

META = {"torch": "2.13.0", "transformers": "5.0", "sentence-transformers": "6.0", "device": "cpu"}


@pytest.fixture
def store_dir(tmp_path):
    store = EmbeddingStore(tmp_path / "s")
    vecs = np.random.default_rng(0).standard_normal((30, 12)).astype(np.float32)
    store.put_many(make_keys("fp-a", [f"t{i}" for i in range(30)]), vecs, model="fp-a", meta=META)
    store.close()
    return tmp_path / "s"


def test_info_shows_entries_versions_and_device(store_dir, capsys):
    assert main(["cache", "info", "--cache", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "store format 2): 30 entries" in out and "fp-a" in out and "dim 12 float32" in out
    assert "first written on cpu with" in out and "torch 2.13.0" in out
    assert "sentence-transformers 6.0" in out
    assert main(["cache", "info", "--json", "--cache", str(store_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["models"]["fp-a"]["meta"] == META and info["entries"] == 30


def test_check_exits_non_zero_on_damage_and_fix_repairs(store_dir, capsys):
    """Guards against: `cache check` passing a store whose vector bytes were overwritten."""
    assert main(["cache", "check", "--cache", str(store_dir)]) == 0
    assert "ok (30 entries)" in capsys.readouterr().out
    seg = next((store_dir / "segments").glob("*.eks"))
    data = bytearray(seg.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 100] = bytes(100)
    seg.write_bytes(bytes(data))
    assert main(["cache", "check", "--cache", str(store_dir)]) == 1
    assert "fail their checksum" in capsys.readouterr().out
    assert main(["cache", "check", "--fix", "--cache", str(store_dir)]) == 0
    assert "(fixed)" in capsys.readouterr().out
    assert main(["cache", "check", "--json", "--cache", str(store_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []


def test_clear_and_errors_are_one_line(store_dir, tmp_path, capsys):
    assert main(["cache", "clear", "--model", "nope", "--cache", str(store_dir)]) == 1
    assert "no entries for model fingerprint nope" in capsys.readouterr().err
    assert main(["cache", "info", "--cache", str(tmp_path / "missing")]) == 1
    assert "no embedding store" in capsys.readouterr().err
    assert main(["cache", "clear", "--model", "fp-a", "--cache", str(store_dir)]) == 0
    assert "removed 30 entries of model fp-a" in capsys.readouterr().out
    assert not list((store_dir / "segments").glob("*.eks"))
