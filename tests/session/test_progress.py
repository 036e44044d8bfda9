"""The progress view off a terminal: one plain line per event, never wrapped at 80 columns, with the planner's
phase of the step and the failing criteria by label; step lines name the failing criteria by label too."""

from __future__ import annotations

import io
import time

from rich.console import Console

from m2m.agents.messages import CriterionResult, Step, StepPhase
from m2m.session.client import step_line
from m2m.session.progress import ProgressView, phase_text

RECTUM = CriterionResult(id="rectum:V70Gy", label="rectum V70Gy ≤ 25 %", structure="rectum", metric="V70Gy",
                         unit="%", value=31.0, limit=25.0, zero=50.0, points=0.6, passed=False)


def _phase(phase: str, decider: str = "llm:embedded", **kw: object) -> StepPhase:
    return StepPhase(session_id="s", step=3, phase=phase, started_at=time.time() - 42, decider=decider,
                     **kw)  # type: ignore[arg-type]


def test_phases_say_what_the_planner_does() -> None:
    assert phase_text(_phase("planning")) == "planning (dose engine)"
    assert phase_text(_phase("scoring")) == "scoring (evaluator)"
    assert phase_text(_phase("advising")) == "asking the DRL advisor"
    assert phase_text(_phase("deciding")) == "asking the LLM (llm:embedded)"
    assert phase_text(_phase("deciding", decider="drl")) == "asking the DRL"
    assert phase_text(_phase("deciding", decider="rules")) == "applying the rules"


def test_off_a_terminal_each_event_is_one_unwrapped_line() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80)  # a file: not a terminal
    failing = [f"criterion number {i} with a long label ≤ 25 %" for i in range(6)]
    with ProgressView(console) as view:
        assert not view.live
        view.phase(_phase("deciding", score=7.5, max_score=9.0, failing=failing))
        view.phase(_phase("deciding", score=7.5, max_score=9.0, failing=failing))  # the same again: no new line
        step = Step(step=3, score=7.5, max_score=9.0, tpps={}, failing=[RECTUM.id], criteria=[RECTUM])
        view.line(step_line(step))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("step 3: asking the LLM (llm:embedded) · score 7.50/9 · failing: "
                             + ", ".join(failing))
    assert len(lines[0]) > 200  # one line, however long
    assert "failing: rectum V70Gy ≤ 25 %" in lines[1]
