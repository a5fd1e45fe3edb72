"""Helpers shared by the FAISS tests (test_index.py, test_ann.py)."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Tiny indexes: OpenMP threads only add spin-waiting on a shared 2-core machine."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def clustered(n: int, dim: int = 16, *, seed: int = 0, centers: int = 20) -> np.ndarray:
    """n float32 vectors around `centers` random centres: realistic neighbourhoods for ANN tests."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    return (c[rng.integers(0, centers, n)] + 0.4 * rng.standard_normal((n, dim))).astype(np.float32)
