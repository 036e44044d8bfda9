"""The dose-engine agent (``dose.plan``): TPPs → optimised plan → DVHs and the protocol's dose metrics.

DVHs are reported on the DRL policy's dose bins continued to 150 % Rx (:func:`report_bins_gy`) for every target and
OAR of the case: the structures the plan is optimised and scored on, then the case's other OARs (their doses from
the case's report dij, :attr:`m2m.scenarios.cases.PlanningCase.report_dij`; never in the objective). Each case's dij
is built once (on-disk cache, :mod:`m2m.physics.dij_cache`) and kept in a small in-memory LRU.
The optimisation runs in a worker thread so the agent keeps heart-beating while it solves. Several instances can
serve ``dose.plan`` together: a request carries everything a plan depends on (the warm-start fluence included),
so any instance returns the same plan.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from m2m.agents.messages import DOSE_PLAN, DosePlanRequest, DosePlanResult, StructureDose
from m2m.agents.runtime import Agent, AgentConfigError
from m2m.bus.errors import BadRequest
from m2m.bus.worker import Handlers, RequestContext
from m2m.physics.case import CaseFileError
from m2m.physics.dvh import cumulative_dvh, d_percent, report_bins_gy
from m2m.physics.optimizer import optimize
from m2m.physics.protocol import measure_all
from m2m.physics.tpp import TppSet
from m2m.scenarios import Scenario, ScenarioError, load_scenario
from m2m.scenarios.cases import CaseBank, scenario_bank


def structure_doses(dose: dict[str, np.ndarray], bins_gy: np.ndarray) -> list[StructureDose]:
    """DVH (% volume) and summary doses (Gy) of each structure."""
    return [
        StructureDose(
            name=name,
            dvh_pct=(100.0 * cumulative_dvh(d, bins_gy)).astype(np.float32),
            dmax_gy=float(d.max()),
            dmean_gy=float(d.mean()),
            d95_gy=d_percent(d, 95.0),
        )
        for name, d in dose.items()
    ]


class DoseEngine(Agent):
    """Serves ``dose.plan`` with the pencil-beam dij and the TPP-driven optimizer of :mod:`m2m.physics`."""

    known_options: ClassVar[frozenset[str]] = frozenset({"cases_in_memory"})

    @classmethod
    def check_options(cls, agent: str, options: Mapping[str, str]) -> None:
        super().check_options(agent, options)
        value = options.get("cases_in_memory", "8")
        if not (value.strip().isdigit() and int(value) >= 1):
            raise AgentConfigError(f"{agent}: option cases_in_memory must be an integer >= 1, got {value!r}",
                                   option="cases_in_memory")

    async def setup(self) -> None:
        self._banks: dict[str, tuple[Scenario, CaseBank]] = {}
        self._capacity = int(self.option("cases_in_memory", "8"))

    def handlers(self) -> dict[str, Handlers]:
        return {DOSE_PLAN: {DosePlanRequest: self.on_plan}}

    def _bank(self, scenario_name: str) -> tuple[Scenario, CaseBank]:
        """The scenario and its case bank; a user scenario registered again (new fingerprint) gets a new bank."""
        sc = load_scenario(scenario_name)
        known = self._banks.get(scenario_name)
        if known is None or known[0].fingerprint != sc.fingerprint:
            self._banks[scenario_name] = (sc, scenario_bank(sc, [0], capacity=self._capacity))
        return self._banks[scenario_name]

    async def on_plan(self, msg: DosePlanRequest, ctx: RequestContext) -> DosePlanResult:
        # A scenario or case file that cannot be used is the requester's problem: a typed, non-retryable answer that
        # names the file, and the engine keeps serving.
        try:
            sc, bank = self._bank(msg.scenario)
            tpps = TppSet.from_dict(msg.tpps, sc.oar_names)
            started = time.perf_counter()
            case = await asyncio.to_thread(bank.get, msg.case_seed)
        except (ScenarioError, CaseFileError, ValueError) as exc:  # ValueError: TPPs that are not the case's
            self.log.warning("bad_case", scenario=msg.scenario, error=str(exc))
            raise BadRequest(str(exc)) from None
        warm = None if msg.warm_start is None else np.asarray(msg.warm_start, dtype=np.float64)
        # One solve at a time per process: the agent's capacity is 1, so the broker never sends a second.
        if warm is not None and warm.shape != (case.dij.n_beamlets,):
            self.log.warning("bad_warm_start", scenario=msg.scenario, shape=list(warm.shape))
            raise BadRequest(f"warm start has {warm.shape} weights; the case has {case.dij.n_beamlets} beamlets")
        plan = await asyncio.to_thread(optimize, case.dij, tpps, sc.rx_gy, warm_start=warm)
        solve_s = time.perf_counter() - started

        def report() -> tuple[np.ndarray, list[StructureDose], dict[str, float]]:
            # DVHs and metrics over every voxel: a thread's work, so the event loop (and its heartbeats) keeps going
            dose = {**plan.dose, **case.report_doses(plan.fluence)}
            bins = report_bins_gy(sc.rx_gy)
            return bins, structure_doses(dose, bins), measure_all(sc.protocol, plan, case.dij.voxel_volume_cc,
                                                                  sc.rx_gy)

        bins, structures, metrics = await asyncio.to_thread(report)
        self.log.info("dose_planned", case=case.case_id, solve_s=round(solve_s, 3), iterations=plan.iterations)
        return DosePlanResult(
            scenario=msg.scenario, case_id=case.case_id, case_seed=msg.case_seed, rx_gy=sc.rx_gy,
            tpps=tpps.as_dict(), dvh_bins_gy=bins, structures=structures, metrics=metrics,
            fluence=plan.fluence, solve_s=solve_s, iterations=plan.iterations, engine=self.ctx.name,
        )
