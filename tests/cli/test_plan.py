"""``m2m plan --mode …`` brings a stack up, runs one session on the bus, writes the session folder and takes the
stack down again; ``m2m replay`` re-drives the recorded session and finds every score again."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from support.procs import processes_mentioning, run_m2m
from support.stacks import stack_toml

from m2m.session.client import recorded_sessions
from m2m.stack.config import load_stack_config

pytestmark = pytest.mark.slow



def test_plan_brings_the_stack_up_and_down_and_replay_matches() -> None:
    d = Path(tempfile.mkdtemp(prefix="m2mcli", dir="/tmp"))
    try:
        config = d / "stack.toml"
        config.write_text(stack_toml(d, planner="drl", endpoints=True))
        bus = ["--connect", f"ipc://{d}/bus", "--pub-connect", f"ipc://{d}/pub"]
        assert load_stack_config(config).endpoint == f"ipc://{d}/bus"
        done = run_m2m("plan", "--scenario", "prostate-basic", "--case", "0", "--mode", "guided", "--step-cap", "4",
                    "--config", str(config), "--out", str(d / "runs"), *bus)
        assert done.returncode == 0, done.stderr[-3000:]
        folder = Path(done.stdout.strip().splitlines()[-1].removeprefix("session folder: "))
        for name in ("dvh.png", "score.png", "tpps.png", "trajectory.csv", "final.json", "transcript.m2mt"):
            assert (folder / name).is_file(), name
        final = json.loads((folder / "final.json").read_text())
        trajectory = json.loads((folder / "trajectory.json").read_text())
        assert final["steps"] == len(trajectory) - 1 <= 4
        sessions = recorded_sessions(folder / "transcript.m2mt")
        assert len(sessions) == 1 and len(next(iter(sessions.values())).steps) == len(trajectory)
        # The stack this command started is gone again: no process refers to its folder.
        assert list((d / "stack").glob("*/bus.m2mt")), "the stack recorded its transcript"
        assert not processes_mentioning(str(d))
        status = run_m2m("status", *bus)
        assert status.returncode == 1 and "no stack answers" in status.stdout + status.stderr

        replayed = run_m2m("replay", str(folder / "transcript.m2mt"), "--config", str(config), *bus)
        assert replayed.returncode == 0, replayed.stderr[-3000:]
        assert f"{len(trajectory)}/{len(trajectory)} steps with the recorded score" in replayed.stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_plan_rejects_a_case_outside_the_cohort_before_starting_anything(tmp_path: Path) -> None:
    done = run_m2m("plan", "--case", "100000", "--connect", f"ipc://{tmp_path}/none", "--pub-connect",
                f"ipc://{tmp_path}/pub", timeout=60)
    assert done.returncode == 2 and "outside cohort" in done.stderr  # a usage error, as argparse's
