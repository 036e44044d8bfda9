"""How hard are the random starts, and how hard could they be? Initial-plan scores under objectives, anatomies and
TPP drawing ranges, and whether the maximum stays reachable.

The paper's random initial plans scored 5.8 ± 1.7 of 9 (prostate) and 2.5 ± 0.4 of 4 (liver). This script plans
each validation case of a scenario from ``--draws`` random TPP sets (the first one is the scenario's own start,
:meth:`Scenario.random_tpps`, when the ranges are the scenario's) under each named drawing-range set, and prints the
initial score and which criteria fail. With ``--search B`` it also runs the calibration search with its trade
moves (:func:`m2m.scenarios.calibrate.search_max` with ``trade=True``, budget ``B`` plans) from the first draw of
each case and reports how many reach the maximum, the plans that cost, and how far the TPPs it found lie from the
start in published steps.

``--objective fidelity`` is a candidate, not the product's optimizer (issue 16): it swaps the PTV coverage penalty of
:mod:`m2m.physics.optimizer` (weight μ = 10·(1 + Σ λ_o/λ_P), which always dominates the OARs) for the papers'
two-sided PTV fidelity to Rx of weight 1, and makes every λ an absolute weight on the mean squared excess over the
penalised voxels::

    F = 1/(2 n_P) Σ_P (u − 1)² + Σ_s λ_s/(2 k_s) Σ_{H_s(v_s)} (u − t_s)_+²,   u = dose/Rx,  k_s = ceil(v_s n_s)

(``s`` the PTV hot spot and each OAR). Plans are still scaled to D95 = Rx. It replaces the optimizer's private
``_Objective.dose_terms`` for this process only.

``--anatomy closer`` is a candidate prostate anatomy (issue 16), patched into :mod:`m2m.physics.phantoms` for this
process only: the rectum's anterior wall 12 mm inside to 0 mm clear of the prostate (shipped: 10 mm inside to 1 mm
clear) and an emptier bladder (semi-axes SI 12-24, AP 16-28, LR 20-34 mm; shipped 16-31, 21-35, 25-41 mm, ≈ 45-150 cc),
with the same 12 % overlap cap.

Run from the repository root (the commands and their outputs are in this folder's README):
    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python examples/initial-difficulty/initial_scores.py --cases 20
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter

import numpy as np

from m2m.physics import optimizer, phantoms
from m2m.physics.tpp import PARAMETERS, TRAINING_RANGES, DrawRanges, TppSet, random_tpps, role_of
from m2m.scenarios import load_scenario
from m2m.scenarios.calibrate import search_max
from m2m.scenarios.cases import scenario_case, scenario_optimizer


def _with(**changes: tuple[float, float, bool]) -> DrawRanges:
    """The training ranges with ``role_param=(low, high, log)`` changes."""
    out = dict(TRAINING_RANGES)
    for key, value in changes.items():
        role, param = key.split("_", 1)
        out[(role, param)] = value
    return out


RANGE_SETS: dict[str, tuple[str, DrawRanges]] = {
    "training": ("training ranges (tpp.TRAINING_RANGES)", dict(TRAINING_RANGES)),
    "weak-oars": ("weak OARs: λ_oar 0.1–10, t_oar 0.6–1, λ_ptv 1–100",
                  _with(oar_lambda=(0.1, 10.0, True), oar_t=(0.6, 1.0, False), ptv_lambda=(1.0, 100.0, True))),
    "homogeneous-ptv": ("homogeneous PTV: t_ptv 1–1.07, λ_ptv 1–100, λ_oar 0.01–1, t_oar 0.7–1",
                        _with(ptv_t=(1.0, 1.07, False), ptv_lambda=(1.0, 100.0, True),
                              oar_lambda=(0.01, 1.0, True), oar_t=(0.7, 1.0, False))),
    "oars-off": ("OAR penalties practically off: λ_oar 1e-3–1e-2, t_oar 0.9–1, v_oar 0.05–0.2, λ_ptv 10–100",
                 _with(oar_lambda=(0.001, 0.01, True), oar_t=(0.9, 1.0, False), oar_v=(0.05, 0.2, False),
                       ptv_lambda=(10.0, 100.0, True))),
    "strong-oars": ("strong OARs: λ_oar 0.3–300", _with(oar_lambda=(0.3, 300.0, True))),
    "strong-low-oars": ("strong, low OAR thresholds: λ_oar 1–1000, t_oar 0.4–0.8",
                        _with(oar_lambda=(1.0, 1000.0, True), oar_t=(0.4, 0.8, False))),
}


def _fidelity_terms(self: optimizer._Objective, x: np.ndarray) -> tuple[float, np.ndarray]:
    """The fidelity candidate (module docstring): F and dF/du per dij row."""
    u = self.matrix.matvec_rows(x, self.problem.active)
    u *= self.inv_rx
    return _fidelity_terms_on(self, u)


def _fidelity_terms_on(self: optimizer._Objective, u: np.ndarray) -> tuple[float, np.ndarray]:
    """F and dF/du of the fidelity candidate at ``u`` (dose/Rx per dij row)."""
    grad = np.zeros_like(u)
    ptv = self.problem.rows["ptv"]
    error = u[ptv] - np.float32(1.0)
    value = 0.5 / ptv.size * float(error @ error)
    grad[ptv] = np.float32(1.0 / ptv.size) * error
    for k, (rows, t, v, w) in enumerate(self.terms):
        lam = self.lam_ptv * (1.0 if k == 0 else w)
        scale = lam / min(rows.size, max(1, math.ceil(v * rows.size - 1e-9)))
        excess = np.maximum(u[rows] - np.float32(t), np.float32(0.0))
        mask = optimizer._hot_mask(u[rows], v)
        if mask is not None:
            excess *= mask
        value += 0.5 * scale * float(excess @ excess)
        grad[rows] += np.float32(scale) * excess
    return value, grad


def _use_objective(terms) -> None:  # type: ignore[no-untyped-def]
    plain_init = optimizer._Objective.__init__

    def init(self: optimizer._Objective, dij, problem, tpps, rx_gy, mu0):  # type: ignore[no-untyped-def]
        plain_init(self, dij, problem, tpps, rx_gy, mu0)
        self.lam_ptv = tpps.ptv.lam

    optimizer._Objective.__init__ = init  # type: ignore[method-assign]
    optimizer._Objective.dose_terms = terms  # type: ignore[method-assign]


def _use_closer_anatomy() -> None:
    phantoms._RECTUM_GAP_MM = (-12.0, 0.0)  # type: ignore[attr-defined]
    phantoms._BLADDER_SI_MM = (12.0, 24.0)  # type: ignore[attr-defined]
    phantoms._BLADDER_AP_MM = (16.0, 28.0)  # type: ignore[attr-defined]
    phantoms._BLADDER_LR_MM = (20.0, 34.0)  # type: ignore[attr-defined]


def published_steps(start: TppSet, end: TppSet) -> int:
    """A lower bound on the published single steps from ``start`` to ``end``: per TPP, the multiplicative distance
    in units of its step factor in that direction (each TPP moves on its own)."""
    total = 0
    a, b = start.as_dict(), end.as_dict()
    for name, x in a.items():
        param, structure = name.split("_", 1)
        spec = PARAMETERS[param].of(role_of(structure))
        ratio = b[name] / x
        if abs(math.log(ratio)) < 1e-9:
            continue
        factor = spec.raise_factor if ratio > 1 else spec.lower_factor
        total += math.ceil(abs(math.log(ratio)) / abs(math.log(factor)) - 1e-9)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="prostate-basic")
    ap.add_argument("--cases", type=int, default=20, help="validation cases, from the cohort's first seed")
    ap.add_argument("--draws", type=int, default=2, help="random TPP sets per case and range set")
    ap.add_argument("--objective", choices=("coverage", "fidelity"), default="coverage",
                    help="the optimizer's objective (coverage, the product's) or the candidate (docstring)")
    ap.add_argument("--anatomy", choices=("shipped", "closer"), default="shipped",
                    help="the shipped prostate phantoms or the candidate anatomy (docstring)")
    ap.add_argument("--ranges", nargs="+", choices=tuple(RANGE_SETS), default=["training", "weak-oars",
                    "homogeneous-ptv", "oars-off"], help="drawing-range sets to try")
    ap.add_argument("--search", type=int, default=0, metavar="B",
                    help="also search for the maximum from each case's first draw, budget B plans (0: no search)")
    args = ap.parse_args()
    if args.objective == "fidelity":
        _use_objective(_fidelity_terms)
    if args.anatomy == "closer":
        _use_closer_anatomy()
    sc = load_scenario(args.scenario)
    first = sc.cohorts.validation.start
    planners = [(seed, scenario_optimizer(sc, scenario_case(sc, seed)))
                for seed in range(first, first + args.cases)]
    print(f"{args.scenario}: validation seeds {first}-{first + args.cases - 1}, {args.draws} draws each, "
          f"max {sc.protocol.max_score:g}, objective {args.objective}, anatomy {args.anatomy}")
    for key in args.ranges:
        label, ranges = RANGE_SETS[key]
        scores: list[float] = []
        failing: Counter[str] = Counter()
        starts = []
        for seed, planner in planners:
            rng = np.random.default_rng([sc.initial_seed, seed])  # the scenario's own draw comes first
            for draw in range(args.draws):
                tpps = random_tpps(rng, sc.oar_names, ranges)
                scored = planner.evaluate(tpps)
                scores.append(scored.report.total)
                failing.update(scored.report.failing)
                if draw == 0:
                    starts.append((planner, scored))
        at_max = sum(s >= sc.protocol.max_score - 1e-9 for s in scores)
        print(f"\n{label}\n  initial score {np.mean(scores):.2f} ± {np.std(scores):.2f} "
              f"(min {min(scores):.2f}; at max {at_max}/{len(scores)})")
        for criterion, n in failing.most_common():
            print(f"  fails {n:3d}/{len(scores)}  {criterion}")
        if args.search:
            results = [search_max(planner, start, max_evaluations=args.search, trade=True)
                       for planner, start in starts]
            reached = [r for r in results if r.reached_max]
            plans = [r.evaluations for r in results]
            steps = [published_steps(s.tpps, r.best.tpps) for (_, s), r in zip(starts, results, strict=True)
                     if r.reached_max]
            lam_ptv = [r.best.tpps.ptv.lam for r in reached]
            lam_oar = [o.lam for r in reached for o in r.best.tpps.oars.values()]
            print(f"  search ({args.search} plans): reached the maximum on {len(reached)}/{len(results)}, "
                  f"median {statistics.median(plans):g} plans (most {max(plans)})")
            if reached:
                print(f"  found TPPs: published steps from the start median {statistics.median(steps):g} "
                      f"(fewest {min(steps)}, most {max(steps)}; within 20: {sum(s <= 20 for s in steps)}); "
                      f"λ_ptv median {statistics.median(lam_ptv):.3g} (max {max(lam_ptv):.3g}), "
                      f"λ_oar median {statistics.median(lam_oar):.3g} (min {min(lam_oar):.3g})")
            for (seed, _), r in zip(planners, results, strict=True):
                if not r.reached_max:
                    print(f"  not reached: seed {seed} at {r.best.report.total:.2f}, failing {r.best.report.failing}")


if __name__ == "__main__":
    main()
