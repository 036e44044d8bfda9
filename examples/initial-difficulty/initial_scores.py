"""How hard are the random starts, and how hard could they be? Initial-plan scores under TPP drawing ranges.

The paper's random initial plans scored 5.8 ± 1.7 of 9 (prostate); ours, drawn from
:data:`m2m.physics.tpp.TRAINING_RANGES`, score about 8 because almost only the PTV hot spot fails. This script
plans each validation case from a few random TPP sets under several drawing ranges, down to OAR penalties that are
practically off (λ_oar 1e-3–1e-2, t_oar 0.9–1.0, v_oar 0.05–0.2), and prints the score and which criteria fail.
The last row is a floor set by the anatomy: no drawing range can make these phantoms fail their OAR criteria
more often than plans that barely try to spare them.

Run from the repository root (≈ 2 min on one core for 20 cases × 2 draws × 4 range sets):
    OPENBLAS_NUM_THREADS=1 .venv/bin/python examples/initial-difficulty/initial_scores.py --cases 20
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="prostate-basic")
    ap.add_argument("--cases", type=int, default=20, help="validation cases, from the cohort's first seed")
    ap.add_argument("--draws", type=int, default=2, help="random TPP sets per case and range set")
    args = ap.parse_args()
    sc = load_scenario(args.scenario)
    first = sc.cohorts.validation.start
    planners = [(seed, scenario_optimizer(sc, make_case(sc.site, seed))) for seed in range(first, first + args.cases)]
    print(f"{args.scenario}: validation seeds {first}-{first + args.cases - 1}, {args.draws} draws each, "
          f"max {sc.protocol.max_score:g}")
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
