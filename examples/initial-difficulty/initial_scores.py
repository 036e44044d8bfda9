"""How hard are the random starts, and how hard could they be? Initial-plan scores under TPP drawing ranges.

The paper's random initial plans scored 5.8 ± 1.7 of 9 (prostate); ours, drawn from
:data:`m2m.physics.tpp.TRAINING_RANGES`, score about 8 because almost only the PTV hot spot fails. This script
plans each validation case from a few random TPP sets under several drawing ranges, down to OAR penalties that are
practically off (λ_oar 1e-3–1e-2, t_oar 0.9–1.0, v_oar 0.05–0.2), and prints the score and which criteria fail.
The last row is a floor set by the anatomy: no drawing range can make these phantoms fail their OAR criteria
more often than plans that barely try to spare them.

Run from the repository root (≈ 2 min on one core for 20 cases × 2 draws × 4 range sets):
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/initial-difficulty/initial_scores.py --cases 20

``--objective fidelity`` is a probe, not the product's optimizer: it swaps the PTV coverage penalty of
:mod:`m2m.physics.optimizer` (weight μ that always dominates the OARs) for a two-sided PTV fidelity to Rx of weight 1
and makes every λ an absolute weight (λ_ptv on the PTV hot spot, λ_oar on each OAR, not λ_oar/λ_ptv), as in the
virtual-treatment-planner papers, so that OAR sparing and PTV homogeneity compete; plans are still scaled to
D95 = Rx. It replaces the optimizer's private ``_Objective.dose_terms`` for this process only.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from m2m.physics import optimizer
from m2m.physics.phantoms import make_case
from m2m.physics.tpp import TRAINING_RANGES, random_tpps
from m2m.scenarios import load_scenario
from m2m.scenarios.cases import scenario_optimizer

RANGE_SETS = {
    "training ranges (tpp.TRAINING_RANGES)": dict(TRAINING_RANGES),
    "weak OARs: λ_oar 0.1–10, t_oar 0.6–1, λ_ptv 1–100": {
        **TRAINING_RANGES, ("oar", "lambda"): (0.1, 10.0, True), ("oar", "t"): (0.6, 1.0, False),
        ("ptv", "lambda"): (1.0, 100.0, True),
    },
    "homogeneous PTV: t_ptv 1–1.07, λ_ptv 1–100, λ_oar 0.01–1, t_oar 0.7–1": {
        **TRAINING_RANGES, ("ptv", "t"): (1.0, 1.07, False), ("ptv", "lambda"): (1.0, 100.0, True),
        ("oar", "lambda"): (0.01, 1.0, True), ("oar", "t"): (0.7, 1.0, False),
    },
    "OAR penalties practically off: λ_oar 1e-3–1e-2, t_oar 0.9–1, v_oar 0.05–0.2, λ_ptv 10–100": {
        **TRAINING_RANGES, ("oar", "lambda"): (0.001, 0.01, True), ("oar", "t"): (0.9, 1.0, False),
        ("oar", "v"): (0.05, 0.2, False), ("ptv", "lambda"): (10.0, 100.0, True),
    },
}


def _fidelity_terms(self: optimizer._Objective, x: np.ndarray) -> tuple[float, np.ndarray]:
    """F = 1/(2 n_P) Σ_P (u − 1)² + Σ_s λ_s/(2 n_s) Σ_{H_s(v_s)} (u − t_s)_+² (u = dose/Rx); dF/du per row."""
    active = self.problem.active
    u = self.matrix @ x if active is None else self.matrix.matvec_rows(x, active)
    u *= self.inv_rx
    grad = np.zeros_like(u)
    value = 0.0
    for k, (rows, t, v, w) in enumerate(self.terms):
        weight = self.lam_ptv * (1.0 if k == 0 else w)  # the terms hold λ_oar/λ_ptv: absolute λ again
        excess = np.maximum(u[rows] - np.float32(t), np.float32(0.0))
        mask = optimizer._hot_mask(u[rows], v)
        if mask is not None:
            excess *= mask
        value += 0.5 * weight / rows.size * float(excess @ excess)
        grad[rows] += np.float32(weight / rows.size) * excess
    ptv = self.problem.rows["ptv"]
    error = u[ptv] - np.float32(1.0)
    value += 0.5 / ptv.size * float(error @ error)
    grad[ptv] += np.float32(1.0 / ptv.size) * error
    return value, grad


def _use_fidelity_objective() -> None:
    plain_init = optimizer._Objective.__init__

    def init(self: optimizer._Objective, dij, problem, tpps, rx_gy, mu0):  # type: ignore[no-untyped-def]
        plain_init(self, dij, problem, tpps, rx_gy, mu0)
        self.lam_ptv = tpps.ptv.lam

    optimizer._Objective.__init__ = init  # type: ignore[method-assign]
    optimizer._Objective.dose_terms = _fidelity_terms  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="prostate-basic")
    ap.add_argument("--cases", type=int, default=20, help="validation cases, from the cohort's first seed")
    ap.add_argument("--draws", type=int, default=2, help="random TPP sets per case and range set")
    ap.add_argument("--objective", choices=("coverage", "fidelity"), default="coverage",
                    help="the optimizer's objective (coverage, the product's) or the fidelity probe (docstring)")
    args = ap.parse_args()
    if args.objective == "fidelity":
        _use_fidelity_objective()
    sc = load_scenario(args.scenario)
    first = sc.cohorts.validation.start
    planners = [(seed, scenario_optimizer(sc, make_case(sc.site, seed))) for seed in range(first, first + args.cases)]
    print(f"{args.scenario}: validation seeds {first}-{first + args.cases - 1}, {args.draws} draws each, "
          f"max {sc.protocol.max_score:g}, objective {args.objective}")
    for label, ranges in RANGE_SETS.items():
        scores: list[float] = []
        failing: Counter[str] = Counter()
        for seed, planner in planners:
            rng = np.random.default_rng([7, seed])
            for _ in range(args.draws):
                report = planner.evaluate(random_tpps(rng, sc.oar_names, ranges)).report
                scores.append(report.total)
                failing.update(report.failing)
        at_max = sum(s >= sc.protocol.max_score - 1e-9 for s in scores)
        print(f"\n{label}\n  initial score {np.mean(scores):.2f} ± {np.std(scores):.2f} "
              f"(min {min(scores):.2f}; at max {at_max}/{len(scores)})")
        for criterion, n in failing.most_common():
            print(f"  fails {n:3d}/{len(scores)}  {criterion}")


if __name__ == "__main__":
    main()
