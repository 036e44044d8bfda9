"""Two ``m2m plan`` started at once, neither told where a stack is: each brings up a stack of its own (its own
runtime folder and sockets), both sessions complete in separate session folders, and each takes down only its own
stack, so that nothing of either is left running."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.procs import kill_tree, processes_mentioning, run_m2m
from support.stacks import stack_toml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _registered(runtime: Path) -> list[dict[str, object]]:
    entries = []
    for path in runtime.glob("*/stack.json"):
        with contextlib.suppress(OSError, ValueError):  # being written or removed
            entries.append(json.loads(path.read_text()))
    return entries


def test_two_plans_at_once_run_on_stacks_of_their_own_and_leave_nothing_running() -> None:
    d = Path(tempfile.mkdtemp(prefix="m2mcc", dir="/tmp"))  # ipc paths must stay short
    runtime = d / "rt"
    config = d / "stack.toml"
    # No [bus] endpoints: what isolation is about. The rules planner in unguided mode needs no DRL advisor (no torch).
    config.write_text(stack_toml(d, planner="rules", drl_advisor=False, ready_timeout_s=400))
    env = {**os.environ, "M2M_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []
    supervisors: set[int] = set()
    try:
        for name in ("a", "b"):  # the same case twice: only the stacks and the folders tell them apart
            argv = [sys.executable, "-m", "m2m.cli.main", "plan", "--scenario", "prostate-basic", "--case", "0",
                    "--mode", "unguided", "--step-cap", "2", "--config", str(config), "--out", str(d / "runs")]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=(d / f"{name}.err").open("w"),
                                          text=True, env=env))
        # both stacks are registered at the same time at some point: they ran side by side
        most = 0
        deadline = time.monotonic() + 800
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            entries = _registered(runtime)
            supervisors |= {int(str(e["pid"])) for e in entries}
            most = max(most, len(entries))
            time.sleep(0.2)
        outs = [p.communicate(timeout=60)[0] for p in procs]
        errs = [(d / f"{name}.err").read_text() for name in ("a", "b")]
        for p, out, err in zip(procs, outs, errs, strict=True):
            assert p.returncode == 0, f"rc {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
        assert most == 2, "the two stacks never ran at the same time"

        # each started a stack of its own, on sockets in its own runtime folder
        started = [next(line for line in err.splitlines() if "m2m plan: started stack" in line) for err in errs]
        ids = [line.split("started stack ")[1].split()[0] for line in started]
        assert ids[0] != ids[1]
        for stack_id, line in zip(ids, started, strict=True):
            assert f"at ipc://{runtime}/{stack_id}/bus" in line
        assert not any("joining" in err for err in errs)
        assert len(list((d / "stack").iterdir())) == 2  # two run folders, two transcripts

        # two sessions, two folders, each complete
        folders = [Path(out.strip().splitlines()[-1].removeprefix("session folder: ")) for out in outs]
        assert folders[0] != folders[1] and all(f.parent == d / "runs" for f in folders)
        for folder in folders:
            final = json.loads((folder / "final.json").read_text())
            assert final["steps"] <= 2
            assert (folder / "transcript.m2mt").is_file()

        for line, folder in zip(started, folders, strict=True):
            print(f"{line}\n  -> {folder}")  # shown with pytest -rP
        # each plan took its own stack down: no runtime folder, no process of either stack left
        assert list(runtime.iterdir()) == []
        assert not processes_mentioning(str(d))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
            p.wait(timeout=30)
        for pid in supervisors:  # a supervisor outlives a killed plan (its own session): by pid, with its children
            if Path(f"/proc/{pid}").exists() and str(d) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                kill_tree(pid)
        shutil.rmtree(d, ignore_errors=True)


def test_plan_joins_the_stack_it_is_told_about_and_leaves_it_running() -> None:
    """``m2m up --detach`` prints the stack's id; ``m2m plan --stack ID`` says it joins that stack and leaves it up;
    ``m2m down --stack ID`` stops it, and its runtime folder and processes are gone."""
    d = Path(tempfile.mkdtemp(prefix="m2mcj", dir="/tmp"))
    runtime = d / "rt"
    config = d / "stack.toml"
    config.write_text(stack_toml(d, planner="rules", drl_advisor=False, ready_timeout_s=400))
    env = {**os.environ, "M2M_RUNTIME_DIR": str(runtime), "PYTHONUNBUFFERED": "1"}

    def m2m(*args: str) -> subprocess.CompletedProcess[str]:
        return run_m2m(*args, env=env)

    try:
        up = m2m("up", "--detach", "--config", str(config))
        assert up.returncode == 0, up.stderr[-3000:]
        [entry] = _registered(runtime)
        stack_id = str(entry["id"])
        assert f"m2m down --stack {stack_id}" in up.stdout
        plan = m2m("plan", "--stack", stack_id[:4], "--mode", "unguided", "--step-cap", "1", "--out", str(d / "runs"))
        assert plan.returncode == 0, plan.stderr[-3000:]
        assert f"m2m plan: joining the running stack {stack_id} at {entry['endpoint']}" in plan.stderr
        assert "it stays up after this command" in plan.stderr and "started stack" not in plan.stderr
        status = m2m("status")  # the only running stack
        assert status.returncode == 0 and f"stack:      {stack_id}" in status.stdout
        wrong = m2m("plan", "--stack", stack_id, "--mode", "guided")  # no drl-advisor there
        assert wrong.returncode == 1
        assert f"m2m plan: not joining the stack at {entry['endpoint']}: it runs no drl-advisor agent" in wrong.stderr
        down = m2m("down", "--stack", stack_id)
        assert down.returncode == 0, down.stderr[-3000:]
        deadline = time.monotonic() + 60
        while (list(runtime.iterdir()) or processes_mentioning(str(d))) and time.monotonic() < deadline:
            time.sleep(0.2)  # the supervisor stops its broker after it stopped answering
        assert list(runtime.iterdir()) == [] and not processes_mentioning(str(d))
    finally:
        for e in _registered(runtime):
            pid = int(str(e["pid"]))
            if Path(f"/proc/{pid}").exists() and str(d) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                kill_tree(pid)
        shutil.rmtree(d, ignore_errors=True)
