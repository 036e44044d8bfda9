"""Experiment records: version 2 round-trips, version 1 files (written before the one step schema) still load, an
unknown version is refused by name, and the committed example's report regenerates byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m2m.agents.messages import Outcome
from m2m.experiment import records as er
from m2m.experiment.design import ExperimentError
from m2m.experiment.report import write_report
from m2m.physics.tpp import Direction, Move

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "experiment-paper"
V1_GUIDED = {
    "key": "prostate-basic/guided/3000/0", "scenario": "prostate-basic", "arm": "guided", "impl": "llm",
    "mode": "guided", "case_seed": 3000, "case_id": "prostate-3000", "init": 0, "session_id": "4b979cc3bc62459f",
    "initial_tpps": {"t_ptv": 1.08}, "initial_score": 8.0, "final_score": 9.0, "max_score": 9.0, "steps": 1,
    "reached_max": True, "outcome": "maximum score", "wall_s": 30.5, "planners": ["llm:planner-2"],
    "steps_detail": [
        {"step": 0, "score": 8.0, "tpps": {"t_ptv": 1.08}, "failing": ["ptv D0.03cc ≤ 107 %Rx"], "raw_action": "change",
         "raw_tpp": "t_ptv", "raw_direction": "raise", "action_tpp": "t_ptv", "action_direction": -1, "source": "drl",
         "vetoes": ["loosens_at_risk", "outside_knowledge"], "valid": True, "decision_s": 27.9, "plan_s": 0.5},
        {"step": 1, "score": 9.0, "tpps": {"t_ptv": 1.0}, "failing": [], "raw_action": "", "raw_tpp": "",
         "raw_direction": "", "action_tpp": "", "action_direction": 0, "source": "", "vetoes": [], "valid": True,
         "decision_s": 0.0, "plan_s": 0.4},
    ],
    "finished_utc": "2026-11-20T10:00:00Z",
}


def test_a_version_1_line_is_upgraded_on_read(tmp_path: Path) -> None:
    (tmp_path / er.RECORDS_FILE).write_text(json.dumps(V1_GUIDED) + "\n")
    record = er.load_records(tmp_path)["prostate-basic/guided/3000/0"]
    assert record.version == 2 and record.outcome is Outcome.MAXIMUM_SCORE and record.reached_max
    first, last = record.steps_detail
    assert first.failing == ["ptv:D0.03cc"] and first.max_score == 9.0 and last.decision is None
    d = first.decision
    assert d is not None and d.proposal is not None
    assert d.proposal.move == Move("t_ptv", Direction.RAISE) and d.action == Move("t_ptv", Direction.LOWER)
    assert d.source == "drl_advice"  # 'drl' replacing an LLM proposal (the arm's planner is the LLM)
    assert [v.reason for v in d.vetoes] == ["loosens_at_risk", "outside_knowledge"]
    assert record.decisions == [d]


def test_version_1_sources_follow_the_arms_planner() -> None:
    drl_arm = {**V1_GUIDED, "arm": "drl", "impl": "drl"}
    record = er.decode_record(json.dumps(drl_arm).encode())
    assert record.decisions[0].source == "proposal"  # the DRL planner's own move


def test_version_2_round_trips_and_appends_after_version_1(tmp_path: Path) -> None:
    (tmp_path / er.RECORDS_FILE).write_text(json.dumps(V1_GUIDED) + "\n")
    upgraded = er.load_records(tmp_path)["prostate-basic/guided/3000/0"]
    second = er.decode_record(json.dumps({**V1_GUIDED, "key": "prostate-basic/guided/3001/0"}).encode())
    er.append_record(tmp_path, second)
    loaded = er.load_records(tmp_path)
    assert loaded == {upgraded.key: upgraded, second.key: second}
    assert json.loads((tmp_path / er.RECORDS_FILE).read_text().splitlines()[1])["version"] == 2


def test_an_unknown_version_is_refused_with_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / er.RECORDS_FILE).write_text(json.dumps({**V1_GUIDED, "version": 7}) + "\n")
    with pytest.raises(ExperimentError, match=r"sessions.jsonl:1: session record version 7"):
        er.load_records(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("example", "sessions"), [
    (EXAMPLE, 90),
    (EXAMPLE.parent / "real-cases" / "tg119", 30),
    (EXAMPLE.parent / "real-cases" / "tg119-guided", 5),
    (EXAMPLE.parent / "real-cases" / "alderson", 50),
])
def test_the_committed_example_report_regenerates_identically(tmp_path: Path, example: Path, sessions: int) -> None:
    folder = tmp_path / "example"
    shutil.copytree(example, folder)
    records = list(er.load_records(folder).values())
    assert len(records) == sessions
    write_report(folder, er.read_design(folder), records, wall_s=er.total_wall(folder))
    for name in ("report.md", "summary.json", "cases.csv", "hierarchy.csv"):
        assert (folder / name).read_bytes() == (example / name).read_bytes(), name
