"""The session folder holds readable plots, a trajectory whose rows keep each rationale with its own proposal, and
a final.json with every criterion of the final plan."""

from __future__ import annotations

import csv
import json

import msgspec
import numpy as np
import pytest

from m2m.agents.llm.guard import Veto
from m2m.agents.messages import CriterionResult, Decision, Outcome, Proposal, Step
from m2m.physics.dvh import report_bins_gy
from m2m.physics.tpp import Direction, Move
from m2m.session.folder import CSV_COLUMNS, dvh_curves, write_session_folder

RAISE_RECTUM = Move("lambda_rectum", Direction.RAISE)
LOWER_T_PTV = Move("t_ptv", Direction.LOWER)


def _criterion(value: float) -> CriterionResult:
    return CriterionResult(id="rectum:V70Gy", label="rectum V70Gy ≤ 25 %", structure="rectum", metric="V70Gy",
                           unit="%", value=value, limit=25.0, zero=30.0, points=min(1.0, (30 - value) / 5),
                           passed=value <= 25.0)


def _steps() -> list[Step]:
    vetoed = Decision(  # the LLM proposed loosening the rectum; the guard took the DRL's advice instead
        proposal=Proposal(action="change", move=Move("lambda_rectum", Direction.LOWER), rationale="spare the PTV"),
        action=RAISE_RECTUM, source="drl_advice",
        vetoes=[Veto("loosens_at_risk", "lower lambda_rectum loosens rectum")], decision_s=2.5,
    )
    own = Decision(proposal=Proposal(action="change", move=LOWER_T_PTV, rationale="hot spot"), action=LOWER_T_PTV,
                   source="proposal", decision_s=1.5)
    return [
        Step(step=0, score=6.5, max_score=9.0, tpps={"t_ptv": 1.1, "lambda_rectum": 1.0}, failing=["rectum:V70Gy"],
             criteria=[_criterion(28.0)], plan_s=0.4, decision=vetoed),
        Step(step=1, score=8.0, max_score=9.0, tpps={"t_ptv": 1.1, "lambda_rectum": 1.65}, failing=["ptv:D0.03cc"],
             criteria=[_criterion(24.0)], plan_s=0.1, decision=own),
        Step(step=2, score=9.0, max_score=9.0, tpps={"t_ptv": 1.0, "lambda_rectum": 1.65}, failing=[],
             criteria=[_criterion(24.5)], plan_s=0.1),
    ]


def _write(folder, steps=None):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    dose = {"ptv": rng.normal(79.2, 1.0, 500), "rectum": rng.uniform(0, 75, 300)}
    bins = report_bins_gy(79.2)
    return write_session_folder(
        folder, title="prostate-0000", steps=_steps() if steps is None else steps, outcome=Outcome.MAXIMUM_SCORE,
        dvh_bins_gy=bins, initial_dvh_pct=dvh_curves(dose, bins),
        final_dvh_pct=dvh_curves({k: v * 0.95 for k, v in dose.items()}, bins), rx_gy=79.2,
    )


def test_folder_has_plots_and_a_trajectory_with_each_rationale_on_its_own_proposal(tmp_path):
    paths = _write(tmp_path / "s")
    for key in ("dvh", "score", "tpps"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(paths["trajectory_csv"].open()))
    assert list(rows[0])[: len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    # row k holds the decision taken FROM step k: the vetoed proposal, its own rationale, and the action taken
    assert (rows[0]["proposal"], rows[0]["action"], rows[0]["source"]) == (
        "lower lambda_rectum", "raise lambda_rectum", "drl_advice")
    assert (rows[0]["rationale"], rows[0]["vetoes"]) == ("spare the PTV", "loosens_at_risk")
    assert (rows[1]["proposal"], rows[1]["action"], rows[1]["rationale"]) == ("lower t_ptv", "lower t_ptv", "hot spot")
    assert (rows[2]["proposal"], rows[2]["action"]) == ("", "")
    assert float(rows[1]["lambda_rectum"]) == pytest.approx(1.65)
    assert rows[0]["failing"] == "rectum:V70Gy"


def test_trajectory_json_round_trips_the_step_schema(tmp_path):
    paths = _write(tmp_path / "s")
    decoded = msgspec.json.decode(paths["trajectory_json"].read_bytes(), type=list[Step])
    assert decoded == _steps()


def test_final_json_has_every_criterion_and_the_outcome(tmp_path):
    final = json.loads(_write(tmp_path / "s")["final"].read_text())
    assert final["reached_max"] is True and final["outcome"] == "maximum score"
    assert final["steps"] == 2 and final["tpps"]["t_ptv"] == 1.0 and final["failing"] == []
    assert final["criteria"] == [{"id": "rectum:V70Gy", "label": "rectum V70Gy ≤ 25 %", "structure": "rectum",
                                  "metric": "V70Gy", "unit": "%", "value": 24.5, "limit": 25.0, "zero": 30.0,
                                  "points": 1.0, "passed": True}]


def test_dvh_curves_are_percent_of_volume():
    curves = dvh_curves({"ptv": np.array([10.0, 20.0, 30.0, 40.0])}, np.array([0.0, 15.0, 35.0, 50.0]))
    assert curves["ptv"].tolist() == [100.0, 75.0, 25.0, 0.0]


def test_session_must_start_at_step_zero(tmp_path):
    with pytest.raises(ValueError, match="step 0"):
        _write(tmp_path, steps=_steps()[1:])
