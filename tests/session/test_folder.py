"""The session folder holds readable plots (a one-page summary, a DVH with a marker per criterion, TPPs in absolute
values), a trajectory whose rows keep each rationale with its own proposal, and a final.json with every criterion and
the dose metrics of every structure of the final plan."""

from __future__ import annotations

import csv
import json

import msgspec
import numpy as np
import pytest

from m2m.agents.dose_engine import structure_doses
from m2m.agents.llm.guard import Veto
from m2m.agents.messages import CriterionResult, Decision, Outcome, Proposal, Step, ValueChange
from m2m.physics.dvh import report_bins_gy
from m2m.physics.tpp import Direction, Move
from m2m.session.folder import CSV_COLUMNS, SessionLabel, dose_metrics, dvh_markers, write_session_folder

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


LABEL = SessionLabel(case_id="prostate-0000", scenario="prostate-basic", mode="guided", planner="llm")
#: ptv and rectum carry TPPs and criteria; the femoral head is an OAR of the case with neither.
DOSE = {"ptv": np.random.default_rng(0).normal(79.2, 1.0, 500),
        "rectum": np.random.default_rng(1).uniform(0, 75, 300),
        "femoral_head_l": np.random.default_rng(2).uniform(0, 40, 200)}


def _write(folder, steps=None):  # type: ignore[no-untyped-def]
    bins = report_bins_gy(79.2)
    return write_session_folder(
        folder, label=LABEL, steps=_steps() if steps is None else steps, outcome=Outcome.MAXIMUM_SCORE, rx_gy=79.2,
        dvh_bins_gy=bins, initial_structures=structure_doses(DOSE, bins),
        final_structures=structure_doses({k: v * 0.95 for k, v in DOSE.items()}, bins),
    )


def test_folder_has_plots_and_a_trajectory_with_each_rationale_on_its_own_proposal(tmp_path):
    from PIL import Image

    paths = _write(tmp_path / "s")
    for key in ("summary", "dvh", "score", "tpps"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(paths[key]) as image:  # a whole, decodable image of a readable size
            image.load()
            assert min(image.size) >= 400
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
    assert (final["case_id"], final["scenario"], final["mode"], final["planner"]) == (
        "prostate-0000", "prostate-basic", "guided", "llm")
    assert final["steps"] == 2 and final["tpps"]["t_ptv"] == 1.0 and final["failing"] == []
    assert final["files"]["summary"] == "summary.png" and final["files"]["dvh"] == "dvh.png"
    assert final["criteria"] == [{"id": "rectum:V70Gy", "label": "rectum V70Gy ≤ 25 %", "structure": "rectum",
                                  "metric": "V70Gy", "unit": "%", "value": 24.5, "limit": 25.0, "zero": 30.0,
                                  "points": 1.0, "passed": True}]


def test_final_json_says_who_chose_the_decisions(tmp_path):
    final = json.loads(_write(tmp_path / "s")["final"].read_text())
    assert final["decisions"] == 2 and final["ownership"] == 0.5  # the proposal taken; the DRL advice is not its own
    assert final["sources"] == {"proposal": 1, "retry": 0, "drl_advice": 1, "safe": 0}
    assert final["feedback_retries"] == 0


def _value_steps() -> list[Step]:
    """A feedback retry taken (new TPP values after the guard refused a loosening), then a refused retry replaced by
    the safe action, then the safe stop."""
    median = [ValueChange(tpp="t_ptv", before=1.1, after=1.0, target="p50"),
              ValueChange(tpp="lambda_rectum", before=1.0, after=9.0, target="p50")]
    retried = Decision(
        proposal=Proposal(action="change", form="quantile", rationale="spare the PTV",
                          changes=[ValueChange(tpp="lambda_rectum", before=1.0, after=0.5, target="p5")]),
        retry=Proposal(action="change", form="quantile", rationale="tighten", changes=median),
        action=None, changes=median, source="retry", vetoes=[Veto("loosens_at_risk", "x")], decision_s=4.0)
    refused = Decision(
        proposal=Proposal(action="stop", rationale="done"), retry=Proposal(action="stop", rationale="really"),
        action=LOWER_T_PTV, changes=[ValueChange(tpp="t_ptv", before=1.0, after=0.95)], source="safe",
        vetoes=[Veto("early_stop", "x"), Veto("early_stop", "x")], decision_s=3.0)
    stop = Decision(proposal=None, action=None, source="safe", error="no JSON", valid=False,
                    vetoes=[Veto("no_admissible_action", "x")])
    tpps = {"t_ptv": 1.1, "lambda_rectum": 1.0}
    return [
        Step(step=0, score=6.5, max_score=9.0, tpps=tpps, failing=["rectum:V70Gy"], criteria=[_criterion(28.0)],
             decision=retried),
        Step(step=1, score=8.0, max_score=9.0, tpps={"t_ptv": 1.0, "lambda_rectum": 9.0}, failing=["rectum:V70Gy"],
             criteria=[_criterion(26.0)], decision=refused),
        Step(step=2, score=8.0, max_score=9.0, tpps={"t_ptv": 0.95, "lambda_rectum": 9.0}, failing=["rectum:V70Gy"],
             criteria=[_criterion(26.0)], decision=stop),
    ]


def test_value_changes_and_feedback_retries_are_written_and_counted(tmp_path):
    paths = _write(tmp_path / "s", steps=_value_steps())
    rows = list(csv.DictReader(paths["trajectory_csv"].open()))
    assert (rows[0]["proposal"], rows[0]["retry"], rows[0]["action"], rows[0]["source"]) == (
        "lambda_rectum 1->0.5 (p5)", "t_ptv 1.1->1 (p50), lambda_rectum 1->9 (p50)",
        "t_ptv 1.1->1 (p50), lambda_rectum 1->9 (p50)", "retry")
    assert (rows[0]["rationale"], rows[0]["retry_rationale"]) == ("spare the PTV", "tighten")
    assert (rows[1]["proposal"], rows[1]["retry"], rows[1]["action"]) == ("stop", "stop", "lower t_ptv")
    assert (rows[2]["proposal"], rows[2]["action"], rows[2]["rationale"]) == ("invalid answer", "stop", "no JSON")
    final = json.loads(paths["final"].read_text())
    assert (final["decisions"], final["feedback_retries"]) == (3, 2)
    assert final["ownership"] == pytest.approx(1 / 3)  # the retry taken; the safe action and the safe stop are not
    assert final["sources"] == {"proposal": 0, "retry": 1, "drl_advice": 0, "safe": 2}
    assert msgspec.json.decode(paths["trajectory_json"].read_bytes(), type=list[Step]) == _value_steps()


def test_final_json_has_the_dose_metrics_of_every_structure_in_gy_and_percent_rx(tmp_path):
    final = json.loads(_write(tmp_path / "s")["final"].read_text())
    doses = final["dose_metrics"]
    assert list(doses) == ["ptv", "rectum", "femoral_head_l"]  # not only the structures with criteria
    rectum = 0.95 * DOSE["rectum"]
    assert doses["rectum"]["dmax_gy"] == pytest.approx(rectum.max(), abs=1e-3)
    assert doses["rectum"]["dmean_gy"] == pytest.approx(rectum.mean(), abs=1e-3)
    assert doses["ptv"]["d95_pct_rx"] == pytest.approx(100 * doses["ptv"]["d95_gy"] / 79.2, abs=0.01)
    assert set(doses["femoral_head_l"]) == {"dmax_gy", "dmean_gy", "d95_gy", "dmax_pct_rx", "dmean_pct_rx",
                                            "d95_pct_rx"}


def test_dose_metrics_convert_gy_to_percent_rx():
    (ptv,) = structure_doses({"ptv": np.array([40.0, 50.0, 60.0])}, np.array([0.0, 50.0]))
    metrics = dose_metrics([ptv], rx_gy=50.0)["ptv"]
    assert (metrics["dmax_gy"], metrics["dmax_pct_rx"], metrics["dmean_pct_rx"]) == (60.0, 120.0, 100.0)


def _result(structure: str, metric: str, unit: str, limit: float, zero: float, passed: bool) -> CriterionResult:
    return CriterionResult(id=f"{structure}:{metric}", label="", structure=structure, metric=metric, unit=unit,
                           value=0.0, limit=limit, zero=zero, points=float(passed), passed=passed)


def test_dvh_has_a_marker_per_criterion_at_its_dose_and_volume():
    criteria = [
        _result("rectum", "V70Gy", "%", 25.0, 30.0, True),  # (70 Gy, 25 %), upper limit
        _result("bladder", "V95%Rx", "%", 10.0, 15.0, False),  # (95 % of 50 Gy, 10 %)
        _result("ptv", "D95%", "%Rx", 100.0, 95.0, True),  # (50 Gy, 95 %), a lower limit
        _result("ptv", "D0.03cc", "%Rx", 107.0, 110.0, True),  # a dose limit: tick at 53.5 Gy
        _result("stomach", "D10cc", "Gy", 18.0, 23.0, False),
        _result("liver_normal", "Dmean", "Gy", 15.0, 20.0, True),
        _result("cord", "Dmax", "Gy", 30.0, 35.0, True),
        _result("lung", "V20Gy", "cc", 700.0, 900.0, True),  # a volume in cc: a tick at 20 Gy
    ]
    markers = dvh_markers(criteria, rx_gy=50.0)
    assert [m.criterion for m in markers] == [c.id for c in criteria]
    assert [(m.dose_gy, m.volume_pct) for m in markers] == [
        (70.0, 25.0), (47.5, 10.0), (50.0, 95.0), (53.5, None), (18.0, None), (15.0, None), (30.0, None),
        (20.0, None)]
    assert [m.upper for m in markers] == [True, True, False, True, True, True, True, True]
    assert [m.passed for m in markers] == [c.passed for c in criteria]
    assert markers[4].text == "D10cc ≤ 18 Gy" and markers[2].text == "D95% ≥ 100 %Rx"


def test_the_dvh_figure_draws_a_marker_per_criterion(tmp_path, monkeypatch):
    """The figure code draws what dvh_markers computes: one marker (or tick) per criterion of the final plan."""
    from m2m.session import folder as folder_module

    drawn: list[int] = []
    original = folder_module._Dvh.draw

    def spy(self, ax, **kwargs):  # type: ignore[no-untyped-def]
        before = len(ax.lines)
        original(self, ax, **kwargs)
        # per structure: initial and final curve; one Rx line; per criterion one marker (a tick is a line + marker)
        drawn.append(len(ax.lines) - before - 2 * len(self.final) - 1)
        assert [m.criterion for m in self.markers] == ["rectum:V70Gy"]

    monkeypatch.setattr(folder_module._Dvh, "draw", spy)
    _write(tmp_path / "s")
    assert drawn == [1, 1]  # summary.png and dvh.png


def test_session_must_start_at_step_zero(tmp_path):
    with pytest.raises(ValueError, match="step 0"):
        _write(tmp_path, steps=_steps()[1:])
