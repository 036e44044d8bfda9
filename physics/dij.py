"""The dose-influence matrix (dij) type shared by the dose engine and the optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from m2m.physics.sparse import PackedCsr


@dataclass(frozen=True, eq=False)
class Dij:
    """Sparse dose-influence matrix restricted to the voxels of the structures that need dose.

    ``matrix`` (:class:`~m2m.physics.sparse.PackedCsr`, shape (n_rows, n_beamlets)): dose in Gy per unit beamlet
    weight, 16-bit codes per beamlet scale; ``matrix @ x`` and ``matrix.rmatvec(y)`` are the products, ``to_csr()``
    the float32 values. ``voxel_index[r]`` is the flat (C-order) grid index of row ``r``; ``rows[name]`` are the
    row indices of a structure (rows are shared where structures overlap). ``beamlet_beam[j]`` is the beam index
    of beamlet ``j``. ``key`` is the content hash the cache stores it under. Build from a float CSR matrix with
    :meth:`from_csr`.
    """

    matrix: PackedCsr
    voxel_index: np.ndarray
    rows: dict[str, np.ndarray]
    beamlet_beam: np.ndarray
    voxel_volume_cc: float
    grid_shape: tuple[int, int, int]
    key: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.matrix, PackedCsr):
            raise TypeError(f"Dij.matrix must be a PackedCsr (use Dij.from_csr), got {type(self.matrix).__name__}")

    @classmethod
    def from_csr(cls, matrix: sp.csr_matrix | sp.csr_array, **values: Any) -> Dij:
        """``Dij(matrix=PackedCsr.from_csr(matrix), **values)``: pack a float (Gy per unit weight) CSR dij."""
        return cls(matrix=PackedCsr.from_csr(matrix), **values)

    @property
    def n_beamlets(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self.matrix.shape[0])

    def dose(self, fluence: np.ndarray) -> np.ndarray:
        """Dose (Gy) on every row for beamlet weights ``fluence``."""
        return self.matrix @ np.asarray(fluence)

    def dose_to_grid(self, fluence: np.ndarray) -> np.ndarray:
        """Dose (Gy) on the full grid (zero outside the computed rows), for plots."""
        full = np.zeros(int(np.prod(self.grid_shape)), dtype=np.float32)
        full[self.voxel_index] = self.dose(fluence)
        return full.reshape(self.grid_shape)
