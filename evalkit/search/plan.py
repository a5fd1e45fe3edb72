"""Choosing a FAISS index before building it: pure functions of row count, dimension and budget.

1) estimate each candidate's resident size (`estimate_bytes`): raw float32 vectors, HNSW links,
   IVF ids and centroids, PQ codes;
2) walk the candidates in order (Flat under 100k rows; then IVF whose lists are found by a
   4-bit fast-scan PQ over the centroids, 4-bit fast-scan PQ codes in the lists and an fp16
   re-ranking of the best candidates, the fastest at recall@10 >= 0.95 on real sentence
   embeddings (scripts/bench_ann.py, docs/design.md); HNSW32; IVF-Flat; OPQ+IVF-PQ with the
   widest codes that fit) and take the first that fits the budget;
3) return the factory string, default search parameters and the reason in one sentence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from evalkit.errors import EvalkitError

FLAT_MAX_ROWS = 100_000  # auto choice: exact search below this many rows
HNSW_MAX_ROWS = 20_000_000  # auto choice: HNSW graphs above this take too long to build
HNSW_EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
REFINE_K_FACTOR = 8  # fast-scan PQ: re-ranking of 8 x k candidates (fewer lose recall@10)
QUANTIZER_EF_MIN = 64  # efSearch of an HNSW coarse quantizer: at least this, and 2 x nprobe
FASTSCAN_MIN_NLIST = 1024  # the centroids train the quantizer's 16-centroid PQ (>= 39 x 16 each)


def fastscan_m(dim: int) -> int | None:
    """4-bit fast-scan PQ sub-quantizers for `dim`: one per 4 dimensions (an even count), or
    None when the dimension does not split so."""
    if dim % 4 or (dim // 4) % 2:
        return None
    return dim // 4


def fastscan_nlist(rows: int) -> int | None:
    """Inverted lists of the fast-scan IVF: `ivf_nlist(rows)` (~4*sqrt(rows)), or None when
    that is under FASTSCAN_MIN_NLIST (the rows cannot train that many lists).

    On 161,611 MiniLM vectors (scripts/bench_ann.py), 2048 lists reach recall@10 0.956 with
    fewer codes scanned than 1024 (nprobe 80 x ~79 codes vs 56 x ~158) while scanning 2048
    centroid codes costs ~16 us per query; 512 lists need more codes still."""
    nlist = ivf_nlist(rows)
    return nlist if nlist >= FASTSCAN_MIN_NLIST else None


def fastscan_spec(nlist: int, m: int) -> str:
    """The FAISS factory string of the fast-scan auto choice."""
    return f"IVF{nlist}(PQ{m}x4fs),PQ{m}x4fs,Refine(SQfp16)"


def fastscan_params(nlist: int, nprobe: int | None = None) -> dict[str, int]:
    """Search settings of a `fastscan_spec(nlist, m)` index at `nprobe` (default nlist / 16;
    `evalkit.search.tune` replaces it by the cheapest setting reaching its target)."""
    return {"nprobe": nprobe or max(1, nlist // 16), "k_factor_rf": REFINE_K_FACTOR}


def parse_size(text: str | int | float) -> int:
    """'4G', '512M', '1.5GB', '300MiB', 10**9 -> bytes (powers of 1024 for the letters)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
        if not match:
            raise EvalkitError(f"memory size must look like 4G, 512M or 1500000000; got {text!r}")
        scale = 1024 ** " kmgt".index(match.group(2).lower() or " ")
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise EvalkitError(f"memory size must be positive; got {text!r}")
    return value


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def ivf_nlist(rows: int) -> int:
    """Inverted lists for an IVF index: the power of two nearest 4*sqrt(rows), at least 16, and
    never more than rows/39 (FAISS wants ~39 training points per centroid)."""
    target = 4 * math.sqrt(max(rows, 1))
    nlist = 2 ** max(4, round(math.log2(target)))
    while nlist > 16 and nlist * 39 > rows:
        nlist //= 2
    return nlist


def estimate_bytes(kind: str, rows: int, dim: int, *, hnsw_m: int = 32, pq_m: int = 0) -> int:
    """Approximate resident size of an index: 'flat', 'hnsw', 'ivf_flat', 'ivf_pq' or 'ivf_fs'
    (`fastscan_spec`: 4-bit codes of the centroids and of the rows, fp16 vectors kept for
    re-ranking) (+ 8-byte ids in the lists for IVF)."""
    vectors = rows * dim * 4
    if kind == "flat":
        return vectors
    if kind == "hnsw":  # level-0 links (2M) + upper levels (~M/(M-1) more), int32 each
        return vectors + int(rows * hnsw_m * 2 * 4 * 1.05)
    if kind == "ivf_fs":  # fp16 vectors (refine) + 4-bit codes + ids; centroid codes + codebooks
        m = pq_m or fastscan_m(dim) or dim // 4
        nlist = fastscan_nlist(rows) or FASTSCAN_MIN_NLIST
        return rows * (dim * 2 + m // 2 + 8) + nlist * m // 2 + 2 * 16 * dim * 4
    nlist = ivf_nlist(rows)
    if kind == "ivf_flat":
        return vectors + rows * 8 + nlist * dim * 4
    if kind == "ivf_pq":  # codes + ids + centroids + OPQ matrix + PQ tables
        return rows * (pq_m + 8) + nlist * dim * 4 + dim * dim * 4 + 256 * dim * 4
    raise ValueError(kind)


@dataclass(frozen=True)
class IndexChoice:
    """What `choose_index` picked: a FAISS factory string, its default search parameters, the
    estimated resident size and a sentence saying why."""

    spec: str
    search_params: dict[str, int]
    estimated_bytes: int
    reason: str


def choose_index(rows: int, dim: int, memory_budget: str | int = "4G") -> IndexChoice:
    """Pick an index from the row count, dimension and memory budget:

    * fewer than 100,000 rows: `Flat` (exact; scanning them is fast and loses nothing);
    * when fp16 vectors and 4-bit codes fit: `IVF{n}(PQ{d/4}x4fs),PQ{d/4}x4fs,Refine(SQfp16)`
      with n ~ 4*sqrt(rows) (lists found by scanning 4-bit codes of the centroids, then scanned
      as 4-bit codes with SIMD, the best 8 x k re-ranked on fp16 vectors): the most queries per
      second at recall@10 >= 0.95 on real sentence embeddings (scripts/bench_ann.py);
    * up to 20M rows whose HNSW32 graph fits the budget: `HNSW32` (best recall per query time);
    * else `IVF{n},Flat` with n ~ 4*sqrt(rows) if the raw vectors fit;
    * else `OPQ{m},IVF{n},PQ{m}` with the most PQ bytes per vector that fit.
    """
    if rows <= 0 or dim <= 0:
        raise EvalkitError(f"cannot index {rows} rows of dimension {dim}")
    budget = parse_size(memory_budget)
    size = f"{rows:,} rows x {dim} dims"
    flat = estimate_bytes("flat", rows, dim)
    if rows < FLAT_MAX_ROWS and flat <= budget:
        return IndexChoice(
            "Flat",
            {},
            flat,
            f"{size} is under {FLAT_MAX_ROWS:,} rows: exact search over {_fmt_bytes(flat)} is fast "
            "enough and loses nothing",
        )
    m, fs_nlist = fastscan_m(dim), fastscan_nlist(rows)
    fs = estimate_bytes("ivf_fs", rows, dim, pq_m=m or 0)
    if m and fs_nlist and fs <= budget:
        return IndexChoice(
            fastscan_spec(fs_nlist, m),
            fastscan_params(fs_nlist),
            fs,
            f"{size}: {fs_nlist} IVF lists found by scanning 4-bit codes of their centroids, "
            f"then scanned as {m} 4-bit codes per vector with SIMD, the best {REFINE_K_FACTOR} x k "
            f"re-ranked on fp16 vectors (~{_fmt_bytes(fs)}, within the {_fmt_bytes(budget)} budget)",
        )
    nlist = ivf_nlist(rows)
    hnsw = estimate_bytes("hnsw", rows, dim)
    if rows <= HNSW_MAX_ROWS and hnsw <= budget:
        return IndexChoice(
            "HNSW32",
            {"efSearch": 64},
            hnsw,
            f"{size}: an HNSW32 graph (~{_fmt_bytes(hnsw)}) fits the {_fmt_bytes(budget)} budget and "
            "gives the best recall per query time; no training needed",
        )
    ivf = estimate_bytes("ivf_flat", rows, dim)
    if ivf <= budget:
        why = "too many rows for an HNSW graph" if rows > HNSW_MAX_ROWS else "HNSW32 does not fit"
        return IndexChoice(
            f"IVF{nlist},Flat",
            {"nprobe": max(1, nlist // 64)},
            ivf,
            f"{size}: {why} ({_fmt_bytes(hnsw)} > {_fmt_bytes(budget)} budget or > "
            f"{HNSW_MAX_ROWS:,} rows); IVF{nlist},Flat (~{_fmt_bytes(ivf)}) keeps exact vectors "
            f"in {nlist} lists (~4*sqrt(rows))",
        )
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if dim % m:
            continue
        need = estimate_bytes("ivf_pq", rows, dim, pq_m=m)
        if need <= budget:
            return IndexChoice(
                f"OPQ{m},IVF{nlist},PQ{m}",
                {"nprobe": max(1, nlist // 32)},
                need,
                f"{size}: the raw vectors ({_fmt_bytes(flat)}) exceed the {_fmt_bytes(budget)} "
                f"budget, so vectors are compressed to {m} bytes each with OPQ+PQ "
                f"(~{_fmt_bytes(need)}) in {nlist} IVF lists",
            )
    raise EvalkitError(
        f"{size} cannot be indexed within a {_fmt_bytes(budget)} memory budget (even 4-byte PQ codes "
        f"need ~{_fmt_bytes(estimate_bytes('ivf_pq', rows, dim, pq_m=4))}); raise --memory-budget"
    )
