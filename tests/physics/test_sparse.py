"""The packed dij storage (m2m.physics.sparse): values within the 16-bit code's error of the float matrix, products
equal to float CSR products, the same bits serial, parallel and on any number of threads, bad input refused."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import scipy.sparse as sp

from m2m.physics import sparse
from m2m.physics.sparse import LEVELS, PackedCsr


def _random_dij(n_rows: int = 3000, n_cols: int = 400, density: float = 0.05, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(n_rows, n_cols, density=density, format="csr", random_state=rng, dtype=np.float32)
    # beamlets of very different strength, as in a dij (per-column scales must follow them)
    m = m @ sp.diags(rng.uniform(1e-3, 10.0, n_cols).astype(np.float32))
    return sp.csr_matrix(m, dtype=np.float32)


def test_values_within_the_code_error_and_products_match_float_csr() -> None:
    a = _random_dij()
    p = PackedCsr.from_csr(a)
    assert p.codes.dtype == np.uint16 and p.indices.dtype == np.uint16 and p.nnz == a.nnz
    decoded = p.to_csr()
    col_max = np.asarray(a.max(axis=0).todense()).ravel()
    err = np.abs(decoded - a).tocsc()
    per_column = np.asarray(err.max(axis=0).todense()).ravel()
    # half a code step of each column, plus float32 rounding of the decoded value
    assert np.all(per_column <= 0.5 * col_max / LEVELS + 4e-7 * col_max)
    x = np.random.default_rng(1).uniform(0, 2, a.shape[1]).astype(np.float32)
    y = np.random.default_rng(2).uniform(-1, 1, a.shape[0]).astype(np.float32)
    np.testing.assert_allclose(p @ x, a @ x, rtol=1e-4, atol=1e-4 * float(np.max(a @ x)))
    np.testing.assert_allclose(p.rmatvec(y), a.T @ y, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(a.T @ y))))


def test_rows_with_zero_weight_are_skipped_without_changing_the_product() -> None:
    a = _random_dij(seed=3)
    p = PackedCsr.from_csr(a)
    y = np.random.default_rng(4).uniform(0, 1, a.shape[0]).astype(np.float32)
    y[np.random.default_rng(5).random(a.shape[0]) < 0.9] = 0.0
    np.testing.assert_allclose(p.rmatvec(y), p.to_csr().T @ y, rtol=1e-5, atol=1e-6)


def test_serial_parallel_and_thread_counts_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    a = _random_dij(n_rows=20000, n_cols=900, density=0.02, seed=6)
    p = PackedCsr.from_csr(a)
    x = np.random.default_rng(7).uniform(0, 2, a.shape[1]).astype(np.float32)
    y = np.random.default_rng(8).uniform(-1, 1, a.shape[0]).astype(np.float32)
    monkeypatch.setattr(sparse, "PARALLEL_MIN_NNZ", 10**12)
    assert not p.parallel
    serial = (p @ x, p.rmatvec(y))
    monkeypatch.setattr(sparse, "PARALLEL_MIN_NNZ", 0)
    assert p.parallel
    results = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append((p @ x, p.rmatvec(y)))
    finally:
        numba.set_num_threads(before)
    for forward, backward in results:
        np.testing.assert_array_equal(forward, serial[0])
        np.testing.assert_array_equal(backward, serial[1])


def test_select_rows_and_column_sums_of_squares() -> None:
    a = _random_dij(seed=9)
    p = PackedCsr.from_csr(a)
    rows = np.array([5, 0, 2999, 17, 17])
    picked = p.select_rows(rows)
    assert picked.shape == (5, a.shape[1])
    np.testing.assert_array_equal(picked.to_csr().toarray(), p.to_csr()[rows].toarray())
    decoded = p.to_csr()
    ptv = np.arange(100, 900)
    expected = np.asarray(decoded[ptv].multiply(decoded[ptv]).sum(axis=0), dtype=np.float64).ravel()
    np.testing.assert_allclose(p.column_sumsq(ptv), expected, rtol=1e-5)


def test_wide_matrices_take_int32_indices() -> None:
    a = sp.csr_matrix(([1.0, 2.0], ([0, 0], [3, 70_000])), shape=(1, 70_001), dtype=np.float32)
    p = PackedCsr.from_csr(a)
    assert p.indices.dtype == np.int32
    x = np.zeros(70_001, dtype=np.float32)
    x[70_000] = 1.0
    assert (p @ x)[0] == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_negative_or_non_finite_entries_are_refused(bad: float) -> None:
    a = sp.csr_matrix(np.array([[1.0, bad], [0.5, 0.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="finite and non-negative"):
        PackedCsr.from_csr(a)


def test_inconsistent_arrays_are_refused() -> None:
    p = PackedCsr.from_csr(_random_dij(n_rows=10, n_cols=5, density=0.5))
    with pytest.raises(ValueError, match="shape"):
        PackedCsr(p.indptr, p.indices, p.codes, p.scale, (11, 5))
    with pytest.raises(ValueError, match="disagree"):
        PackedCsr(p.indptr, p.indices[:-1], p.codes, p.scale, p.shape)


def test_a_product_on_some_rows_computes_those_rows_and_leaves_the_others_zero() -> None:
    a = _random_dij(seed=10)
    p = PackedCsr.from_csr(a)
    x = np.random.default_rng(11).uniform(0, 2, a.shape[1])
    rows = np.array([0, 17, 1500, 2999])
    part, full = p.matvec_rows(x, rows), p @ x
    np.testing.assert_array_equal(part[rows], full[rows])
    assert np.count_nonzero(np.delete(part, rows)) == 0
