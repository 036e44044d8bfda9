"""This engine against pyRadPlan 0.5.0 (DKFZ's Python port of matRad) on one prostate phantom: a benchmark, not CI.

Imported only when pyRadPlan is installed (extra ``pyradplan``: ``pyRadPlan==0.5.0`` and ``pydantic<2.14``);
``m2m bench physics`` adds its rows. What is compared, exactly:

- **Case.** ``make_case("prostate", seed)``; ``m2m bench physics`` passes the first seed of the prostate-basic
  validation cohort (1000).
  Our ``[z, y, x]`` arrays map to pyRadPlan's SimpleITK images one to one (SimpleITK's numpy view is ``[z, y, x]``;
  both use LPS-like axes: x → patient left, y → posterior, z → superior, and the origin is the first voxel
  centre). The relative electron density becomes HU by inverting pyRadPlan's default HLUT piecewise linearly (its
  engine maps it back; the round trip is checked to 1e-4). Structures: ``body`` → ``ExternalVOI``, ``ptv`` →
  ``Target``, every OAR → ``OAR``.
- **Beams.** The same 7 gantry angles (couch 0), 5 mm bixels, SAD 1000 mm (pyRadPlan's Generic photon machine).
  pyRadPlan centres bixels on multiples of the bixel width from the isocentre, ours on half-multiples; each
  pyRadPlan beam therefore gets its own isocentre, ours (the PTV centroid) moved by half a bixel along the beam's
  lateral axis and along z, which puts every pyRadPlan bixel centre exactly on one of ours (checked) while the
  source moves 2.5 mm sideways (rays differ by < 0.3 mm within 100 mm of the isocentre plane). Each engine picks
  its own bixels around the PTV; ours map one to one onto pyRadPlan's (pyRadPlan's extra margin bixels get weight
  0; any of ours without a partner is counted and reported).
- **Dose.** pyRadPlan's photon SVD pencil beam (``SVDPB``, Bortfeld et al. 1993 kernels of its Generic 6 MV
  machine) on a dose grid equal to the CT grid (3 mm; its default would be 5 mm), over every body voxel (its
  engine always computes the union of the structures, and it zeroes densities outside them, so the body must be
  in). Ours: ``compute_dij`` on the body voxels too (same voxel set), and, for reference, on the planner's default
  rows (target and OARs only). Timed without any cache: pyRadPlan's stf generation plus dij, our ``compute_dij``
  (which includes its bixel selection).
- **Fluence.** Ours, optimised on our planner dij with default TPPs (``optimize``), mapped onto pyRadPlan's
  bixels. Absolute calibrations differ (pyRadPlan's Generic machine has its own output factor), so each dose is
  scaled to PTV D95 = Rx before it is compared; the raw ratio of the two engines' PTV D95 for the same fluence is
  reported.
- **Gamma.** :func:`m2m.physics.gamma.gamma_index`, global, reference = pyRadPlan's dose, evaluated = ours,
  ΔD a percentage of Rx, voxels with reference dose below 10 % of Rx excluded, inside the body.
- **Optimizers.** pyRadPlan's ``fluence_optimization`` (scipy L-BFGS-B, at most 300 iterations, starting from zero
  fluence) on its own dij with objectives of the same form as our default TPPs (quadratic penalties per voxel,
  thresholds at Rx): PTV squared deviation from Rx (priority 30, our coverage weight μ), bladder and rectum squared
  overdose above Rx (priority 1 each, our λ_oar/λ_ptv). Ours (``optimize``, default TPPs) on our dij, and on the
  *same* dij as pyRadPlan's (its PTV/bladder/rectum rows). The objectives are not identical (ours has DVH-type
  hottest-fraction terms), so the time ratio compares two practical solves of similar problems, not one algorithm.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyRadPlan
import scipy.sparse as sp
import structlog
from pyRadPlan import CT, PhotonPlan, StructureSet, fluence_optimization, generate_stf
from pyRadPlan.core import ProgressReporter
from pyRadPlan.cst import OAR, ExternalVOI, Target
from pyRadPlan.ct import default_hlut
from pyRadPlan.dose.engines import get_engine
from pyRadPlan.optimization.objectives import SquaredDeviation, SquaredOverdosing

from m2m.physics.beams import BeamSet, beam_geometry, beams_for, bixel_grid
from m2m.physics.case import Case
from m2m.physics.dij import Dij
from m2m.physics.dose import compute_dij
from m2m.physics.dvh import d_percent, mean_gy, v_percent_rx
from m2m.physics.gamma import GammaResult, gamma_index
from m2m.physics.optimizer import optimize
from m2m.physics.phantoms import make_case
from m2m.physics.tpp import PTV, TppSet

log = structlog.get_logger()

SCENARIO = "prostate-basic"
TPP_OARS = ("bladder", "rectum")
# pyRadPlan objective priorities mirroring our default TPPs: μ = μ0·(1 + Σ λ_o/λ_P) = 10·3 for coverage, 1 per OAR.
PTV_PRIORITY = 30.0
OAR_PRIORITY = 1.0
MAX_ITERATIONS = 300
GAMMA_CRITERIA = ((3.0, 3.0), (2.0, 2.0))
THRESHOLD_PERCENT = 10.0


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Switch pyRadPlan's console progress bars off (its documented ``console_progress`` switch) for a block."""
    before = ProgressReporter.console_progress
    ProgressReporter.console_progress = False
    try:
        yield
    finally:
        ProgressReporter.console_progress = before


def density_to_hu(density: np.ndarray) -> np.ndarray:
    """HU whose conversion by pyRadPlan's default HLUT gives back ``density`` (relative electron density).

    The HLUT is monotonic above its air plateau (-999 HU → 0.001); densities at or below 0.001 (air) map to -1024.
    """
    hlut = default_hlut()
    hu_points, red_points = hlut[1:, 0], hlut[1:, 1]
    if np.any(np.diff(red_points) <= 0):
        raise ValueError("pyRadPlan's default HLUT is not strictly increasing above air; cannot invert it")
    rho = np.asarray(density, dtype=np.float64)
    if rho.max() > red_points[-1]:
        raise ValueError(f"density {rho.max():g} beyond the HLUT's range ({red_points[-1]:g})")
    hu = np.interp(rho, red_points, hu_points)
    hu[rho <= red_points[0]] = -1024.0
    return hu.astype(np.float32)


def to_pyradplan(case: Case, objectives: dict[str, list[Any]] | None = None) -> tuple[Any, Any]:
    """pyRadPlan ``CT`` and ``StructureSet`` of ``case`` (see the module docstring for the mapping)."""
    dz, dy, dx = case.grid.spacing_mm
    oz, oy, ox = case.grid.origin_mm
    hu = density_to_hu(case.density)
    ct = CT(cube_hu=hu, resolution={"x": dx, "y": dy, "z": dz}, origin=(ox, oy, oz))
    back = np.interp(hu, default_hlut()[:, 0], default_hlut()[:, 1])
    inside = case.density > 0.01
    if float(np.max(np.abs(back[inside] - case.density[inside]))) > 1e-4:
        raise ValueError("density → HU → density round trip is off by more than 1e-4")
    objectives = objectives or {}
    vois = []
    for s in case.structures:
        kwargs = {"name": s.name, "mask": s.mask.astype(np.uint8), "ct_image": ct,
                  "objectives": objectives.get(s.name, [])}
        if s.role == "target":
            vois.append(Target(**kwargs))
        elif s.role == "oar":
            vois.append(OAR(**kwargs))
        elif s.name == "body":
            vois.append(ExternalVOI(**kwargs))
    return ct, StructureSet(vois=vois, ct_image=ct)


def matched_isocentres(beams: BeamSet) -> np.ndarray:
    """(n_beams, 3) pyRadPlan isocentres (x, y, z mm): ours moved half a bixel along each beam's lateral axis and z."""
    half = 0.5 * beams.bixel_mm
    iz, iy, ix = beams.isocentre_mm
    out = []
    for b in range(beams.n_beams):
        l_y, l_x = beam_geometry(beams, b).lateral_yx
        out.append((ix + half * l_x, iy + half * l_y, iz + half))
    return np.array(out, dtype=np.float64)


def column_map(case: Case, beams: BeamSet, stf: Any, beam_num: np.ndarray, ray_num: np.ndarray) -> np.ndarray:
    """For each pyRadPlan dij column, our beamlet index (−1 where we have no such bixel)."""
    ours: dict[tuple[int, int, int], int] = {}
    start = 0
    for b in range(beams.n_beams):
        grid = bixel_grid(case, beams, b)
        for k, (iu, iz) in enumerate(zip(grid.iu.tolist(), grid.iz.tolist(), strict=True)):
            ours[(b, int(iu), int(iz))] = start + k
        start += grid.n
    out = np.full(beam_num.size, -1, dtype=np.int64)
    for j, (b, r) in enumerate(zip(beam_num.astype(int).tolist(), ray_num.astype(int).tolist(), strict=True)):
        pos = np.asarray(stf.beams[b].rays[r].ray_pos_bev, dtype=np.float64)
        u, z = pos[0] / beams.bixel_mm, pos[2] / beams.bixel_mm
        if abs(u - round(u)) > 1e-6 or abs(z - round(z)) > 1e-6:
            raise ValueError(f"pyRadPlan bixel at BEV ({pos[0]:g}, {pos[2]:g}) mm is off our bixel lattice")
        out[j] = ours.get((b, round(u), round(z)), -1)
    return out


@dataclass(frozen=True, eq=False)
class Comparison:
    """Everything the benchmark measured (times in s, doses in Gy, after normalising to PTV D95 = Rx)."""

    version: str
    seed: int
    rx_gy: float
    n_beams: int
    bixel_mm: float
    body_voxels: int
    ours_dij_s: float
    ours_dij_nnz: int
    ours_planner_dij_s: float
    ours_planner_rows: int
    ours_planner_nnz: int
    ours_beamlets: int
    prp_stf_s: float
    prp_dij_s: float
    prp_dij_nnz: int
    prp_voxels: int
    prp_beamlets: int
    matched_beamlets: int
    unmatched_fluence_fraction: float
    calibration_ratio: float
    beam_ratio: tuple[float, ...]
    gamma: dict[str, GammaResult]
    gamma_ptv: dict[str, GammaResult]
    gamma_open: dict[str, GammaResult]
    gamma_open_ptv: dict[str, GammaResult]
    dvh: dict[str, tuple[float, float]]
    ours_opt_s: float
    ours_opt_evaluations: int
    ours_opt_iterations: int
    ours_opt_on_prp_s: float
    ours_opt_on_prp_evaluations: int
    prp_opt_s: float
    prp_opt_iterations: int
    max_iterations: int
    prp_plan_dvh: dict[str, float] = field(default_factory=dict)
    ours_on_prp_plan_dvh: dict[str, float] = field(default_factory=dict)

    @property
    def dij_ratio(self) -> float:
        """pyRadPlan (stf + dij) / ours, same body voxels."""
        return (self.prp_stf_s + self.prp_dij_s) / self.ours_dij_s


def _dvh_metrics(dose: np.ndarray, case: Case) -> dict[str, float]:
    rx = case.rx_gy
    ptv = dose[case.target.mask]
    out = {"PTV D98": d_percent(ptv, 98.0), "PTV D2": d_percent(ptv, 2.0)}
    for name in TPP_OARS:
        d = dose[case.structure(name).mask]
        out[f"{name} mean"] = mean_gy(d)
        out[f"{name} V70Gy %"] = 100.0 * v_percent_rx(d, 100.0 * 70.0 / rx, rx)
    return out


def _rows_with_entries(matrix: Any) -> int:
    """Number of rows of a sparse matrix holding at least one stored entry (voxels the engine reached)."""
    seen = np.zeros(matrix.shape[0], dtype=bool)
    seen[matrix.indices] = True
    return int(seen.sum())


def _objectives(rx_gy: float) -> dict[str, list[Any]]:
    return {
        PTV: [SquaredDeviation(d_ref=rx_gy, priority=PTV_PRIORITY)],
        **{name: [SquaredOverdosing(d_max=rx_gy, priority=OAR_PRIORITY)] for name in TPP_OARS},
    }


def _dij_from_pyradplan(matrix: sp.csc_array | sp.csc_matrix, case: Case, beam_num: np.ndarray) -> Dij:
    """Our ``Dij`` of pyRadPlan's matrix restricted to the PTV and TPP OAR voxels (for our optimizer)."""
    union = np.zeros(case.grid.shape, dtype=bool)
    for name in (PTV, *TPP_OARS):
        union |= case.structure(name).mask
    voxel_index = np.flatnonzero(union)
    rows = {n: np.searchsorted(voxel_index, np.flatnonzero(case.structure(n).mask)) for n in (PTV, *TPP_OARS)}
    return Dij.from_csr(_csc_rows(matrix, voxel_index).tocsr(), voxel_index=voxel_index, rows=rows,
               beamlet_beam=beam_num.astype(np.int32), voxel_volume_cc=case.grid.voxel_volume_cc,
               grid_shape=case.grid.shape)


def _csc_rows(matrix: Any, rows: np.ndarray) -> sp.csc_matrix:
    """Rows ``rows`` (sorted, unique) of a CSC matrix, in one O(nnz) pass (float32 CSC)."""
    n_rows, n_cols = matrix.shape
    new_index = np.full(n_rows, -1, dtype=np.int64)
    new_index[rows] = np.arange(rows.size)
    mapped = new_index[matrix.indices]
    keep = mapped >= 0
    # Kept entries before each column start are the new column pointers.
    indptr = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[matrix.indptr]
    return sp.csc_matrix((matrix.data[keep].astype(np.float32), mapped[keep], indptr), shape=(rows.size, n_cols))


def run(seed: int) -> Comparison:
    """Run the comparison (about 2-4 minutes and 3-4 GB on 2 cores; pyRadPlan's 3 mm dij dominates)."""
    pyRadPlan.settings.xp.prefer_gpu = False
    pyRadPlan.settings.xp.preferred_cpu_array_backend = "numpy"
    case = make_case("prostate", seed)
    beams = beams_for(case)
    rx = case.rx_gy

    started = time.perf_counter()
    planner_dij = compute_dij(case, beams)
    planner_dij_s = time.perf_counter() - started
    started = time.perf_counter()
    body_dij = compute_dij(case, beams, structures=list(case.structure_names))
    ours_dij_s = time.perf_counter() - started
    tpps = TppSet.default(TPP_OARS)
    plan = optimize(planner_dij, tpps, rx)

    ct, cst = to_pyradplan(case, _objectives(rx))
    pln = PhotonPlan(machine="Generic", prescribed_dose=rx)
    pln.prop_stf = {
        "gantry_angles": [float(a) for a in beams.gantry_deg],
        "couch_angles": [0.0] * beams.n_beams,
        "bixel_width": beams.bixel_mm,
        "iso_center": matched_isocentres(beams),
    }
    pln.prop_dose_calc = {"engine": "SVDPB", "dose_grid": ct.grid}
    pln.prop_opt = {"solver": "scipy", "max_iter": MAX_ITERATIONS, "display": False}
    with quiet_progress():
        started = time.perf_counter()
        stf = generate_stf(ct, cst, pln)
        prp_stf_s = time.perf_counter() - started
        engine = get_engine(pln)
        started = time.perf_counter()
        # Its Siddon ray tracer divides by zero ray-direction components (axis-parallel rays, handled as inf).
        with np.errstate(divide="ignore", invalid="ignore"):
            prp_dij = engine.calc_dose_influence(ct, cst, stf)
        prp_dij_s = time.perf_counter() - started
    if abs(float(stf.beams[0].sad) - beams.sad_mm) > 1e-6:
        raise ValueError(f"pyRadPlan machine SAD {stf.beams[0].sad} mm != ours {beams.sad_mm} mm")
    matrix = prp_dij.physical_dose.flat[0]
    if tuple(prp_dij.dose_grid.dimensions) != case.grid.shape[::-1]:
        raise ValueError(f"pyRadPlan dose grid {prp_dij.dose_grid.dimensions} is not the CT grid")
    beam_num = np.asarray(prp_dij.beam_num)
    cols = column_map(case, beams, stf, beam_num, np.asarray(prp_dij.ray_num))

    # Our fluence on pyRadPlan's bixels; and open fields: unit weight on every bixel both engines share.
    w = np.zeros(cols.size)
    has = cols >= 0
    w[has] = plan.fluence[cols[has]]
    unmatched = 1.0 - float(w.sum()) / float(plan.fluence.sum())
    ptv_mask = case.target.mask
    body = case.structure("body").mask
    ours_dose = body_dij.dose_to_grid(plan.fluence).astype(np.float64)
    prp_dose = np.asarray(matrix @ w, dtype=np.float64).reshape(case.grid.shape)
    ours_d95 = d_percent(ours_dose[ptv_mask], 95.0)
    prp_d95 = d_percent(prp_dose[ptv_mask], 95.0)
    ours_dose *= rx / ours_d95
    prp_dose *= rx / prp_d95
    open_ours = np.zeros(planner_dij.n_beamlets)
    open_ours[cols[has]] = 1.0
    open_prp = has.astype(np.float64)
    beam_ratio = []
    for b in range(beams.n_beams):
        on_beam = (beam_num == b).astype(np.float64)
        d_o = body_dij.dose(open_ours * (planner_dij.beamlet_beam == b))[body_dij.rows[PTV]]
        d_p = np.asarray(matrix @ (open_prp * on_beam))[np.flatnonzero(ptv_mask)]
        beam_ratio.append(float(np.mean(d_p) / np.mean(d_o)))
    open_o = body_dij.dose_to_grid(open_ours).astype(np.float64)
    open_p = np.asarray(matrix @ open_prp, dtype=np.float64).reshape(case.grid.shape)
    open_o *= rx / d_percent(open_o[ptv_mask], 95.0)
    open_p *= rx / d_percent(open_p[ptv_mask], 95.0)

    def gammas(reference: np.ndarray, evaluated: np.ndarray, mask: np.ndarray) -> dict[str, GammaResult]:
        return {
            f"{dd:g}%/{dta:g}mm": gamma_index(reference, evaluated, case.grid.spacing_mm, dose_percent=dd,
                                              dta_mm=dta, norm_dose=rx, threshold_percent=THRESHOLD_PERCENT,
                                              mask=mask)
            for dd, dta in GAMMA_CRITERIA
        }

    ours_m, prp_m = _dvh_metrics(ours_dose, case), _dvh_metrics(prp_dose, case)
    dvh = {k: (ours_m[k], prp_m[k]) for k in ours_m}

    # Optimizers: pyRadPlan's on its dij; ours on the same matrix (its PTV/OAR rows).
    info: dict[str, Any] = {}
    with quiet_progress():
        started = time.perf_counter()
        prp_x = fluence_optimization(ct, cst, stf, prp_dij, pln, opt_info=info)
        prp_opt_s = time.perf_counter() - started
    prp_plan = np.asarray(matrix @ np.asarray(prp_x, dtype=np.float64), dtype=np.float64).reshape(case.grid.shape)
    prp_plan *= rx / d_percent(prp_plan[ptv_mask], 95.0)
    same = _dij_from_pyradplan(matrix, case, beam_num)
    ours_on_prp = optimize(same, tpps, rx)
    ours_on_prp_dose = same.dose_to_grid(ours_on_prp.fluence).astype(np.float64)

    comparison = Comparison(
        version=str(getattr(pyRadPlan, "__version__", "?")), seed=seed, rx_gy=rx, n_beams=beams.n_beams,
        bixel_mm=beams.bixel_mm, body_voxels=int(body.sum()),
        ours_dij_s=ours_dij_s, ours_dij_nnz=int(body_dij.matrix.nnz), ours_planner_dij_s=planner_dij_s,
        ours_planner_rows=planner_dij.n_rows, ours_planner_nnz=int(planner_dij.matrix.nnz),
        ours_beamlets=planner_dij.n_beamlets, prp_stf_s=prp_stf_s, prp_dij_s=prp_dij_s,
        prp_dij_nnz=int(matrix.nnz), prp_voxels=_rows_with_entries(matrix),
        prp_beamlets=int(cols.size), matched_beamlets=int(has.sum()), unmatched_fluence_fraction=unmatched,
        calibration_ratio=prp_d95 / ours_d95, beam_ratio=tuple(beam_ratio),
        gamma=gammas(prp_dose, ours_dose, body), gamma_ptv=gammas(prp_dose, ours_dose, ptv_mask),
        gamma_open=gammas(open_p, open_o, body), gamma_open_ptv=gammas(open_p, open_o, ptv_mask), dvh=dvh,
        ours_opt_s=plan.solve_time_s, ours_opt_evaluations=plan.evaluations, ours_opt_iterations=plan.iterations,
        ours_opt_on_prp_s=ours_on_prp.solve_time_s, ours_opt_on_prp_evaluations=ours_on_prp.evaluations,
        prp_opt_s=prp_opt_s, prp_opt_iterations=int(info.get("num_iter", -1)),
        max_iterations=MAX_ITERATIONS,
        prp_plan_dvh=_dvh_metrics(prp_plan, case), ours_on_prp_plan_dvh=_dvh_metrics(ours_on_prp_dose, case),
    )
    log.info("pyradplan_bench", seed=seed, dij_ratio=round(comparison.dij_ratio, 2),
             gamma_3_3=round(comparison.gamma["3%/3mm"].pass_rate, 2))
    return comparison


