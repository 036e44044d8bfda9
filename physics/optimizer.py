r"""TPP-driven fluence map optimisation (FMO): the in-house TPS the virtual planners operate.

In the spirit of the virtual-treatment-planner optimiser (Shen et al., Med Phys 2019/2020), for beamlet
weights ``x ≥ 0``, dose ``d = A x`` (Gy, ``A`` the dij), prescription ``R`` (Gy) and, per structure ``s``
with ``n_s`` voxels, ``H_s(f)`` = the ``ceil(f·n_s)`` hottest voxels of ``s`` under the current dose:

.. math::

    F(x) = \frac{1}{2 n_P} \sum_{i \in H_P(v_P)} \Big(\frac{d_i}{R} - t_P\Big)_+^2
         + \sum_{o \in \mathrm{OARs}} \frac{\lambda_o}{\lambda_P} \frac{1}{2 n_o}
               \sum_{i \in H_o(v_o)} \Big(\frac{d_i}{R} - t_o\Big)_+^2
         + \frac{\mu}{2 n_P} \sum_{i \in H_P(0.95)} \Big(1 - \frac{d_i}{R}\Big)_+^2,
    \qquad \mu = \mu_0 \Big(1 + \sum_o \frac{\lambda_o}{\lambda_P}\Big)

minimised over ``x ≥ 0``. The first term is the PTV hot-spot penalty on its hottest ``v_P`` fraction above
``t_P·R``; the second the dose-volume penalty of each OAR on its hottest ``v_o`` fraction above ``t_o·R``;
the third is zero exactly when PTV ``D95 ≥ R`` (it penalises only voxels of the hottest 95 % that are
below ``R``), i.e. the coverage constraint as a quadratic penalty whose weight ``μ`` scales with the OAR
weights so that it always dominates them (default ``μ0 = 10``). The plan is then scaled so that PTV
``D95 = R`` exactly, which removes the penalty's residual violation.

Solver: L-BFGS-B with bounds ``x ≥ 0`` (scipy) in variables scaled by each beamlet's inverse RMS PTV dose,
gradient ``Aᵀ ∇_d F`` with the hottest-fraction sets held fixed at the current dose (``F`` is continuous and
piecewise quadratic). It stops when an iteration lowers ``F`` by less than ``max(atol, rtol·F)``. Products
run on the dij's packed matrix (:mod:`m2m.physics.sparse`: ``A @ x`` over the dij's rows, then each structure's
rows gathered; ``Aᵀ @ g`` from the same storage, no transpose, no copy); a warm start from the previous plan's
fluence typically needs 5-20 evaluations instead of 100-300. ``F`` is flat
along many directions, so a warm-started plan can differ from a cold-started one by a percentage point or
two on DVH metrics at an equal objective: the plan depends on the warm start, deterministically.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from m2m.physics.dij import Dij
from m2m.physics.dvh import d_percent
from m2m.physics.tpp import PTV, TppSet

COVERAGE_FRACTION = 0.95
# Floor of a beamlet's PTV column norm, relative to the median: keeps the variable scaling bounded for
# beamlets that graze the PTV.
SCALE_FLOOR = 0.1
DEFAULT_MU0 = 10.0


@dataclass(frozen=True, eq=False)
class FmoProblem:
    """What the objective needs besides the dij itself: the dij rows of each structure that carries TPPs
    (``rows[name]``, ``structures`` order, PTV first; overlapping structures share rows, computed once) and the
    solver's variable scaling ``x = column_scale · y``: the inverse RMS PTV dose per unit weight of each beamlet.
    Products run on the dij's own packed matrix; nothing of it is copied.
    """

    structures: tuple[str, ...]
    rows: dict[str, np.ndarray]
    column_scale: np.ndarray
    #: The rows any structure reads (sorted, each once), or None when that is every row of the dij.
    active: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class PlanResult:
    """One optimised, normalised plan.

    ``fluence``: beamlet weights (float64, ≥ 0) scaled so PTV D95 = ``rx_gy``. ``dose[name]``: Gy on each row
    of the structure (``dij.rows[name]`` order) for every reported structure. ``objective``: F at the solution
    before normalisation (dimensionless). ``evaluations``: objective/gradient evaluations, each one ``A @ x``
    and one ``Aᵀ @ g`` on the dij's rows. ``scale``: the normalisation factor applied.
    """

    fluence: np.ndarray
    dose: dict[str, np.ndarray]
    tpps: TppSet
    rx_gy: float
    objective: float
    iterations: int
    evaluations: int
    solve_time_s: float
    scale: float
    converged: bool


_PROBLEMS: weakref.WeakKeyDictionary[Dij, dict[tuple[str, tuple[str, ...]], FmoProblem]] = weakref.WeakKeyDictionary()


def prepare(dij: Dij, structures: Iterable[str], *, target: str = PTV) -> FmoProblem:
    """The problem for ``structures`` (cached per dij object, so repeated calls are free).

    The structure named ``"ptv"`` takes the dij rows of ``target``, so a dij may name its target differently.
    """
    names = tuple(structures)
    per_dij = _PROBLEMS.setdefault(dij, {})
    if (target, names) in per_dij:
        return per_dij[(target, names)]
    sources = [target if n == PTV else n for n in names]
    missing = [n for n in sources if n not in dij.rows]
    if missing:
        raise KeyError(f"dij has no rows for {missing}; it has {sorted(dij.rows)}")
    empty = [n for n in sources if len(dij.rows[n]) == 0]
    if empty:
        raise ValueError(f"structures without voxels cannot carry TPPs: {empty}")
    rows = {n: np.asarray(dij.rows[src], dtype=np.int64) for n, src in zip(names, sources, strict=True)}
    rms = np.sqrt(dij.matrix.column_sumsq(rows[PTV]) / rows[PTV].size)
    if not np.any(rms > 0):
        raise ValueError("no beamlet delivers dose to the PTV")
    rms = np.maximum(rms, SCALE_FLOOR * np.median(rms[rms > 0]))
    active = np.unique(np.concatenate(list(rows.values())))
    problem = FmoProblem(names, rows, 1.0 / rms, None if active.size == dij.n_rows else active)
    per_dij[(target, names)] = problem
    return problem


def _hot_mask(d: np.ndarray, fraction: float) -> np.ndarray | None:
    """Mask of the ``ceil(fraction·n)`` hottest entries (None: all of them); ties at the cut are kept."""
    k = min(d.size, max(1, math.ceil(fraction * d.size - 1e-9)))
    if k >= d.size:
        return None
    cut = np.partition(d, d.size - k)[d.size - k]
    return d >= cut


class _Objective:
    """F(x) and its gradient, counting evaluations."""

    def __init__(self, dij: Dij, problem: FmoProblem, tpps: TppSet, rx_gy: float, mu0: float) -> None:
        self.matrix = dij.matrix
        self.problem = problem
        self.inv_rx = np.float32(1.0 / rx_gy)
        lam_p = tpps.ptv.lam
        # (dij rows, threshold t, hottest fraction v, weight) per penalty term, PTV hot spot first.
        self.terms: list[tuple[np.ndarray, float, float, float]] = [(problem.rows[PTV], tpps.ptv.t, tpps.ptv.v, 1.0)]
        for name, tpp in tpps.oars.items():
            self.terms.append((problem.rows[name], tpp.t, tpp.v, tpp.lam / lam_p))
        self.mu = mu0 * (1.0 + sum(w for *_, w in self.terms[1:]))
        self.evaluations = 0
        # L-BFGS-B stops when ΔF ≤ ftol·max(|F|, 1): the solver sees F·rtol/atol with ftol = rtol, so it
        # stops when ΔF ≤ max(atol, rtol·F) (same minimiser).
        self.scale = 1.0
        self._last: tuple[np.ndarray, float, np.ndarray] | None = None

    def scaled(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = self(x)
        return value * self.scale, grad * self.scale

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        if self._last is not None and np.array_equal(self._last[0], x):
            return self._last[1], self._last[2]
        value, grad = self._evaluate(x)
        self._last = (x.copy(), value, grad)
        return value, grad

    def _evaluate(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        value, grad_u = self.dose_terms(x)
        # dF/dx = Aᵀ (dF/du) / R.
        grad = self.matrix.rmatvec(grad_u).astype(np.float64) * float(self.inv_rx)
        return value, grad

    def dose_terms(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """F(x) and dF/du per dij row (u = dose / R): one ``A @ x``, no ``Aᵀ`` product."""
        u = self.matrix.matvec_rows(x, self.problem.active)
        u *= self.inv_rx
        grad_u = np.zeros_like(u)
        value = 0.0
        for rows, t, v, w in self.terms:
            us = u[rows]
            excess = np.maximum(us - np.float32(t), np.float32(0.0))
            mask = _hot_mask(us, v)
            if mask is not None:
                excess *= mask
            scale = w / us.size
            value += 0.5 * scale * float(np.dot(excess, excess))
            grad_u[rows] += np.float32(scale) * excess  # rows are unique within a structure
        ptv = self.problem.rows[PTV]
        up = u[ptv]
        deficit = np.maximum(np.float32(1.0) - up, np.float32(0.0))
        mask = _hot_mask(up, COVERAGE_FRACTION)
        if mask is not None:
            deficit *= mask
        scale = self.mu / up.size
        value += 0.5 * scale * float(np.dot(deficit, deficit))
        grad_u[ptv] -= np.float32(scale) * deficit
        return value, grad_u


def dose_gradient(dij: Dij, tpps: TppSet, rx_gy: float, fluence: np.ndarray, *, target: str = PTV,
                  mu0: float = DEFAULT_MU0) -> np.ndarray:
    """dF/du per dij row (float32; u = dose / Rx) at beamlet weights ``fluence``: the vector each objective
    evaluation multiplies by ``Aᵀ`` (zero on rows no penalty touches, which the product skips)."""
    problem = prepare(dij, tpps.structures, target=target)
    return _Objective(dij, problem, tpps, rx_gy, mu0).dose_terms(np.asarray(fluence, dtype=np.float64))[1]


def _open_field(dij: Dij, problem: FmoProblem, rx_gy: float) -> np.ndarray:
    """Uniform fluence scaled so the PTV mean dose is ``rx_gy``: the cold start."""
    ptv = problem.rows[PTV]
    mean = float(np.mean(dij.matrix.matvec_rows(np.ones(dij.n_beamlets, dtype=np.float32), ptv)[ptv]))
    if mean <= 0:
        raise ValueError("no beamlet delivers dose to the PTV")
    return np.full(dij.n_beamlets, rx_gy / mean, dtype=np.float64)


def held_by_normalisation(
    structure: str, metric: str, unit: str, limit: float, upper: bool, rx_gy: float, *, target: str = PTV
) -> bool:
    """Whether every plan :func:`optimize` returns meets this criterion by construction: the target's
    ``D{100·COVERAGE_FRACTION}%`` (D95) as a lower limit of at most Rx (``unit`` Gy or %Rx), since each plan is
    scaled to D95 = Rx. No TPP change can move such a criterion (TG-119's PTV D95 ≥ 50 Gy at Rx 50 Gy)."""
    if structure != target or upper or metric != f"D{100 * COVERAGE_FRACTION:g}%":
        return False
    limit_gy = limit if unit == "Gy" else limit * rx_gy / 100.0
    return limit_gy <= rx_gy * (1.0 + 1e-6)


def optimize(
    dij: Dij,
    tpps: TppSet,
    rx_gy: float,
    *,
    target: str = PTV,
    warm_start: np.ndarray | None = None,
    max_iterations: int = 300,
    atol: float = 1e-9,
    rtol: float = 1e-4,
    mu0: float = DEFAULT_MU0,
    dose_structures: Iterable[str] | None = None,
) -> PlanResult:
    """Optimise beamlet weights for ``tpps`` and normalise to PTV D95 = ``rx_gy`` (Gy).

    ``target`` names the dij structure the PTV TPPs apply to (default ``"ptv"``). ``warm_start`` is a previous
    fluence (same beamlets); without it the solve starts from a uniform open field. The solve stops when an
    iteration lowers F by less than ``max(atol, rtol·F)`` (F is dimensionless: weighted ½·(dose error / Rx)²
    per voxel) or after ``max_iterations``. ``dose_structures`` chooses the structures reported in
    ``PlanResult.dose`` (default: every structure in the dij).
    """
    if rx_gy <= 0:
        raise ValueError(f"rx_gy must be positive, got {rx_gy}")
    started = time.perf_counter()
    problem = prepare(dij, tpps.structures, target=target)
    objective = _Objective(dij, problem, tpps, rx_gy, mu0)
    if warm_start is None:
        x0 = _open_field(dij, problem, rx_gy)
    else:
        x0 = np.maximum(np.asarray(warm_start, dtype=np.float64), 0.0)
        if x0.shape != (dij.n_beamlets,):
            raise ValueError(f"warm_start has shape {x0.shape}, expected ({dij.n_beamlets},)")
    objective.scale = rtol / atol
    column_scale = problem.column_scale

    def in_scaled_variables(y: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = objective.scaled(y * column_scale)
        return value, grad * column_scale

    solution = scipy.optimize.minimize(
        in_scaled_variables,
        x0 / column_scale,
        jac=True,
        method="L-BFGS-B",
        bounds=scipy.optimize.Bounds(0.0, np.inf),
        options={"maxiter": max_iterations, "ftol": rtol, "gtol": 1e-10, "maxcor": 10},
    )
    x = np.maximum(solution.x * column_scale, 0.0)
    names = tuple(dij.rows) if dose_structures is None else tuple(dose_structures)
    full = dij.matrix @ x.astype(np.float32)
    d95 = d_percent(full[dij.rows[target]], 100.0 * COVERAGE_FRACTION)
    if d95 <= 0:
        raise ValueError("the optimised plan gives the PTV no dose; cannot normalise")
    scale = rx_gy / d95
    x *= scale
    dose = {name: full[dij.rows[name]] * np.float32(scale) for name in names}
    return PlanResult(
        fluence=x,
        dose=dose,
        tpps=tpps,
        rx_gy=float(rx_gy),
        objective=float(solution.fun) / objective.scale,
        iterations=int(solution.nit),
        evaluations=objective.evaluations,
        solve_time_s=time.perf_counter() - started,
        scale=float(scale),
        converged=bool(solution.success),
    )

