r"""Global 3-D gamma index (Low et al. 1998) for comparing two dose distributions on one voxel grid.

Definition. For every *reference* voxel centre :math:`r_i` with reference dose :math:`D_r(r_i)` at or above the
low-dose threshold,

.. math::

    \gamma(r_i) = \min_{r_e:\ \lVert r_e - r_i \rVert \le R}
        \sqrt{\frac{\lVert r_e - r_i \rVert^2}{\Delta d^2} + \frac{(D_e(r_e) - D_r(r_i))^2}{\Delta D^2}},
    \qquad \Delta D = \frac{\text{dose\_percent}}{100} \cdot D_\text{norm}

- distances in mm on the grid's physical spacing (``spacing_mm``, (z, y, x) like :mod:`m2m.physics.case`);
  :math:`\Delta d` = ``dta_mm`` (distance to agreement, mm);
- doses in any one unit (Gy); *global* normalisation: :math:`\Delta D` is a percentage of one dose
  :math:`D_\text{norm}` for every voxel (``norm_dose``; default the reference maximum, or pass e.g. the
  prescription), never of the local dose;
- :math:`D_e(r_e)` is the evaluated dose *trilinearly interpolated* between voxel centres, sampled on a regular
  lattice of offsets :math:`r_e - r_i` with step ``≤ step_mm`` per axis (default ``dta_mm / 5``; exact multiples of
  the voxel spacing, so voxel centres are always on the lattice) inside the search sphere of radius :math:`R`
  = ``search_radius_mm`` (default ``2 · dta_mm``). Offsets that leave the grid are not candidates.
- A voxel *passes* when :math:`\gamma \le 1`. The pass rate is the percentage of evaluated voxels that pass; the
  evaluated voxels are the reference voxels with :math:`D_r \ge` ``threshold_percent``/100 ·
  :math:`D_\text{norm}` (default 10 %), intersected with ``mask`` if given.

Accuracy. The minimum is taken over the offset lattice, so :math:`\gamma` is never below the continuous gamma of
the interpolated distribution; the continuous minimiser lies within half a lattice-cell diagonal
(:math:`\le \tfrac{\sqrt 3}{2}\,\text{step}`) of a lattice point, which bounds the error of the distance term. Because
:math:`R \ge \Delta d` is required, pass/fail is decided exactly up to that lattice approximation; a voxel whose
:math:`\gamma` exceeds :math:`R/\Delta d` gets the minimum over the searched sphere, an upper bound of the true
value (its true :math:`\gamma` is at least :math:`R/\Delta d`).

Algorithm (numpy only). Offsets are visited in order of increasing distance; a voxel leaves the search as soon as
the distance term alone, :math:`\lVert o\rVert^2/\Delta d^2`, reaches its best :math:`\gamma^2` so far (no farther
offset can lower it). Each offset's interpolation weights are the same for every voxel, so one offset costs eight
gathers over the voxels still searching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_DOSE_PERCENT = 3.0
DEFAULT_DTA_MM = 3.0
DEFAULT_THRESHOLD_PERCENT = 10.0
# Search radius and lattice step as multiples of the DTA when not given.
SEARCH_RADIUS_DTA = 2.0
STEP_DTA = 0.2


@dataclass(frozen=True, eq=False)
class GammaResult:
    """Outcome of :func:`gamma_index`.

    ``gamma``: grid-shaped float64, NaN where not evaluated. ``evaluated``: the voxels counted in the pass rate.
    ``pass_rate``: percentage of evaluated voxels with γ ≤ 1. ``norm_dose`` / ``threshold_dose``: the doses (same
    unit as the inputs) the dose criterion and the low-dose cut were taken from. ``step_mm``: the lattice step
    actually used per axis (z, y, x).
    """

    gamma: np.ndarray
    evaluated: np.ndarray
    pass_rate: float
    n_evaluated: int
    n_passed: int
    dose_percent: float
    dta_mm: float
    norm_dose: float
    threshold_dose: float
    search_radius_mm: float
    step_mm: tuple[float, float, float]

    @property
    def criteria(self) -> str:
        """E.g. ``"3%/3mm"``."""
        return f"{self.dose_percent:g}%/{self.dta_mm:g}mm"

    def mean_gamma(self) -> float:
        """Mean γ over the evaluated voxels."""
        return float(np.mean(self.gamma[self.evaluated]))


def _positive(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def gamma_index(
    reference: np.ndarray,
    evaluated: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    dose_percent: float = DEFAULT_DOSE_PERCENT,
    dta_mm: float = DEFAULT_DTA_MM,
    norm_dose: float | None = None,
    threshold_percent: float = DEFAULT_THRESHOLD_PERCENT,
    search_radius_mm: float | None = None,
    step_mm: float | None = None,
    mask: np.ndarray | None = None,
) -> GammaResult:
    """Global gamma of ``evaluated`` against ``reference`` (both 3-D, same shape, same dose unit).

    ``spacing_mm``: voxel spacing (z, y, x) in mm. ``dose_percent`` (%) of ``norm_dose`` (default: the reference
    maximum) and ``dta_mm`` (mm) are the criteria. Voxels with reference dose below ``threshold_percent`` % of
    ``norm_dose``, or outside ``mask``, are not evaluated. ``search_radius_mm`` (≥ ``dta_mm``; default 2·DTA) and
    ``step_mm`` (the interpolation lattice step, ≤ ``dta_mm``; default DTA/5) set the search; see the module
    docstring for the exact definition. Raises ValueError on inconsistent input or when no voxel is evaluated.
    """
    ref = np.asarray(reference, dtype=np.float64)
    ev = np.asarray(evaluated, dtype=np.float64)
    if ref.ndim != 3:
        raise ValueError(f"reference must be a 3-D array, got {ref.ndim} dimensions")
    if ev.shape != ref.shape:
        raise ValueError(f"evaluated shape {ev.shape} does not match reference shape {ref.shape}")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(ev))):
        raise ValueError("doses must be finite (no NaN or inf)")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3:
        raise ValueError(f"spacing_mm must have 3 values (z, y, x), got {len(spacing)}")
    for s in spacing:
        _positive("every spacing_mm value", s)
    dose_percent = _positive("dose_percent", dose_percent)
    dta = _positive("dta_mm", dta_mm)
    if not (math.isfinite(threshold_percent) and 0.0 <= threshold_percent < 100.0):
        raise ValueError(f"threshold_percent must be in [0, 100), got {threshold_percent!r}")
    norm = float(ref.max()) if norm_dose is None else float(norm_dose)
    if not math.isfinite(norm) or norm <= 0:
        raise ValueError(f"norm_dose must be positive (default: the reference maximum), got {norm!r}")
    radius = SEARCH_RADIUS_DTA * dta if search_radius_mm is None else _positive("search_radius_mm", search_radius_mm)
    if radius < dta:
        raise ValueError(f"search_radius_mm ({radius:g}) must be at least dta_mm ({dta:g})")
    step = STEP_DTA * dta if step_mm is None else _positive("step_mm", step_mm)
    if step > dta:
        raise ValueError(f"step_mm ({step:g}) must not exceed dta_mm ({dta:g})")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != ref.shape or mask.dtype != np.bool_:
            raise ValueError(f"mask must be a bool array of shape {ref.shape}")

    threshold = threshold_percent / 100.0 * norm
    selected = ref >= threshold
    if mask is not None:
        selected &= mask
    points = np.flatnonzero(selected)
    if points.size == 0:
        raise ValueError(f"no voxel has reference dose ≥ the threshold ({threshold:g}); nothing to evaluate")

    # Lattice: per axis a whole number of steps per voxel, so voxel centres are lattice points.
    sub = tuple(max(1, math.ceil(s / step - 1e-9)) for s in spacing)
    step_axis = tuple(s / k for s, k in zip(spacing, sub, strict=True))
    reach = tuple(math.floor(radius / h + 1e-9) for h in step_axis)
    axes = [np.arange(-n, n + 1) * h for n, h in zip(reach, step_axis, strict=True)]
    oz, oy, ox = np.meshgrid(*axes, indexing="ij")
    offsets = np.stack([oz.ravel(), oy.ravel(), ox.ravel()], axis=1)
    dist2 = np.einsum("ij,ij->i", offsets, offsets)
    inside = dist2 <= radius * radius * (1 + 1e-12)
    offsets, dist2 = offsets[inside], dist2[inside]
    order = np.argsort(dist2, kind="stable")
    offsets, dist2 = offsets[order], dist2[order]

    # Evaluated dose padded with NaN (off-grid candidates drop out through fmin) by the reach plus one voxel.
    pad = tuple(math.ceil(radius / s) + 1 for s in spacing)
    padded = np.pad(ev, [(p, p) for p in pad], mode="constant", constant_values=np.nan)
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1], dtype=np.int64)
    iz, iy, ix = np.unravel_index(points, ref.shape)
    base = (iz + pad[0]) * strides[0] + (iy + pad[1]) * strides[1] + (ix + pad[2]) * strides[2]
    flat = padded.ravel()

    inv_dd2 = 1.0 / (dose_percent / 100.0 * norm) ** 2
    inv_dta2 = 1.0 / (dta * dta)
    ref_pts = ref.ravel()[points]
    best = np.full(points.size, np.inf)
    active = np.arange(points.size)
    spacing_arr = np.array(spacing)
    last_r2 = -1.0
    for o, r2 in zip(offsets, dist2, strict=True):
        if r2 > last_r2:
            # No offset at this distance or beyond can beat a γ² already ≤ r²/Δd².
            active = active[best[active] > r2 * inv_dta2]
            if active.size == 0:
                break
            last_r2 = r2
        value = _interpolate(flat, base[active], o / spacing_arr, strides)
        diff = value - ref_pts[active]
        g2 = r2 * inv_dta2 + diff * diff * inv_dd2
        best[active] = np.fmin(best[active], g2)

    gamma = np.full(ref.shape, np.nan)
    g = np.sqrt(best)
    gamma.ravel()[points] = g
    n_passed = int(np.count_nonzero(g <= 1.0))
    return GammaResult(
        gamma=gamma,
        evaluated=selected,
        pass_rate=100.0 * n_passed / points.size,
        n_evaluated=int(points.size),
        n_passed=n_passed,
        dose_percent=dose_percent,
        dta_mm=dta,
        norm_dose=norm,
        threshold_dose=threshold,
        search_radius_mm=radius,
        step_mm=step_axis,  # type: ignore[arg-type]
    )


def _interpolate(flat: np.ndarray, base: np.ndarray, shift_vox: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of the padded array at ``base`` (flat indices) + ``shift_vox`` (voxels, z/y/x)."""
    lo = np.floor(shift_vox + 1e-9).astype(np.int64)
    frac = shift_vox - lo
    frac[np.abs(frac) < 1e-9] = 0.0
    out: np.ndarray | None = None
    for corner in range(8):
        bits = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        weight = float(np.prod(np.where(bits == 1, frac, 1.0 - frac)))
        if weight == 0.0:
            continue
        term = flat[base + int(np.dot(lo + bits, strides))]
        out = weight * term if out is None else out + weight * term
    assert out is not None  # the weights sum to 1, so at least one corner contributes
    return out
