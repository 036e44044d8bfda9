"""An experiment folder's files and its session records (``sessions.jsonl``, one :class:`SessionRecord` a line).

Files: ``design.json`` (the :class:`~m2m.experiment.design.Design`), ``sessions.jsonl`` (finished sessions),
``wall.json`` (wall time over all resumed runs), ``knowledge.json`` (the DRL knowledge the stack published, the
report's reference) and ``transcripts/`` (each session's slice of the bus transcript).

Records are versioned. Version 2 holds the session's steps in the one step schema of the bus
(:class:`m2m.agents.messages.Step`). Version 1 lines (written before it; no ``version`` key) still load: they are
converted on read (:func:`upgrade_v1`) — their failing criteria are turned from display labels into criterion ids,
their action sources into the typed sources, and they carry no criterion values and no rationales, which version 1
never stored. A line of an unknown version is refused with a message that names the file, the line and the version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec
import structlog

from m2m.agents.llm.guard import ActionSource, Veto, VetoReason
from m2m.agents.llm.situation import Mode
from m2m.agents.messages import Decision, Outcome, Proposal, SessionResult, Step
from m2m.experiment.design import ARMS, Design, ExperimentError, Run, runs_of
from m2m.physics.protocol import CriterionId
from m2m.physics.tpp import Direction, Move

log = structlog.get_logger("experiment")

RECORDS_FILE = "sessions.jsonl"
DESIGN_FILE = "design.json"
WALL_FILE = "wall.json"
TRANSCRIPTS_DIR = "transcripts"
#: The DRL knowledge the stack published when the experiment ran (the report's reference for the guided arm).
KNOWLEDGE_FILE = "knowledge.json"
RECORD_VERSION = 2


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A finished session of the experiment, one line of ``sessions.jsonl``: the run it belongs to, its outcome and
    every step (``steps_detail``; ``steps`` is the number of decisions taken)."""

    version: Literal[2] = 2
    key: str
    scenario: str
    arm: str
    impl: str
    mode: Mode
    case_seed: int
    case_id: str
    init: int
    session_id: str
    initial_tpps: dict[str, float]
    initial_score: float
    final_score: float
    max_score: float
    steps: int
    outcome: Outcome
    wall_s: float
    planners: list[str]
    steps_detail: list[Step]
    finished_utc: str

    @property
    def reached_max(self) -> bool:
        return self.outcome is Outcome.MAXIMUM_SCORE

    @property
    def decisions(self) -> list[Decision]:
        """The decisions that changed TPPs — a published step or new values — (a session that stopped without one
        has a last decision that changed none)."""
        return [s.decision for s in self.steps_detail if s.decision is not None and not s.decision.stopped]

    @property
    def all_decisions(self) -> list[Decision]:
        """Every decision taken, a last one that stopped the session included (what ownership is counted over)."""
        return [s.decision for s in self.steps_detail if s.decision is not None]


def record_of(run: Run, result: SessionResult, wall_s: float) -> SessionRecord:
    """The record of ``run`` from the planner's reply."""
    arm = ARMS[run.arm]
    return SessionRecord(
        key=run.key, scenario=run.scenario, arm=run.arm, impl=arm.impl, mode=arm.mode, case_seed=run.case_seed,
        case_id=result.header.case_id, init=run.init, session_id=result.header.session_id,
        initial_tpps=dict(run.initial_tpps), initial_score=result.initial_score, final_score=result.final_score,
        max_score=result.max_score, steps=result.n_steps, outcome=result.outcome, wall_s=wall_s,
        planners=list(result.planners), steps_detail=list(result.steps),
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


# ------------------------------------------------------------------------------------------------ version 1
class _StepV1(msgspec.Struct, frozen=True, kw_only=True):
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
    vetoes: list[VetoReason] = msgspec.field(default_factory=list)
    valid: bool = True
    decision_s: float = 0.0
    plan_s: float = 0.0


class _RecordV1(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    scenario: str
    arm: str
    impl: str
    mode: Mode
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
    outcome: Outcome
    wall_s: float
    planners: list[str]
    steps_detail: list[_StepV1]
    finished_utc: str


def _criterion_id_v1(label: str) -> CriterionId:
    """``"rectum V70Gy ≤ 25 %"`` (version 1 display label) → ``"rectum:V70Gy"``."""
    structure, metric, *_ = label.split(" ")
    return CriterionId(f"{structure}:{metric}")


def _source_v1(source: str, impl: str) -> ActionSource:
    """Version 1 recorded the decider's name (``llm:embedded``, ``drl``, ``rules``) for its own proposal and ``drl``
    or ``safe`` for a replacement; which ``drl`` it was follows from the arm's implementation. Version 1 had no
    feedback turn: no decision of it has the source ``retry``."""
    if source == "safe":
        return "safe"
    if source == "drl" and impl != "drl":
        return "drl_advice"
    return "proposal"


def _step_v1(s: _StepV1, max_score: float, impl: str) -> Step:
    decision = None
    if s.action_tpp or s.raw_action or s.vetoes:
        proposal = None
        if s.raw_action in ("change", "stop"):
            move = (Move(s.raw_tpp, Direction[s.raw_direction.upper()])
                    if s.raw_action == "change" and s.raw_tpp and s.raw_direction in ("raise", "lower") else None)
            proposal = Proposal(action=s.raw_action, move=move)
        decision = Decision(
            proposal=proposal,
            action=Move(s.action_tpp, Direction(s.action_direction)) if s.action_tpp else None,
            source=_source_v1(s.source, impl),
            vetoes=[Veto(reason, "") for reason in s.vetoes],  # v1 wrote the same reason codes
            valid=s.valid,
            decision_s=s.decision_s,
        )
    return Step(step=s.step, score=s.score, max_score=max_score, tpps=s.tpps,
                failing=[_criterion_id_v1(label) for label in s.failing], plan_s=s.plan_s, decision=decision)


def upgrade_v1(old: _RecordV1) -> SessionRecord:
    """A version 1 record in the version 2 schema (see the module docstring for what version 1 lacks)."""
    return SessionRecord(
        key=old.key, scenario=old.scenario, arm=old.arm, impl=old.impl, mode=old.mode, case_seed=old.case_seed,
        case_id=old.case_id, init=old.init, session_id=old.session_id, initial_tpps=old.initial_tpps,
        initial_score=old.initial_score, final_score=old.final_score, max_score=old.max_score, steps=old.steps,
        outcome=old.outcome, wall_s=old.wall_s, planners=old.planners,
        steps_detail=[_step_v1(s, old.max_score, old.impl) for s in old.steps_detail], finished_utc=old.finished_utc,
    )


# ------------------------------------------------------------------------------------------------ files
class _Version(msgspec.Struct):
    version: int = 1


_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[int, msgspec.json.Decoder] = {
    1: msgspec.json.Decoder(_RecordV1),
    2: msgspec.json.Decoder(SessionRecord),
}
_PROBE = msgspec.json.Decoder(_Version)


def decode_record(line: bytes) -> SessionRecord:
    """One ``sessions.jsonl`` line of any known version as a current record (``msgspec.DecodeError`` if it is not
    one; :class:`ExperimentError` for an unknown version)."""
    version = _PROBE.decode(line).version
    decoder = _DECODERS.get(version)
    if decoder is None:
        raise ExperimentError(f"session record version {version}: this m2m reads versions {sorted(_DECODERS)}")
    record = decoder.decode(line)
    return upgrade_v1(record) if isinstance(record, _RecordV1) else record


def load_records(folder: Path) -> dict[str, SessionRecord]:
    """The finished sessions in ``folder`` by run key. A last line cut off by a kill (no newline) is ignored: that
    session is planned again. Any other unreadable line is an error naming the file and the line."""
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
            rec = decode_record(line)
        except msgspec.DecodeError as exc:
            if i == len(lines) - 1 and not data.endswith(b"\n"):
                log.warning("partial_record_ignored", file=str(path), line=i + 1)
                continue
            raise ExperimentError(f"{path}:{i + 1}: not a session record: {exc}") from None
        except ExperimentError as exc:
            raise ExperimentError(f"{path}:{i + 1}: {exc}") from None
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


def ordered(records: Sequence[SessionRecord], design: Design) -> list[SessionRecord]:
    """``records`` of ``design`` in its run order (records of other designs are dropped)."""
    by_key = {r.key: r for r in records}
    return [by_key[r.key] for r in runs_of(design) if r.key in by_key]
