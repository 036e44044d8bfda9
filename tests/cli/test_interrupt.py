"""Ctrl-C during ``m2m plan``: a one-line message and exit status 130, no traceback, the steps done so far in the
session folder, and no process of the stack it started left behind (its planner cancels the decision in flight)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from support.procs import WatchedCommand, kill_tree
from support.stacks import stack_toml

pytestmark = pytest.mark.slow

ANSWER = {"action": "change", "tpp": "lambda_rectum", "direction": "raise", "rationale": "spare the rectum"}

# A planner slow enough to be interrupted mid-decision: each replayed answer takes DELAY s of a worker thread, as
# the embedded model's computation does (so the planner must not wait for that thread to exit).
DELAY_S = 10
FIRST_STEP = re.compile(r"\bstep +0 +score ")


def _pids_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            zombie = (proc / "stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if text in cmdline and not zombie and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def test_ctrl_c_during_a_decision_keeps_the_steps_and_leaves_no_process() -> None:
    d = Path(tempfile.mkdtemp(prefix="m2mint", dir="/tmp"))
    cmd: WatchedCommand | None = None
    try:
        (d / "answers.json").write_text(json.dumps([ANSWER] * 6))
        (d / "stack.toml").write_text(stack_toml(d, planner="llm", drl_advisor=False, planner_options={
            "model": "replay", "replay": f"{d}/answers.json", "replay_delay": str(DELAY_S), "decision": "step"}))
        env = {**os.environ, "M2M_RUNTIME_DIR": str(d / "rt")}  # the stack's own sockets live under d
        cmd = WatchedCommand("plan", "--mode", "unguided", "--step-cap", "5", "--config", str(d / "stack.toml"),
                             "--out", str(d / "runs"), env=env)
        cmd.wait_for(FIRST_STEP.search, "the first step is shown", timeout=300)
        cmd.proc.send_signal(signal.SIGINT)  # the planner is now planning step 1 or asking the model about it

        assert cmd.wait(timeout=60) == 130, cmd.tail()
        lines = cmd.lines
        stdout = cmd.stdout()
        assert not any("Traceback" in line for line in lines), "\n".join(lines)
        about = [line for line in lines if "interrupted" in line and not line.startswith("[")]
        assert about == [lines[-1]] and about[0].startswith("m2m plan: interrupted at step 1"), "\n".join(lines)

        folder = Path(stdout.strip().splitlines()[-1].removeprefix("session folder: "))
        trajectory = json.loads((folder / "trajectory.json").read_text())
        final = json.loads((folder / "final.json").read_text())
        assert len(trajectory) >= 1 and trajectory[0]["step"] == 0
        assert final["outcome"] == "interrupted"
        assert (folder / "transcript.m2mt").is_file()
        # Nothing of the stack it started runs any more: broker, agents (the planner's model thread included)
        # and supervisor all mention d on their command lines.
        assert not _pids_mentioning(str(d))
    finally:
        if cmd is not None:
            cmd.close()
        for pid in _pids_mentioning(str(d)):
            kill_tree(pid)
        shutil.rmtree(d, ignore_errors=True)


def test_sigterm_stops_an_experiment_and_the_stack_it_started() -> None:
    """``kill`` (SIGTERM) of ``m2m experiment paper`` is a clean stop as Ctrl-C is: the stack it started goes down
    with it (before, its detached supervisor and every agent kept running)."""
    d = Path(tempfile.mkdtemp(prefix="m2mterm", dir="/tmp"))
    cmd: WatchedCommand | None = None
    try:
        (d / "stack.toml").write_text(stack_toml(d, planner="rules", drl_advisor=False))
        env = {**os.environ, "M2M_RUNTIME_DIR": str(d / "rt")}
        cmd = WatchedCommand("experiment", "paper", "--arms", "rules", "--scenarios", "prostate-basic", "--cases", "3",
                             "--config", str(d / "stack.toml"), "--out", str(d / "exp"), env=env)
        cmd.wait_for(lambda line: "started stack" in line, "the stack is up", timeout=300)
        assert _pids_mentioning(str(d / "rt"))  # the stack's supervisor and agents run
        cmd.proc.send_signal(signal.SIGTERM)
        assert cmd.wait(timeout=120) == 130, cmd.tail()
        assert not any("Traceback" in line for line in cmd.lines), "\n".join(cmd.lines)
        assert not _pids_mentioning(str(d)), cmd.tail()
        assert not list((d / "rt").iterdir())  # its registration removed with it
    finally:
        if cmd is not None:
            cmd.close()
        for pid in _pids_mentioning(str(d)):
            kill_tree(pid)
        shutil.rmtree(d, ignore_errors=True)
