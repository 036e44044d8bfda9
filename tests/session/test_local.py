"""``m2m plan --planner …``: real in-process sessions (phantom, dij, optimizer, protocol) through the greedy and the
DRL planner, written in the session's step schema."""

from __future__ import annotations

import itertools
import json

import msgspec
import pytest

from m2m.agents.messages import Step
from m2m.cli.main import main
from m2m.session.local import run_session


def _steps(folder) -> list[Step]:  # type: ignore[no-untyped-def]
    return msgspec.json.decode((folder / "trajectory.json").read_bytes(), type=list[Step])


@pytest.mark.slow
def test_greedy_session_improves_the_plan_and_writes_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path / "cache"))
    folder = run_session(scenario="prostate-basic", case_index=0, planner="greedy", out_parent=tmp_path)
    steps = _steps(folder)
    final = json.loads((folder / "final.json").read_text())
    assert steps[0].step == 0 and steps[-1].decision is None
    assert len(steps) - 1 == final["steps"] <= 20
    assert final["score"] >= steps[0].score
    # The session stops exactly when the maximum is reached, never before and never after.
    assert final["reached_max"] == (final["score"] >= 9.0 - 1e-9)
    assert all(s.score < 9.0 - 1e-9 for s in steps[:-1])
    assert all(s.action is not None and s.decision.source == "proposal" for s in steps[:-1])  # type: ignore[union-attr]
    for name in ("dvh.png", "score.png", "trajectory.csv"):
        assert (folder / name).stat().st_size > 0


@pytest.mark.slow
def test_drl_planner_never_repeats_a_no_op_at_a_bound(tmp_path, monkeypatch):
    """The in-process DRL planner uses the masked greedy policy of `m2m drl evaluate`: on the first test case the
    unmasked argmax lowered t_ptv at its bound 16 times and ended at 8/9."""
    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path / "cache"))
    folder = run_session(scenario="prostate-basic", case_index=0, planner="drl", out_parent=tmp_path)
    steps = _steps(folder)
    assert len(steps) >= 2
    for s, nxt in itertools.pairwise(steps):
        assert nxt.tpps != s.tpps, f"step {s.step}: {s.action} changed no TPP"


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["plan", "--planner", "drl", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)])
    assert code == 2  # a bad command line (README: exit codes), refused before anything runs
    assert "--checkpoint" in (err := capsys.readouterr().err) and "none.pt: no such file" in err


def test_case_outside_cohort_is_rejected(tmp_path, capsys):
    assert main(["plan", "--case", "100000", "--out", str(tmp_path)]) == 2
    assert "outside cohort" in capsys.readouterr().err
