"""The dose engine: DVH summaries (its reported DVH bins are tested with m2m.physics.dvh, TPPs from a message with
m2m.physics.tpp), and the structures it reports: every target and OAR of the case, while the plan is made on the TPP
and protocol structures alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from support.synthetic import synthetic_case

from m2m.agents.dose_engine import DoseEngine, structure_doses
from m2m.agents.messages import DosePlanRequest
from m2m.agents.runtime import AgentContext
from m2m.physics.dij import Dij
from m2m.physics.optimizer import optimize
from m2m.physics.protocol import measure_all
from m2m.scenarios import load_scenario
from m2m.scenarios.cases import PlanningCase, phantom_bank


def test_structure_doses_are_percent_volume_and_gray() -> None:
    (rectum,) = structure_doses({"rectum": np.array([10.0, 20.0, 30.0, 40.0])}, np.array([0.0, 25.0, 50.0]))
    assert rectum.dvh_pct.tolist() == [100.0, 50.0, 0.0]
    assert (rectum.dmax_gy, rectum.dmean_gy) == (40.0, 25.0)


def test_report_doses_come_from_the_report_dij_and_leave_the_planning_dij_alone() -> None:
    planning = synthetic_case(0)
    assert planning.report_doses(np.ones(planning.dij.n_beamlets)) == {}  # no other structure: nothing reported
    # a report dij whose one structure ("femoral_head_l") is the planning dij's rectum rows
    case = PlanningCase(planning.case_id, planning.seed, planning.dij,
                        lambda: _renamed(planning.dij, "rectum", "femoral_head_l"))
    fluence = np.linspace(0.5, 1.5, planning.dij.n_beamlets)
    (name, dose), = case.report_doses(fluence).items()
    assert name == "femoral_head_l"
    np.testing.assert_allclose(dose, planning.dij.dose(fluence)[planning.dij.rows["rectum"]], rtol=1e-6)
    assert case.report_dij is case.report_dij  # built once


def _renamed(dij: Dij, source: str, name: str) -> Dij:
    rows = dij.rows[source]
    return Dij(matrix=dij.matrix.select_rows(rows), voxel_index=dij.voxel_index[rows],
               rows={name: np.arange(rows.size)}, beamlet_beam=dij.beamlet_beam, voxel_volume_cc=dij.voxel_volume_cc,
               grid_shape=dij.grid_shape)


def test_dose_engine_reports_every_target_and_oar_of_the_case_but_plans_on_the_tpp_structures(
    tmp_path, monkeypatch
) -> None:
    """prostate-basic carries TPPs and criteria on the PTV, bladder and rectum only: the femoral heads are reported
    (DVH and summary doses) from the case's report dij, and the planning dij (the optimisation) is unchanged."""
    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path / "cache"))
    sc = load_scenario("prostate-basic")
    seed = int(sc.cohorts.get("test").seeds[0])
    engine = DoseEngine(AgentContext(name="dose-engine-test", role="dose-engine", impl="physics", incarnation=0,
                                     options={}, bus=None))  # type: ignore[arg-type]  # on_plan never uses the bus
    asyncio.run(engine.setup())
    tpps = sc.random_tpps(seed)
    result = asyncio.run(engine.on_plan(DosePlanRequest(scenario=sc.name, case_seed=seed, tpps=tpps.as_dict()),
                                        None))  # type: ignore[arg-type]
    assert [s.name for s in result.structures] == ["ptv", "bladder", "rectum", "femoral_head_l", "femoral_head_r"]
    femoral = {s.name: s for s in result.structures}["femoral_head_l"]
    assert femoral.dvh_pct[0] == pytest.approx(100.0) and 0 < femoral.dmean_gy <= femoral.dmax_gy < 1.5 * sc.rx_gy
    # the plan is the one made on the TPP and protocol structures alone
    case = phantom_bank(sc, [seed]).get(seed)
    assert set(case.dij.rows) == {"ptv", "bladder", "rectum"}
    assert case.report_dij is not None and set(case.report_dij.rows) == {"femoral_head_l", "femoral_head_r"}
    plan = optimize(case.dij, tpps, sc.rx_gy)
    assert result.metrics == measure_all(sc.protocol, plan, case.dij.voxel_volume_cc, sc.rx_gy)
    np.testing.assert_array_equal(result.fluence, plan.fluence)
