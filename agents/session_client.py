"""The client side of a planning session on the bus: ``m2m plan --mode …`` and ``m2m replay``.

:func:`plan_on_bus` asks the running stack's planner for one session (``plan.session``), shows every step as it is
published on ``session.<id>``, then writes the session folder: the session's slice of the bus transcript
(``transcript.m2mt``), DVH of the first vs the final plan, score vs step, TPP trajectories, ``final.json``.

:func:`replay` re-drives a recorded session: the planner's recorded decisions (the LLM's raw answers, or the
DRL's action) are replayed in this process — the LLM's through autogen's replay model client — against the live
dose engine, evaluator and advisor, and every step's score is compared with the recording.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from m2m.agents.llm.decision import DecisionOutcome, decide
from m2m.agents.llm.situation import Situation
from m2m.agents.messages import SESSION, SessionRequest, SessionResult, StepEvent, new_session_id, session_topic
from m2m.agents.planner import DrlDecider, SessionRunner, replay_client
from m2m.agents.session_report import StepRecord, write_session_folder
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import BusError
from m2m.bus.transcript import TranscriptWriter, filter_records, read_transcript

SESSION_TIMEOUT_S = 3600.0
"""A session of 20 steps on the embedded model on 2 cores takes minutes; 180-beam plans take longer."""


def step_line(e: StepEvent) -> str:
    """One progress line: score, failing criteria and the step taken (raw proposal and guard)."""
    failing = [c.label for c in e.criteria if not c.passed]
    text = f"step {e.step:>2}  score {e.score:5.2f}/{e.max_score:g}  failing {len(failing)}"
    if e.done:
        return f"{text}  → {e.outcome}"
    change = f"{'raise' if e.action_direction > 0 else 'lower'} {e.action_tpp}"
    raw = f"{e.raw_direction} {e.raw_tpp}" if e.raw_tpp else e.raw_action or "invalid answer"
    veto = f"  vetoed [{'; '.join(v.reason for v in e.vetoes)}]" if e.vetoes else ""
    return f"{text}  → {change} ({e.action_source}; proposed {raw}){veto}  [{e.decision_s:.1f} s decision]"


def step_records(events: list[StepEvent]) -> list[StepRecord]:
    return [
        StepRecord(
            step=e.step, score=e.score, max_score=e.max_score, tpps=dict(e.tpps),
            failing=tuple(c.label for c in e.criteria if not c.passed),
            action="" if i == 0 else _change(events[i - 1]), rationale="" if i == 0 else events[i - 1].rationale,
            extra={"plan_s": e.plan_s, "decision_s": e.decision_s},
        )
        for i, e in enumerate(events)
    ]


def _change(e: StepEvent) -> str:
    return f"{'raise' if e.action_direction > 0 else 'lower'} {e.action_tpp} ({e.action_source})"


def write_bus_session_folder(folder: Path, events: list[StepEvent], transcript: Path | None) -> dict[str, Path]:
    """The session folder from its step events (and the bus transcript, when the stack records one)."""
    folder.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Path] = {}
    if transcript is not None and transcript.is_file():
        extra["transcript"] = copy_session_transcript(transcript, events[0].session_id, folder / "transcript.m2mt")
    first, last = events[0], events[-1]
    rx = _rx_of(first)
    return write_session_folder(
        folder,
        title=f"{first.case_id} ({first.mode}, {', '.join(sorted({e.planner for e in events}))})",
        steps=step_records(events),
        dvh_bins_gy=np.asarray(first.dvh_bins_gy),
        initial_dvh_pct={s.name: np.asarray(s.dvh_pct) for s in first.structures},
        final_dvh_pct={s.name: np.asarray(s.dvh_pct) for s in last.structures},
        rx_gy=rx,
        extra_files=extra,
    )


def _rx_of(e: StepEvent) -> float:
    from m2m.scenarios import load_scenario

    return load_scenario(e.scenario).rx_gy


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
    config: BusConfig, req: SessionRequest, on_step: Callable[[StepEvent], None]
) -> tuple[SessionResult, list[StepEvent]]:
    """Send ``req`` to ``plan.session`` and collect its step events (one per step, in order)."""
    async with BusClient(f"plan-client-{os.getpid()}", config) as bus:
        events: dict[int, StepEvent] = {}
        sub = bus.subscribe(session_topic(req.session_id), snapshot=False)

        async def collect() -> None:
            async for d in sub:
                if isinstance(d.message, StepEvent) and d.message.step not in events:
                    events[d.message.step] = d.message
                    on_step(d.message)

        collector = asyncio.get_running_loop().create_task(collect())
        await asyncio.sleep(0.2)  # let the SUB socket join before the first step is published
        try:
            result: SessionResult = await bus.request(
                SESSION, req, timeout=SESSION_TIMEOUT_S, retries=0, idempotency_key=req.session_id,
                expect=SessionResult, session=req.session_id,
            )
            deadline = time.monotonic() + 5.0
            while result.steps not in events and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # events may trail the reply by a moment
        finally:
            collector.cancel()
            sub.close()
        missing = [s for s in range(result.steps + 1) if s not in events]
        if missing:  # a best-effort event was lost: the retained state has the last step only
            raise BusError(f"session {req.session_id}: step events {missing} not received")
        return result, [events[s] for s in range(result.steps + 1)]


def session_folder_name(scenario: str, case_id: str, mode: str) -> str:
    return f"{scenario}-{case_id}-{mode}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def print_summary(console: Console, result: SessionResult, events: list[StepEvent]) -> None:
    table = Table(title=f"session {result.session_id}: {result.case_id} · {result.scenario} · {result.mode}")
    for col in ("step", "score", "failing", "proposed (LLM/DRL)", "taken", "vetoes", "decision s"):
        table.add_column(col)
    for e in events:
        table.add_row(
            str(e.step), f"{e.score:.2f}", str(sum(not c.passed for c in e.criteria)),
            "" if e.done else (f"{e.raw_direction} {e.raw_tpp}" if e.raw_tpp else e.raw_action or "—"),
            e.outcome if e.done else _change(e), "; ".join(v.reason for v in e.vetoes), f"{e.decision_s:.1f}",
        )
    console.print(table)
    console.print(
        f"final score {result.final_score:.2f}/{result.max_score:g} after {result.steps} steps "
        f"({'maximum reached' if result.reached_max else 'step cap reached'}) in {result.wall_s:.1f} s; "
        f"invalid answers {result.invalid_answers}, vetoes {result.vetoes}, fallbacks {result.fallbacks}"
    )


# ------------------------------------------------------------------------------------------------ replay
@dataclass
class ReplayDecider:
    """Replays each recorded step's decision: the LLM's raw answers through autogen's replay model client
    (so parsing, retries, fallbacks and the guard run again), or the DRL's action."""

    recorded: dict[int, StepEvent]
    pause: Callable[[int], Awaitable[None]] | None = None
    name: str = "replay"
    needs_advice: bool = False

    def __post_init__(self) -> None:
        self.needs_advice = any(e.planner.startswith("drl") for e in self.recorded.values())

    async def decide(self, situation: Situation, mode: str, with_advice: bool) -> DecisionOutcome:
        if self.pause is not None:
            await self.pause(situation.step)
        event = self.recorded.get(situation.step)
        if event is None:
            raise LookupError(f"the recording has no decision at step {situation.step}")
        if event.planner.startswith("drl"):
            return await DrlDecider().decide(situation, mode, with_advice)
        return await decide(replay_client(list(event.llm_answers)), situation, mode, with_advice=with_advice)


def recorded_sessions(path: Path) -> dict[str, list[StepEvent]]:
    """Step events per session id found in a transcript (a whole bus transcript or a session's own)."""
    out: dict[str, dict[int, StepEvent]] = {}
    for rec in read_transcript(path).records:
        if rec.kind != "event" or not rec.route.startswith("session."):
            continue
        try:
            msg = rec.decode()
        except BusError:
            continue
        if isinstance(msg, StepEvent):
            out.setdefault(msg.session_id, {})[msg.step] = msg
    return {sid: [steps[k] for k in sorted(steps)] for sid, steps in out.items()}


@dataclass(frozen=True)
class ReplayStep:
    step: int
    recorded: float
    replayed: float

    @property
    def matches(self) -> bool:
        return abs(self.recorded - self.replayed) <= 1e-9


async def replay(
    config: BusConfig,
    recorded: list[StepEvent],
    *,
    on_step: Callable[[StepEvent], None] | None = None,
    pause: Callable[[int], Awaitable[None]] | None = None,
) -> list[ReplayStep]:
    """Re-drive a recorded session (see the module docstring); one comparison per recorded step. ``pause(step)``
    runs before each decision (``m2m replay --speed``/``--step`` slow the replay down for demos)."""
    first = recorded[0]
    by_step = {e.step: e for e in recorded}
    req = SessionRequest(
        session_id=new_session_id(), scenario=first.scenario, case_seed=first.case_seed, mode=first.mode,
        step_cap=first.step_cap, with_advice=False, initial_tpps=dict(first.tpps),
    )
    out: list[ReplayStep] = []
    async with BusClient(f"replay-{os.getpid()}", config) as bus:
        runner = SessionRunner(bus, ReplayDecider(by_step, pause), "replay")
        sub = bus.subscribe(session_topic(req.session_id), snapshot=False)

        async def compare() -> None:
            async for d in sub:
                e = d.message
                if isinstance(e, StepEvent) and e.step in by_step and e.step >= len(out):
                    out.append(ReplayStep(e.step, by_step[e.step].score, e.score))
                    if on_step is not None:
                        on_step(e)

        if first.mode == "guided":
            runner.follow_knowledge()
        task = asyncio.get_running_loop().create_task(compare())
        await asyncio.sleep(0.2)
        try:
            await runner.run(req)
            deadline = time.monotonic() + 5.0
            while len(out) < len(recorded) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            sub.close()
            runner.stop_following()
    return out
