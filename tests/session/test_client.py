"""The session client's pieces that need no stack: progress lines from the one step schema, and a transcript
recorded before the step schema changed refused with a message that says so."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from m2m.agents.llm.guard import Veto
from m2m.agents.messages import Decision, Outcome, Proposal, SessionHeader, SessionResult, Step, ValueChange
from m2m.bus.messages import Envelope
from m2m.bus.transcript import TranscriptWriter
from m2m.physics.tpp import Direction, Move
from m2m.session.client import TranscriptVersionError, recorded_sessions, step_line, summary_line


def test_step_lines_name_the_failing_criteria_and_who_chose_the_move() -> None:
    move = Move("t_ptv", Direction.LOWER)
    vetoed = Decision(proposal=Proposal(action="change", move=Move("lambda_rectum", Direction.LOWER)), action=move,
                      source="drl_advice", vetoes=[Veto("loosens_at_risk", "x")], decision_s=3.25)
    step = Step(step=2, score=7.5, max_score=9.0, tpps={}, failing=["ptv:D0.03cc", "rectum:V70Gy"], decision=vetoed)
    line = step_line(step)
    assert "failing: ptv:D0.03cc, rectum:V70Gy" in line
    assert "→ lower t_ptv (drl_advice; proposed lower lambda_rectum)  vetoed [loosens_at_risk]" in line
    last = Step(step=3, score=9.0, max_score=9.0, tpps={}, failing=[])
    assert step_line(last, "maximum score").endswith("failing: none  → maximum score")
    change = [ValueChange(tpp="t_ptv", before=1.1, after=1.0, target="p50")]
    retried = Decision(proposal=Proposal(action="stop"), retry=Proposal(action="change", changes=change),
                       action=None, changes=change, source="retry", vetoes=[Veto("early_stop", "x")])
    line = step_line(Step(step=0, score=7.5, max_score=9.0, tpps={}, failing=[], decision=retried))
    assert "→ t_ptv 1.1->1 (p50) (retry; proposed stop, then t_ptv 1.1->1 (p50))  vetoed [early_stop]" in line


def test_the_summary_line_gives_the_llms_ownership_and_feedback_retries() -> None:
    own = Decision(proposal=Proposal(action="change", move=Move("t_ptv", Direction.LOWER)),
                   action=Move("t_ptv", Direction.LOWER), source="proposal")
    retried = msgspec.structs.replace(own, source="retry", retry=own.proposal)
    advice = msgspec.structs.replace(own, source="drl_advice", retry=own.proposal)
    steps = [Step(step=i, score=7.0, max_score=9.0, tpps={}, failing=[], decision=d)
             for i, d in enumerate([own, retried, advice, advice])]
    header = SessionHeader(session_id="s", scenario="prostate-basic", case_id="c", case_seed=1, mode="guided",
                           step_cap=20, planner="llm:planner-1", rx_gy=79.2)
    result = SessionResult(header=header, outcome=Outcome.STEP_CAP, steps=steps, initial_score=7.0, final_score=7.0,
                           max_score=9.0, dvh_bins_gy=np.zeros(2), initial_structures=[], final_structures=[],
                           invalid_answers=0, vetoes=2, fallbacks=0, planners=["llm:planner-1"], wall_s=1.0)
    line = summary_line(result)
    assert "LLM ownership 50 % (2/4); proposal 1, retry 1, drl_advice 2, feedback retries 3" in line
    rules = msgspec.structs.replace(result, planners=["rules:planner-1"])
    assert "own proposals 50 % (2/4)" in summary_line(rules)


def test_a_transcript_of_the_previous_session_schema_is_refused_by_version(tmp_path: Path) -> None:
    path = tmp_path / "old.m2mt"
    writer = TranscriptWriter(path)
    try:  # a version 1 session reply, as m2m wrote them before the one step schema
        env = Envelope(id="r1", schema=SessionResult.schema, version=1, kind="reply", route="plan.session")
        writer.append(t=0.0, direction="out", kind="reply", route="plan.session", peer="p", session="s1",
                      frames=[msgspec.msgpack.encode(env), msgspec.msgpack.encode({"session_id": "s1"})])
    finally:
        writer.close()
    with pytest.raises(TranscriptVersionError, match=r"older m2m .*version 1 unknown here.*record the session again"):
        recorded_sessions(path)
