"""A precompute shard's partial file: finished windows made durable, and resumed after a kill.

1. Writing (`ShardFile`): the shard is an Arrow IPC file written to `.{name}.tmp-{pid}`, one
   record batch per encoder window, beside a journal `.{name}.journal-{pid}`: a JSON header line
   (shard rows, window size, model fingerprint, dtype, dim, format), then one line per finished
   window, `"{rows} {end} {xxh3_128}\\n"`: its row count, the temp file's size once its batch is
   written, and a checksum of its id, key and embedding values (`window_checksum`). The batch is
   flushed and fsync'ed before its line is appended (then the line is fsync'ed), so a line never
   names bytes that are not durable. `finish`: footer, fsync, `os.replace` into the shard's name;
   the journal stays until the manifest lists the shard (`forget`), so a kill between the rename
   and the manifest's rewrite still finds every window (in the renamed file).
2. Finding (`resume`): the journals of this shard whose writer is gone (`writer_alive`: its pid
   no longer runs; a live pid's files are never touched) are candidates, each with its temp file,
   or the shard's own file when the temp file was already renamed (the manifest, which is
   rewritten after the rename, does not list it, or the shard would not be written again); the
   one whose journal header matches this run and lists the most rows is read, the files of every
   dead writer of this shard are deleted once the recovered windows are durable in this run's
   temp file.
3. Reading: an Arrow IPC file is 8 bytes of magic, then an IPC stream (schema, batches), then a
   footer; the bytes [8, end of the last journaled window) are read as a stream, batch by batch.
   A window counts while its journal line is whole (ends in a newline, three strict fields), its
   batch decodes, its checksum matches, and it holds exactly `window` rows (or ends the shard).
   A torn last batch lies past the last line and is never read; a torn line is ignored.
4. Checking against the input (`check_window`): the window's input rows are read from the job's
   row cursor; the ids must equal the input's, the keys `make_keys(fingerprint, text)` of the
   input's texts (this proves the vector is this model's for this text), the texts strings, the
   vectors finite, of this dtype and dim. The first window that fails a check (step 3 or 4) ends
   the recovery with one warning naming the shard and the check; it and every later window are
   encoded again, and its input rows (already read) are handed back to be encoded first.
5. The recovered windows are written again, through this run's writer (equal batches serialise
   to equal bytes), and their input rows are fed to the shard's input digest (`consume`).

Why the result is the uninterrupted run's bytes: the encoder cuts windows every `window` texts
from its first one (`_window.windows`), recovered windows end on such a cut, so encoding from the
next row gives the same later windows; and a window's vectors depend only on its texts and the
store as it was when the job started (the job writes the store only at its end).

Remote outputs (s3://) are staged in a fresh local folder per shard and uploaded whole: a killed
writer's staging is not found again, so they are not resumed (the shard is encoded again). A
writer that raises deletes its files, except on KeyboardInterrupt (Ctrl-C): they are kept for a
later process to resume (SIGTERM ends Python without cleanup, like a kill).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.embed.shards import ID_COLUMN, KEY_COLUMN, VECTOR_COLUMN, RowDigest

logger = logging.getLogger(__name__)
_LINE = re.compile(rb"(\d{1,12}) (\d{1,15}) ([0-9a-f]{32})\n")
_MAGIC = 8  # "ARROW1" + 2 bytes of padding: the IPC stream starts after them
_WINDOWS_PER_SHARD = 4  # windows per shard at least (one read-ahead, dedupe and write unit each)
# At most this many rows per window: a window is what a kill can lose (its journal line is the
# unit of resume), ~30 s of MiniLM on 2 CPU cores for short texts; large enough that
# length-sorted batches of 64-256 pad little and per-window costs stay < 1%.
JOB_WINDOW = 4096


def job_window(rows_per_shard: int, window: int | None = None) -> int:
    """The precompute job's window: `window` if given, else <= JOB_WINDOW and <= a quarter shard."""
    return window or min(JOB_WINDOW, -(-rows_per_shard // _WINDOWS_PER_SHARD))


def writer_alive(path: Path) -> bool:
    """True when the process named by the pid ending `path` (`...-{pid}`) still runs."""
    try:
        os.kill(int(path.name.rsplit("-", 1)[1]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def window_checksum(batch: Any) -> str:
    """xxh3-128 of a window's ids (as `RowDigest` hashes them), keys and embedding values."""
    import xxhash

    ids = RowDigest()
    ids.update(batch.column(ID_COLUMN))
    h = xxhash.xxh3_128(f"{batch.schema}\n{ids.hexdigest()}\n".encode())
    keys = batch.column(KEY_COLUMN)
    width = keys.type.byte_width
    h.update(memoryview(keys.buffers()[1])[keys.offset * width : (keys.offset + len(keys)) * width])
    values = batch.column(VECTOR_COLUMN).flatten().to_numpy(zero_copy_only=False)
    h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


class ShardFile:
    """This process's temp file and journal for one shard (step 1)."""

    def __init__(self, out: Path, name: str, header: dict) -> None:
        pid = os.getpid()
        self.tmp, self.journal = out / f".{name}.tmp-{pid}", out / f".{name}.journal-{pid}"
        self._writer = None
        self._fh = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish/abort
        self._jh = open(self.journal, "wb")  # noqa: SIM115
        self._append(json.dumps(header, sort_keys=True).encode() + b"\n")

    def _append(self, line: bytes) -> None:
        self._jh.write(line)
        self._jh.flush()
        os.fsync(self._jh.fileno())

    @property
    def empty(self) -> bool:
        return self._writer is None

    def write(self, batch: Any) -> None:
        import pyarrow as pa

        if self._writer is None:
            self._writer = pa.ipc.new_file(pa.PythonFile(self._fh, mode="w"), batch.schema)
        self._writer.write_batch(batch)
        self._fh.flush()
        os.fsync(self._fh.fileno())  # the batch is durable before its journal line names it
        self._append(f"{len(batch)} {self._fh.tell()} {window_checksum(batch)}\n".encode())

    def finish(self, final: Path) -> None:
        self._writer.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, final)
        self._jh.close()  # kept until the manifest lists the shard: `forget`

    def abort(self, keep: bool = False) -> None:
        """Close; delete the files unless `keep` (then a later process resumes from them, and
        this one overwrites them if it writes this shard again)."""
        for fh in (self._fh, self._jh):
            fh.close()
        if not keep:
            self.tmp.unlink(missing_ok=True)
            self.journal.unlink(missing_ok=True)


def forget(out: Path, name: str) -> None:
    """The manifest now lists shard `name`: delete its journals whose temp file is gone (renamed
    into place). A journal beside a temp file belongs to a writer still at work, or to a dead
    one that `resume` reads; neither is touched."""
    for journal in out.glob(f".{name}.journal-*"):
        if not journal.with_name(journal.name.replace(".journal-", ".tmp-", 1)).exists():
            journal.unlink(missing_ok=True)


def _dead_partials(out: Path, name: str) -> list[Path]:
    """Temp files and journals of this shard left by writers that are gone."""
    found = [*out.glob(f".{name}.tmp-*"), *out.glob(f".{name}.journal-*")]
    return sorted(p for p in found if not writer_alive(p))


def _journal(path: Path, header: dict, warn: Callable[[str], None]) -> list[tuple[int, int, str]]:
    """The whole window lines of a journal whose header is `header` (else none)."""
    try:
        lines = path.read_bytes().split(b"\n")
        found = json.loads(lines[0])
    except (OSError, ValueError):  # no journal, or its header torn: nothing was journaled
        return []
    if found != header:
        differ = sorted(k for k in {*found, *header} if found.get(k) != header.get(k))
        warn(f"it was written with other settings ({', '.join(differ)})")
        return []
    out = []
    for line in lines[1:-1]:  # the last piece follows the last newline: empty or torn
        m = _LINE.fullmatch(line + b"\n")
        if m is None:
            break
        out.append((int(m[1]), int(m[2]), m[3].decode()))
    return out


def _windows(tmp: Path, lines: list, header: dict, warn: Callable[[str], None]) -> Iterator[Any]:
    """The journaled windows of `tmp` whose bytes decode and match their checksum (step 3)."""
    import pyarrow as pa

    rows, window, done = header["rows"], header["window"], 0
    if not lines:
        return
    with pa.memory_map(str(tmp)) as mm:
        size = mm.size()
        whole = [line for line in lines if line[1] <= size]
        if len(whole) < len(lines):  # not after a kill (fsync comes first): a damaged file
            warn(f"the temp file ends inside window {len(whole)} ({size} bytes)")
            lines = whole
        if not lines or mm.read_buffer(_MAGIC).to_pybytes()[:6] != b"ARROW1":
            return
        mm.seek(_MAGIC)
        source = pa.BufferReader(mm.read_buffer(lines[-1][1] - _MAGIC))
        try:
            stream = pa.ipc.open_stream(source)
        except (pa.ArrowException, OSError) as exc:
            warn(f"its schema does not decode ({exc})")
            return
        for i, (n, _end, checksum) in enumerate(lines):
            if n != window and done + n != rows or done + n > rows:
                warn(f"window {i} holds {n} rows, not {window}")
                return
            try:
                batch = stream.read_next_batch()
            except (pa.ArrowException, OSError, StopIteration) as exc:
                warn(f"window {i} does not decode ({exc})")
                return
            if len(batch) != n or window_checksum(batch) != checksum:
                warn(f"window {i} does not match its checksum")
                return
            done += n
            yield batch


def check_window(batch: Any, pieces: list, first_row: int, expect: dict) -> str | None:
    """What is wrong with a recovered window given its input rows (`pieces`), or None."""
    import pyarrow as pa

    from evalkit.data.beir import document_texts
    from evalkit.embed.store import KEY_BYTES, make_keys

    column, id_column = expect["column"], expect["id_column"]
    if id_column:
        ids = [_array(p.column(id_column)) for p in pieces]
        ids = ids[0] if len(ids) == 1 else pa.concat_arrays(ids)
    else:
        ids = pa.array(np.arange(first_row, first_row + len(batch), dtype=np.int64))
    if not ids.equals(_array(batch.column(ID_COLUMN))):
        return "its ids differ from the input's"
    texts = [t for p in pieces for t in document_texts(p, column).to_pylist()]
    if not all(isinstance(t, str) for t in texts):
        return "the input has a text that is not a string"
    keys = pa.array(make_keys(expect["fingerprint"], texts), type=pa.binary(KEY_BYTES))
    if not keys.equals(_array(batch.column(KEY_COLUMN))):
        return "its keys are not this model's keys of the input texts (input or model changed)"
    value_type = pa.float16() if expect["dtype"] == "float16" else pa.float32()
    vec = batch.column(VECTOR_COLUMN)
    if vec.type != pa.list_(value_type, expect["dim"]) or vec.null_count or vec.values.null_count:
        return f"its vectors are not {expect['dim']}-d {expect['dtype']}"
    if not np.isfinite(vec.flatten().to_numpy(zero_copy_only=False)).all():
        return "it holds non-finite vectors"
    return None


def _array(col: Any) -> Any:
    import pyarrow as pa

    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def resume(
    out: Path,
    name: str,
    header: dict,
    expect: dict,
    reader: Any,
    sink: ShardFile,
    consume: Callable[[Any], None],
) -> tuple[int, list]:
    """Copy the windows of this shard that a dead writer finished into `sink` (steps 2-5),
    reading their input rows from `reader` (positioned at the shard's first row) and feeding
    each piece to `consume`. -> (rows recovered, input pieces read but not recovered)."""
    warned: list[str] = []
    warn = warned.append
    stale = _dead_partials(out, name)
    best, lines = None, []
    for journal in (p for p in stale if ".journal-" in p.name):
        data = journal.with_name(journal.name.replace(".journal-", ".tmp-", 1))
        if not data.exists():  # killed after the rename, before the manifest named the shard
            data = out / name
        if not data.is_file():
            continue
        got = _journal(journal, header, warn)
        if sum(n for n, _, _ in got) > sum(n for n, _, _ in lines):
            best, lines = data, got
    rows, pending = 0, []
    if best is not None:
        first = header["start"]
        windows = _windows(best, lines, header, warn)
        for batch in windows:
            pieces = list(reader.take(len(batch)))
            problem = check_window(batch, pieces, first + rows, expect)
            if problem:
                warn(f"window at row {first + rows}: {problem}")
                pending = pieces
                break
            for piece in pieces:
                consume(piece)
            sink.write(batch)
            rows += len(batch)
        windows.close()
    if warned:
        logger.warning(
            "%s: recovered %d rows of a killed run's partial shard, then stopped: %s; "
            "encoding the rest again",
            name,
            rows,
            warned[0],
        )
    elif rows:
        logger.info(
            "%s: resumed from row %d (%d rows recovered)", name, header["start"] + rows, rows
        )
    for path in stale:
        path.unlink(missing_ok=True)
    return rows, pending
