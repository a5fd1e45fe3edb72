"""Candidates by float32 GEMM with a proven error bound, scores by exact float64 rescoring.

The engine behind `evalkit.search.exact.exact_search`:
1) `prepare_queries`: float64 queries (normalised for cosine), their norms and a float32 copy;
2) `CorpusSlice`: one corpus slice's float32 rows for the GEMM, normalised (cosine) with float32
   norms, and an upper bound of the rows' norms; a NaN or infinite value is refused (it would
   rank as garbage), rows whose float32 norm overflows are normalised in float64;
3) `margin`: M = C(d) * |q| * max|v| bounds |A - S| for every pair, where A is the float32 GEMM
   score and S the exact score rounded to float32: C(d) = 1.01 (1.5 gamma_d + 12u) + 1e-12,
   u = 2^-24, gamma_d = d u / (1 - d u) (any summation order, with or without FMA; half of it
   again for rows normalised with float32 norms), 12u covering the float32 rounding of both
   operands, of the normaliser and of S;
4) `candidates`: the pairs whose A reaches the cut (the row's k-th exact score held so far - M,
   or the slice's k-th largest A - 2M while fewer than k are held), found by scanning the mask
   a machine word at a time; the k-th largest A is bounded from below by the k-th largest of
   >= 8k column-group maxima (cheap, and nearly as tight as a full partition); `prune` then
   drops those whose A + M is below the k-th largest of (held exact scores, candidates' A - M):
   pushed out by others of their own slice, they need no exact score;
5) `exact_scores`: S = einsum("ij,j->i") of the document's float64 row and its query, times
   (cosine) 1 / max(|v_j|, 1e-12) with |v_j| = sqrt(einsum("ij,ij->i")) of the same row:
   numpy reduces each output's products in one fixed order, so a pair's score does not depend
   on which other pairs share its call.
The approximate GEMM runs in numpy, or in torch on a torch device (TF32 and reduced-precision
matmul switched off while it runs, so the float32 bound holds); candidates and rescoring are the
same numpy code on both, so both give the same answer.
Steps 2, 4 and 5 are row-wise (a slice row, a query row, a pair), so `parallel` runs them on
parts of the rows, one part per CPU (numpy releases the GIL in these loops); every value is
computed by the same code on the same operands, so the answer is bit-identical to one part.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from evalkit._threads import MAX_THREADS, MIN_PART_ROWS, cpus, parallel, row_parts
from evalkit.errors import DataError

U32 = 2.0**-24  # unit roundoff of float32
RESCORE_PAIRS = 1024  # pairs gathered at a time for rescoring (3 MiB of float64 rows)
DENSE_NORM = 1e30  # |q| |v| above this could overflow float32: score every pair exactly
NORM_ROWS = 1024  # rows whose float64 norms are computed together


def margin_factor(dim: int) -> float:
    """C(d): |A - S| <= C(d) |q| |v| for a float32 GEMM score A and the exact score S: the dot
    product's gamma_d, plus gamma_d / 2 for normalising with float32 norms, plus the roundings
    of both operands, the normaliser and S."""
    gamma = dim * U32 / (1.0 - dim * U32)
    return 1.01 * (1.5 * gamma + 12 * U32) + 1e-12


def row_norms(x: np.ndarray, work: np.ndarray | None = None) -> np.ndarray:
    """float64 Euclidean norms of the rows, each the same function of its row alone (`work`: an
    optional float64 scratch array of NORM_ROWS rows, reused instead of allocating)."""
    out = np.empty(len(x), dtype=np.float64)
    if work is None:
        work = np.empty((min(NORM_ROWS, len(x)), x.shape[1]), dtype=np.float64)
    for s in range(0, len(x), NORM_ROWS):
        part = x[s : s + NORM_ROWS]
        r = work[: len(part)]
        r[...] = part
        out[s : s + len(r)] = np.sqrt(np.einsum("ij,ij->i", r, r))
    return out


def _finite(norms: np.ndarray, what: str, first_row: int = 0) -> None:
    bad = ~np.isfinite(norms)
    if bad.any():
        row = first_row + int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{what} row {row} has a NaN or infinite value (or overflows float64); "
            "scores on it would be garbage: check the model's output"
        )


def prepare_queries(q_in: np.ndarray, cosine: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q64 for rescoring, |q64| per row, q32 for the GEMM)."""
    q64 = np.asarray(q_in, dtype=np.float64)
    norms = row_norms(q64)
    _finite(norms, "query_emb")
    if cosine:
        q64 = q64 / np.maximum(norms, 1e-12)[:, None]
        norms = row_norms(q64)
    return q64, norms, q64.astype(np.float32)


class Workspace:
    """Scratch arrays reused across slices and chunks: large temporaries would otherwise be
    fresh pages (page faults) on every call."""

    def __init__(self, dim: int, query_rows: int, corpus_rows: int, slices: bool = True) -> None:
        self.approx = np.empty((query_rows, corpus_rows), dtype=np.float32)
        self.mask = np.empty((query_rows, corpus_rows), dtype=bool)
        self.v = np.empty((RESCORE_PAIRS, dim), dtype=np.float64)
        if slices:  # a corpus slice's buffers (`CorpusSlice`), shared by every query part
            self.norm = np.empty((NORM_ROWS, dim), dtype=np.float64)
            self.gemm = np.empty((corpus_rows, dim), dtype=np.float32)


class QueryParts:
    """The queries cut into parts (`spans`, each folded into its own TopK) and the parts grouped
    into chunks of at most query_rows rows; `run` scores one corpus slice:
    1) the chunk's GEMM (`NumpyGemm.multiply`), the slice's columns cut into one part per thread;
    2) the chunk's parts in parallel, one per thread: candidates, rescoring, folding.
    With T > 1 threads BLAS runs single-threaded in each (process-wide while `run` runs): with one
    multi-threaded GEMM, steps 2 ran on one core while the BLAS workers spun idle. Every score,
    candidate and TopK is computed from the same rows as with one thread: the answer is identical.
    On a torch device there is one part per chunk, scored there (`TorchGemm`)."""

    def __init__(
        self, q32: np.ndarray, q_norms: np.ndarray, device: Any, corpus_rows: int, query_rows: int
    ) -> None:
        nq, dim = q32.shape
        numpy_path = device is None or (isinstance(device, str) and device in ("cpu", "auto"))
        self.threads = min(cpus(), MAX_THREADS, max(1, nq // MIN_PART_ROWS)) if numpy_path else 1
        chunk = min(query_rows, nq)
        rows = max(1, -(-chunk // self.threads))
        self.spans = [(i, min(i + rows, nq)) for i in range(0, nq, rows)]
        self.chunks = [
            list(range(i, min(i + self.threads, len(self.spans))))
            for i in range(0, len(self.spans), self.threads)
        ]
        self.work = Workspace(dim, min(nq, rows * self.threads) if numpy_path else 0, corpus_rows)
        self.scratch = [Workspace(dim, 0, 0, slices=False) for _ in range(self.threads)]
        self.gemm: Any = None
        self._blas = None
        if not nq:
            return
        if numpy_path:
            self.gemm = NumpyGemm(q32, q_norms, self.work, self.threads)
        else:
            self.gemm = TorchGemm(q32, q_norms, device)
        if self.threads > 1:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()

    def run(self, sl: CorpusSlice, fold) -> None:
        """fold(span index, gemm, scratch workspace) for every span, chunk by chunk."""
        with contextlib.ExitStack() as stack:
            if self._blas is not None:
                stack.enter_context(self._blas.limit(limits=1, user_api="blas"))
            for chunk in self.chunks:
                lo, hi = self.spans[chunk[0]][0], self.spans[chunk[-1]][1]
                self.gemm.multiply(lo, hi, sl)

                def part(t: int, _: int, chunk=chunk) -> None:
                    fold(chunk[t], self.gemm, self.scratch[t])

                parallel(part, [(t, t + 1) for t in range(len(chunk))])


class CorpusSlice:
    """One corpus slice: raw rows (for rescoring) and the float32 GEMM operand (normalised with
    float32 norms for cosine: their error is in the margin), `vmax` >= every row's true norm
    after normalisation."""

    def __init__(self, v: np.ndarray, cosine: bool, work: Workspace, first_row: int = 0) -> None:
        self.v, self.cosine = v, cosine
        gemm = work.gemm[: len(v)]
        # float32 rows are read as they are: one pass fewer than copying them first
        src = v if v.dtype == np.float32 else gemm

        def part(lo: int, hi: int) -> np.ndarray:
            if src is gemm:
                gemm[lo:hi] = v[lo:hi]
            rows = src[lo:hi]
            norms = np.sqrt(np.einsum("ij,ij->i", rows, rows).astype(np.float64))
            if cosine and np.isfinite(norms).all() and norms.max(initial=0.0) <= 1e18:
                inv = (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)
                np.multiply(rows, inv[:, None], out=gemm[lo:hi])
            elif not cosine and src is v:
                gemm[lo:hi] = rows
            return norms

        norms = np.concatenate(parallel(part, row_parts(len(v))))
        if not np.isfinite(norms).all() or norms.max(initial=0.0) > 1e18:
            norms = row_norms(v, work.norm)  # float32 overflowed (or NaN): exact norms decide
            _finite(norms, "corpus block", first_row)
            if cosine:
                gemm[...] = np.asarray(v, dtype=np.float64) / np.maximum(norms, 1e-12)[:, None]
            elif src is v:
                gemm[...] = v
        slack = 1.0 + 2 * margin_factor(v.shape[1])  # the float32 norms' own error
        if cosine:
            self.vmax = float(np.max(norms / np.maximum(norms, 1e-12), initial=0.0)) * slack
        else:
            self.vmax = float(norms.max(initial=0.0)) * slack
        self.gemm = gemm
        self.device_gemm: Any = None  # the operand on a torch device, made once per slice

    def __len__(self) -> int:
        return len(self.v)


def exact_scores(q64, sl: CorpusSlice, rows: np.ndarray, cols: np.ndarray, work: Workspace):
    """float64 exact scores of the (query row, slice column) pairs, `rows` ascending.

    Every pair is one output of einsum("ij,j->i"): the document's float64 row against its query
    (contiguous, one kernel, one summation order, whatever else is scored in the same call).
    Pairs go RESCORE_PAIRS at a time, gathered into reused float64 scratch, one call per run of
    pairs sharing a query."""
    out = np.empty(len(rows), dtype=np.float64)
    buf = work.v
    for s in range(0, len(rows), len(buf)):
        e = min(len(rows), s + len(buf))
        block = buf[: e - s]
        # a plain fancy-index gather: np.take(..., out=) runs ~2.6x slower on rows of 384
        block[...] = sl.v[cols[s:e]]
        r = rows[s:e]
        bounds = np.r_[0, np.flatnonzero(r[1:] != r[:-1]) + 1, e - s]
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            np.einsum("ij,j->i", block[a:b], q64[r[a]], out=out[s + a : s + b])
        if sl.cosine:  # the document's float64 norm, clamped at 1e-12 as torch does
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            out[s:e] *= 1.0 / np.maximum(norms, 1e-12)
    return out


def _below32(cut: np.ndarray) -> np.ndarray:
    """The largest float32 values not above `cut` (float64), so a float32 test keeps a superset."""
    c32 = cut.astype(np.float32)
    return np.where(c32 > cut, np.nextafter(c32, np.float32(-np.inf)), c32)


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a sparse 2-D boolean mask, in row-major order: the 64-byte groups holding a
    hit are found 8 bytes at a time (numpy's nonzero visits every element it is given), then
    the 8-byte words of those groups, then the bytes of those words."""
    nb = mask.shape[1]
    flat = np.ascontiguousarray(mask).reshape(-1)
    n64 = len(flat) // 64 * 64
    words = flat[:n64].view(np.uint64)
    groups = np.flatnonzero((words != 0).view(np.uint64))  # 8 words = 64 mask bytes a group
    g, w = np.nonzero(words.reshape(-1, 8)[groups])
    hit = groups[g] * 8 + w  # the words with a hit, ascending
    r, c = np.nonzero(flat[:n64].reshape(-1, 8)[hit])
    idx = np.concatenate([hit[r] * 8 + c, np.flatnonzero(flat[n64:]) + n64])
    return np.divmod(idx, nb)


def _kth_lower(approx: np.ndarray, k: int) -> np.ndarray:
    """Per row, a value with at least k entries >= it, close to the k-th largest."""
    n, nb = approx.shape
    groups = 1 << max(0, int(8 * k - 1).bit_length())
    if nb >= 4 * groups:  # the k-th largest of the column-group maxima: k groups reach it
        per = nb // groups
        maxima = approx[:, : per * groups].reshape(n, per, groups).max(axis=1)
        return np.partition(maxima, groups - k, axis=1)[:, groups - k]
    return np.partition(approx, nb - k, axis=1)[:, nb - k]


def candidates(
    approx: np.ndarray,
    margin: np.ndarray,
    held_kth: np.ndarray | None,
    k: int,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pairs that may enter the top-k; see the module docstring, step 4."""
    n, nb = approx.shape
    if held_kth is None:
        if nb <= k:
            rows, cols = np.divmod(np.arange(n * nb), nb)
            return rows, cols
        cut = _kth_lower(approx, k).astype(np.float64) - 2 * margin
    else:
        cut = held_kth - margin
    mask = np.greater_equal(approx, _below32(cut)[:, None], out=mask)
    rows, cols = _nonzero(mask)
    if held_kth is not None and nb > k and len(rows) > 4 * k * n:
        # a slice far better than what is held: its own k-th best bounds the cut tighter
        cut = np.maximum(cut, _kth_lower(approx, k).astype(np.float64) - 2 * margin)
        mask = np.greater_equal(approx, _below32(cut)[:, None], out=mask)
        rows, cols = _nonzero(mask)
    return rows, cols


def prune(rows, cols, approx_values, margin, held: np.ndarray, k: int):
    """Drop the candidates that cannot reach the new k-th best score: those whose upper bound
    A + M is below the k-th largest of the held exact scores and the candidates' lower bounds
    A - M (at least k distinct documents score at least that). Saves rescoring the documents
    that another candidate of the same slice pushes out."""
    if not len(rows):
        return rows, cols
    a = approx_values.astype(np.float64)
    m = margin[rows]
    n = len(held)
    counts = np.bincount(rows, minlength=n)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    lower = np.full((n, int(counts.max())), -np.inf)
    lower[rows, slot] = a - m
    both = np.concatenate([held.astype(np.float64), lower], axis=1)
    kth = np.partition(both, both.shape[1] - k, axis=1)[:, both.shape[1] - k]
    keep = a + m >= kth[rows]
    return rows[keep], cols[keep]


def all_pairs(n: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
    return np.divmod(np.arange(n * nb), nb)


# ----------------------------------------------------------------------------- approximate GEMM


class NumpyGemm:
    """A = q32 @ slice32.T on the CPU (numpy's BLAS): `multiply` a chunk of query rows, then
    `candidates` of any rows of it (several parts at once, from threads)."""

    def __init__(self, q32: np.ndarray, q_norms, work: Workspace, threads: int = 1) -> None:
        self.q32, self.q_norms, self.work, self.threads = q32, q_norms, work, threads
        self.lo, self.approx, self.skipped = 0, work.approx[:0], False

    def dense(self, lo: int, hi: int, sl: CorpusSlice) -> bool:
        """Whether rows [lo, hi) of the multiplied chunk score every pair exactly (`multiply`
        decided it for the whole chunk: its float32 products could overflow)."""
        return self.skipped

    def multiply(self, lo: int, hi: int, sl: CorpusSlice) -> None:
        """Query rows [lo, hi) x the slice into the work array, the columns cut into a part per
        thread (single-threaded BLAS each: one part's packed operands are its own); nothing
        when a product could overflow float32 (the rows are then scored exactly, `dense`)."""
        self.lo, self.approx = lo, self.work.approx[: hi - lo, : len(sl)]
        self.skipped = bool(np.max(self.q_norms[lo:hi]) * sl.vmax > DENSE_NORM)
        if self.skipped:
            return

        def part(a: int, b: int) -> None:
            np.matmul(self.q32[lo:hi], sl.gemm[a:b].T, out=self.approx[:, a:b])

        parallel(part, row_parts(len(sl), self.threads))

    def candidates(self, lo, hi, sl: CorpusSlice, margin, held_kth, k):
        """(rows, cols, their approximate scores) of query rows [lo, hi) of the multiplied chunk."""
        approx = self.approx[lo - self.lo : hi - self.lo]
        mask = self.work.mask[lo - self.lo : hi - self.lo, : len(sl)]
        rows, cols = candidates(approx, margin, held_kth, k, mask)
        return rows, cols, approx[rows, cols]


class TorchGemm:
    """A = q32 @ slice32.T in torch on `device` at full float32 precision; the candidate test
    runs there too and only the (row, col) pairs come back."""

    def __init__(self, q32: np.ndarray, q_norms, device: Any) -> None:
        import torch

        self.torch, self.device, self.q_norms = torch, torch.device(device), q_norms
        self.q32 = torch.from_numpy(q32).to(self.device)

    def dense(self, lo: int, hi: int, sl: CorpusSlice) -> bool:
        """Whether rows [lo, hi) score every pair exactly (float32 products could overflow)."""
        return bool(np.max(self.q_norms[lo:hi]) * sl.vmax > DENSE_NORM)

    def multiply(self, lo: int, hi: int, sl: CorpusSlice) -> None:
        """Nothing ahead: `candidates` multiplies its rows on the device."""

    @contextlib.contextmanager
    def _full_precision(self):
        """IEEE float32 matmul (no TF32 on CUDA, no bf16 in oneDNN) while the GEMM runs, then the
        caller's settings back; torch >= 2.9 through the per-backend fp32_precision flags."""
        torch = self.torch
        backends = [torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)]
        flags = [b for b in backends if b is not None and hasattr(b, "fp32_precision")]
        if not flags:  # older torch: the global setting
            saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")
            try:
                yield
            finally:
                torch.set_float32_matmul_precision(saved)
            return
        saved = [b.fp32_precision for b in flags]
        for b in flags:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, value in zip(flags, saved, strict=True):
                b.fp32_precision = value

    def candidates(self, lo, hi, sl: CorpusSlice, margin, held_kth, k):
        torch = self.torch
        if sl.device_gemm is None:
            sl.device_gemm = torch.from_numpy(sl.gemm).to(self.device)
        with self._full_precision():
            approx = self.q32[lo:hi] @ sl.device_gemm.T
        n, nb = approx.shape
        if held_kth is None and nb <= k:
            rows, cols = all_pairs(n, nb)
            return rows, cols, approx.cpu().numpy().reshape(-1)
        if held_kth is None:
            kth = torch.topk(approx, k, dim=1).values[:, -1].double().cpu().numpy()
            cut = kth - 2 * margin
        else:
            cut = held_kth - margin
        cut32 = torch.from_numpy(_below32(cut)).to(self.device)
        rows, cols = torch.nonzero(approx >= cut32[:, None], as_tuple=True)
        values = approx[rows, cols]
        return rows.cpu().numpy(), cols.cpu().numpy(), values.cpu().numpy()
