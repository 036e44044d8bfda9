"""The experiment report's ``summary.json`` and ownership figures, from a small synthetic record set: every figure
of every arm, the LLM's ownership counted from the right sources (its proposal and its feedback retry, not the DRL
advice nor the safe action), null for an arm without an LLM, and the plain verdict of guided vs knowledge.
Records of the step schema before value changes and feedback retries still decode and count."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import msgspec
import pytest

from m2m.agents.llm.guard import Veto
from m2m.agents.messages import Decision, Outcome, Proposal, Step, ValueChange
from m2m.experiment import design as ed
from m2m.experiment import records as er
from m2m.experiment.analysis import arm_stats, hierarchy, proposal_moves
from m2m.experiment.report import write_report
from m2m.physics.tpp import Direction, Move
from m2m.session.folder import DecisionTally

RAISE = Move("lambda_rectum", Direction.RAISE)
LOWER = Move("t_ptv", Direction.LOWER)
VETO = [Veto("loosens_at_risk", "x")]
#: The summary keys every arm has (the brief's shape; more keys may follow).
ARM_KEYS = {"n", "initial_mean", "final_mean", "final_sd", "at_max", "steps_mean", "steps_sd", "steps_median",
            "s_per_decision", "ownership", "feedback_retries", "sources"}


def _own(move: Move, s: float) -> Decision:
    return Decision(proposal=Proposal(action="change", move=move), action=move, source="proposal", decision_s=s)


def _retried(s: float) -> Decision:
    """The guard refused the proposal, said why, and took the LLM's second answer."""
    return Decision(proposal=Proposal(action="change", move=Move("lambda_rectum", Direction.LOWER)),
                    retry=Proposal(action="change", move=RAISE), action=RAISE, source="retry", vetoes=VETO,
                    decision_s=s)


def _replaced(source: str, s: float, *, retry: bool = False) -> Decision:
    """The guard refused the answer(s) and took the DRL advice or the safe action instead."""
    return Decision(proposal=Proposal(action="change", move=Move("lambda_rectum", Direction.LOWER)),
                    retry=Proposal(action="stop") if retry else None, action=LOWER, source=source,  # type: ignore[arg-type]
                    vetoes=VETO, decision_s=s)


def _record(arm: str, case_seed: int, decisions: list[Decision], *, initial: float, final: float,
            outcome: Outcome) -> er.SessionRecord:
    steps = [Step(step=i, score=initial, max_score=9.0, tpps={}, failing=[], decision=d)
             for i, d in enumerate(decisions)]
    n = len(decisions) - (1 if decisions and decisions[-1].stopped else 0)
    if len(steps) == n:
        steps.append(Step(step=n, score=final, max_score=9.0, tpps={}, failing=[]))
    arm_ = ed.ARMS[arm]
    return er.SessionRecord(
        key=f"prostate-basic/{arm}/{case_seed}/0", scenario="prostate-basic", arm=arm, impl=arm_.impl,
        mode=arm_.mode, case_seed=case_seed, case_id=f"prostate-{case_seed}", init=0, session_id=f"{arm}{case_seed}",
        initial_tpps={}, initial_score=initial, final_score=final, max_score=9.0, steps=n, outcome=outcome,
        wall_s=10.0, planners=[f"{arm_.impl}:planner-1"], steps_detail=steps, finished_utc="",
    )


def _records() -> list[er.SessionRecord]:
    # guided: 6 decisions — proposal 2, retry 1, drl_advice 1, safe 2 (one of them the stop that ended a session);
    # 2 feedback retries (one taken, one refused again). Ownership = (2 + 1) / 6.
    guided_a = _record("guided", 3000, [_own(LOWER, 1.0), _retried(2.0), _replaced("drl_advice", 3.0, retry=True),
                                        _replaced("safe", 4.0)], initial=7.0, final=9.0,
                       outcome=Outcome.MAXIMUM_SCORE)
    stop = Decision(proposal=Proposal(action="stop"), action=None, source="safe", vetoes=VETO, decision_s=10.0)
    guided_b = _record("guided", 3001, [_own(RAISE, 2.0), stop], initial=8.0, final=8.0,
                       outcome=Outcome.NO_ADMISSIBLE_ACTION)
    median = Decision(
        proposal=Proposal(action="change", form="quantile", changes=[
            ValueChange(tpp="t_ptv", before=1.1, after=1.0, target="p50"),
            ValueChange(tpp="v_ptv", before=0.05, after=0.17, target="p50")]),
        action=None, source="proposal",
        changes=[ValueChange(tpp="t_ptv", before=1.1, after=1.0, target="p50"),
                 ValueChange(tpp="v_ptv", before=0.05, after=0.17, target="p50")], decision_s=0.01)
    knowledge = [_record("knowledge", seed, [median], initial=initial, final=9.0, outcome=Outcome.MAXIMUM_SCORE)
                 for seed, initial in ((3000, 7.0), (3001, 8.0))]
    return [guided_a, guided_b, *knowledge]


def test_summary_json_has_every_arms_figures_and_the_llms_ownership(tmp_path: Path) -> None:
    design = ed.make_design(["prostate-basic"], ["guided", "knowledge"], cases=2)
    write_report(tmp_path, design, _records(), wall_s=120.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["wall_min"] == pytest.approx(2.0)
    arms = summary["scenarios"]["prostate-basic"]
    assert list(arms) == ["guided", "knowledge"] and all(set(a) >= ARM_KEYS for a in arms.values())
    g, k = arms["guided"], arms["knowledge"]
    assert (g["n"], g["initial_mean"], g["final_mean"], g["final_sd"], g["at_max"]) == (2, 7.5, 8.5, 0.5, 0.5)
    assert (g["steps_mean"], g["steps_sd"], g["steps_median"]) == (2.5, 1.5, 2.5)  # 4 steps, and 1 to the stop
    assert g["s_per_decision"] == pytest.approx((1 + 2 + 3 + 4 + 2) / 5)  # the decisions that changed TPPs
    assert g["ownership"] == pytest.approx(3 / 6)  # proposal 2 + retry 1 of 6 decisions, the final stop included
    assert g["sources"] == {"proposal": 2, "retry": 1, "drl_advice": 1, "safe": 2}
    assert (g["feedback_retries"], g["decisions"]) == (2, 6)
    assert k["ownership"] is None and k["own_share"] == 1.0 and k["sources"]["proposal"] == 2
    assert (k["at_max"], k["steps_mean"], k["feedback_retries"]) == (1.0, 1.0, 0)
    versus = summary["guided_vs_knowledge"]["prostate-basic"]
    assert versus["llm_adds"] is False and versus["at_max_diff"] == pytest.approx(-0.5)

    text = (tmp_path / "report.md").read_text()
    assert "| prostate-basic | guided | 2 |" in text and "| 50 % (3/6) | 2 (1 taken) |" in text
    assert "| no LLM: own 100 % (2/2) | 0 |" in text
    assert ("- prostate-basic: at the maximum guided 50 % vs knowledge 100 %; steps guided 2.5±1.5 (median 2.5) vs "
            "knowledge 1.0±0.0 (median 1): the guided LLM adds nothing over the knowledge arm") in text
    rows = {r["arm"] + r["case_seed"]: r for r in csv.DictReader((tmp_path / "cases.csv").open())}
    assert (rows["guided3000"]["decisions"], rows["guided3000"]["own_decisions"],
            rows["guided3000"]["feedback_retries"]) == ("4", "2", "2")


def test_ownership_counts_the_proposal_and_the_retry_only() -> None:
    tally = DecisionTally.of([_own(LOWER, 1), _retried(1), _replaced("drl_advice", 1), _replaced("safe", 1)])
    assert (tally.decisions, tally.owned, tally.ownership) == (4, 2, 0.5)
    assert tally.percent() == "50 % (2/4)" and tally.sources_words() == "proposal 1, retry 1, drl_advice 1, safe 1"
    stats = arm_stats([r for r in _records() if r.arm == "guided"])
    assert stats.llm and stats.ownership == pytest.approx(0.5) and stats.decisions == 5
    assert DecisionTally.of([]).ownership is None


def test_hierarchy_counts_every_tpp_a_decision_changed_at_its_stage() -> None:
    knowledge = [r for r in _records() if r.arm == "knowledge"]
    moves = {m.tpp: m for m in hierarchy(knowledge)}
    assert set(moves) == {"t_ptv", "v_ptv"}
    assert (moves["t_ptv"].lower_n, moves["v_ptv"].raise_n, moves["t_ptv"].first_n) == (2, 2, 2)
    proposed = {m.tpp: m for m in hierarchy(knowledge, proposals=True)}
    assert proposed["t_ptv"].lower_n == 2 and proposed["v_ptv"].mean_first_stage == 0.0


def test_goals_are_judged_with_the_arms_numbers() -> None:
    from m2m.experiment.design import Goals
    from m2m.experiment.report import _goal_words

    stats = arm_stats([r for r in _records() if r.arm == "guided"])
    mean, sd = stats.steps
    words = _goal_words(stats, Goals(mean, steps_sd=sd, ownership=0.5))
    assert words[1] == f"steps {mean:.1f}±{sd:.1f} (MET: goal mean ≤ {mean:g} with sd ≤ {sd:g})"
    assert words[2] == "LLM ownership 50 % (MET: goal ≥ 50 %)"
    strict = _goal_words(stats, Goals(mean - 0.5, ownership=0.8, final_mean=stats.final[0] + 0.1))
    assert strict[0].startswith(f"final {stats.final[0]:.2f}") and "(NOT MET: goal ≥" in strict[0]
    assert "(NOT MET: goal mean ≤" in strict[1] and strict[2] == "LLM ownership 50 % (NOT MET: goal ≥ 80 %)"


def test_a_copied_value_proposes_no_move() -> None:
    # The unguided values form: the model copied t_ptv (a no_change) beside a real change; the report's hierarchy
    # counts the real one and does not fail on the copy (it raised ValueError: 0 is not a valid Direction).
    copied = Proposal(action="change", changes=[ValueChange("t_ptv", 1.04, 1.04), ValueChange("v_ptv", 0.1, 0.2)])
    assert proposal_moves(copied) == [Move("v_ptv", Direction.RAISE)]
    record = _records()[0]
    step = record.steps_detail[0]
    assert step.decision is not None
    step = msgspec.structs.replace(step, decision=msgspec.structs.replace(step.decision, proposal=copied))
    moved = hierarchy([msgspec.structs.replace(record, steps_detail=[step, *record.steps_detail[1:]])],
                      proposals=True)
    assert "t_ptv" not in {m.tpp for m in moved} and "v_ptv" in {m.tpp for m in moved}


def test_a_record_written_before_value_changes_and_retries_still_decodes_and_counts(tmp_path: Path) -> None:
    record = _records()[1]  # a published step, then the safe stop
    line = json.loads(msgspec.json.encode(record))
    for step in line["steps_detail"]:
        d = step.get("decision")
        if d is not None:  # the decision schema before value changes, feedback retries and decision forms
            del d["changes"], d["retry"]
            if d.get("proposal") is not None:
                del d["proposal"]["changes"], d["proposal"]["form"]
    (tmp_path / er.RECORDS_FILE).write_text(json.dumps(line) + "\n")
    old = er.load_records(tmp_path)[record.key]
    assert old == record
    assert [d.stopped for d in old.all_decisions] == [False, True] and len(old.decisions) == 1
    tally = DecisionTally.of(old.all_decisions)
    assert (tally.owned, tally.decisions, tally.feedback_retries) == (1, 2, 0)
