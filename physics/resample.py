"""Resample a case to a dose grid: the pipeline stage between loading a CT and computing its dij.

A clinical CT (e.g. 512 × 512 × 160 at 0.74 × 0.74 × 2 mm, 42 M voxels) is far finer than the dose needs; the dose
engine's cost grows with the voxels it ray-traces. :func:`resample_case` returns the case on a regular grid of
``spacing_mm`` (z, y, x) over the part of the CT that holds the patient:

* **Extent.** The bounding box of the body structure (role ``"body"``; without one, of every voxel denser than
  :data:`AIR_DENSITY`) grown by one new voxel, so nothing the beams cross is cut away. The new grid's voxel centres
  start half a new voxel inside that box, so the box is covered without extrapolating: for an axis of ``n`` old
  voxels of size ``s`` and a new size ``S``, ``n' = ceil(n·s/S)``.
* **Density.** Averaged over each new voxel: a box filter of ``S/s`` old voxels per axis (area-weighted mean, so
  relative electron density is conserved), then trilinear interpolation at the new centres.
* **Structures.** The same box filter on each mask (0/1) gives the fraction of the new voxel inside the structure;
  a new voxel belongs to the structure when that fraction is ≥ :data:`INSIDE_FRACTION` (0.5), so volumes are kept to
  within the partial-volume error at the boundary. A structure left with no voxel (smaller than about half a new
  voxel) is a :class:`ValueError` naming it.

Coordinates: the new grid stays in the CT's patient frame (``origin_mm`` of the new voxel [0, 0, 0]), so a dose on it
is placed exactly in the CT's frame of reference (an RTDOSE written on it overlays the CT).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import structlog
from scipy import ndimage

from m2m.physics.case import Case, Grid, Structure

log = structlog.get_logger()

#: Relative electron density below which a voxel counts as air when the case has no body structure.
AIR_DENSITY = 0.1
#: Fraction of a new voxel a structure must fill to own it.
INSIDE_FRACTION = 0.5


@dataclass(frozen=True)
class Resampled:
    """The resampled case and what it took: ``seconds`` wall time, voxel counts before and after."""

    case: Case
    seconds: float
    voxels_before: int
    voxels_after: int


def resample_case(case: Case, spacing_mm: tuple[float, float, float]) -> Resampled:
    """``case`` on a grid of ``spacing_mm`` (mm, z, y, x) over its patient (see the module docstring)."""
    started = time.perf_counter()
    new_spacing = tuple(float(s) for s in spacing_mm)
    if len(new_spacing) != 3 or min(new_spacing) <= 0:
        raise ValueError(f"dose grid spacing must be 3 positive numbers (z, y, x) in mm, got {spacing_mm}")
    lo, hi = _patient_box(case, new_spacing)
    old = case.grid
    # Crop first: every later array is the patient's box, not the whole CT.
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    shape, start_index = [], []
    for axis in range(3):
        n_old = hi[axis] - lo[axis]
        extent = n_old * old.spacing_mm[axis]
        n_new = max(1, math.ceil(extent / new_spacing[axis] - 1e-9))
        shape.append(n_new)
        # Old-index coordinate (within the crop) of the new voxel 0's centre: the new grid is centred on the crop.
        start_index.append((n_old - 1) / 2 - (n_new - 1) / 2 * new_spacing[axis] / old.spacing_mm[axis])
    step = [new_spacing[a] / old.spacing_mm[a] for a in range(3)]
    coords = np.meshgrid(*[start_index[a] + step[a] * np.arange(shape[a]) for a in range(3)], indexing="ij")
    width = [max(1, round(s)) for s in step]

    def sample(volume: np.ndarray) -> np.ndarray:
        smooth = ndimage.uniform_filter(volume, size=width, mode="nearest") if max(width) > 1 else volume
        return np.asarray(ndimage.map_coordinates(smooth, coords, order=1, mode="nearest"), dtype=np.float32)

    density = sample(np.ascontiguousarray(case.density[crop], dtype=np.float32))
    structures = []
    for s in case.structures:
        fraction = sample(s.mask[crop].astype(np.float32))
        mask = fraction >= INSIDE_FRACTION
        if not mask.any():
            raise ValueError(f"structure {s.name!r} of case {case.case_id} has no voxel on the {new_spacing} mm dose "
                             f"grid (it is smaller than about half a dose voxel)")
        structures.append(Structure(name=s.name, role=s.role, mask=mask))
    origin = tuple(
        old.origin_mm[a] + (lo[a] + start_index[a]) * old.spacing_mm[a] for a in range(3)
    )
    grid = Grid(shape=(shape[0], shape[1], shape[2]), spacing_mm=new_spacing,
                origin_mm=origin)
    out = replace(case, grid=grid, density=density, structures=tuple(structures))
    seconds = time.perf_counter() - started
    log.info("case_resampled", case=case.case_id, before=old.shape, after=grid.shape, spacing_mm=new_spacing,
             seconds=round(seconds, 2))
    return Resampled(out, seconds, old.n_voxels, grid.n_voxels)


def _patient_box(case: Case, spacing_mm: tuple[float, ...]) -> tuple[list[int], list[int]]:
    """Index bounds ``[lo, hi)`` per axis of the patient (body, else non-air voxels), grown by one new voxel."""
    bodies = [s.mask for s in case.structures if s.role == "body"]
    inside = bodies[0] if bodies else case.density > AIR_DENSITY
    if not inside.any():
        return [0, 0, 0], list(case.grid.shape)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(inside.any(axis=other))
        margin = math.ceil(spacing_mm[axis] / case.grid.spacing_mm[axis])
        lo.append(max(0, int(present[0]) - margin))
        hi.append(min(case.grid.shape[axis], int(present[-1]) + 1 + margin))
    return lo, hi
