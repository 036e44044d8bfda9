"""``m2m experiment paper``: its design, its records and resumption, its statistics, the rule-based planner, and a
small experiment through a real stack (supervisor, broker, agents; the LLM arms on autogen's replay client)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from scipy.stats import wilcoxon
from support.procs import stop_stack

from m2m.agents.llm.bench import PROSTATE_PASS, PROSTATE_TPPS, situation_from_values
from m2m.agents.llm.situation import StepView
from m2m.agents.messages import Decision, Outcome, Proposal, Step
from m2m.agents.planner import RulesDecider
from m2m.bus.client import BusConfig
from m2m.experiment import design as ed
from m2m.experiment import records as er
from m2m.experiment import run as ex
from m2m.experiment.analysis import hierarchy, paired_steps, rank_agreement
from m2m.experiment.report import write_report
from m2m.physics.tpp import Direction, Move
from m2m.stack.control import start_detached
from m2m.stack.supervisor import PID_FILE_NAME


def _record(arm: str, case_seed: int, steps: int, moves: list[tuple[str, int]] | None = None,
            reached: bool = True) -> er.SessionRecord:
    moves = moves or [("lambda_rectum", 1)] * steps

    def decision(move: Move) -> Decision:
        return Decision(proposal=Proposal(action="change", move=move), action=move, source="proposal")

    detail = [Step(step=i, score=8.0, max_score=9.0, tpps={}, failing=[], decision=decision(Move(t, Direction(d))))
              for i, (t, d) in enumerate(moves)]
    detail.append(Step(step=steps, score=9.0 if reached else 8.0, max_score=9.0, tpps={}, failing=[]))
    return er.SessionRecord(
        key=f"prostate-basic/{arm}/{case_seed}/0", scenario="prostate-basic", arm=arm, impl=ed.ARMS[arm].impl,
        mode=ed.ARMS[arm].mode, case_seed=case_seed, case_id=f"prostate-{case_seed}", init=0, session_id="s",
        initial_tpps={}, initial_score=8.0, final_score=9.0 if reached else 8.0, max_score=9.0, steps=steps,
        outcome=Outcome.MAXIMUM_SCORE if reached else Outcome.STEP_CAP, wall_s=1.0, planners=[arm],
        steps_detail=detail, finished_utc="",
    )


# ------------------------------------------------------------------------------------------------ design
def test_the_default_design_is_the_papers_and_arms_share_initial_tpps() -> None:
    design = ed.make_design()
    assert design.is_paper_size
    assert (design.cases, design.inits) == ({"prostate-basic": 10, "prostate-complex": 1, "liver": 1},
                                            {"prostate-basic": 1, "prostate-complex": 1, "liver": 10})
    assert design.arms == ("guided", "unguided", "drl", "rules", "knowledge")
    runs = ed.runs_of(design)
    assert len(runs) == (10 + 1 + 10) * 5 and len({r.key for r in runs}) == len(runs)
    # one planner swap per implementation: the runs are grouped by the arm's implementation
    impls = [ed.ARMS[r.arm].impl for r in runs]
    assert impls == sorted(impls, key=["llm", "drl", "rules", "knowledge"].index)
    by_setting: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    for r in runs:
        by_setting.setdefault((r.scenario, r.case_seed, r.init), []).append(dict(r.initial_tpps))
    assert all(len(v) == 5 and all(t == v[0] for t in v) for v in by_setting.values())  # paired arms
    liver = {k: v[0] for k, v in by_setting.items() if k[0] == "liver"}
    assert len({json.dumps(v, sort_keys=True) for v in liver.values()}) == 10  # ten distinct initial settings
    assert ed.initial_tpps("liver", 0, 3000, 1) == ed.initial_tpps("liver", 0, 3000, 1)
    assert ed.initial_tpps("liver", 1, 3000, 1) != ed.initial_tpps("liver", 0, 3000, 1)
    assert not ed.make_design(["liver"], cases=2).is_paper_size


def test_bad_designs_are_refused() -> None:
    with pytest.raises(ed.ExperimentError, match="unknown scenario or arm"):
        ed.make_design(["lung"])
    with pytest.raises(ed.ExperimentError, match="unknown scenario or arm"):
        ed.make_design(arms=["human"])
    with pytest.raises(ed.ExperimentError, match="--cases must be >= 1"):
        ed.make_design(cases=0)
    with pytest.raises(ed.ExperimentError, match="paper cohort has"):
        ed.runs_of(ed.make_design(["liver"], cases=10_000))


def test_a_folder_keeps_its_design_and_a_cut_off_last_line_is_ignored(tmp_path: Path) -> None:
    design = ed.make_design(["prostate-basic"], ["rules"], cases=2)
    assert ex.prepare_folder(tmp_path, design) == {}
    a, b = _record("rules", 3000, 2), _record("rules", 3001, 3)
    er.append_record(tmp_path, a)
    with open(tmp_path / er.RECORDS_FILE, "ab") as f:
        f.write(b'{"key": "prostate-basic/rules/3001/0", "scen')  # killed mid-write
    assert er.load_records(tmp_path) == {a.key: a}
    er.append_record(tmp_path, b)  # the cut-off line is dropped
    assert er.load_records(tmp_path) == {a.key: a, b.key: b}
    assert len((tmp_path / er.RECORDS_FILE).read_bytes().splitlines()) == 2
    assert er.read_design(tmp_path) == design
    with pytest.raises(ed.ExperimentError, match="holds another experiment"):
        ex.prepare_folder(tmp_path, dataclasses.replace(design, seed=1))
    with pytest.raises(ed.ExperimentError, match="holds another experiment"):
        ex.prepare_folder(tmp_path, dataclasses.replace(design, llm={"model": "openai", "base_url": "http://x"}))
    with pytest.raises(ed.ExperimentError, match=r"cases\[prostate-basic\]"):
        ex.prepare_folder(tmp_path, dataclasses.replace(design, cases={"prostate-basic": 3}))
    # arms and scenarios may be added: the folder's design lists the union, the finished sessions stay
    assert ex.prepare_folder(tmp_path, dataclasses.replace(design, arms=("guided",))) == {a.key: a, b.key: b}
    ex.prepare_folder(tmp_path, ed.make_design(["liver"], ["drl"], inits=2))
    merged = er.read_design(tmp_path)
    assert (merged.scenarios, merged.arms) == (("prostate-basic", "liver"), ("guided", "drl", "rules"))
    assert (merged.cases, merged.inits) == ({"prostate-basic": 2, "liver": 1}, {"prostate-basic": 1, "liver": 2})
    (tmp_path / er.RECORDS_FILE).write_bytes(b"garbage\n" + (tmp_path / er.RECORDS_FILE).read_bytes())
    with pytest.raises(ed.ExperimentError, match="not a session record"):
        er.load_records(tmp_path)


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_steps_is_wilcoxon_on_the_common_settings() -> None:
    guided = [_record("guided", 3000 + i, s) for i, s in enumerate([1, 2, 3, 1, 2, 2, 1])]
    unguided = [_record("unguided", 3000 + i, s, reached=False) for i, s in enumerate([20, 20, 5, 20, 2, 18])]
    t = paired_steps(guided + unguided)
    g, u = [1, 2, 3, 1, 2, 2], [20, 20, 5, 20, 2, 18]
    assert (t.n, t.n_nonzero) == (6, 5)  # case 3006 has no unguided pair; case 3004 ties
    assert t.diff_mean == pytest.approx(sum(a - b for a, b in zip(g, u, strict=True)) / 6)
    assert t.p_value == pytest.approx(wilcoxon(g, u).pvalue)
    assert paired_steps([_record("guided", 3000, 2), _record("unguided", 3000, 2)]).p_value is None


def test_hierarchy_orders_tpps_by_their_first_move() -> None:
    r1 = _record("guided", 3000, 3, [("t_ptv", -1), ("lambda_rectum", 1), ("lambda_rectum", 1)])
    r2 = _record("guided", 3001, 2, [("t_ptv", -1), ("v_bladder", 1)])
    moves = hierarchy([r1, r2])
    assert [m.tpp for m in moves] == ["t_ptv", "lambda_rectum", "v_bladder"]
    first = moves[0]
    assert (first.lower_n, first.raise_n, first.first_n, first.mean_first_stage) == (2, 0, 2, 0.0)
    assert moves[1].raise_n == 2 and moves[1].mean_stage == pytest.approx(0.75)
    assert rank_agreement(["a", "b", "c"], ["a", "b", "c"]) == (3, pytest.approx(1.0))
    assert rank_agreement(["c", "b", "a"], ["a", "b", "c", "d"]) == (3, pytest.approx(-1.0))
    assert rank_agreement(["a"], ["a", "b"]) == (1, None)


# ------------------------------------------------------------------------------------------------ rules planner
def _prostate(over: dict[str, float], tpps: dict[str, float] | None = None, history: tuple[StepView, ...] = ()):
    s = situation_from_values("prostate-basic", 3, {**PROSTATE_PASS, **over}, {**PROSTATE_TPPS, **(tpps or {})}, [])
    return dataclasses.replace(s, history=history)


def _decide(situation) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    outcome = asyncio.run(RulesDecider().decide(situation, "unguided", False, None))
    assert outcome.valid and outcome.raw is not None and outcome.raw.move is not None
    return outcome.raw.move.tpp, outcome.raw.move.direction.word


def test_rules_planner_tightens_the_worst_failing_structure_and_escalates() -> None:
    fails = {"rectum V70Gy": 31.0, "bladder V75Gy": 25.5}
    assert _decide(_prostate(fails)) == ("lambda_rectum", "raise")
    s = _prostate(fails)
    stalled = (StepView(step=2, move=Move.parse("raise lambda_rectum"), score=s.score),)  # the same step did not help
    assert _decide(_prostate(fails, history=stalled)) == ("t_rectum", "lower")
    helped = (StepView(step=2, move=Move.parse("raise lambda_rectum"), score=s.score - 0.5),)
    assert _decide(_prostate(fails, history=helped)) == ("lambda_rectum", "raise")
    assert _decide(_prostate(fails, {"lambda_rectum": 1e5})) == ("t_rectum", "lower")  # at its bound
    assert _decide(_prostate({"ptv D0.03cc": 109.0}, {"t_ptv": 1.0})) == ("v_ptv", "raise")


# ------------------------------------------------------------------------------------------------ on a stack
@pytest.fixture
def stack() -> Iterator[tuple[BusConfig, Path, Path]]:
    d = Path(tempfile.mkdtemp(prefix="m2mx", dir="/tmp"))
    cfg = d / "stack.toml"
    cfg.write_text(
        f'[bus]\nendpoint = "ipc://{d}/bus"\npub_endpoint = "ipc://{d}/pub"\ntranscript_dir = "{d}/runs"\n'
        "[restart]\nready_timeout_s = 90\nstop_timeout_s = 20\n"
        '[[agent]]\nrole = "dose-engine"\ninstances = 2\n[[agent]]\nrole = "evaluator"\n'
        '[[agent]]\nrole = "drl-advisor"\n[[agent]]\nrole = "planner"\nimpl = "drl"\n'
    )
    config = BusConfig(endpoint=f"ipc://{d}/bus", pub_endpoint=f"ipc://{d}/pub")
    supervisor_pid = None
    try:
        status = start_detached(cfg)
        supervisor_pid = int((Path(status.transcript).parent / PID_FILE_NAME).read_text())
        yield config, Path(status.transcript), d
    finally:
        # the stack's own down; then SIGTERM, then SIGKILL of the supervisor and every process it started (by pid)
        stop_stack(config, supervisor_pid)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(600)
def test_an_experiment_runs_every_arm_on_the_stack_and_resumes(stack: tuple[BusConfig, Path, Path]) -> None:
    config, transcript, d = stack
    loosen = {"action": "change", "tpp": "lambda_rectum", "direction": "lower", "rationale": "spare the PTV"}
    answers = d / "answers.json"
    answers.write_text(json.dumps([loosen] * 40))
    design = ed.make_design(["prostate-basic"], cases=1, step_cap=3,
                            llm={"model": "replay", "replay": str(answers), "decision": "step"})
    out = d / "out"
    first = asyncio.run(ex.run_experiment(config, design, out, transcript=transcript, max_sessions=2))
    assert (first.planned, first.skipped) == (2, 0)
    kept = er.load_records(out)
    with open(out / er.RECORDS_FILE, "ab") as f:
        f.write(b'{"key": "prostate-basic/drl/')  # the run was killed while writing
    second = asyncio.run(ex.run_experiment(config, design, out, transcript=transcript))
    assert (second.planned, second.skipped) == (3, 2)
    records = er.load_records(out)
    assert set(records) == {r.key for r in ed.runs_of(design)}
    assert all(records[k] == v for k, v in kept.items())  # finished sessions were not planned again
    by_arm = {r.arm: r for r in records.values()}
    assert len({json.dumps(r.initial_tpps, sort_keys=True) for r in by_arm.values()}) == 1
    assert len({r.initial_score for r in by_arm.values()}) == 1  # the same initial plan for every arm
    stems = {r.key: r.file_stem for r in ed.runs_of(design)}
    for arm, r in by_arm.items():
        assert r.steps_detail[0].tpps == pytest.approx(r.initial_tpps)
        assert [s.step for s in r.steps_detail] == list(range(r.steps + 1)) and r.steps <= 3
        assert all(p.startswith(f"{ed.ARMS[arm].impl}:") for p in r.planners), (arm, r.planners)
        assert r.mode == ed.ARMS[arm].mode
        assert (out / er.TRANSCRIPTS_DIR / f"{stems[r.key]}.m2mt").stat().st_size > 0
    assert by_arm["unguided"].decisions, "the initial plan is not at the maximum: decisions were taken"
    loosen_move = Move("lambda_rectum", Direction.LOWER)
    assert all(d.proposal is not None and d.proposal.move == loosen_move for d in by_arm["unguided"].decisions)
    # who chose each step: the arm's own planner (the replayed LLM's loosening is admissible when unguided)
    for arm in ("drl", "rules", "knowledge", "unguided"):
        assert {d.source for d in by_arm[arm].decisions} == {"proposal"}, arm
    # the knowledge baseline's first decision sets TPPs to the knowledge median (through the knowledge the DRL
    # advisor publishes), in values, not by a published step
    first_knowledge = by_arm["knowledge"].decisions[0]
    assert first_knowledge.action is None and first_knowledge.changes
    assert {c.target for c in first_knowledge.changes} == {"p50"}
    report = write_report(out, design, list(records.values()), wall_s=first.wall_s + second.wall_s)
    text = report.read_text()
    assert "| prostate-basic | 1 case(s) × 1 init(s)" in text and "9.0±0.0 / 3.5±4.4" in text
    assert "Guided vs unguided steps" in text and "## Hierarchy of objectives" in text
    assert "## Guided LLM vs the knowledge alone" in text and "- prostate-basic: at the maximum guided" in text
    assert "| prostate-basic | unguided | 1 |" in text and "| no LLM: own 100 % (" in text
    assert len((out / "cases.csv").read_text().splitlines()) == 1 + 5
    summary = json.loads((out / "summary.json").read_text())
    arms = summary["scenarios"]["prostate-basic"]
    assert set(arms) == set(ed.ARMS)
    assert arms["unguided"]["ownership"] == 1.0 and arms["knowledge"]["ownership"] is None
    assert set(summary["guided_vs_knowledge"]) == {"prostate-basic"}
    assert all((out / f).stat().st_size > 0 for f in ("score_vs_step.png", "final_tpps.png", "initial_quality.png"))
