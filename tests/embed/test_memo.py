"""The fingerprint memo key: any changed byte of a model folder gives another key (an edited
checkpoint is never served with an old fingerprint), identical bytes elsewhere give the same key
(a copy such as best/ is recognised), and encode settings are part of it."""

from __future__ import annotations

import shutil

from evalkit.embed import memo


def test_memo_key_follows_the_folder_bytes(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    (a / "sub" / "config.json").write_text('{"x": 1}')
    key = memo.memo_key(str(a), {"precision": "float32"})
    shutil.copytree(a, tmp_path / "copy")
    assert memo.memo_key(str(tmp_path / "copy"), {"precision": "float32"}) == key
    assert memo.memo_key(str(a), {"precision": "float16"}) != key
    raw = bytearray((a / "weights.bin").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (a / "weights.bin").write_bytes(bytes(raw))
    assert memo.memo_key(str(a), {"precision": "float32"}) != key
    (tmp_path / "copy" / "sub" / "config.json").rename(tmp_path / "copy" / "config.json")
    assert memo.memo_key(str(tmp_path / "copy"), {"precision": "float32"}) != key  # names count
