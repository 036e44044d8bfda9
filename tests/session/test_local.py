"""``m2m plan``: a real session (phantom, dij, optimizer, protocol) through the greedy planner."""

from __future__ import annotations

import json

import pytest

from m2m.cli.main import main
from m2m.session.local import run_session


@pytest.mark.slow
def test_greedy_session_improves_the_plan_and_writes_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path / "cache"))
    folder = run_session(scenario="prostate-basic", case_index=0, planner="greedy", out_parent=tmp_path)
    steps = json.loads((folder / "trajectory.json").read_text())
    final = json.loads((folder / "final.json").read_text())
    assert steps[0]["step"] == 0 and steps[0]["action"] == ""
    assert len(steps) - 1 == final["steps"] <= 20
    assert final["score"] >= steps[0]["score"]
    # The session stops exactly when the maximum is reached, never before and never after.
    assert final["reached_max"] == (final["score"] >= 9.0 - 1e-9)
    assert all(s["score"] < 9.0 - 1e-9 for s in steps[:-1])
    assert all(s["action"].split()[0] in {"raise", "lower"} for s in steps[1:])
    for name in ("dvh.png", "score.png", "trajectory.csv"):
        assert (folder / name).stat().st_size > 0


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["plan", "--planner", "drl", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)])
    assert code == 1
    assert "no DRL checkpoint" in capsys.readouterr().err


def test_case_outside_cohort_is_rejected(tmp_path, capsys):
    assert main(["plan", "--case", "100000", "--out", str(tmp_path)]) == 1
    assert "outside cohort" in capsys.readouterr().err
