"""``m2m experiment paper``: the paper's comparison, run through the real agent stack on the bus.

Every scenario is planned by four **arms** from the same initial TPPs: the LLM planner ``guided`` (it sees the DRL
knowledge) and ``unguided``, and two baselines without an LLM: ``drl`` (the DRL advisor's best admissible action at
every step) and ``rules`` (the rule-based planner of :class:`m2m.agents.planner.RulesDecider`). An arm is a planner
implementation and a mode; the experiment swaps the running stack's planner (``m2m swap``) between arms, so each
session is an ordinary ``plan.session`` request to a planner process.

Design (the paper's cohort sizes by default): prostate-basic 10 cases × 1 initial TPP setting, prostate-complex
1 case × 1, liver 1 case × 10 settings; cases are the first seeds of each scenario's ``paper`` cohort. Initial TPPs
are random from the published training ranges, a pure function of (scenario's ``initial_seed``, ``--seed``, case
seed, setting index), and shared by the four arms of a run, so the arms are paired.

Resumable: every finished session is appended as one JSON line to ``sessions.jsonl`` in the output folder (and its
records are copied from the stack's bus transcript to ``transcripts/<run>.m2mt``); a rerun with the same folder
skips the sessions already there and refuses a folder made with another design (scenarios and arms may be added, to
run an experiment in parts). A session cut off by a kill is planned again from its first step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

from m2m.agents.messages import SessionRequest, StepEvent, new_session_id
from m2m.bus.client import BusConfig
from m2m.physics.tpp import random_tpps
from m2m.scenarios import load_scenario

log = structlog.get_logger("experiment")

RECORDS_FILE = "sessions.jsonl"
DESIGN_FILE = "design.json"
WALL_FILE = "wall.json"
TRANSCRIPTS_DIR = "transcripts"


@dataclass(frozen=True)
class Arm:
    """A planner implementation (``m2m swap planner IMPL``) and the session mode it is asked for."""

    name: str
    impl: str
    mode: str


ARMS: dict[str, Arm] = {
    "guided": Arm("guided", "llm", "guided"),
    "unguided": Arm("unguided", "llm", "unguided"),
    "drl": Arm("drl", "drl", "unguided"),
    "rules": Arm("rules", "rules", "unguided"),
}


@dataclass(frozen=True)
class PaperRow:
    """The published numbers of one scenario (as printed in the paper's table) and its cohort layout."""

    setup: str
    cases: int
    inits: int
    initial: str
    unguided: str
    guided: str
    goal_median_steps: int


PAPER: dict[str, PaperRow] = {
    "prostate-basic": PaperRow("7 beams, PTV + bladder + rectum, 10 cases, max 9", 10, 1, "5.8±1.7",
                               "7.9±1.0 / 18.2±4.4", "9.0±0.0 / 3.5±4.4", 3),
    "prostate-complex": PaperRow("180 beams, + 2 femoral heads, 1 case, max 15", 1, 1, "10", "15 / 12", "15 / 5", 5),
    "liver": PaperRow("7 beams, PTV + 2 OARs, 1 case × 10 initial TPP settings, max 4", 1, 10, "2.5±0.4",
                      "3.1±0.2 / 20.0±0.0", "3.7±0.35 / 12.8±8.3", 8),
}


class ExperimentError(ValueError):
    """A bad design (unknown scenario or arm, sizes) or an output folder made with another design."""


@dataclass(frozen=True)
class Run:
    """One session of the design: ``arm`` plans case ``case_seed`` of ``scenario`` from initial setting ``init``."""

    scenario: str
    arm: str
    case_seed: int
    init: int
    initial_tpps: Mapping[str, float]

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.arm}/{self.case_seed}/{self.init}"

    @property
    def file_stem(self) -> str:
        return self.key.replace("/", "-")


@dataclass(frozen=True)
class Design:
    """What the experiment plans: scenarios × cases × initial settings × arms, with one step cap and seed."""

    scenarios: tuple[str, ...]
    arms: tuple[str, ...]
    cases: Mapping[str, int]
    inits: Mapping[str, int]
    seed: int = 0
    step_cap: int | None = None
    llm: Mapping[str, str] = field(default_factory=lambda: {"model": "embedded"})

    def to_json(self) -> dict[str, Any]:
        return {"scenarios": list(self.scenarios), "arms": list(self.arms), "cases": dict(self.cases),
                "inits": dict(self.inits), "seed": self.seed, "step_cap": self.step_cap, "llm": dict(self.llm)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Design:
        return cls(scenarios=tuple(d["scenarios"]), arms=tuple(d["arms"]), cases=dict(d["cases"]),
                   inits=dict(d["inits"]), seed=int(d["seed"]), step_cap=d["step_cap"], llm=dict(d["llm"]))

    def llm_words(self) -> str:
        """The LLM planner's client in words (the options that say which model)."""
        return ", ".join(f"{k}={v}" for k, v in self.llm.items() if k in ("model", "model_name", "base_url"))

    @property
    def is_paper_size(self) -> bool:
        """Every scenario of the paper at its published cohort size."""
        return set(self.scenarios) == set(PAPER) and all(
            self.cases[s] == PAPER[s].cases and self.inits[s] == PAPER[s].inits for s in self.scenarios
        )


def make_design(
    scenarios: Sequence[str] = tuple(PAPER),
    arms: Sequence[str] = tuple(ARMS),
    *,
    cases: int | None = None,
    inits: int | None = None,
    seed: int = 0,
    step_cap: int | None = None,
    llm: Mapping[str, str] | None = None,
) -> Design:
    """The paper's design for ``scenarios`` (``cases``/``inits`` override its cohort sizes for every scenario);
    ``llm``: the LLM planner's options (default the embedded model)."""
    unknown = [s for s in scenarios if s not in PAPER] + [a for a in arms if a not in ARMS]
    if unknown:
        raise ExperimentError(f"unknown scenario or arm {unknown}: scenarios {sorted(PAPER)}, arms {sorted(ARMS)}")
    if not scenarios or not arms:
        raise ExperimentError("the experiment needs at least one scenario and one arm")
    for name, value in (("cases", cases), ("inits", inits)):
        if value is not None and value < 1:
            raise ExperimentError(f"--{name} must be >= 1, got {value}")
    if step_cap is not None and step_cap < 0:
        raise ExperimentError(f"step cap must be >= 0, got {step_cap}")
    return Design(
        scenarios=tuple(dict.fromkeys(scenarios)),
        arms=tuple(dict.fromkeys(arms)),
        cases={s: cases or PAPER[s].cases for s in scenarios},
        inits={s: inits or PAPER[s].inits for s in scenarios},
        seed=seed,
        step_cap=step_cap,
        llm=dict(llm) if llm is not None else {"model": "embedded"},
    )


def initial_tpps(scenario: str, seed: int, case_seed: int, init: int) -> dict[str, float]:
    """Random initial TPPs from the published training ranges, a pure function of its arguments."""
    sc = load_scenario(scenario)
    rng = np.random.default_rng([sc.initial_seed, seed, case_seed, init])
    return random_tpps(rng, sc.oar_names).as_dict()


def runs_of(design: Design) -> list[Run]:
    """Every session of ``design``, grouped by planner implementation (one swap per implementation), then by
    scenario and case, the arms of one initial setting next to each other."""
    runs: list[Run] = []
    impls = list(dict.fromkeys(ARMS[a].impl for a in design.arms))
    for impl in impls:
        for scenario in design.scenarios:
            cohort = load_scenario(scenario).cohorts.get("paper").seeds
            if design.cases[scenario] > len(cohort):
                raise ExperimentError(f"{scenario}: {design.cases[scenario]} cases asked, the paper cohort has "
                                      f"{len(cohort)}")
            for case_seed in cohort[: design.cases[scenario]]:
                for init in range(design.inits[scenario]):
                    tpps = initial_tpps(scenario, design.seed, int(case_seed), init)
                    runs.extend(Run(scenario, arm, int(case_seed), init, tpps)
                                for arm in design.arms if ARMS[arm].impl == impl)
    return runs


# ------------------------------------------------------------------------------------------------ records
class SessionStep(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a session: its score and TPPs, and the decision taken from it (empty at the last step).
    ``raw_*`` is the planner's own proposal, ``action_*`` what the guard let through; ``source`` who chose it."""

    step: int
    score: float
    tpps: dict[str, float]
    failing: list[str]
    raw_action: str = ""
    raw_tpp: str = ""
    raw_direction: str = ""
    action_tpp: str = ""
    action_direction: int = 0
    source: str = ""
    vetoes: list[str] = msgspec.field(default_factory=list)
    valid: bool = True
    decision_s: float = 0.0
    plan_s: float = 0.0


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A finished session of the experiment, one line of ``sessions.jsonl``."""

    key: str
    scenario: str
    arm: str
    impl: str
    mode: str
    case_seed: int
    case_id: str
    init: int
    session_id: str
    initial_tpps: dict[str, float]
    initial_score: float
    final_score: float
    max_score: float
    steps: int
    reached_max: bool
    outcome: str
    wall_s: float
    planners: list[str]
    steps_detail: list[SessionStep]
    finished_utc: str

    @property
    def decisions(self) -> list[SessionStep]:
        return [s for s in self.steps_detail if s.action_tpp]


def record_of(run: Run, events: Sequence[StepEvent], wall_s: float) -> SessionRecord:
    """The record of ``run`` from its step events (step 0 … last, as published on ``session.<id>``)."""
    first, last = events[0], events[-1]
    arm = ARMS[run.arm]
    return SessionRecord(
        key=run.key, scenario=run.scenario, arm=run.arm, impl=arm.impl, mode=arm.mode, case_seed=run.case_seed,
        case_id=first.case_id, init=run.init, session_id=first.session_id, initial_tpps=dict(run.initial_tpps),
        initial_score=first.score, final_score=last.score, max_score=last.max_score, steps=last.step,
        reached_max=last.outcome == "maximum score", outcome=last.outcome, wall_s=wall_s,
        planners=sorted({e.planner for e in events}),
        steps_detail=[
            SessionStep(
                step=e.step, score=e.score, tpps=dict(e.tpps), failing=[c.label for c in e.criteria if not c.passed],
                raw_action=e.raw_action, raw_tpp=e.raw_tpp, raw_direction=e.raw_direction, action_tpp=e.action_tpp,
                action_direction=e.action_direction, source=e.action_source, vetoes=[v.reason for v in e.vetoes],
                valid=e.valid, decision_s=e.decision_s, plan_s=e.plan_s,
            )
            for e in events
        ],
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(SessionRecord)


def load_records(folder: Path) -> dict[str, SessionRecord]:
    """The finished sessions in ``folder`` by run key. A last line cut off by a kill (no newline) is ignored: that
    session is planned again. Any other unreadable line is an error."""
    path = folder / RECORDS_FILE
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.splitlines()
    records: dict[str, SessionRecord] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = _DECODER.decode(line)
        except msgspec.DecodeError as exc:
            if i == len(lines) - 1 and not data.endswith(b"\n"):
                log.warning("partial_record_ignored", file=str(path), line=i + 1)
                continue
            raise ExperimentError(f"{path}:{i + 1}: not a session record: {exc}") from None
        records[rec.key] = rec
    return records


def append_record(folder: Path, record: SessionRecord) -> None:
    """Append one session, flushed before the next session starts; a last line cut off by a kill is dropped first."""
    path = folder / RECORDS_FILE
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, "ab") as f:
        f.write(_ENCODER.encode(record) + b"\n")
        f.flush()


def read_design(folder: Path) -> Design:
    """The design an experiment folder was made with."""
    path = folder / DESIGN_FILE
    try:
        return Design.from_json(json.loads(path.read_text()))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ExperimentError(f"{path}: not an experiment design ({exc})") from None


def add_wall(folder: Path, wall_s: float) -> float:
    """Add one run's wall time (s) to the experiment's total over all its resumed runs (``wall.json``)."""
    path = folder / WALL_FILE
    total = (json.loads(path.read_text())["wall_s"] if path.is_file() else 0.0) + wall_s
    path.write_text(json.dumps({"wall_s": total}) + "\n")
    return float(total)


def total_wall(folder: Path) -> float | None:
    path = folder / WALL_FILE
    return float(json.loads(path.read_text())["wall_s"]) if path.is_file() else None


def prepare_folder(folder: Path, design: Design) -> dict[str, SessionRecord]:
    """Create ``folder`` for ``design`` or check that it holds a compatible one; the sessions already finished.

    An experiment may be run in parts: scenarios and arms can be added (``--scenarios liver`` or ``--arms drl,rules``
    into a folder made with others). The folder's design then lists the union, and its report covers it. The seed,
    step cap, LLM and the sizes of a scenario already there must match."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DESIGN_FILE
    wanted = design.to_json()
    if path.is_file():
        found = json.loads(path.read_text())
        same = ("seed", "step_cap", "llm")
        clash = [k for k in same if found.get(k) != wanted[k]] + [
            f"{k}[{sc}]" for k in ("cases", "inits") for sc in wanted[k]
            if sc in found.get(k, {}) and found[k][sc] != wanted[k][sc]
        ]
        if clash:
            raise ExperimentError(f"{folder} holds another experiment ({', '.join(clash)} differ: {found}); "
                                  f"use another --out to run {wanted}")
        wanted = {
            **wanted,
            "scenarios": [sc for sc in PAPER if sc in found["scenarios"] or sc in wanted["scenarios"]],
            "arms": [a for a in ARMS if a in found["arms"] or a in wanted["arms"]],
            "cases": {**found["cases"], **wanted["cases"]},
            "inits": {**found["inits"], **wanted["inits"]},
        }
    path.write_text(json.dumps(wanted, indent=2) + "\n")
    return load_records(folder)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Progress:
    """Callbacks the command line uses to show progress (all optional)."""

    on_step: Callable[[Run, StepEvent], None] = lambda run, event: None
    on_session_done: Callable[[Run, SessionRecord], None] = lambda run, record: None
    on_swap: Callable[[str], None] = lambda impl: None


@dataclass
class RunSummary:
    """What one run did: sessions planned, sessions skipped as already finished, its wall time (s)."""

    planned: int
    skipped: int
    wall_s: float = 0.0


async def run_experiment(
    config: BusConfig,
    design: Design,
    folder: Path,
    *,
    transcript: Path | None,
    progress: Progress | None = None,
    max_sessions: int | None = None,
) -> RunSummary:
    """Plan every unfinished session of ``design`` on the running stack at ``config``; records go to ``folder``.

    The planner is swapped to each arm's implementation before that arm's first session (the LLM arms with
    ``design.llm``). ``transcript`` is the stack's bus transcript (each session's records are copied out of it).
    ``max_sessions`` stops after that many sessions (tests of resumption)."""
    from m2m.agents.session_client import copy_session_transcript, run_session_request
    from m2m.agents.supervisor import swap

    progress = progress or Progress()
    done = prepare_folder(folder, design)
    runs = runs_of(design)
    todo = [r for r in runs if r.key not in done]
    summary = RunSummary(planned=0, skipped=len(runs) - len(todo))
    started = time.perf_counter()
    current_impl: str | None = None
    sc_caps = {s: load_scenario(s).step_cap for s in design.scenarios}
    for run in todo:
        if max_sessions is not None and summary.planned >= max_sessions:
            break
        arm = ARMS[run.arm]
        if arm.impl != current_impl:
            progress.on_swap(arm.impl)
            await swap(config, "planner", arm.impl, dict(design.llm) if arm.impl == "llm" else {})
            current_impl = arm.impl
        req = SessionRequest(
            session_id=new_session_id(), scenario=run.scenario, case_seed=run.case_seed, mode=arm.mode,
            step_cap=sc_caps[run.scenario] if design.step_cap is None else design.step_cap,
            initial_tpps=dict(run.initial_tpps),
        )
        t0 = time.perf_counter()
        result, events = await run_session_request(config, req, lambda e, run=run: progress.on_step(run, e))
        record = record_of(run, events, time.perf_counter() - t0)
        if transcript is not None and transcript.is_file():
            (folder / TRANSCRIPTS_DIR).mkdir(exist_ok=True)
            await asyncio.to_thread(copy_session_transcript, transcript, result.session_id,
                                    folder / TRANSCRIPTS_DIR / f"{run.file_stem}.m2mt")
        append_record(folder, record)
        summary.planned += 1
        progress.on_session_done(run, record)
        log.info("experiment_session", key=run.key, score=record.final_score, steps=record.steps,
                 wall_s=round(record.wall_s, 1))
    summary.wall_s = time.perf_counter() - started
    return summary


def ordered(records: Iterable[SessionRecord], design: Design) -> list[SessionRecord]:
    """``records`` of ``design`` in its run order (records of other designs are dropped)."""
    by_key = {r.key: r for r in records}
    return [by_key[r.key] for r in runs_of(design) if r.key in by_key]
