"""Coplanar photon beam arrangements and their beamlet (bixel) grids.

Geometry (IEC-like, head-first supine): gantry angles rotate in the axial (y, x) plane about the z axis through the
isocentre. At gantry 0° the source is anterior (−y) and the beam travels towards +y (posterior); at 90° the source
is on the patient's left (+x) and the beam travels towards −x. The beam's-eye-view (BEV) axes in the isocentre plane
are ``u`` (lateral, +x at gantry 0°) and ``z`` (superior). Bixels are squares of ``bixel_mm`` at the isocentre plane
whose centres sit at ``(i + 0.5) · bixel_mm`` along u and z, i.e. the bixel edges are multiples of ``bixel_mm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from m2m.physics.case import Case

DEFAULT_GANTRY_DEG: tuple[float, ...] = (0, 32, 64, 96, 264, 296, 328)


@dataclass(frozen=True)
class BeamSet:
    """A set of coplanar beams sharing one isocentre.

    ``gantry_deg``: gantry angles (degrees). ``bixel_mm``: bixel size at the isocentre plane (mm).
    ``isocentre_mm``: (z, y, x) in the case's coordinates (mm). ``sad_mm``: source-axis distance (mm).
    ``field_mm``: if given, every beam gets a fixed open rectangle of (u, z) size in mm centred on the isocentre
    (commissioning and tests; rounded to an even number of bixels); if None, each beam's bixels cover the PTV's
    BEV projection plus one bixel.
    """

    gantry_deg: tuple[float, ...]
    bixel_mm: float = 5.0
    isocentre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sad_mm: float = 1000.0
    field_mm: tuple[float, float] | None = None

    @property
    def n_beams(self) -> int:
        return len(self.gantry_deg)


@dataclass(frozen=True, eq=False)
class BeamGeometry:
    """Unit vectors of one beam in (y, x) components, and its source position (z, y, x) in mm."""

    direction_yx: tuple[float, float]
    lateral_yx: tuple[float, float]
    source_mm: tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class BixelGrid:
    """The active bixels of one beam: integer indices ``iu``, ``iz`` (bixel centre = (i + 0.5) · bixel_mm)."""

    iu: np.ndarray
    iz: np.ndarray
    bixel_mm: float

    @property
    def n(self) -> int:
        return int(self.iu.size)

    def centres_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Bixel centres (u, z) at the isocentre plane, mm."""
        return (self.iu + 0.5) * self.bixel_mm, (self.iz + 0.5) * self.bixel_mm


def every_n_degrees(step: float) -> tuple[float, ...]:
    """Equi-spaced gantry angles from 0° in steps of ``step`` degrees (e.g. 2 → 180 beams)."""
    if step <= 0 or step > 360:
        raise ValueError(f"step must be in (0, 360] degrees, got {step}")
    return tuple(float(a) for a in np.arange(0.0, 360.0, step))


def ptv_centroid_mm(case: Case) -> tuple[float, float, float]:
    """Centroid (z, y, x) of the target's voxel centres, in mm."""
    idx = np.nonzero(case.target.mask)
    return tuple(  # type: ignore[return-value]
        float(o + s * i.mean()) for o, s, i in zip(case.grid.origin_mm, case.grid.spacing_mm, idx, strict=True)
    )


def beams_for(case: Case, gantry_deg: tuple[float, ...] = DEFAULT_GANTRY_DEG, bixel_mm: float = 5.0) -> BeamSet:
    """Beams with the isocentre at the PTV centroid."""
    return BeamSet(gantry_deg=tuple(gantry_deg), bixel_mm=bixel_mm, isocentre_mm=ptv_centroid_mm(case))


def beam_geometry(beams: BeamSet, index: int) -> BeamGeometry:
    """Direction, lateral axis and source position of beam ``index``."""
    theta = np.deg2rad(beams.gantry_deg[index])
    d_y, d_x = float(np.cos(theta)), float(-np.sin(theta))
    l_y, l_x = float(np.sin(theta)), float(np.cos(theta))
    iz, iy, ix = beams.isocentre_mm
    source = (iz, iy - beams.sad_mm * d_y, ix - beams.sad_mm * d_x)
    return BeamGeometry(direction_yx=(d_y, d_x), lateral_yx=(l_y, l_x), source_mm=source)


def project(geom: BeamGeometry, sad_mm: float, points_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project points (n, 3) mm onto the beam: distance from the source along the central axis ``t`` (mm) and the
    divergent BEV coordinates ``u``, ``z`` at the isocentre plane (mm)."""
    sz, sy, sx = geom.source_mm
    rz = points_zyx[:, 0] - sz
    ry = points_zyx[:, 1] - sy
    rx = points_zyx[:, 2] - sx
    t = ry * geom.direction_yx[0] + rx * geom.direction_yx[1]
    lat = ry * geom.lateral_yx[0] + rx * geom.lateral_yx[1]
    scale = sad_mm / t
    return t, lat * scale, rz * scale


def voxel_centres_mm(case: Case, flat_index: np.ndarray) -> np.ndarray:
    """Voxel-centre coordinates (n, 3) in mm, (z, y, x), of C-order flat indices."""
    idx = np.unravel_index(flat_index, case.grid.shape)
    return np.stack(
        [o + s * i.astype(np.float64) for o, s, i in zip(case.grid.origin_mm, case.grid.spacing_mm, idx, strict=True)],
        axis=1,
    )


def bixel_grid(case: Case, beams: BeamSet, index: int) -> BixelGrid:
    """Active bixels of beam ``index``: the fixed open field, or the PTV's BEV projection dilated by one bixel."""
    b = beams.bixel_mm
    if beams.field_mm is not None:
        # An even bixel count keeps the field centred, since bixel edges sit on multiples of bixel_mm.
        nu = max(2, 2 * round(beams.field_mm[0] / (2 * b)))
        nz = max(2, 2 * round(beams.field_mm[1] / (2 * b)))
        iu, iz = np.meshgrid(np.arange(nu) - nu // 2, np.arange(nz) - nz // 2, indexing="ij")
        return BixelGrid(iu=iu.ravel().astype(np.int32), iz=iz.ravel().astype(np.int32), bixel_mm=b)
    geom = beam_geometry(beams, index)
    pts = voxel_centres_mm(case, np.flatnonzero(case.target.mask))
    _, u, z = project(geom, beams.sad_mm, pts)
    iu = np.floor(u / b).astype(np.int64)
    iz = np.floor(z / b).astype(np.int64)
    u0, z0 = iu.min() - 1, iz.min() - 1
    occ = np.zeros((iu.max() - u0 + 2, iz.max() - z0 + 2), dtype=bool)
    occ[iu - u0, iz - z0] = True
    # One bixel of margin around the projection covers voxel extent and the beam penumbra at the PTV edge.
    occ = ndimage.binary_dilation(occ, structure=np.ones((3, 3), dtype=bool))
    au, az = np.nonzero(occ)
    return BixelGrid(iu=(au + u0).astype(np.int32), iz=(az + z0).astype(np.int32), bixel_mm=b)
