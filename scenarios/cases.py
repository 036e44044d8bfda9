"""Cases assembled under a scenario: the scenario's beams, dij (cached), protocol and prescription around a case.

* :class:`PlanningCase` / :class:`CaseBank` / :func:`phantom_bank` — cases ready to plan (a dij each), built on
  first use and kept in a bounded LRU (the dose engine and the DRL environment plan from these);
* :class:`CaseOptimizer` / :func:`scenario_optimizer` — optimise and score TPP sets on one case (the calibration
  search and the experiments' difficulty probes use this).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2m.physics.beams import beams_for
from m2m.physics.case import Case
from m2m.physics.dij import Dij
from m2m.physics.dij_cache import load_or_compute_dij
from m2m.physics.optimizer import PlanResult, optimize
from m2m.physics.phantoms import make_case
from m2m.physics.protocol import Protocol, ScoreReport, score
from m2m.physics.tpp import TppSet
from m2m.scenarios import Scenario


@dataclass(frozen=True, eq=False)
class PlanningCase:
    """One case ready to plan: its dij (rows for the TPP and protocol structures) and identity."""

    case_id: str
    seed: int
    dij: Dij


class CaseBank:
    """Planning cases for a list of phantom seeds, built on first use and kept in a bounded in-memory LRU.

    A prostate dij takes ~1.4 M non-zeros (≈ 50 MB with the optimizer's row-restricted copy), so the default
    capacity of 48 cases stays under ~2.5 GB while covering a whole training cohort slice.
    """

    def __init__(self, seeds: Sequence[int], build: Callable[[int], PlanningCase], capacity: int = 48) -> None:
        if not seeds:
            raise ValueError("a case bank needs at least one seed")
        self.seeds = tuple(int(s) for s in seeds)
        self._build = build
        self._capacity = capacity
        self._cache: OrderedDict[int, PlanningCase] = OrderedDict()

    def get(self, seed: int) -> PlanningCase:
        """The case of ``seed`` (built on first use)."""
        if seed in self._cache:
            self._cache.move_to_end(seed)
            return self._cache[seed]
        case = self._build(seed)
        self._cache[seed] = case
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return case


def phantom_bank(scenario: Scenario, seeds: Sequence[int], capacity: int = 48) -> CaseBank:
    """Cases of ``scenario`` for phantom ``seeds``, dijs from the on-disk dij cache (computed once per case)."""
    structures = tuple(dict.fromkeys((*scenario.tpp_structures, *scenario.protocol.structures)))

    def build(seed: int) -> PlanningCase:
        case = make_case(scenario.site, seed)
        beams = beams_for(case, scenario.beams.angles(), scenario.beams.bixel_mm)
        return PlanningCase(case.case_id, seed, load_or_compute_dij(case, beams, structures))

    return CaseBank(seeds, build, capacity)


@dataclass(frozen=True, eq=False)
class ScoredPlan:
    """A plan for ``tpps`` and its protocol score."""

    tpps: TppSet
    plan: PlanResult
    report: ScoreReport

    @property
    def key(self) -> tuple[float, float]:
        """Ranking key: points first, then the summed clipped margins."""
        return (round(self.report.total, 9), self.report.margin())


class CaseOptimizer:
    """Plans and scores TPP sets on one case: a dij, a protocol and a prescription (Gy)."""

    def __init__(self, dij: Dij, protocol: Protocol, rx_gy: float, *, target: str = "ptv") -> None:
        self.dij, self.protocol, self.rx_gy, self.target = dij, protocol, rx_gy, target
        self.evaluations = 0

    def evaluate(self, tpps: TppSet, warm_start: np.ndarray | None = None) -> ScoredPlan:
        """Optimise (warm-started if given) and score."""
        self.evaluations += 1
        plan = optimize(
            self.dij, tpps, self.rx_gy, target=self.target, warm_start=warm_start,
            dose_structures=self.protocol.structures,
        )
        return ScoredPlan(tpps, plan, score(self.protocol, plan, self.dij.voxel_volume_cc, self.rx_gy))


def scenario_optimizer(scenario: Scenario, case: Case, *, cache_dir: str | Path | None = None) -> CaseOptimizer:
    """A :class:`CaseOptimizer` for ``case`` under ``scenario``'s beams, protocol and prescription (dij from the cache
    when present)."""
    beams = beams_for(case, gantry_deg=scenario.beams.angles(), bixel_mm=scenario.beams.bixel_mm)
    return CaseOptimizer(load_or_compute_dij(case, beams, cache_dir=cache_dir), scenario.protocol, scenario.rx_gy)
