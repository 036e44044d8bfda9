"""A planning case: a CT-like voxel grid, named structures and a prescription.

Arrays are indexed ``[z, y, x]`` (C order); ``spacing_mm`` and ``origin_mm`` follow the same axis order.
``origin_mm`` is the position of the centre of voxel ``[0, 0, 0]``. Beams rotate in the axial (y, x)
plane about the z axis (patient superior-inferior).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

Role = Literal["target", "oar", "body"]


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular voxel grid. ``shape`` is (nz, ny, nx); spacings and origin are in mm, (z, y, x)."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cm³."""
        dz, dy, dx = self.spacing_mm
        return dz * dy * dx / 1000.0

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def coordinates_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along z, y and x (1-D arrays, mm)."""
        return tuple(  # type: ignore[return-value]
            o + s * np.arange(n, dtype=np.float64)
            for o, s, n in zip(self.origin_mm, self.spacing_mm, self.shape, strict=True)
        )


@dataclass(frozen=True, eq=False)
class Structure:
    """A named region of interest; ``mask`` is a boolean array of the grid's shape."""

    name: str
    role: Role
    mask: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True, eq=False)
class Case:
    """One patient (real or phantom).

    ``density`` is the relative electron density (water = 1.0) per voxel, float32, grid-shaped.
    ``rx_gy`` is the prescription dose in Gy to the target.
    """

    case_id: str
    site: str
    grid: Grid
    density: np.ndarray
    structures: tuple[Structure, ...]
    rx_gy: float
    seed: int | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.structures]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate structure names in case {self.case_id}: {names}")
        if self.density.shape != self.grid.shape:
            raise ValueError(f"density shape {self.density.shape} != grid shape {self.grid.shape}")
        for s in self.structures:
            if s.mask.shape != self.grid.shape or s.mask.dtype != np.bool_:
                raise ValueError(f"structure {s.name}: mask must be bool with the grid's shape")

    def structure(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(f"case {self.case_id} has no structure {name!r}; it has {self.structure_names}")

    @property
    def structure_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.structures)

    @property
    def target(self) -> Structure:
        """The single target structure (the PTV)."""
        targets = [s for s in self.structures if s.role == "target"]
        if len(targets) != 1:
            raise ValueError(f"case {self.case_id} has {len(targets)} targets; exactly one is supported")
        return targets[0]

    @property
    def oars(self) -> tuple[Structure, ...]:
        return tuple(s for s in self.structures if s.role == "oar")

    def content_hash(self) -> str:
        """sha256 over the geometry, densities, masks and prescription: equal hash ⇔ same planning input."""
        h = hashlib.sha256()
        h.update(repr((self.grid.shape, self.grid.spacing_mm, self.grid.origin_mm, self.rx_gy)).encode())
        h.update(np.ascontiguousarray(self.density, dtype=np.float32).tobytes())
        for s in self.structures:
            h.update(f"{s.name}:{s.role}".encode())
            h.update(np.packbits(s.mask).tobytes())
        return h.hexdigest()
