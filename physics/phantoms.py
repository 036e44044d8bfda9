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
  posterior of the body centre, ±2 mm (sd) lateral. ``ptv`` = prostate grown isotropically by 5-8 mm (≈ 40-85 cc).
- rectum: solid tube of radius 10-15 mm (1.2× wider LR), bending posteriorly above the prostate, contoured only
  from 10-15 mm below to 15-25 mm above the PTV (as many protocols do), so it is ≈ 30-70 cc and the region next to
  the PTV is a large fraction of it. Its anterior wall lies 10 mm inside to 1 mm clear of the prostate's posterior
  surface (the prostate indents it), so the PTV overlaps 0-12 % of the rectum (0.2-7.7 cc, mean ≈ 7 % over seeds
  0-29).
- bladder: ellipsoid 25-41 × 21-35 × 16-31 mm (≈ 45-150 cc: empty to moderately full, density 1.0), 3-12 mm
  anterior of the prostate axis; its lowest point lies 17 mm below to 1 mm above the prostate's top (the base sits
  on the prostate), so the PTV overlaps 1-12 % of the bladder (≈ 2-10 cc, mean ≈ 5.5 %).
- Overlap cap (``MAX_OVERLAP`` = 12 %): a sampled rectum or bladder whose PTV overlap exceeds 12 % of its volume is
  moved away from the prostate in 1 mm steps until it does not, so the protocol maximum stays reachable (larger
  overlaps left the rectum V75Gy or the PTV hot spot failing in calibration).
- femoral_head_l / _r: spheres of radius 22-26 mm (≈ 45-73 cc) at ±76-90 mm lateral, 0-10 mm superior of the
  prostate centre, density 1.5-1.7 (bone); their nearest point is 20-45 mm from the PTV (21-42 mm over seeds 0-29),
  close enough that lateral beams of the 180-beam scenario load them.
- density-only bone: pubic symphysis anterior of the bladder neck and sacrum/coccyx posterior of the rectum (1.5).

Liver anatomy (prescription 50 Gy in 5 fractions: the top SBRT dose level of RTOG 1112 and common practice for
liver metastases/HCC; its standard criteria are PTV coverage, liver_normal mean dose/spared volume, stomach, cord and
kidney limits):
- body: elliptic cylinder 150-185 × 105-130 mm; fat 0.95 (8-20 mm), soft tissue 1.04.
- liver (role ``body``: context only, not scored): right lobe ellipsoid 60-75 × 60-80 × 60-75 mm plus a left lobe
  45-60 × 30-40 × 35-45 mm towards the left/anterior, kept 10 mm inside the skin (≈ 1,400-2,000 cc), density 1.05.
- ptv (target): a GTV ellipsoid of mean radius 10-22 mm (semi-axes ×0.85-1.15) grown by 5 mm (≈ 12-100 cc); its
  centre sits 0.4-1.6× the PTV radius below the liver surface (below 1× the PTV crosses the liver edge).
- PTV-stomach gap (``liver_stomach_gap_mm``): every PTV voxel stays at least max(10 mm, the PTV's largest
  semi-axis − 9 mm) from the stomach (10-21 mm: the low-dose spill that sets stomach D10cc widens with the PTV).
  SBRT lesions abutting the stomach are not treated to 50 Gy / 5 fx, and with the stomach touching the PTV its
  32 Gy point limit was unreachable (earlier phantom: 3 of 20 validation cases). In 70 % of cases the lesion is
  drawn within 6 mm beyond that gap (the hard cases: measured nearest PTV-stomach distance 13-26 mm over seeds
  0-29 and 1000-1019), except PTVs whose largest semi-axis exceeds 27 mm (≈ 75 cc and more: a 92 cc PTV there
  missed stomach D10cc after 200 plans); the others lie 39-120 mm away. Calibration (2026-11-28, validation seeds
  1000-1019, 200 plans): the search reaches 4/4 on 20/20; defaults 3.73 ± 0.42 of 4, failing the stomach
  (D10cc) on 9/20; random initial TPPs 3.10 ± 0.72. Normal-liver mean dose (2.9-12.1 Gy) never fails.
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
from scipy import ndimage

from m2m.physics.case import Case, Grid, Structure

Site = Literal["prostate", "liver"]

PROSTATE_RX_GY = 79.2
LIVER_RX_GY = 50.0

_PROSTATE_GRID = Grid(shape=(54, 96, 136), spacing_mm=(3.0, 3.0, 3.0), origin_mm=(-60.0, -142.5, -202.5))
_LIVER_GRID = Grid(shape=(50, 96, 128), spacing_mm=(4.0, 3.0, 3.0), origin_mm=(-98.0, -142.5, -190.5))

# Prostate-site sampling ranges (uniform, mm) that set the difficulty of the prostate protocols; see the docstring.
_RECTUM_RADIUS_MM = (10.0, 15.0)
_RECTUM_GAP_MM = (-10.0, 1.0)
_RECTUM_BELOW_PTV_MM = (10.0, 15.0)
_RECTUM_ABOVE_PTV_MM = (15.0, 25.0)
_BLADDER_SI_MM = (16.0, 31.0)
_BLADDER_AP_MM = (21.0, 35.0)
_BLADDER_LR_MM = (25.0, 41.0)
_BLADDER_GAP_MM = (-17.0, 1.0)
_BLADDER_ANTERIOR_MM = (3.0, 12.0)
#: Largest fraction of the rectum or of the bladder the PTV may overlap (the organ is moved away beyond it).
MAX_OVERLAP = 0.12

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
    margin = rng.uniform(5.0, 8.0)
    ptv = ax.grow(prostate, margin) & body
    ptv_lo, ptv_hi = p_c[0] - p_semi[0] - margin, p_c[0] + p_semi[0] + margin

    # Rectum: the sampled gap between prostate and anterior rectal wall is what sets the PTV/rectum overlap. It is
    # contoured only over a short span around the PTV (as many protocols do), so the high-dose region is a sizeable
    # fraction of it. All draws come first; an overlap above MAX_OVERLAP (the protocol maximum would become
    # unreachable) is pulled back by widening the gap in 1 mm steps, which needs no further draws.
    r_rad = rng.uniform(*_RECTUM_RADIUS_MM)
    gap_r = rng.uniform(*_RECTUM_GAP_MM)
    z_lo, z_hi = ptv_lo - rng.uniform(*_RECTUM_BELOW_PTV_MM), ptv_hi + rng.uniform(*_RECTUM_ABOVE_PTV_MM)
    bend = rng.uniform(0.002, 0.006)  # mm⁻¹: posterior sweep towards the sigmoid above the prostate
    above = np.clip(ax.z - (p_c[0] + p_semi[0]), 0.0, None)
    in_span = (ax.z >= z_lo) & (ax.z <= z_hi)

    b_semi = (rng.uniform(*_BLADDER_SI_MM), rng.uniform(*_BLADDER_AP_MM), rng.uniform(*_BLADDER_LR_MM))
    gap_b = rng.uniform(*_BLADDER_GAP_MM)
    b_yx = (p_c[1] - rng.uniform(*_BLADDER_ANTERIOR_MM), p_c[2] + rng.normal(0.0, 3.0))

    fh_r = rng.uniform(22.0, 26.0)
    fh_x = rng.uniform(76.0, 90.0)
    fh_y = p_c[1] + rng.uniform(-5.0, 10.0)
    fh_z = p_c[0] + rng.uniform(0.0, 10.0)
    fh_rho = rng.uniform(1.5, 1.7)
    fh_l = ax.ellipsoid((fh_z, fh_y, fh_x + rng.normal(0.0, 1.5)), (fh_r, fh_r, fh_r))
    fh_r_mask = ax.ellipsoid((fh_z, fh_y, -fh_x + rng.normal(0.0, 1.5)), (fh_r, fh_r, fh_r))

    # Organs never overlap each other (only the PTV margin does): prostate > rectum > bladder.
    while True:
        r_y0 = p_c[1] + p_semi[1] + gap_r + r_rad
        r_yc = r_y0 + bend * above**2
        rectum = (((ax.y - r_yc) / r_rad) ** 2 + ((ax.x - p_c[2]) / (1.2 * r_rad)) ** 2 <= 1.0) & in_span
        rectum &= ~prostate & body
        if (rectum & ptv).sum() <= MAX_OVERLAP * rectum.sum():
            break
        gap_r += 1.0
    while True:
        b_c = (p_c[0] + p_semi[0] + b_semi[0] + gap_b, *b_yx)
        bladder = ax.ellipsoid(b_c, b_semi) & ~prostate & ~rectum & body
        if (bladder & ptv).sum() <= MAX_OVERLAP * bladder.sum():
            break
        gap_b += 1.0

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
    # PTV across the liver edge. The GTV is drawn first so its extent is known: every centre keeps the whole PTV
    # at least liver_stomach_gap_mm() clear of the stomach (an abutting stomach makes 50 Gy / 5 fx undeliverable),
    # and a share of lesions is drawn within a 10 mm band beyond that gap (the hard SBRT cases).
    gtv_r = rng.uniform(10.0, 22.0)
    ptv_r = gtv_r + 5.0
    gtv_semi = tuple(gtv_r * rng.uniform(0.85, 1.15) for _ in range(3))
    reach = max(gtv_semi) + 5.0  # no PTV voxel centre lies further than this from the PTV centre
    gap = liver_stomach_gap_mm(reach)
    depth = rng.uniform(0.4, 1.6) * ptv_r
    # The draw is always made (seed stability); the largest PTVs are never put next to the stomach.
    near_stomach = rng.uniform() < _LIVER_NEAR_STOMACH_P and reach <= _LIVER_NEAR_MAX_REACH_MM
    liver_depth = ax.depth_inside(liver)
    z_top = ax.grid.origin_mm[0] + (ax.grid.shape[0] - 1) * ax.grid.spacing_mm[0]
    z_ok = (ax.z > ax.grid.origin_mm[0] + ptv_r + 8.0) & (ax.z < z_top - ptv_r - 8.0)
    to_stomach = np.asarray(ndimage.distance_transform_edt(~stomach, sampling=ax.grid.spacing_mm))
    allowed = liver & z_ok & (to_stomach >= reach + gap)
    if near_stomach:
        band = to_stomach <= reach + gap + _LIVER_NEAR_BAND_MM
        if np.any(allowed & band):
            allowed &= band
    candidates = np.flatnonzero(allowed & (np.abs(liver_depth - depth) <= 2.0))
    if candidates.size == 0:  # no voxel at exactly that depth in the allowed region: take its deepest voxels
        candidates = np.flatnonzero(allowed & (liver_depth >= 0.9 * liver_depth[allowed].max()))
    iz, iy, ix = np.unravel_index(int(rng.choice(candidates)), ax.grid.shape)
    zc, yc, xc = (o + s * i for o, s, i in zip(ax.grid.origin_mm, ax.grid.spacing_mm, (iz, iy, ix), strict=True))
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


# Liver-site PTV/stomach spacing (see the module docstring): the share of lesions drawn next to the stomach and the
# width (mm) of the band beyond the minimum gap they are drawn in.
_LIVER_NEAR_STOMACH_P = 0.7
_LIVER_NEAR_BAND_MM = 6.0
#: PTVs reaching further than this (mm, ≈ 75 cc and more) are not drawn next to the stomach: a 92 cc PTV 17-30 mm
#: from it missed stomach D10cc ≤ 18 Gy after 200 plans (its low-dose spill covers too much stomach).
_LIVER_NEAR_MAX_REACH_MM = 27.0


def liver_stomach_gap_mm(ptv_reach_mm: float) -> float:
    """Minimum distance (mm, voxel centre to voxel centre) kept between a liver PTV and the stomach.

    ``ptv_reach_mm`` is the PTV's largest semi-axis. The stomach D0.03cc ≤ 32 Gy and D10cc ≤ 18 Gy limits need
    room for the pencil-beam penumbra and for the low-dose spill, which widens with the PTV (calibration: a 92 cc
    PTV 17 mm from the stomach missed stomach D10cc ≤ 18 Gy by 0.1 Gy after 200 plans), so the gap is the PTV's
    reach minus 9 mm and never under 10 mm (10 mm up to a 19 mm reach, ≈ 21 mm for the largest PTVs).
    """
    return max(10.0, ptv_reach_mm - 9.0)
