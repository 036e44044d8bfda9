r"""Packed sparse storage of a dij and its two products, ``A @ x`` and ``Aᵀ @ y``, on every core.

A dij is non-negative and each beamlet's (column's) entries span a known range, so a column is stored as 16-bit
integers against one float scale: ``A_ij ≈ s_j · q_ij`` with ``s_j = max_i A_ij / 65535`` and
``q_ij = round(A_ij / s_j)`` (uint16). The error is at most ``s_j / 2``, i.e. 7.6e-6 of the beamlet's own maximum,
far below the dose engine's cut-off (5e-4 of a broad field) and model error. Row-compressed (CSR) layout with
uint16 column indices while there are at most 65,536 beamlets (int32 beyond): 4 bytes per non-zero instead of 8
for float32 CSR, and one orientation instead of two (a 180-beam prostate dij: 43 M non-zeros, 165 MiB instead of
660 MiB for float32 CSR with a stored transpose). The products stream these bytes, so they shrink with them.

Products (numba; from :data:`PARALLEL_MIN_NNZ` non-zeros on every core, threads ``NUMBA_NUM_THREADS``, default all
cores; smaller matrices on the calling thread):

.. math::

    (A x)_i = \sum_k q_{ik} (s \circ x)_{j_k}, \qquad (A^T y)_j = s_j \sum_i q_{ij} y_i

``A @ x`` (or the product on some rows only) gives each row to one thread. ``Aᵀ @ y`` splits the rows into
:data:`CHUNKS` fixed blocks of about equal non-zeros, accumulates each block into its own column vector and sums the
blocks in order, so the result is the same bit for bit whatever the number of threads (a 1-thread DRL actor and a
2-thread dose engine plan alike). Rows with ``y_i = 0`` are skipped: the objective's gradient is zero wherever no
penalty is active, which is most rows.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
import scipy.sparse as sp

#: Levels of the 16-bit code (``q`` in 0..LEVELS).
LEVELS = 65535
#: Most columns whose indices fit uint16.
SMALL_INDEX = 65536
_PACK_BLOCK = 1 << 22
#: Non-zeros from which the products run on every core (see :attr:`PackedCsr.parallel`).
PARALLEL_MIN_NNZ = 8_000_000
#: Fixed row blocks of ``Aᵀ @ y`` (≥ any thread count this runs with; results do not depend on threads).
CHUNKS = 16


def _forward_subset(indptr: np.ndarray, indices: np.ndarray, codes: np.ndarray, xs: np.ndarray, rows: np.ndarray,
                    out: np.ndarray) -> None:  # pragma: no cover - compiled
    for r in numba.prange(rows.size):
        i = rows[r]
        acc = np.float32(0.0)
        for k in range(indptr[i], indptr[i + 1]):
            acc += np.float32(codes[k]) * xs[indices[k]]
        out[i] = acc


def _backward_chunks(indptr: np.ndarray, indices: np.ndarray, codes: np.ndarray, y: np.ndarray, bounds: np.ndarray,
                     part: np.ndarray) -> None:  # pragma: no cover - compiled
    for c in numba.prange(bounds.size - 1):
        acc = part[c]
        for i in range(bounds[c], bounds[c + 1]):
            yi = y[i]
            if yi != 0.0:
                for k in range(indptr[i], indptr[i + 1]):
                    acc[indices[k]] += np.float32(codes[k]) * yi


def _named(fn: Callable[..., None], name: str) -> Callable[..., None]:
    """``fn`` under another name. numba keys its on-disk cache by a function's name and bytecode, not by the compile
    flags, so the serial and the parallel build of one loop need distinct names or each would load the other's."""
    return types.FunctionType(fn.__code__.replace(co_name=name, co_qualname=name), fn.__globals__, name)


# Each kernel twice: on every core, and on the calling thread alone (``prange`` is ``range`` there). Same loops, same
# order of additions per row and per block, so both give the same bits.
_forward = numba.njit(parallel=True, cache=True, fastmath=True, nogil=True)(_named(_forward_subset, "_forward"))
_forward_serial = numba.njit(cache=True, fastmath=True, nogil=True)(_named(_forward_subset, "_forward_serial"))
_backward = numba.njit(parallel=True, cache=True, fastmath=True, nogil=True)(_named(_backward_chunks, "_backward"))
_backward_serial = numba.njit(cache=True, fastmath=True, nogil=True)(_named(_backward_chunks, "_backward_serial"))


@numba.njit(cache=True, nogil=True)
def _column_max(indices: np.ndarray, data: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    for k in range(indices.size):
        if data[k] > out[indices[k]]:
            out[indices[k]] = data[k]


@numba.njit(cache=True, nogil=True)
def _column_sumsq(indptr: np.ndarray, indices: np.ndarray, codes: np.ndarray, rows: np.ndarray,
                  out: np.ndarray) -> None:  # pragma: no cover - compiled
    for i in rows:
        for k in range(indptr[i], indptr[i + 1]):
            q = np.float64(codes[k])
            out[indices[k]] += q * q


def set_product_threads(n: int) -> None:
    """Run this thread's parallel products on ``n`` threads (clamped to 1..``NUMBA_NUM_THREADS``); the results do
    not depend on it. Set it this way, not by changing ``NUMBA_NUM_THREADS`` in a running process: numba refuses a
    changed value once its threads have started."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def index_dtype(n_cols: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    """The narrowest column-index type for ``n_cols`` columns: uint16 up to :data:`SMALL_INDEX`, else int32."""
    return np.uint16 if n_cols <= SMALL_INDEX else np.int32


@dataclass(frozen=True, eq=False)
class PackedCsr:
    """A non-negative sparse matrix (n_rows × n_cols) as uint16 codes per column scale, CSR layout.

    ``indptr`` int64 (n_rows + 1), ``indices`` the column of each entry (uint16 up to :data:`SMALL_INDEX`
    columns, else int32), ``codes`` uint16, ``scale`` float32 per column (value = ``scale[j] * code``). Build
    with :meth:`from_csr`; products with ``A @ x`` and :meth:`rmatvec`.
    """

    indptr: np.ndarray
    indices: np.ndarray
    codes: np.ndarray
    scale: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        n_rows, n_cols = self.shape
        if self.indptr.shape != (n_rows + 1,) or self.scale.shape != (n_cols,):
            raise ValueError(f"packed matrix arrays do not match its shape {self.shape}")
        if self.indices.shape != self.codes.shape or self.indices.size != int(self.indptr[-1]):
            raise ValueError("packed matrix: indices, codes and indptr disagree on the number of entries")

    @cached_property
    def _row_blocks(self) -> np.ndarray:
        """The :data:`CHUNKS` row blocks of ``Aᵀ @ y`` (bounds, int64), of about equal non-zeros."""
        bounds = np.searchsorted(self.indptr, np.linspace(0, self.indices.size, CHUNKS + 1)).astype(np.int64)
        bounds[0], bounds[-1] = 0, self.shape[0]
        return np.maximum.accumulate(bounds)

    @cached_property
    def _every_row(self) -> np.ndarray:
        return np.arange(self.shape[0], dtype=np.int64)

    @classmethod
    def from_csr(cls, matrix: sp.csr_matrix | sp.csr_array) -> PackedCsr:
        """Pack a non-negative CSR matrix (any float dtype); raises ValueError on a negative or non-finite entry."""
        m = sp.csr_matrix(matrix)
        m.sum_duplicates()
        data = m.data
        if data.size and (not np.all(np.isfinite(data)) or data.min() < 0):
            raise ValueError("a dij must be finite and non-negative to be packed")
        n_cols = int(m.shape[1])
        col_max = np.zeros(n_cols, dtype=np.float64)
        _column_max(m.indices, data, col_max)
        scale = np.where(col_max > 0, col_max / LEVELS, 1.0)
        inverse = (1.0 / scale).astype(np.float32)
        codes = np.empty(data.size, dtype=np.uint16)
        for lo in range(0, data.size, _PACK_BLOCK):  # in blocks: a 43 M-entry dij needs no float copy of itself
            hi = min(lo + _PACK_BLOCK, data.size)
            codes[lo:hi] = np.rint(data[lo:hi] * inverse[m.indices[lo:hi]])
        return cls(np.asarray(m.indptr, dtype=np.int64), np.asarray(m.indices, dtype=index_dtype(n_cols)), codes,
                   scale.astype(np.float32), (int(m.shape[0]), n_cols))

    @property
    def parallel(self) -> bool:
        """Whether the products use every core: only from :data:`PARALLEL_MIN_NNZ` non-zeros up. A smaller product
        takes a few milliseconds, and a thread waiting for a core that another process holds would cost more."""
        return self.nnz >= PARALLEL_MIN_NNZ

    @property
    def nnz(self) -> int:
        return int(self.codes.size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what the matrix keeps resident)."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.codes.nbytes + self.scale.nbytes)

    def to_csr(self) -> sp.csr_matrix:
        """The decoded values as float32 CSR (a copy: 8 bytes per non-zero; for tests, exports and small dijs)."""
        values = self.codes.astype(np.float32) * self.scale[self.indices]
        return sp.csr_matrix((values, self.indices.copy(), self.indptr.copy()), shape=self.shape)

    def select_rows(self, rows: np.ndarray) -> PackedCsr:
        """The rows ``rows`` (in that order) as a new packed matrix with the same column scales."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        lengths = stops - starts
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        take = (np.repeat(starts - indptr[:-1], lengths) + np.arange(int(indptr[-1]))).astype(np.int64)
        return PackedCsr(indptr, self.indices[take], self.codes[take], self.scale.copy(), (rows.size, self.shape[1]))

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        """``A @ x`` (float32, one entry per row)."""
        return self.matvec_rows(x)

    def matvec_rows(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """``(A @ x)[i]`` for the rows ``rows`` (int64, each once; None: every row), in a full-length float32 vector
        whose other entries are 0: the product an objective needs when the dij has rows it does not read (e.g.
        report-only OARs)."""
        x = np.asarray(x)
        if x.shape != (self.shape[1],):
            raise ValueError(f"A @ x: x has shape {x.shape}, expected ({self.shape[1]},)")
        out = np.zeros(self.shape[0], dtype=np.float32)
        kernel = _forward if self.parallel else _forward_serial
        kernel(self.indptr, self.indices, self.codes, (self.scale * x).astype(np.float32),
               self._every_row if rows is None else np.asarray(rows, dtype=np.int64), out)
        return out

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        """``Aᵀ @ y`` (float32, one entry per column); the same bits whatever the number of threads."""
        y = np.ascontiguousarray(y, dtype=np.float32)
        if y.shape != (self.shape[0],):
            raise ValueError(f"Aᵀ @ y: y has shape {y.shape}, expected ({self.shape[0]},)")
        bounds = self._row_blocks
        part = np.zeros((bounds.size - 1, self.shape[1]), dtype=np.float32)
        (_backward if self.parallel else _backward_serial)(self.indptr, self.indices, self.codes, y, bounds, part)
        out = part[0].copy()
        for c in range(1, part.shape[0]):
            out += part[c]
        out *= self.scale
        return out

    def column_sumsq(self, rows: np.ndarray) -> np.ndarray:
        """``Σ_{i ∈ rows} A_ij²`` per column (float64): e.g. a beamlet's squared dose summed over the PTV."""
        out = np.zeros(self.shape[1], dtype=np.float64)
        _column_sumsq(self.indptr, self.indices, self.codes, np.asarray(rows, dtype=np.int64), out)
        return out * self.scale.astype(np.float64) ** 2
