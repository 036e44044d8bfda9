"""Procedural patient phantoms: prostate and liver cohorts with per-patient anatomical variation.

Every case is a deterministic function of ``(site, seed)``: all random draws come from one
``numpy.random.Generator(PCG64(seed))``, so ``make_case("prostate", 42)`` is the same phantom on every machine.

Coordinates (mm) follow :mod:`m2m.physics.case`: arrays are ``[z, y, x]``; ``x`` increases towards the patient's
left, ``y`` towards posterior, ``z`` towards superior. The body contour is centred on ``(y, x) = (0, 0)`` and the
treated organ on ``z ≈ 0``. Density is relative electron density (water = 1.0), 0 (air) outside the body.

Grid (why): only coplanar beams are used, so the axial field of view must hold the whole body contour (rays cross
it), while the superior-inferior extent is cropped to the organs that are scored. The dose engine keeps dij rows
only for target and OAR voxels, so the voxel size sets the row count and, with the beamlet footprint, the number of
non-zeros; the optimizer must stay in the 2-5 M non-zero range for 7 beams.

- prostate: 3 × 3 × 3 mm (27 mm³), 54 × 96 × 136 voxels = 162 × 288 × 408 mm (z, y, x).
- liver: 4 × 3 × 3 mm (36 mm³), 50 × 96 × 128 voxels = 200 × 288 × 384 mm; 4 mm slices because the liver and
  its PTV are large in z, and 3 mm in-plane keeps the 8-12 mm spinal cord several voxels across.

Prostate anatomy (ranges are the uniform sampling ranges; semi-axes are LR × AP × SI):
- body: elliptic cylinder, semi-axes 160-195 mm (LR) × 105-135 mm (AP); subcutaneous fat (density 0.95) 8-25 mm
  thick, muscle/soft tissue 1.04 inside.
- prostate (not a structure): ellipsoid 19-27 × 14-20 × 16-24 mm (≈ 18-54 cc), centre 5 mm anterior to 10 mm
  posterior of the body centre, ±2 mm (sd) lateral. ``ptv`` = prostate grown isotropically by 5-7 mm (≈ 40-80 cc).
- rectum: tube of radius 12-18 mm (1.2× wider LR), 100 mm long, bending posteriorly above the prostate; its anterior
  wall lies 7 mm inside to 2 mm clear of the prostate's posterior surface (the prostate indents it), so the PTV
  overlaps 0-7 cc of rectum (mean ≈ 2.5 cc over seeds 0-29); the cropped rectum is ≈ 55-130 cc.
- bladder: ellipsoid 30-45 × 25-38 × 22-35 mm (≈ 85-225 cc, density 1.0), 5-15 mm anterior of the prostate axis;
  its lowest point lies 10 mm below to 3 mm above the prostate's top, so the PTV overlaps 0-6 cc of bladder.
- femoral_head_l / _r: spheres of radius 22-26 mm (≈ 45-72 cc) at ±85-100 mm lateral, density 1.5-1.7 (bone).
- density-only bone: pubic symphysis anterior of the bladder neck and sacrum/coccyx posterior of the rectum (1.5).

Liver anatomy (prescription 50 Gy in 5 fractions: the top SBRT dose level of RTOG 1112 and common practice for
liver metastases/HCC; its standard criteria are PTV coverage, liver_normal mean dose/spared volume, stomach, cord and
kidney limits):
- body: elliptic cylinder 150-185 × 105-130 mm; fat 0.95 (8-20 mm), soft tissue 1.04.
- liver (role ``body``: context only, not scored): right lobe ellipsoid 60-75 × 60-80 × 60-75 mm plus a left lobe
  45-60 × 30-40 × 35-45 mm towards the left/anterior, kept 10 mm inside the skin (≈ 1,400-2,000 cc), density 1.05.
- ptv (target): a GTV ellipsoid of mean radius 10-22 mm grown by 5 mm (≈ 13-75 cc); its centre sits 0.4-1.6× the
  PTV radius below the liver surface (below 1× the PTV crosses the liver edge); in ~35 % of cases the lesion is
  drawn within 15 mm plus the PTV radius of the stomach.
- liver_normal (oar) = liver minus PTV.
- stomach (oar): ellipsoid 35-50 × 28-40 × 40-55 mm left of the left lobe, minus liver; density 1.02.
- kidney_l / kidney_r (oar): ellipsoids 22-28 × 22-28 × 45-55 mm at ±60-75 mm, level with the vertebral body and
  30-55 mm inferior of the liver centre; minus liver.
- vertebra (role ``body``: density context): vertebral body 22 × 17 mm, the ring of the spinal canal and the spinous
  process, density 1.5-1.7; spinal_cord (oar): cylinder of radius 5-6 mm inside the 8 mm canal (CSF 1.0).
- density-only lung bases (0.25) posterior-lateral at the superior edge of the field of view, above the liver dome.

Role convention: ``target`` and ``oar`` are what dose rows, objectives and protocol criteria refer to; the structure
named ``body`` is the external contour; any other ``body``-role structure (``liver``, ``vertebra``) is anatomical
context that is neither scored nor optimised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from m2m.physics.case import Case, Grid, Structure
from scipy import ndimage

Site = Literal["prostate", "liver"]

PROSTATE_RX_GY = 79.2
LIVER_RX_GY = 50.0

_PROSTATE_GRID = Grid(shape=(54, 96, 136), spacing_mm=(3.0, 3.0, 3.0), origin_mm=(-60.0, -142.5, -202.5))
_LIVER_GRID = Grid(shape=(50, 96, 128), spacing_mm=(4.0, 3.0, 3.0), origin_mm=(-98.0, -142.5, -190.5))

_FAT = 0.95
_SOFT = 1.04


def make_case(site: Site, seed: int) -> Case:
    """Build the phantom for ``site`` ("prostate" or "liver") and ``seed`` (deterministic).

    Prostate: rx_gy = 79.2 Gy. Liver: rx_gy = 50 Gy (5 fractions). See the module docstring for the anatomy.
    """
    if site == "prostate":
        return _prostate(seed)
    if site == "liver":
        return _liver(seed)
    raise ValueError(f"unknown site {site!r}; expected 'prostate' or 'liver'")


def cohort(site: Site, seeds: Iterable[int]) -> list[Case]:
    """One case per seed, in the order given."""
    return [make_case(site, int(s)) for s in seeds]


class _Axes:
    """Broadcastable voxel-centre coordinates (mm) of a grid: z[:,None,None], y[None,:,None], x[None,None,:]."""

    def __init__(self, grid: Grid) -> None:
        z, y, x = grid.coordinates_mm()
        self.z = z[:, None, None]
        self.y = y[None, :, None]
        self.x = x[None, None, :]
        self.grid = grid

    def ellipsoid(self, centre: tuple[float, float, float], semi: tuple[float, float, float]) -> np.ndarray:
        """Boolean ellipsoid; ``centre`` and ``semi`` in (z, y, x) mm."""
        cz, cy, cx = centre
        az, ay, ax = semi
        return ((self.z - cz) / az) ** 2 + ((self.y - cy) / ay) ** 2 + ((self.x - cx) / ax) ** 2 <= 1.0

    def ellipse_cylinder(self, cy: float, cx: float, ay: float, ax: float) -> np.ndarray:
        """Boolean elliptic cylinder along z spanning the whole grid."""
        m = ((self.y - cy) / ay) ** 2 + ((self.x - cx) / ax) ** 2 <= 1.0
        return np.broadcast_to(m, self.grid.shape).copy()

    def grow(self, mask: np.ndarray, margin_mm: float) -> np.ndarray:
        """Isotropic expansion by ``margin_mm`` using the Euclidean distance in mm (anisotropic voxels)."""
        dist = ndimage.distance_transform_edt(~mask, sampling=self.grid.spacing_mm)
        return np.asarray(dist <= margin_mm)

    def depth_inside(self, mask: np.ndarray) -> np.ndarray:
        """Distance (mm) from each voxel inside ``mask`` to the nearest voxel outside it."""
        return np.asarray(ndimage.distance_transform_edt(mask, sampling=self.grid.spacing_mm))


def _snap(value_mm: float, grid: Grid, axis: int) -> float:
    """The voxel-centre coordinate (mm) nearest to ``value_mm`` along ``axis``."""
    o, s = grid.origin_mm[axis], grid.spacing_mm[axis]
    return o + s * round((value_mm - o) / s)


def _body(ax: _Axes, rng: np.random.Generator, ax_range: tuple[float, float], ay_range: tuple[float, float],
          fat_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, float, float]:
    a_x = rng.uniform(*ax_range)
    a_y = rng.uniform(*ay_range)
    fat = rng.uniform(*fat_range)
    body = ax.ellipse_cylinder(0.0, 0.0, a_y, a_x)
    inner = ax.ellipse_cylinder(0.0, 0.0, a_y - fat, a_x - fat)
    density = np.zeros(ax.grid.shape, dtype=np.float32)
    density[body] = _FAT
    density[inner] = _SOFT
    return body, density, a_x, a_y


def _prostate(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    ax = _Axes(_PROSTATE_GRID)
    body, density, _a_x, _a_y = _body(ax, rng, (160.0, 195.0), (105.0, 135.0), (8.0, 25.0))

    p_semi = (rng.uniform(16.0, 24.0), rng.uniform(14.0, 20.0), rng.uniform(19.0, 27.0))  # (SI, AP, LR)
    p_c = (0.0, rng.uniform(-5.0, 10.0), rng.normal(0.0, 2.0))
    prostate = ax.ellipsoid(p_c, p_semi)
    margin = rng.uniform(5.0, 7.0)
    ptv = ax.grow(prostate, margin) & body

    # Rectum: the sampled gap between prostate and anterior rectal wall is what sets the PTV/rectum overlap.
    r_rad = rng.uniform(12.0, 18.0)
    gap_r = rng.uniform(-7.0, 2.0)
    r_y0 = p_c[1] + p_semi[1] + gap_r + r_rad
    z_lo, z_hi = p_c[0] - 45.0, p_c[0] + 55.0
    bend = rng.uniform(0.002, 0.006)  # mm⁻¹: posterior sweep towards the sigmoid above the prostate
    above = np.clip(ax.z - (p_c[0] + p_semi[0]), 0.0, None)
    r_yc = r_y0 + bend * above**2
    rectum = (((ax.y - r_yc) / r_rad) ** 2 + ((ax.x - p_c[2]) / (1.2 * r_rad)) ** 2 <= 1.0) & (
        (ax.z >= z_lo) & (ax.z <= z_hi)
    )

    b_semi = (rng.uniform(22.0, 35.0), rng.uniform(25.0, 38.0), rng.uniform(30.0, 45.0))
    gap_b = rng.uniform(-10.0, 3.0)
    b_c = (p_c[0] + p_semi[0] + b_semi[0] + gap_b, p_c[1] - rng.uniform(5.0, 15.0), p_c[2] + rng.normal(0.0, 3.0))
    bladder = ax.ellipsoid(b_c, b_semi)

    fh_r = rng.uniform(22.0, 26.0)
    fh_x = rng.uniform(85.0, 100.0)
    fh_y = p_c[1] + rng.uniform(-5.0, 10.0)
    fh_z = p_c[0] + rng.uniform(0.0, 15.0)
    fh_rho = rng.uniform(1.5, 1.7)
    fh_l = ax.ellipsoid((fh_z, fh_y, fh_x + rng.normal(0.0, 1.5)), (fh_r, fh_r, fh_r))
    fh_r_mask = ax.ellipsoid((fh_z, fh_y, -fh_x + rng.normal(0.0, 1.5)), (fh_r, fh_r, fh_r))

    # Organs never overlap each other (only the PTV margin does): prostate > rectum > bladder.
    rectum &= ~prostate & body
    bladder &= ~prostate & ~rectum & body

    soft_organs = prostate | rectum | bladder
    pubis = ax.ellipsoid((p_c[0] + 5.0, b_c[1] - b_semi[1] - rng.uniform(8.0, 15.0), 0.0), (20.0, 8.0, 25.0))
    sacrum_y = r_y0 + r_rad + rng.uniform(12.0, 20.0) + 12.0
    sacrum = ax.ellipse_cylinder(sacrum_y, 0.0, 12.0, 45.0) & (ax.z > p_c[0] - 20.0)
    bone = (pubis | sacrum) & body & ~soft_organs & ~ax.grow(soft_organs, 3.0)
    density[bone] = 1.5
    density[bladder] = 1.0
    density[rectum] = 1.03
    density[fh_l | fh_r_mask] = fh_rho

    structures = (
        Structure("body", "body", body),
        Structure("ptv", "target", ptv),
        Structure("bladder", "oar", bladder),
        Structure("rectum", "oar", rectum),
        Structure("femoral_head_l", "oar", fh_l & body),
        Structure("femoral_head_r", "oar", fh_r_mask & body),
    )
    return Case(
        case_id=f"prostate-{seed:04d}",
        site="prostate",
        grid=_PROSTATE_GRID,
        density=density,
        structures=structures,
        rx_gy=PROSTATE_RX_GY,
        seed=seed,
    )


def _liver(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    ax = _Axes(_LIVER_GRID)
    body, density, a_x, a_y = _body(ax, rng, (150.0, 185.0), (105.0, 130.0), (8.0, 20.0))
    inner_body = ax.ellipse_cylinder(0.0, 0.0, a_y - 10.0, a_x - 10.0)

    # Vertebra (posterior midline) with the canal and cord; the cord runs through the whole field of view.
    # Snapped to a voxel centre in y (x = 0 is a voxel edge) so the thin cord keeps a stable voxel count.
    canal_y = _snap(a_y - rng.uniform(50.0, 60.0) + 26.0, ax.grid, axis=1)
    v_y = canal_y - 26.0
    v_body = ax.ellipse_cylinder(v_y, 0.0, 17.0, 22.0)
    ring_r2 = (ax.y - canal_y) ** 2 + ax.x**2
    arch = np.broadcast_to((ring_r2 > 8.0**2) & (ring_r2 <= 15.0**2), ax.grid.shape)
    spinous = np.broadcast_to((np.abs(ax.x) <= 4.0) & (ax.y > canal_y + 8.0) & (ax.y <= canal_y + 35.0), ax.grid.shape)
    vertebra = (v_body | arch | spinous) & body
    canal = ax.ellipse_cylinder(canal_y, 0.0, 8.0, 8.0)
    cord_r = rng.uniform(5.0, 6.0)
    cord = ax.ellipse_cylinder(canal_y, 0.0, cord_r, cord_r)

    rl_semi = (rng.uniform(60.0, 75.0), rng.uniform(60.0, 80.0), rng.uniform(60.0, 75.0))
    right_lobe = ax.ellipsoid((rng.uniform(-5.0, 5.0), rng.uniform(-10.0, 5.0), -0.45 * a_x), rl_semi)
    ll_semi = (rng.uniform(35.0, 45.0), rng.uniform(30.0, 40.0), rng.uniform(45.0, 60.0))
    left_lobe = ax.ellipsoid((20.0 + rng.uniform(0.0, 15.0), -30.0 - rng.uniform(0.0, 10.0), rng.uniform(10.0, 30.0)),
                             ll_semi)
    liver = (right_lobe | left_lobe) & inner_body & ~vertebra & ~canal

    st_semi = (rng.uniform(40.0, 55.0), rng.uniform(28.0, 40.0), rng.uniform(35.0, 50.0))
    stomach = ax.ellipsoid((rng.uniform(10.0, 35.0), rng.uniform(-35.0, -5.0), rng.uniform(55.0, 80.0)), st_semi)
    stomach &= inner_body & ~liver

    kid_z = rng.uniform(-55.0, -30.0)
    kidneys = []
    for side in (1.0, -1.0):
        semi = (rng.uniform(45.0, 55.0), rng.uniform(22.0, 28.0), rng.uniform(22.0, 28.0))
        centre = (kid_z + rng.normal(0.0, 5.0), v_y + rng.uniform(-5.0, 10.0), side * rng.uniform(60.0, 75.0))
        kidneys.append(ax.ellipsoid(centre, semi) & inner_body & ~liver & ~vertebra)
    kidney_l, kidney_r = kidneys

    # PTV centre: a liver voxel at a sampled depth below the liver surface; a depth under the PTV radius puts the
    # PTV across the liver edge. About a third of lesions are drawn next to the stomach (the hard SBRT cases).
    gtv_r = rng.uniform(10.0, 22.0)
    ptv_r = gtv_r + 5.0
    depth = rng.uniform(0.4, 1.6) * ptv_r
    near_stomach = rng.uniform() < 0.35
    liver_depth = ax.depth_inside(liver)
    z_top = ax.grid.origin_mm[0] + (ax.grid.shape[0] - 1) * ax.grid.spacing_mm[0]
    z_ok = (ax.z > ax.grid.origin_mm[0] + ptv_r + 8.0) & (ax.z < z_top - ptv_r - 8.0)
    allowed = liver & z_ok
    if near_stomach:
        to_stomach = np.asarray(ndimage.distance_transform_edt(~stomach, sampling=ax.grid.spacing_mm))
        if np.any(allowed & (to_stomach <= ptv_r + 15.0)):
            allowed &= to_stomach <= ptv_r + 15.0
    candidates = np.flatnonzero(allowed & (np.abs(liver_depth - depth) <= 2.0))
    if candidates.size == 0:  # no voxel at exactly that depth in the allowed region: take its deepest voxels
        candidates = np.flatnonzero(allowed & (liver_depth >= 0.9 * liver_depth[allowed].max()))
    iz, iy, ix = np.unravel_index(int(rng.choice(candidates)), ax.grid.shape)
    zc, yc, xc = (o + s * i for o, s, i in zip(ax.grid.origin_mm, ax.grid.spacing_mm, (iz, iy, ix), strict=True))
    gtv_semi = tuple(gtv_r * rng.uniform(0.85, 1.15) for _ in range(3))
    gtv = ax.ellipsoid((zc, yc, xc), gtv_semi)  # type: ignore[arg-type]
    ptv = ax.grow(gtv, 5.0) & inner_body
    liver_normal = liver & ~ptv

    lungs = (
        ax.ellipsoid((z_top + 20.0, 20.0, 85.0), (60.0, 75.0, 70.0))
        | ax.ellipsoid((z_top + 20.0, 20.0, -85.0), (60.0, 75.0, 70.0))
    ) & inner_body & ~liver & ~vertebra & ~stomach & ~ptv

    density[lungs] = 0.25
    density[liver] = 1.05
    density[stomach] = 1.02
    density[kidney_l | kidney_r] = 1.04
    density[vertebra] = rng.uniform(1.5, 1.7)
    density[canal] = 1.0
    density[cord] = 1.03

    structures = (
        Structure("body", "body", body),
        Structure("ptv", "target", ptv),
        Structure("liver_normal", "oar", liver_normal),
        Structure("stomach", "oar", stomach),
        Structure("spinal_cord", "oar", cord & body),
        Structure("kidney_l", "oar", kidney_l),
        Structure("kidney_r", "oar", kidney_r),
        Structure("liver", "body", liver),
        Structure("vertebra", "body", vertebra),
    )
    return Case(
        case_id=f"liver-{seed:04d}",
        site="liver",
        grid=_LIVER_GRID,
        density=density,
        structures=structures,
        rx_gy=LIVER_RX_GY,
        seed=seed,
    )
