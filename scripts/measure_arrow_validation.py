"""What full Arrow validation costs: rows/s reading Arrow IPC files with and without
`RecordBatch.validate(full=True)` (offsets in bounds, UTF-8), on real files.

1) convert STS-B train (5,749 pairs) and the WordNet glosses (117,659 rows) from ../shared/data
   into Arrow IPC files with `evalkit convert`, plus a larger file of the glosses repeated
   `--repeat` times (each copy a new record batch run, as a multi-GB training file would be);
2) for each file, interleaved over `--repeats` rounds after one warm-up (files in page cache):
   a) scan: every record batch of the text columns, as `iter_batches` reads them, with and without
      `validate(full=True)` on each batch (the bare read only maps pages, so this is the
      validation's whole cost); read: the same plus the texts as Python strings, which is what the
      pair and corpus readers do next;
   b) open: `PairDataset`'s memory-mapped open (`IpcFile`), with full and with cheap validation;
3) print the medians (rows/s and the relative cost) as a table, the overall cost figure last.

Run: python scripts/measure_arrow_validation.py [--repeat 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evalkit.data._mmap import IpcFile  # noqa: E402
from evalkit.data.convert import convert  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def make_files(tmp: Path, repeat: int) -> list[tuple[str, Path, list[str]]]:
    stsb = convert(
        DATA / "stsb" / "stsb-en-train.csv",
        tmp / "stsb-train.arrow",
        column_names=["sentence1", "sentence2", "score"],
        progress=False,
    ).dest
    glosses = convert(
        DATA / "corpus-wordnet-glosses" / "wordnet30_glosses.tsv",
        tmp / "glosses.arrow",
        quoting=False,
        progress=False,
    ).dest
    table = pa.ipc.open_file(pa.memory_map(str(glosses))).read_all()
    big = tmp / f"glosses-x{repeat}.arrow"
    with pa.OSFile(str(big), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for _ in range(repeat):
            writer.write_table(table, max_chunksize=65536)
    return [
        ("STS-B train", stsb, ["sentence1", "sentence2"]),
        ("WordNet glosses", glosses, ["lemmas", "gloss"]),
        (f"WordNet glosses x{repeat}", big, ["lemmas", "gloss"]),
    ]


def scan(path: Path, columns: list[str], validate: bool, to_python: bool = False) -> int:
    rows = 0
    dataset = ds.dataset(str(path), format="ipc")
    for batch in dataset.to_batches(columns=columns, batch_size=65536, use_threads=False):
        if validate:
            batch.validate(full=True)
        if to_python:  # what the pair reader does next: the texts as Python strings
            for column in batch.columns:
                column.to_pylist()
        rows += batch.num_rows
    return rows


def open_file(path: Path, validate: bool) -> int:
    return IpcFile(str(path), validate="full" if validate else "quick").num_rows


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    rows = fn(*args)
    return time.perf_counter() - t, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repeat", type=int, default=20, help="copies of the glosses in the big file"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"needs {DATA}", file=sys.stderr)
        return 2
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.repeat)
        print(f"{'file':<24} {'MB':>7} {'rows':>10}  {'what':<5} {'plain rows/s':>14} "
              f"{'validated rows/s':>17} {'cost':>7}")  # fmt: skip
        for name, path, columns in files:
            cases = {
                "scan": (lambda v, p=path, c=columns: timed(scan, p, c, v)),
                "read": (lambda v, p=path, c=columns: timed(scan, p, c, v, True)),
                "open": (lambda v, p=path: timed(open_file, p, v)),
            }
            for what, run in cases.items():
                run(False), run(True)  # warm-up: page cache, imports
                times = {False: [], True: []}
                rows = 0
                for _ in range(args.repeats):
                    for v in (False, True):  # interleaved
                        seconds, rows = run(v)
                        times[v].append(seconds)
                plain, full = (statistics.median(times[v]) for v in (False, True))
                cost = full / plain - 1
                worst = max(worst, cost) if what == "read" else worst
                mb = path.stat().st_size / 1e6
                print(f"{name:<24} {mb:>7.1f} {rows:>10,}  {what:<5} {rows / plain:>14,.0f} "
                      f"{rows / full:>17,.0f} {cost:>+7.0%}")  # fmt: skip
    print(f"full validation: at most {worst:+.0%} time over reading the texts, on these files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
