"""Fixtures shared by several test files."""

import pytest


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss's OpenMP threads spin under CPU contention (shared CI machines); one thread is faster there."""
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
