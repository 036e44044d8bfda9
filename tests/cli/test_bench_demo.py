"""``m2m bench demo`` runs the main job (one guided session on a stack of its own, the session folder) with the LLM
planner on replayed answers and reports every phase: stack start, each agent's setup (the planner's model load),
each plan and decision, the session folder, stack stop and the total. Timings are not asserted, only reported."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from support.procs import processes_mentioning, run_m2m
from support.stacks import stack_toml

pytestmark = pytest.mark.slow

ANSWER = {"action": "change", "tpp": "lambda_rectum", "direction": "raise", "rationale": "spare the rectum"}
PHASES = ("stack start", "model load", "session", "step  0 plan", "step  0 decision", "session folder",
          "stack stop", "total")


def test_bench_demo_times_every_phase_of_the_main_job() -> None:
    d = Path(tempfile.mkdtemp(prefix="m2mbd", dir="/tmp"))
    try:
        (d / "answers.json").write_text(json.dumps([ANSWER] * 20))
        (d / "stack.toml").write_text(stack_toml(d, planner="llm", planner_options={
            "model": "replay", "replay": f"{d}/answers.json", "decision": "step"}))
        env = {**os.environ, "M2M_RUNTIME_DIR": str(d / "rt")}  # the stack's own sockets live under d
        done = run_m2m("bench", "demo", "--mode", "guided", "--step-cap", "2", "--config", str(d / "stack.toml"),
                       "--out", str(d / "runs"), "--json", str(d / "bench.json"), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        for phase in PHASES:
            assert f"  {phase}" in done.stdout, (phase, done.stdout)
        timings = json.loads((d / "bench.json").read_text())
        assert timings["stack_started"] is True and timings["planners"][0].startswith("llm:")
        for key in ("stack_start_s", "model_load_s", "session_s", "planner_session_s", "plans_s", "decisions_s",
                    "folder_s", "stack_stop_s", "total_s"):
            assert isinstance(timings[key], float) and timings[key] >= 0.0, key
        roles = timings["agent_roles"]
        assert sorted(roles.values()) == ["dose-engine", "drl-advisor", "evaluator", "planner"]
        assert set(timings["agents_setup_s"]) == set(roles)
        planner = next(name for name, role in roles.items() if role == "planner")
        assert timings["model_load_s"] == timings["agents_setup_s"][planner]
        steps = timings["steps"]
        assert [s["step"] for s in steps] == list(range(timings["n_steps"] + 1)) and timings["n_steps"] <= 2
        assert all(isinstance(s["decision_s"], float) and s["source"] for s in steps[:-1])
        assert steps[-1]["decision_s"] is None
        assert timings["plans_s"] == pytest.approx(sum(s["plan_s"] for s in steps))
        final = json.loads((Path(timings["session_folder"]) / "final.json").read_text())
        assert final["steps"] == timings["n_steps"] and "ownership" in final
        assert "LLM ownership" in done.stderr  # the session's summary line
        assert not processes_mentioning(str(d))  # the stack it started is gone
    finally:
        shutil.rmtree(d, ignore_errors=True)
