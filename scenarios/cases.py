"""Cases assembled under a scenario: the scenario's beams, dij (cached), protocol and prescription around a case.

* :class:`PlanningCase` / :class:`CaseBank` / :func:`phantom_bank` — cases ready to plan (a dij each), built on
  first use and kept in a bounded LRU (the dose engine and the DRL environment plan from these);
* :class:`CaseOptimizer` / :func:`scenario_optimizer` — optimise and score TPP sets on one case (the calibration
  search and the experiments' difficulty probes use this).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from m2m.physics.beams import BeamSet, beams_for
from m2m.physics.case import Case
from m2m.physics.dij import Dij
from m2m.physics.dij_cache import load_or_compute_dij, resolved_structures
from m2m.physics.optimizer import PlanResult, optimize
from m2m.physics.phantoms import make_case
from m2m.physics.protocol import Protocol, ScoreReport, score
from m2m.physics.tpp import TppSet
from m2m.scenarios import Scenario


@dataclass(frozen=True, eq=False)
class PlanningCase:
    """One case ready to plan: its dij (rows for the TPP and protocol structures: what the optimizer and the score
    read) and identity.

    ``build_report_dij`` builds, on first use of :attr:`report_dij`, a second dij for the case's other targets and
    OARs (none: the case has no other), whose doses are reported beside the plan's but never optimised nor scored.
    It is a separate dij so that the planning dij stays exactly the one planned before: the dose engine's
    radiological-depth lattice depends on the voxels computed, so adding rows would move the planning dij's values
    by up to ~1 % of its maximum and change plans.
    """

    case_id: str
    seed: int
    dij: Dij
    build_report_dij: Callable[[], Dij | None] | None = field(default=None, repr=False)

    @cached_property
    def report_dij(self) -> Dij | None:
        """The dij of the case's targets and OARs outside :attr:`dij` (built once; None when there are none)."""
        if self.build_report_dij is None:
            return None
        dij = self.build_report_dij()
        if dij is not None and dij.n_beamlets != self.dij.n_beamlets:
            raise ValueError(f"case {self.case_id}: the report dij has {dij.n_beamlets} beamlets, the planning dij "
                             f"{self.dij.n_beamlets}")
        return dij

    def report_doses(self, fluence: np.ndarray) -> dict[str, np.ndarray]:
        """Dose (Gy per voxel) of beamlet weights ``fluence`` (a normalised plan's) on each structure of
        :attr:`report_dij` (empty when there is none): add it to ``PlanResult.dose`` for every clinical structure."""
        report = self.report_dij
        if report is None:
            return {}
        dose = report.dose(np.asarray(fluence, dtype=np.float64))
        return {name: dose[rows] for name, rows in report.rows.items()}


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
    """Cases of ``scenario`` for phantom ``seeds``, dijs from the on-disk dij cache (computed once per case).

    The planning dij has rows for the TPP and protocol structures; the report dij (built on first use, cached on
    disk under its own key) those of every other target and OAR of the case
    (:func:`~m2m.physics.dij_cache.resolved_structures`: not the body nor anatomical context), so a plan's DVHs can
    show every structure that matters clinically.
    """
    structures = tuple(dict.fromkeys((*scenario.tpp_structures, *scenario.protocol.structures)))

    def case_and_beams(seed: int) -> tuple[Case, BeamSet]:
        case = make_case(scenario.site, seed)
        return case, beams_for(case, scenario.beams.angles(), scenario.beams.bixel_mm)

    def build(seed: int) -> PlanningCase:
        case, beams = case_and_beams(seed)
        others = tuple(n for n in resolved_structures(case, None) if n not in structures)

        def build_report_dij() -> Dij | None:
            # The phantom is made again (≈ 0.4 s, once) rather than kept: a bank of 48 cases would hold ~400 MB of
            # grids for DVHs that training never asks for.
            return load_or_compute_dij(*case_and_beams(seed), others) if others else None

        return PlanningCase(case.case_id, seed, load_or_compute_dij(case, beams, structures), build_report_dij)

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
