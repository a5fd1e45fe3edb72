"""Benchmark: memory-mapped PairDataset vs HF `datasets` vs a Python list, on a >= 2 GB Arrow file.

Steps (one run, everything in --workdir, removed afterwards unless --keep):
1) build a source Parquet file of real texts with a streaming writer: every WordNet 3.0 gloss paired
   with the gloss of a random other synset, a random score and a row id, repeated until the Arrow data
   reaches --size-gb;
2) convert it to an Arrow IPC file with evalkit.data.convert (rows/s; peak RssAnon growth sampled
   every 20 ms) and write a stream-format copy, which `datasets.Dataset.from_file` needs;
3) like for like: both libraries read the SAME stream-format file, the SAME three columns
   (sentence1, sentence2, score; HF through `select_columns`, so it does not build `id`), the same
   index batches (--batch rows), returning the same shape: a list of row dicts
   (`PairDataset.__getitems__` vs `Dataset.__getitems__`, what torch's DataLoader calls) and
   column lists (`PairDataset.texts_batch` vs `Dataset[indices]`). Both files are read through once
   before timing, so both sit in a warm page cache (printed). --runs (>= 5) timed runs of
   --batches batches per reader, interleaved with the order rotated every run; medians reported.
   evalkit on the file-format copy is printed too, as a separate line;
4) a full random pass over every row of the file through evalkit, with RssAnon before and after;
5) a Python list of dicts held in memory (a subset), timed the same way, for scale.

The last line printed is `ratio_vs_hf_datasets=X` (evalkit rows/s / datasets rows/s, list of row
dicts, same file and columns); exit 1 when X < 1.5 or a RssAnon growth exceeds 200 MB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
GLOSSES = ROOT.parent / "shared" / "data" / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv"


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Samples RssAnon in a thread; .peak is the highest value seen (MB)."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.peak, self._stop = every, rss_anon_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mb())


def load_glosses(path: Path) -> pa.Array:
    table = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(include_columns=["gloss"]),
    )
    return table.column("gloss").combine_chunks()


def write_source(glosses: pa.Array, dest: Path, size_gb: float, seed: int, chunk: int) -> int:
    """Stream random gloss pairs into a Parquet file until the Arrow data reaches size_gb."""
    rng = np.random.default_rng(seed)
    n = len(glosses)
    lengths = np.diff(np.frombuffer(glosses.buffers()[1], dtype=np.int32)[: n + 1]).astype(np.int64)
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("sentence1", pa.string()),
            ("sentence2", pa.string()),
            ("score", pa.float32()),
        ]
    )
    rows, nbytes = 0, 0
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        while nbytes < size_gb * 1e9:
            i = rng.integers(0, n, chunk)
            j = (i + rng.integers(1, n, chunk)) % n  # a random *other* synset
            batch = pa.record_batch(
                [
                    pa.array(np.arange(rows, rows + chunk, dtype=np.int64)),
                    glosses.take(pa.array(i)),
                    glosses.take(pa.array(j)),
                    pa.array(rng.random(chunk, dtype=np.float32)),
                ],
                schema=schema,
            )
            writer.write_batch(batch)
            rows += chunk
            nbytes += int(lengths[i].sum() + lengths[j].sum()) + chunk * (8 + 4 + 4 + 4)
    return rows


def convert(source: Path, dest: Path) -> str:
    """evalkit.data.convert.convert when it exists; else the same streaming conversion inline."""
    try:
        from evalkit.data.convert import convert as ek_convert
    except ImportError:
        ek_convert = None
    if ek_convert is not None:
        ek_convert(str(source), str(dest), progress=False)
        return "evalkit.data.convert.convert"
    import pyarrow.dataset as pads

    data = pads.dataset(str(source), format="parquet")
    with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
        for batch in data.to_batches(batch_size=65536):
            writer.write_batch(batch)
    return "inline pyarrow.dataset -> ipc.new_file (evalkit.data.readers not found)"


def write_stream_copy(src: Path, dest: Path) -> None:
    with pa.memory_map(str(src)) as mm:
        reader = pa.ipc.open_file(mm)
        with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
            for i in range(reader.num_record_batches):
                writer.write_batch(reader.get_batch(i))


def time_readers(readers: dict, batches: list[np.ndarray], runs: int) -> dict[str, float]:
    """Median rows/s of each reader over `runs` timed runs of all `batches` (same index sets for
    every reader), interleaved with the order rotated every run, after one warm-up run each."""
    from _bench_common import median, timed_runs

    def one(fetch):
        def run():
            for idx in batches:
                fetch(idx)

        return run

    times = timed_runs({name: one(fetch) for name, fetch in readers.items()}, runs)
    total = sum(len(b) for b in batches)
    return {name: total / median(secs) for name, secs in times.items()}


def warm_page_cache(*paths: Path) -> str:
    """Read every file through once so timing starts from a warm page cache for all of them."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in paths)
    return f"page cache: read through once before timing, both warm ({sizes})"


def build_files(args, work: Path) -> tuple[int, Path, Path, float]:
    """Steps 1-2: the Parquet source, its Arrow file (conversion timed, RssAnon growth sampled)
    and the stream-format copy. -> (rows, file, stream copy, conversion growth in MB)."""
    glosses = load_glosses(args.glosses)
    print(f"glosses: {len(glosses):,} real WordNet 3.0 glosses from {args.glosses}")
    source = work / "pairs.parquet"
    t0 = time.perf_counter()
    rows = write_source(glosses, source, args.size_gb, args.seed, chunk=args.row_group)
    print(
        f"source: {rows:,} rows -> {source.name} ({source.stat().st_size / 1e9:.2f} GB parquet)"
        f" in {time.perf_counter() - t0:.1f} s"
    )
    del glosses
    pa.default_memory_pool().release_unused()
    dest = work / "pairs.arrow"
    base = rss_anon_mb()
    t0 = time.perf_counter()
    with PeakRss() as peak:
        how = convert(source, dest)
    secs = time.perf_counter() - t0
    growth = peak.peak - base
    print(
        f"convert ({how}): {rows:,} rows, {dest.stat().st_size / 1e9:.2f} GB arrow file in "
        f"{secs:.1f} s = {rows / secs:,.0f} rows/s; RssAnon {base:.0f} MB before, peak "
        f"{peak.peak:.0f} MB (growth {growth:.0f} MB)"
    )
    stream = work / "pairs.stream.arrow"
    write_stream_copy(dest, stream)
    pa.default_memory_pool().release_unused()
    return rows, dest, stream, growth


def compare_readers(args, ds, ds_stream, hf, batches) -> dict[str, float]:
    """Step 3: like-for-like random batches, evalkit vs datasets; rows/s per reader."""
    probe = batches[0][:5]
    assert ds_stream.__getitems__(probe) == hf.__getitems__(probe.tolist())
    assert ds.texts_batch(probe)[0] == [hf[probe.tolist()][c] for c in ("sentence1", "sentence2")]
    print(warm_page_cache(Path(ds_stream.path), Path(ds.path)))
    rates = time_readers(
        {
            "evalkit_rows": ds_stream.__getitems__,
            "hf_rows": lambda idx: hf.__getitems__(idx.tolist()),
            "evalkit_columns": ds_stream.texts_batch,
            "hf_columns": lambda idx: hf[idx.tolist()],
            "evalkit_file_rows": ds.__getitems__,
        },
        batches,
        args.runs,
    )
    print(
        f"random batches of {args.batch} rows, {args.batches} batches per run, {args.runs} "
        "interleaved runs, medians; same stream-format file, same 3 columns, same indices:"
    )
    print(
        f"  list of row dicts: evalkit PairDataset.__getitems__  {rates['evalkit_rows']:>12,.0f} rows/s"
    )
    print(
        f"                     datasets Dataset.__getitems__     {rates['hf_rows']:>12,.0f} rows/s"
    )
    print(
        f"  column lists:      evalkit PairDataset.texts_batch   {rates['evalkit_columns']:>12,.0f} rows/s"
    )
    print(
        f"                     datasets Dataset[indices]         {rates['hf_columns']:>12,.0f} rows/s"
    )
    print(
        f"  (evalkit __getitems__ on the file-format copy: {rates['evalkit_file_rows']:,.0f} rows/s)"
    )
    return rates


def full_pass(args, ds, rows: int, rng) -> tuple[float, float, float]:
    """Step 4: every row once in a random order (an affine permutation i -> (a*i + c) mod n, no
    index array). -> (RssAnon before, after, peak) in MB."""
    n = rows
    a = int(rng.integers(n // 3, n)) | 1
    while np.gcd(a, n) != 1:
        a += 2
    c = int(rng.integers(0, n))
    before = rss_anon_mb()
    total0 = pa.total_allocated_bytes()
    t0 = time.perf_counter()
    seen = 0
    with PeakRss() as peak:
        step = args.batch * 16
        for start in range(0, n, step):
            ids = (np.arange(start, min(start + step, n), dtype=np.int64) * a + c) % n
            for k in range(0, len(ids), args.batch):
                seen += len(ds.__getitems__(ids[k : k + args.batch]))
    secs = time.perf_counter() - t0
    after = rss_anon_mb()
    print(
        f"full random pass (evalkit): {seen:,} rows in {secs:.1f} s = {seen / secs:,.0f} rows/s; "
        f"RssAnon {before:.0f} MB before, {after:.0f} MB after, peak {peak.peak:.0f} MB; arrow "
        f"allocated bytes grew by {pa.total_allocated_bytes() - total0:,}"
    )
    return before, after, peak.peak


def list_baseline(args, ds, rows: int, rng) -> float:
    """Step 5: rows/s of a Python list of dicts held in memory (a subset), timed the same way."""
    m = min(args.list_rows, rows)
    in_memory = [row for chunk in ds.iter_batches(range(m), batch_size=65536) for row in chunk]
    sub = [rng.integers(0, m, args.batch) for _ in range(args.batches)]
    rate = time_readers({"list": lambda idx: [in_memory[i] for i in idx.tolist()]}, sub, args.runs)
    print(f"python list of {m:,} dicts in memory:                     {rate['list']:,.0f} rows/s")
    return rate["list"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--workdir", default=None, help="where to build the files (default: a new temp dir)"
    )
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of the Arrow data to build")
    ap.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    ap.add_argument("--batch", type=int, default=64, help="rows per random batch")
    ap.add_argument("--batches", type=int, default=600, help="random batches per timed run")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per reader (>= 5)")
    ap.add_argument("--list-rows", type=int, default=1_000_000, help="rows in the in-memory list")
    ap.add_argument("--row-group", type=int, default=65_536, help="rows per Parquet row group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--glosses", type=Path, default=GLOSSES, help="WordNet glosses TSV")
    args = ap.parse_args(argv)
    if args.runs < 5:
        ap.error("--runs must be >= 5 (the median of at least five timed runs)")

    from _bench_common import machine_line

    from evalkit.data.dataset import PairDataset

    own_dir = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench-dataset-") if own_dir else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"workdir: {work}; {machine_line()}")
        rows, dest, stream, conv_growth = build_files(args, work)
        before_open = rss_anon_mb()
        ds = PairDataset(dest, ["sentence1", "sentence2"], "score", as_dict=True)
        ds_stream = PairDataset(stream, ["sentence1", "sentence2"], "score", as_dict=True)
        assert len(ds) == len(ds_stream) == rows
        open_growth = rss_anon_mb() - before_open

        import datasets  # after opening ours, so its import does not count as our memory

        hf = datasets.Dataset.from_file(str(stream))
        hf = hf.select_columns(["sentence1", "sentence2", "score"])
        assert len(hf) == rows
        rng = np.random.default_rng(args.seed + 1)
        batches = [rng.integers(0, rows, args.batch) for _ in range(args.batches)]
        rates = compare_readers(args, ds, ds_stream, hf, batches)
        before, after, peak = full_pass(args, ds, rows, rng)
        read_growth = open_growth + max(peak, after) - before
        print(
            f"RssAnon growth: converting {conv_growth:.0f} MB; opening {open_growth:.0f} MB + "
            f"full random pass {read_growth - open_growth:.0f} MB = reading {read_growth:.0f} MB"
        )
        list_rate = list_baseline(args, ds, rows, rng)
        ek_rate, hf_rate = rates["evalkit_rows"], rates["hf_rows"]
        print(f"evalkit / python list: {ek_rate / list_rate:.2f}")
        print(
            f"columns ratio (texts_batch / Dataset[indices]): "
            f"{rates['evalkit_columns'] / rates['hf_columns']:.2f}"
        )
        ratio = ek_rate / hf_rate
        ok = ratio >= 1.5 and conv_growth <= 200 and read_growth <= 200
        print(f"must-show: ratio >= 1.5 and RssAnon growth <= 200 MB: {'PASS' if ok else 'FAIL'}")
        print(f"ratio_vs_hf_datasets={ratio:.2f}")
        return 0 if ok else 1
    finally:
        if own_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for name in ("pairs.parquet", "pairs.arrow", "pairs.stream.arrow"):
                (work / name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
