"""Ctrl-C during ``m2m plan``: a one-line message and exit status 130, no traceback, the steps done so far in the
session folder, and no process of the stack it started left behind (its planner cancels the decision in flight)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from support.procs import kill_tree, wait_until
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
    proc: subprocess.Popen[str] | None = None
    try:
        (d / "answers.json").write_text(json.dumps([ANSWER] * 6))
        (d / "stack.toml").write_text(stack_toml(d, planner="llm", drl_advisor=False, planner_options={
            "model": "replay", "replay": f"{d}/answers.json", "replay_delay": str(DELAY_S), "decision": "step"}))
        env = {**os.environ, "M2M_RUNTIME_DIR": str(d / "rt")}  # the stack's own sockets live under d
        proc = subprocess.Popen(
            [sys.executable, "-m", "m2m.cli.main", "plan", "--mode", "unguided", "--step-cap", "5",
             "--config", str(d / "stack.toml"), "--out", str(d / "runs")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        lines: list[str] = []
        first_step = threading.Event()

        def read_stderr() -> None:
            assert proc is not None and proc.stderr is not None
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                if FIRST_STEP.search(line):
                    first_step.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        wait_until(lambda: first_step.is_set() or proc.poll() is not None, "the first step is shown",
                   timeout=300)
        assert proc.poll() is None, "\n".join(lines[-30:])
        proc.send_signal(signal.SIGINT)  # the planner is now planning step 1 or asking the model about it

        assert proc.wait(timeout=60) == 130, "\n".join(lines[-30:])
        reader.join(timeout=10)
        stdout = proc.stdout.read() if proc.stdout is not None else ""
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
        if proc is not None and proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=10)
        for pid in _pids_mentioning(str(d)):
            kill_tree(pid)
        shutil.rmtree(d, ignore_errors=True)


def test_sigterm_stops_an_experiment_and_the_stack_it_started() -> None:
    """``kill`` (SIGTERM) of ``m2m experiment paper`` is a clean stop as Ctrl-C is: the stack it started goes down
    with it (before, its detached supervisor and every agent kept running)."""
    d = Path(tempfile.mkdtemp(prefix="m2mterm", dir="/tmp"))
    proc: subprocess.Popen[str] | None = None
    try:
        (d / "stack.toml").write_text(stack_toml(d, planner="rules", drl_advisor=False))
        env = {**os.environ, "M2M_RUNTIME_DIR": str(d / "rt")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "m2m.cli.main", "experiment", "paper", "--arms", "rules", "--scenarios",
             "prostate-basic", "--cases", "3", "--config", str(d / "stack.toml"), "--out", str(d / "exp")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        lines: list[str] = []
        started = threading.Event()

        def read_stderr() -> None:
            assert proc is not None and proc.stderr is not None
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                if "started stack" in line:
                    started.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        wait_until(lambda: started.is_set() or proc.poll() is not None, "the stack is up", timeout=300)
        assert proc.poll() is None, "\n".join(lines[-30:])
        assert _pids_mentioning(str(d / "rt"))  # the stack's supervisor and agents run
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, "\n".join(lines[-30:])
        reader.join(timeout=10)
        assert not any("Traceback" in line for line in lines), "\n".join(lines)
        assert not _pids_mentioning(str(d)), "\n".join(lines[-30:])
        assert not list((d / "rt").iterdir())  # its registration removed with it
    finally:
        if proc is not None and proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=10)
        for pid in _pids_mentioning(str(d)):
            kill_tree(pid)
        shutil.rmtree(d, ignore_errors=True)
