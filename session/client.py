"""The client side of a planning session on the bus: ``m2m plan --mode …`` and ``m2m replay``.

:func:`run_session_request` asks the running stack's planner for one session (``plan.session``) and shows every step
as it is published on ``session.<id>`` (best effort: the record itself is the reply, which carries every
:class:`~m2m.agents.messages.Step`); :func:`write_bus_session_folder` then writes the session folder: the session's
slice of the bus transcript (``transcript.m2mt``), the one-page summary, DVH of the first vs the final plan, score
vs step, TPP trajectories, ``trajectory.csv``/``.json`` and ``final.json`` (:mod:`m2m.session.folder`). A session
cut short by its client (Ctrl-C) keeps what was done: :func:`interrupted_result` reads the steps so far from the
session's retained state on ``takeover.<id>`` (outcome ``interrupted``), and the folder is written from them.

:func:`replay` re-drives a recorded session: the planner's recorded decisions (the LLM's raw answers, or the DRL's
or the rules planner's choice) are replayed in this process — the LLM's through autogen's replay model client —
against the live dose engine, evaluator and advisor, and every step's score is compared with the recording. The
recording is the session's :class:`~m2m.agents.messages.SessionResult` reply in a bus transcript; a transcript
written before the step schema changed is refused with a message that says so.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
from rich.console import Console
from rich.table import Table

from m2m.agents.llm.answer import Answer
from m2m.agents.llm.decision import DecisionOutcome, decide
from m2m.agents.llm.situation import Mode, Situation
from m2m.agents.messages import (
    SESSION,
    Outcome,
    SessionRequest,
    SessionResult,
    SessionState,
    Step,
    StepEvent,
    StepPhase,
    new_session_id,
    session_topic,
    takeover_topic,
)
from m2m.agents.planner import (
    DrlDecider,
    KnowledgeDecider,
    RulesDecider,
    SessionRunner,
    replay_client,
    session_result,
)
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import BusError, SchemaVersionError
from m2m.bus.transcript import TranscriptWriter, filter_records, read_transcript
from m2m.physics.protocol import SCORE_TOLERANCE
from m2m.session.folder import DecisionTally, SessionLabel, decision_words, write_session_folder

SESSION_TIMEOUT_S = 3600.0
"""A session of 20 steps on the embedded model on 2 cores takes minutes; 180-beam plans take longer."""
SESSION_TRANSCRIPT = "transcript.m2mt"
"""The session's slice of the bus transcript in its folder."""
STATE_TIMEOUT_S = 5.0
"""How long :func:`interrupted_result` waits for the broker's retained session state."""


class TranscriptVersionError(BusError):
    """A transcript recorded by an older m2m whose session records this version cannot read."""


def failing_labels(step: Step) -> list[str]:
    """The step's failing criteria by label (by id for records that carry no criteria)."""
    labels = {c.id: c.label for c in step.criteria}
    return [labels.get(f, f) for f in step.failing]


def step_line(step: Step, outcome: str | None = None) -> str:
    """One progress line: score, the failing criteria by label, and the decision taken (proposal, action,
    source)."""
    failing = ", ".join(failing_labels(step)) or "none"
    text = f"step {step.step:>2}  score {step.score:5.2f}/{step.max_score:g}  failing: {failing}"
    if step.decision is None:
        return f"{text}  → {outcome}" if outcome else text
    w = decision_words(step.decision)
    veto = f"  vetoed [{'; '.join(w.vetoes)}]" if w.vetoes else ""
    retry = f", then {w.retry}" if w.retry else ""
    return f"{text}  → {w.action} ({w.source}; proposed {w.proposal}{retry}){veto}  [{w.decision_s} s decision]"


def write_bus_session_folder(
    folder: Path, result: SessionResult, transcript: Path | None, *, copy_transcript: bool = True
) -> dict[str, Path]:
    """The session folder from the session's reply (and the bus transcript, when the stack records one).
    ``copy_transcript=False`` lists ``transcript.m2mt`` without copying it yet: the caller copies it
    (:func:`copy_session_transcript`) once the broker has written the session's last records."""
    folder.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Path] = {}
    h = result.header
    if transcript is not None and transcript.is_file():
        target = folder / SESSION_TRANSCRIPT
        extra["transcript"] = (copy_session_transcript(transcript, h.session_id, target) if copy_transcript
                               else target)
    return write_session_folder(
        folder,
        label=SessionLabel(case_id=h.case_id, scenario=h.scenario, mode=h.mode, planner=", ".join(result.planners)),
        steps=result.steps,
        outcome=result.outcome,
        rx_gy=h.rx_gy,
        dvh_bins_gy=np.asarray(result.dvh_bins_gy),
        initial_structures=result.initial_structures,
        final_structures=result.final_structures,
        extra_files=extra,
    )


def warm_up_folder_writing() -> None:
    """Import what writing a session folder needs (matplotlib: a second or more on a busy machine). Run in a thread
    while a session runs, so that the folder of a session cut short by Ctrl-C is written at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot


def copy_session_transcript(source: Path, session_id: str, target: Path) -> Path:
    """The records of one session (requests, replies, events tagged with its id) from a bus transcript."""
    contents = read_transcript(source)
    writer = TranscriptWriter(target)
    try:
        for rec, _env in filter_records(contents.records, session=session_id):
            writer.append(t=rec.t, direction=rec.direction, kind=rec.kind, route=rec.route, peer=rec.peer,
                          session=rec.session, frames=[rec.envelope, rec.payload, *rec.arrays])
    finally:
        writer.close()
    return target


async def run_session_request(
    config: BusConfig,
    req: SessionRequest,
    on_step: Callable[[Step, str | None], None],
    on_phase: Callable[[StepPhase], None] | None = None,
) -> SessionResult:
    """Send ``req`` to ``plan.session`` and return the planner's reply. ``on_step(step, outcome)`` is called once
    per step in order: live from the published events, and after the reply for any step whose event did not
    arrive (events are best effort; the reply is the record). ``on_phase`` gets each :class:`StepPhase` the
    planner publishes (what it is doing within a step; a lost one is not made up)."""
    async with BusClient(f"plan-client-{os.getpid()}", config) as bus:
        shown: set[int] = set()
        sub = bus.subscribe(session_topic(req.session_id), snapshot=False)

        async def follow() -> None:
            async for d in sub:
                e = d.message
                if isinstance(e, StepPhase) and on_phase is not None:
                    on_phase(e)
                if isinstance(e, StepEvent) and e.record.step not in shown and e.record.step == len(shown):
                    shown.add(e.record.step)
                    on_step(e.record, str(e.outcome) if e.outcome is not None else None)

        follower = asyncio.get_running_loop().create_task(follow())
        try:
            result: SessionResult = await bus.request(
                SESSION, req, timeout=SESSION_TIMEOUT_S, retries=0, idempotency_key=req.session_id,
                expect=SessionResult, session=req.session_id,
            )
        finally:
            follower.cancel()
            sub.close()
        for s in result.steps:
            if s.step not in shown:
                on_step(s, str(result.outcome) if s is result.steps[-1] else None)
        return result


async def interrupted_result(config: BusConfig, session_id: str, wall_s: float) -> SessionResult | None:
    """What an interrupted session did, as a :class:`SessionResult` with outcome ``interrupted``: the steps of its
    retained state on ``takeover.<id>``, with the last recorded step's DVHs (None before its first step was
    recorded, or when no broker answers)."""
    async with BusClient(f"plan-client-{os.getpid()}", config) as bus:
        topic = takeover_topic(session_id)
        try:
            async with asyncio.timeout(STATE_TIMEOUT_S):
                state = (await bus.retained(topic)).get(topic)
        except (TimeoutError, BusError):
            return None
    if not isinstance(state, SessionState) or not state.steps:
        return None
    return session_result(msgspec.structs.replace(state, outcome=Outcome.INTERRUPTED), wall_s)


def session_folder_name(scenario: str, case_id: str, mode: str) -> str:
    return f"{scenario}-{case_id}-{mode}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def ownership_words(result: SessionResult) -> str:
    """``"LLM ownership 80 % (8/10; proposal 7, retry 1, drl_advice 1, safe 1), feedback retries 2"``: who chose
    the session's decisions (:class:`~m2m.session.folder.DecisionTally`); ``own proposals`` for a planner without
    an LLM."""
    tally = DecisionTally.of_steps(result.steps)
    llm = any(p.startswith("llm") for p in result.planners)
    return (f"{'LLM ownership' if llm else 'own proposals'} {tally.percent()}"
            + (f"; {tally.sources_words()}" if tally.decisions else "")
            + f", feedback retries {tally.feedback_retries}")


def summary_line(result: SessionResult) -> str:
    """The one line at the end of ``m2m plan``: score, steps, outcome, time, answers, guard and ownership."""
    return (f"final score {result.final_score:.2f}/{result.max_score:g} after {result.n_steps} steps "
            f"({result.outcome}) in {result.wall_s:.1f} s; invalid answers {result.invalid_answers}, "
            f"vetoes {result.vetoes}, fallbacks {result.fallbacks}; {ownership_words(result)}")


def print_summary(console: Console, result: SessionResult) -> None:
    h = result.header
    table = Table(title=f"session {h.session_id}: {h.case_id} · {h.scenario} · {h.mode}")
    for col in ("step", "score", "failing", "proposed", "retried", "taken", "source", "vetoes", "decision s"):
        table.add_column(col)
    for s in result.steps:
        if s.decision is None:
            ended = str(result.outcome) if s is result.steps[-1] else ""
            table.add_row(str(s.step), f"{s.score:.2f}", str(len(s.failing)), "", "", ended, "", "", "")
            continue
        w = decision_words(s.decision)
        table.add_row(str(s.step), f"{s.score:.2f}", str(len(s.failing)), w.proposal, w.retry, w.action, w.source,
                      "; ".join(w.vetoes), w.decision_s)
    console.print(table)
    console.print(summary_line(result), markup=False, highlight=False)


# ------------------------------------------------------------------------------------------------ replay
@dataclass
class ReplayDecider:
    """Replays each recorded step's decision: the LLM's raw answers through autogen's replay model client, in the
    decision form they were given in (so parsing, retries, the guard's feedback turn, fallbacks and the guard run
    again), or the DRL's, the knowledge baseline's or the rules planner's choice."""

    recorded: dict[int, Step]
    planners: list[str]
    pause: Callable[[int], Awaitable[None]] | None = None
    name: str = "replay"
    needs_advice: bool = False
    needs_knowledge: bool = False

    def __post_init__(self) -> None:
        self.needs_advice = self._made_by("drl")
        self.needs_knowledge = self._made_by("knowledge")

    def _made_by(self, impl: str) -> bool:
        return any(p.split(":")[0] == impl for p in self.planners)

    async def decide(self, situation: Situation, mode: Mode, with_advice: bool,
                     refuse: Callable[[Answer], str] | None = None) -> DecisionOutcome:
        if self.pause is not None:
            await self.pause(situation.step)
        step = self.recorded.get(situation.step)
        if step is None or step.decision is None:
            raise LookupError(f"the recording has no decision at step {situation.step}")
        d = step.decision
        if d.answers:
            # asked again in the recorded form (a planner asking in the quantile form and answered in the values
            # form, because no knowledge point helped, records "values": the same situation asks the same again)
            return await decide(replay_client(list(d.answers)), situation, mode, with_advice=with_advice,
                                form=d.form, refuse=refuse)
        if self.needs_advice:
            return await DrlDecider().decide(situation, mode, with_advice, refuse)
        if self.needs_knowledge:
            return await KnowledgeDecider().decide(situation, mode, with_advice, refuse)
        return await RulesDecider().decide(situation, mode, with_advice, refuse)


def recorded_sessions(path: Path) -> dict[str, SessionResult]:
    """The finished sessions (their :class:`SessionResult` replies) in a transcript, by session id — a whole bus
    transcript or a session's own. Raises :class:`TranscriptVersionError` when the transcript holds only session
    records of an older schema version."""
    out: dict[str, SessionResult] = {}
    old: list[str] = []
    for rec in read_transcript(path).records:
        if rec.route != SESSION or rec.kind != "reply":
            continue
        try:
            msg = rec.decode()
        except SchemaVersionError as exc:
            old.append(str(exc))
            continue
        except BusError as exc:  # a poisoned record: one warning, and the other sessions still replay
            import structlog

            structlog.get_logger("m2m.session.replay").warning("bad_session_record", file=str(path), record=rec.n,
                                                               error=str(exc)[:300])
            continue
        if isinstance(msg, SessionResult):
            out[msg.header.session_id] = msg
    if not out and old:
        raise TranscriptVersionError(
            f"{path}: recorded by an older m2m ({old[0]}); this version replays transcripts of its own session "
            f"schema (m2m.plan.session-result v{SessionResult.version}): record the session again with `m2m plan`"
        )
    return out


@dataclass(frozen=True)
class ReplayStep:
    step: int
    recorded: float
    replayed: float

    @property
    def matches(self) -> bool:
        return abs(self.recorded - self.replayed) <= SCORE_TOLERANCE


async def replay(
    config: BusConfig,
    recorded: SessionResult,
    *,
    on_step: Callable[[Step, str | None], None] | None = None,
    pause: Callable[[int], Awaitable[None]] | None = None,
) -> list[ReplayStep]:
    """Re-drive a recorded session (see the module docstring); one comparison per step both have. ``pause(step)``
    runs before each decision (``m2m replay --speed``/``--step`` slow the replay down for demos)."""
    h = recorded.header
    by_step = {s.step: s for s in recorded.steps}
    req = SessionRequest(
        session_id=new_session_id(), scenario=h.scenario, case_seed=h.case_seed, mode=h.mode, step_cap=h.step_cap,
        with_advice=False, initial_tpps=dict(recorded.steps[0].tpps),
    )
    async with BusClient(f"replay-{os.getpid()}", config) as bus:
        decider = ReplayDecider(by_step, recorded.planners, pause)
        runner = SessionRunner(bus, decider, "replay", on_step=on_step)
        if h.mode == "guided" or decider.needs_knowledge:
            runner.follow_knowledge()
        try:
            result = await runner.run(req)
        finally:
            runner.stop_following()
    return [ReplayStep(s.step, by_step[s.step].score, s.score) for s in result.steps if s.step in by_step]
