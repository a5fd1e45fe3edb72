"""A precompute job killed mid-shard resumes from the finished windows of its temp file.

The core claim: the output after a kill -9 and a rerun equals an uninterrupted run's byte for
byte (float32 and float16), while every recovered window is checked (journal line whole, bytes
matching their checksum, ids and keys equal to the input's) and the first one that fails is
encoded again, with everything after it. Most tests stop the job in-process after N windows and
leave its files as a kill would (owned by a pid that no longer runs); one kills a subprocess
with SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from evalkit.cli.encode import summary
from evalkit.embed.shards import load_manifest, stable_manifest
from evalkit.jobs import _partial
from evalkit.jobs.precompute import run_precompute

ROOT = Path(__file__).resolve().parents[2]
ROWS, PER_SHARD, WINDOW = 400, 200, 50  # 2 shards of 4 windows
SHARD_1 = "embeddings-000000000000-000000000200.arrow"
WORDS = "river stone light music paper garden window silver market winter forest engine".split()


class _Killed(BaseException):
    """Raised by the test hook where the process would die."""


def _write_corpus(path: Path, edit: dict | None = None) -> Path:
    rng = random.Random(0)
    texts = [" ".join([f"{i:04d}", *rng.choices(WORDS, k=rng.randint(2, 14))]) for i in range(ROWS)]
    texts[7] = texts[300]  # a repeat across shards, and one inside a window
    texts[8] = texts[9]
    for row, text in (edit or {}).items():
        texts[row] = text
    rows = [{"gid": f"g{i}", "text": t} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(corpus: Path, out: Path, model, dtype: str = "float32", **kw) -> dict:
    return run_precompute(corpus, column="text", id_column="gid", out=out, model=str(model),
                          cache=False, dtype=dtype, batch_size=16, rows_per_shard=PER_SHARD,
                          progress=False, **kw)  # fmt: skip


def _outputs(out: Path) -> dict:
    """Every shard file and the manifest without its run log (what must be byte-identical)."""
    files = {p.name: p.read_bytes() for p in sorted(out.glob("embeddings-*.arrow"))}
    return {**files, "manifest": json.dumps(stable_manifest(load_manifest(out)), sort_keys=True)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("partial") / "corpus.jsonl")


@pytest.fixture(scope="module")
def reference(corpus, tiny_model_dir, tmp_path_factory) -> dict:
    """The uninterrupted run's outputs, by dtype."""
    tmp = tmp_path_factory.mktemp("reference")
    outputs = {}
    for dtype in ("float32", "float16"):
        _run(corpus, tmp / dtype, tiny_model_dir, dtype)
        outputs[dtype] = _outputs(tmp / dtype)
    return outputs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _interrupt(monkeypatch, corpus, out, model, after: int, dtype: str = "float32") -> None:
    """Run the job until `after` windows are written, then leave its files as a kill -9 would,
    owned by a pid that no longer runs."""
    calls = [0]
    write = _partial.ShardFile.write

    def counted(self, batch):
        write(self, batch)
        calls[0] += 1
        if calls[0] == after:
            raise _Killed

    with monkeypatch.context() as m:
        m.setattr(_partial.ShardFile, "write", counted)
        m.setattr(_partial.ShardFile, "abort", lambda self, keep=False: None)
        with pytest.raises(_Killed):
            _run(corpus, out, model, dtype)
    dead = _dead_pid()
    for path in out.glob(f".*-{os.getpid()}"):
        path.rename(path.with_name(f"{path.name.rsplit('-', 1)[0]}-{dead}"))


def _partial_files(out: Path) -> tuple[Path, Path]:
    (tmp,) = out.glob(f".{SHARD_1}.tmp-*")
    (journal,) = out.glob(f".{SHARD_1}.journal-*")
    return tmp, journal


def _ends(journal: Path) -> list[int]:
    """The temp file's size after each journaled window."""
    return [int(line.split()[1]) for line in journal.read_text().splitlines()[1:]]


def _resume(corpus, out, model, dtype="float32") -> dict:
    manifest = _run(corpus, out, model, dtype)
    assert not list(out.glob(".*-*")), "a temp file or journal was left behind"
    return manifest


RUNNER = """
import os, signal, sys
from evalkit.jobs import _partial
from evalkit.jobs.precompute import run_precompute

data, out, model, dtype, kill_at, how = sys.argv[1:7]
write, calls = _partial.ShardFile.write, [0]


def dying_write(self, batch):
    calls[0] += 1
    if calls[0] == int(kill_at) and how == "torn":  # half a batch in the file, no journal line
        data = batch.serialize()
        self._fh.write(data.to_pybytes()[: data.size // 2])
        self._fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, batch)
    if calls[0] == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


_partial.ShardFile.write = dying_write
run_precompute(data, column="text", id_column="gid", out=out, model=model, cache=False,
               dtype=dtype, batch_size=16, rows_per_shard=200, progress=False)
"""


@pytest.mark.parametrize(
    ("dtype", "how", "resumed"), [("float32", "after", 100), ("float16", "torn", 50)]
)
def test_sigkill_mid_shard_resumes_to_the_uninterrupted_bytes(
    corpus, tiny_model_dir, reference, tmp_path, dtype, how, resumed
):
    """Guards against: a resumed shard that differs in any byte from an uninterrupted run (windows
    cut elsewhere after the resume point, a recovered batch serialised differently, its input
    rows missing from the shard's input digest), a torn last batch being read, and finished
    windows of a killed job being thrown away (the whole shard encoded again)."""
    out = tmp_path / "out"
    script = tmp_path / "job.py"
    script.write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")  # same threads: same bits
    args = [
        sys.executable,
        str(script),
        str(corpus),
        str(out),
        str(tiny_model_dir),
        dtype,
        "6",
        how,
    ]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(load_manifest(out)["shards"]) == 1  # killed inside shard 2, after 2 of its windows
    manifest = _resume(corpus, out, tiny_model_dir, dtype)
    assert _outputs(out) == reference[dtype]
    run = manifest["last_run"]
    assert run["resumed_rows"] == resumed and run["rows"] == PER_SHARD - resumed
    assert manifest["runs"][-1]["resumed_rows"] == resumed
    assert f"{resumed} rows resumed from a killed run" in summary(manifest)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torn_journal_line_loses_that_window_only(
    corpus, tiny_model_dir, reference, tmp_path, monkeypatch, caplog, dtype
):
    """Guards against: a half-written journal line being trusted (its window's bytes were not
    known durable), or making the whole partial unusable."""
    out = tmp_path / "out"
    _interrupt(monkeypatch, corpus, out, tiny_model_dir, after=3, dtype=dtype)
    _, journal = _partial_files(out)
    text = journal.read_bytes()
    journal.write_bytes(text[: len(text) - 20])  # the third line, torn
    with caplog.at_level(logging.WARNING):
        manifest = _resume(corpus, out, tiny_model_dir, dtype)
    assert manifest["last_run"]["resumed_rows"] == 2 * WINDOW
    assert _outputs(out) == reference[dtype]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a kill's normal trace


def test_temp_file_cut_inside_a_journaled_window(
    corpus, tiny_model_dir, reference, tmp_path, monkeypatch, caplog
):
    """Guards against: reading a batch past the end of a damaged temp file, or dropping the
    windows before the damage."""
    out = tmp_path / "out"
    _interrupt(monkeypatch, corpus, out, tiny_model_dir, after=3)
    tmp, journal = _partial_files(out)
    ends = _ends(journal)
    os.truncate(tmp, (ends[1] + ends[2]) // 2)
    with caplog.at_level(logging.WARNING):
        manifest = _resume(corpus, out, tiny_model_dir)
    assert manifest["last_run"]["resumed_rows"] == 2 * WINDOW
    assert _outputs(out) == reference["float32"]
    assert f"{SHARD_1}: recovered 100 rows" in caplog.text and "ends inside window 2" in caplog.text


def test_flipped_byte_in_a_recovered_embedding(
    corpus, tiny_model_dir, reference, tmp_path, monkeypatch, caplog
):
    """Guards against: a corrupted vector in a killed run's temp file being copied into the
    shard (and later served as the vector of its text). The checksum catches it; that window
    and the later ones are encoded again."""
    out = tmp_path / "out"
    _interrupt(monkeypatch, corpus, out, tiny_model_dir, after=3)
    tmp, journal = _partial_files(out)
    data = bytearray(tmp.read_bytes())
    data[_ends(journal)[1] - 100] ^= 0x01  # inside window 1's embedding values (the last buffer)
    tmp.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        manifest = _resume(corpus, out, tiny_model_dir)
    assert manifest["last_run"]["resumed_rows"] == WINDOW
    assert _outputs(out) == reference["float32"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        len(warnings) == 1
        and SHARD_1 in warnings[0]
        and "window 1 does not match its checksum" in warnings[0]
    )


def test_input_edited_between_kill_and_rerun(corpus, tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Guards against: a recovered vector kept for a text that changed since it was encoded (a
    stale vector served under the new text's id). The key check stops the recovery at the edited
    window; the shard and its input digest are those of a fresh run on the edited input."""
    out, edited = tmp_path / "out", tmp_path / "edited.jsonl"
    edited.write_bytes(corpus.read_bytes())
    _interrupt(monkeypatch, edited, out, tiny_model_dir, after=3)
    _write_corpus(edited, edit={120: "a completely different text"})  # window 2
    with caplog.at_level(logging.WARNING):
        manifest = _resume(edited, out, tiny_model_dir)
    assert manifest["last_run"]["resumed_rows"] == 2 * WINDOW
    assert "window at row 100: its keys are not this model's keys" in caplog.text
    fresh = tmp_path / "fresh"
    _run(edited, fresh, tiny_model_dir)
    assert _outputs(out) == _outputs(fresh)
    assert (
        manifest["shards"][0]["input_xxh128"] == load_manifest(fresh)["shards"][0]["input_xxh128"]
    )


def test_a_live_writers_files_are_never_touched(
    corpus, tiny_model_dir, reference, tmp_path, monkeypatch
):
    """Guards against: a job reading or deleting the temp file of a writer that still runs
    (another job on the same folder), which would corrupt that writer's shard."""
    out = tmp_path / "out"
    _interrupt(monkeypatch, corpus, out, tiny_model_dir, after=3)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        before = {}
        for path in _partial_files(out):
            moved = path.with_name(f"{path.name.rsplit('-', 1)[0]}-{live.pid}")
            path.rename(moved)
            before[moved] = moved.read_bytes()
        manifest = _run(corpus, out, tiny_model_dir)
        assert manifest["last_run"]["resumed_rows"] == 0
        assert {p: p.read_bytes() for p in before} == before
        for path in before:
            path.unlink()
        assert _outputs(out) == reference["float32"]
    finally:
        live.kill()
        live.wait()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from conftest import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("other-model"), seed=1)


@pytest.mark.parametrize("forge_header", [False, True])
def test_partial_of_another_model_is_encoded_again(
    corpus, tiny_model_dir, other_model, tmp_path, monkeypatch, caplog, forge_header
):
    """Guards against: vectors of another model recovered into this model's shard. The journal
    header names the fingerprint; with a header forged to this model's, the keys (made from the
    fingerprint and the text) still differ and nothing is recovered."""
    out = tmp_path / "out"
    _interrupt(monkeypatch, corpus, out, tiny_model_dir, after=3)
    if forge_header:
        ours = _run(corpus, tmp_path / "fresh", other_model)["model_fingerprint"]
        _, journal = _partial_files(out)
        head, rest = journal.read_bytes().split(b"\n", 1)
        header = {**json.loads(head), "fingerprint": ours}
        journal.write_bytes(json.dumps(header, sort_keys=True).encode() + b"\n" + rest)
    with caplog.at_level(logging.WARNING):
        manifest = _resume(corpus, out, other_model)
    assert manifest["last_run"]["resumed_rows"] == 0
    why = "keys are not this model's" if forge_header else "other settings (fingerprint)"
    assert why in caplog.text
    fresh = tmp_path / "fresh2"
    _run(corpus, fresh, other_model)
    assert _outputs(out) == _outputs(fresh)


def test_workers_resume_a_partial(corpus, tiny_model_dir, reference, tmp_path, monkeypatch):
    """Guards against: `--workers N` ignoring (or mis-reading) a killed run's partial shard;
    it runs the same writer and must give the same bytes and report the resumed rows."""
    from evalkit.jobs.precompute_workers import run_precompute_workers

    out = tmp_path / "out"
    _interrupt(monkeypatch, corpus, out, tiny_model_dir, after=3)
    manifest = run_precompute_workers(corpus, column="text", id_column="gid", out=out, workers=1,
                                      model=str(tiny_model_dir), cache=False, batch_size=16,
                                      rows_per_shard=PER_SHARD, progress=False)  # fmt: skip
    assert manifest["last_run"]["resumed_rows"] == 3 * WINDOW
    assert manifest["last_run"]["rows"] == ROWS - 3 * WINDOW
    assert _outputs(out) == reference["float32"]
    assert not list(out.glob(".*-*"))


def test_ctrl_c_keeps_the_partial_for_the_next_process(
    corpus, tiny_model_dir, reference, tmp_path, monkeypatch
):
    """Guards against: Ctrl-C throwing away the finished windows (the common way a long job is
    stopped), and a rerun in the same process tripping over its own kept files."""
    out = tmp_path / "out"
    calls = [0]
    write = _partial.ShardFile.write

    def interrupted(self, batch):
        write(self, batch)
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_partial.ShardFile, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _run(corpus, out, tiny_model_dir)
    kept = sorted(out.glob(f".{SHARD_1}.*-{os.getpid()}"))
    assert len(kept) == 2  # temp file and journal, owned by this (live) process
    again = tmp_path / "again"  # the same process again: its own files are overwritten
    again.mkdir()
    for path in kept:
        (again / path.name).write_bytes(path.read_bytes())
    assert _resume(corpus, again, tiny_model_dir)["last_run"]["resumed_rows"] == 0
    assert _outputs(again) == reference["float32"]
    dead = _dead_pid()  # a later process: the files' writer is gone
    for path in kept:
        path.rename(path.with_name(f"{path.name.rsplit('-', 1)[0]}-{dead}"))
    assert _resume(corpus, out, tiny_model_dir)["last_run"]["resumed_rows"] == 3 * WINDOW
    assert _outputs(out) == reference["float32"]


def test_every_window_journaled_but_not_renamed(
    corpus, tiny_model_dir, reference, tmp_path, monkeypatch
):
    """Guards against: a shard whose windows were all finished (killed before its footer and
    rename) being encoded again, or the encoder failing on an empty rest."""
    out = tmp_path / "out"
    _interrupt(monkeypatch, corpus, out, tiny_model_dir, after=PER_SHARD // WINDOW)
    assert not (out / SHARD_1).exists()
    manifest = _resume(corpus, out, tiny_model_dir)
    assert manifest["last_run"]["resumed_rows"] == PER_SHARD
    assert manifest["last_run"]["rows"] == ROWS - PER_SHARD
    assert _outputs(out) == reference["float32"]


def test_killed_after_the_rename_before_the_manifest(
    corpus, tiny_model_dir, reference, tmp_path, monkeypatch
):
    """Guards against: a shard renamed into place but not yet listed in the manifest (a kill
    between the two) being encoded again from its first row: its journal outlives the rename, so
    the rerun resumes every window from the renamed file."""
    out = tmp_path / "out"
    finish = _partial.ShardFile.finish

    def dying_finish(self, final):
        finish(self, final)
        raise _Killed  # the process dies before the manifest is rewritten

    with monkeypatch.context() as m:
        m.setattr(_partial.ShardFile, "finish", dying_finish)
        m.setattr(_partial.ShardFile, "abort", lambda self, keep=False: None)  # no cleanup: a kill
        with pytest.raises(_Killed):
            _run(corpus, out, tiny_model_dir)
    assert (out / SHARD_1).exists() and not list(out.glob(f".{SHARD_1}.tmp-*"))
    listed = load_manifest(out)["shards"] if (out / "manifest.json").exists() else []
    assert not listed, "the manifest lists no shard yet"
    dead = _dead_pid()
    for path in out.glob(f".*-{os.getpid()}"):
        path.rename(path.with_name(f"{path.name.rsplit('-', 1)[0]}-{dead}"))
    manifest = _resume(corpus, out, tiny_model_dir)
    assert manifest["last_run"]["resumed_rows"] == PER_SHARD
    assert _outputs(out) == reference["float32"]


def test_a_listed_shard_leaves_no_journal(corpus, tiny_model_dir, tmp_path):
    """Guards against: journals piling up beside finished shards (the manifest lists them, so
    they are deleted), while a journal beside a live writer's temp file is never touched."""
    out = tmp_path / "out"
    _run(corpus, out, tiny_model_dir)
    assert not list(out.glob(".*journal-*"))
    live = out / f".{SHARD_1}.journal-{os.getpid()}"
    live.write_text("{}\n")
    (out / f".{SHARD_1}.tmp-{os.getpid()}").write_bytes(b"")
    _partial.forget(out, SHARD_1)
    assert live.exists()
