"""The planner agent (``plan.session``): one autonomous planning session per request, no human in the loop.

Loop: dose engine (``dose.plan``) → evaluator (``plan.evaluate``) → stop at the protocol's maximum or the step
cap → else [guided: the DRL's advice, ``drl.advise``] → a decision → the guard → the next TPPs. After every step
the session's state is published retained on ``takeover.<id>`` (:class:`SessionState`, read by a planner taking
over the session after a swap or a crash) and the step on ``session.<id>`` (:class:`StepEvent`, live progress);
before each request and before the decision the phase of the step (:class:`StepPhase`: planning, scoring, advising,
deciding) goes on ``session.<id>`` too. The reply (:class:`SessionResult`) carries every :class:`Step`, so the
record never depends on an event.

A stopping planner (SIGTERM: a swap, ``m2m down``) does not finish the step in progress: it cancels it — a decision
in flight included; a model computing in a worker thread is left to finish on its own, and the process exits
without waiting for it — and hands the session over (:class:`HandOver`): another planner resumes from the last
published state, redoing that step (its dose and evaluation requests are answered from the reply cache).

Three implementations share the loop and the guard and differ only in who proposes the step:

* ``llm`` — an autogen-agentchat ``AssistantAgent`` with structured output (:mod:`m2m.agents.llm.decision`) on an
  embedded llama.cpp model, an OpenAI-compatible endpoint or a replay of recorded answers;
* ``drl`` — the DRL advisor's best admissible action;
* ``rules`` — a rule-based planner (a baseline): tighten the structure of the worst failing criterion, escalating
  to the next TPP of that structure when the same step just failed to raise the score.

Modes: ``unguided`` (DVH, criteria, TPPs) and ``guided`` (the same plus the knowledge this agent subscribed to on
``knowledge.tpp.<site>``, which also constrains the guard). Nothing else differs between the modes.

Exactly-once steps: every dose/evaluation request carries the idempotency key ``<session>:<step>:…``, so a step
redone after a takeover is answered from the broker's reply cache instead of being planned twice. A nested call that
fails with a retryable error (:data:`NESTED_RETRYABLE`: a lost worker or broker, no worker yet, a deadline) is sent
again with the same key until its budget (:data:`DOSE_TIMEOUT_S`, :data:`EVALUATE_TIMEOUT_S`,
:data:`ADVISE_TIMEOUT_S`) is spent.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import msgspec
import structlog

from m2m.agents.drl.knowledge import TppKnowledge, decode_knowledge, relabel_knowledge
from m2m.agents.llm.answer import FORMS, Answer, Change, DecisionForm
from m2m.agents.llm.decision import DecisionOutcome, decide
from m2m.agents.llm.guard import GuardResult, guard, refusal, rule_vetoes, stalled_move, tightening_moves
from m2m.agents.llm.situation import AdviceView, CriterionView, Mode, Situation, StepView, knowledge_value
from m2m.agents.messages import (
    ADVISE,
    DOSE_PLAN,
    EVALUATE,
    SESSION,
    Advice,
    AdviseRequest,
    Decision,
    DosePlanRequest,
    DosePlanResult,
    EvaluateRequest,
    Evaluation,
    HistoryEntry,
    KnowledgeMessage,
    Outcome,
    PhaseName,
    Proposal,
    SessionHeader,
    SessionRequest,
    SessionResult,
    SessionState,
    Step,
    StepEvent,
    StepPhase,
    ValueChange,
    knowledge_topic,
    session_topic,
    takeover_topic,
)
from m2m.agents.runtime import Agent, AgentConfigError
from m2m.bus.client import BusClient
from m2m.bus.errors import BrokerUnavailable, BusError, RequestTimeout, ServiceUnavailable, WorkerLost
from m2m.bus.worker import Handlers, RequestContext
from m2m.physics.protocol import SCORE_TOLERANCE
from m2m.physics.tpp import Direction, Move, TppSet, clamp_value
from m2m.scenarios import Scenario, load_scenario

if TYPE_CHECKING:
    from m2m.agents.llm.clients import ModelClientSpec

log = structlog.get_logger("planner")

HISTORY_STEPS = 3
"""Past steps shown to the LLM: the context stays bounded whatever the step cap."""
DOSE_TIMEOUT_S = 600.0
"""A cold 180-beam plan takes minutes on 2 cores; a 7-beam plan well under a second."""
EVALUATE_TIMEOUT_S = 60.0
"""Scoring takes microseconds; the budget covers a lost evaluator's replacement and a restarting broker."""
ADVISE_TIMEOUT_S = 60.0
KNOWLEDGE_WAIT_S = 30.0
RETRY_PAUSE_S = 0.5
"""Pause before a nested call (dose, evaluate, advise) is sent again after a retryable error (s; doubled up to
:data:`RETRY_PAUSE_MAX_S` per retry, always within the call's budget)."""
RETRY_PAUSE_MAX_S = 4.0
NESTED_RETRYABLE: tuple[type[BusError], ...] = (WorkerLost, RequestTimeout, ServiceUnavailable, BrokerUnavailable)
"""Errors of a nested call that the planner retries with the same idempotency key while the call's budget lasts."""
KNOWLEDGE_RETRY_WARN_S = 10.0
"""How often a knowledge follower that has no broker to subscribe through says so (s)."""
ADVICE_K = 5
DEFAULT_FORM: DecisionForm = "quantile"
"""The ``llm`` planner's default decision form (``decision`` option); in the unguided mode, which has no knowledge
to choose from, a ``quantile`` planner asks in the ``values`` form (:func:`m2m.agents.llm.decision.form_for`)."""
MEDIAN = "p50"
"""The knowledge point the ``knowledge`` baseline sets every TPP to."""


class HandOver(WorkerLost):
    """Raised by a draining planner: the client retries and another planner resumes the session."""


class Decider(Protocol):
    """Who proposes the next step. ``needs_advice``: it reads the DRL's advice in either mode; ``needs_knowledge``:
    it reads the knowledge in either mode (the guard still follows the session's mode)."""

    name: str
    needs_advice: bool
    needs_knowledge: bool

    async def decide(self, situation: Situation, mode: Mode, with_advice: bool,
                     refuse: Callable[[Answer], str] | None) -> DecisionOutcome: ...


def _own(answer: Answer, started: float) -> DecisionOutcome:
    """A rule-made (not model-made) decision outcome for ``answer``."""
    return DecisionOutcome(raw=answer, valid=True, retries=0, error="", latency_s=time.perf_counter() - started,
                           prompt="", form=answer.form)


@dataclass
class LlmDecider:
    """The LLM proposes (through :func:`m2m.agents.llm.decision.decide`) in decision ``form``; a proposal the guard
    refuses gets one feedback turn."""

    client: Any
    form: DecisionForm = DEFAULT_FORM
    name: str = "llm"
    needs_advice: bool = False
    needs_knowledge: bool = False

    async def decide(self, situation: Situation, mode: Mode, with_advice: bool,
                     refuse: Callable[[Answer], str] | None) -> DecisionOutcome:
        return await decide(self.client, situation, mode, with_advice=with_advice, form=self.form, refuse=refuse)


@dataclass
class DrlDecider:
    """The DRL's best admissible action is the proposal."""

    name: str = "drl"
    needs_advice: bool = True
    needs_knowledge: bool = False

    async def decide(self, situation: Situation, mode: Mode, with_advice: bool,
                     refuse: Callable[[Answer], str] | None) -> DecisionOutcome:
        started = time.perf_counter()
        if not situation.advice:
            return DecisionOutcome(raw=None, valid=False, retries=0, error="no DRL advice", latency_s=0.0, prompt="")
        best = situation.advice[0]
        move = Move(best.tpp, Direction(best.direction))
        return _own(Answer.of_move(situation.tpps, move, f"DRL top action (p={best.probability:.2f})"), started)


@dataclass
class RulesDecider:
    """A rule-based planner, the baseline a physicist would script: take the failing criteria worst first and, for
    the structure of each, the guard's tightening moves in their documented order (OAR: raise ``lambda``, lower
    ``t``, raise ``v``; PTV hot spot: lower ``t_ptv``, raise ``v_ptv``, raise ``lambda_ptv``). The first move that
    is inside the valid ranges and was not just made without raising the score is the proposal."""

    name: str = "rules"
    needs_advice: bool = False
    needs_knowledge: bool = False

    async def decide(self, situation: Situation, mode: Mode, with_advice: bool,
                     refuse: Callable[[Answer], str] | None) -> DecisionOutcome:
        started = time.perf_counter()
        stalled = stalled_move(situation)
        moves = [m for m in tightening_moves(situation) if not rule_vetoes(situation, *m, "unguided", ())]
        chosen = next((m for m in moves if m != stalled), moves[0] if moves else None)
        if chosen is None:
            return _own(Answer.of_stop("step", "no tightening move is in range"), started)
        escalated = chosen != moves[0]
        rationale = ("tighten for the worst failing criterion"
                     + ("; the previous step did not raise the score" if escalated else ""))
        return _own(Answer.of_move(situation.tpps, Move(chosen[0], Direction(chosen[1])), rationale), started)


@dataclass
class KnowledgeDecider:
    """The ``knowledge`` baseline, no LLM: at the first step of a session set every TPP to the knowledge's median
    for its role (through the role map), then continue as :class:`RulesDecider`. It shows what the knowledge alone
    does, so that what the LLM adds over it can be measured."""

    name: str = "knowledge"
    needs_advice: bool = False
    needs_knowledge: bool = True
    rules: RulesDecider = field(default_factory=RulesDecider)

    async def decide(self, situation: Situation, mode: Mode, with_advice: bool,
                     refuse: Callable[[Answer], str] | None) -> DecisionOutcome:
        started = time.perf_counter()
        if not situation.history and not situation.at_max:
            changes = tuple(
                Change(tpp, situation.tpps[tpp], after, target=MEDIAN)
                for tpp in situation.tpps
                if (value := knowledge_value(situation, tpp, MEDIAN)) is not None
                and Change(tpp, situation.tpps[tpp], after := clamp_value(tpp, value)).direction != 0
            )
            if changes:
                return _own(Answer("quantile", False, changes, None, "every TPP to the knowledge median"), started)
        return await self.rules.decide(situation, mode, with_advice, refuse)


def situation_from(
    scenario: Scenario,
    step: int,
    step_cap: int,
    plan: DosePlanResult,
    evaluation: Evaluation,
    history: list[HistoryEntry],
    knowledge: TppKnowledge | None,
    advice: Advice | None,
    knowledge_site: str | None = None,
) -> Situation:
    """What the decision sees at one step (doses in % of Rx); ``knowledge_site``: where ``knowledge`` was learned."""
    rx = plan.rx_gy
    return Situation(
        scenario=scenario,
        step=step,
        step_cap=step_cap,
        score=evaluation.total,
        max_score=evaluation.max_score,
        criteria=tuple(
            CriterionView(label=c.label, structure=c.structure, value=c.value, limit=c.limit, unit=c.unit,
                          points=c.points, passed=c.passed, upper=c.zero > c.limit, metric=c.metric)
            for c in evaluation.criteria
        ),
        tpps=dict(plan.tpps),
        dose_summary={
            s.name: {"dmax_pct_rx": 100 * s.dmax_gy / rx, "dmean_pct_rx": 100 * s.dmean_gy / rx,
                     "d95_pct_rx": 100 * s.d95_gy / rx}
            # the scored structures only: the dose engine also reports the case's other OARs (for the DVHs)
            for s in plan.structures if s.name in scenario.protocol.structures
        },
        history=tuple(StepView(step=h.step, move=h.move, score=h.score, changes=tuple(h.changes))
                      for h in history[-HISTORY_STEPS:]),
        knowledge=knowledge,
        knowledge_site=knowledge_site,
        advice=tuple(AdviceView(tpp=a.move.tpp, direction=int(a.move.direction), probability=a.probability)
                     for a in (advice.actions if advice else [])),
    )


@dataclass
class SessionRunner:
    """Runs sessions over a bus connection; used by the planner agent and, in-process, by ``m2m replay``."""

    bus: BusClient
    decider: Decider
    planner_name: str
    knowledge: dict[str, TppKnowledge] = field(default_factory=dict)
    knowledge_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    handover: bool = False
    on_step: Callable[[Step, str | None], None] | None = None
    """Called in this process after each step (``m2m replay`` shows progress with it)."""
    on_phase: Callable[[StepPhase], None] | None = None
    """Called in this process when a phase of a step begins (``m2m replay`` shows progress with it)."""
    _listener: asyncio.Task[None] | None = None
    _sessions: set[asyncio.Task[SessionResult]] = field(default_factory=set)

    def stop_sessions(self) -> None:
        """Hand every session in progress over at once (a stopping planner): the step in progress is cancelled —
        a decision in flight too, without waiting for a model computing in a thread — and the session's client
        gets :class:`HandOver`; another planner resumes from the last published state."""
        self.handover = True
        for task in list(self._sessions):
            task.cancel()

    def follow_knowledge(self) -> None:
        """Subscribe to every site's knowledge (the retained value arrives at once) and keep the latest. Without a
        broker yet (a planner started first) the subscription is tried again until one answers, with a warning every
        :data:`KNOWLEDGE_RETRY_WARN_S` s; a value that does not decode is skipped with a warning."""
        sub = self.bus.subscribe("knowledge.tpp.", snapshot=True)

        async def listen() -> None:
            waiting_since = time.monotonic()
            warned = 0.0
            while True:
                try:
                    async for delivery in sub:
                        self._on_knowledge(delivery.topic, delivery.message)
                    return  # the subscription was closed: the planner is stopping
                except (TimeoutError, BusError) as exc:  # no broker (yet), or one restarting: subscribe again
                    waited = time.monotonic() - waiting_since
                    if not self.knowledge and waited - warned >= KNOWLEDGE_RETRY_WARN_S:
                        warned = waited
                        log.warning("knowledge_waiting_for_broker", waited_s=round(waited, 1),
                                    error=f"{type(exc).__name__}: {exc}"[:200])
                    await asyncio.sleep(self.bus.cfg.heartbeat)

        self._listener = asyncio.get_running_loop().create_task(listen())

    def _on_knowledge(self, topic: str, msg: object) -> None:
        if not isinstance(msg, KnowledgeMessage):
            return
        try:
            self.knowledge[msg.site] = decode_knowledge(msg.knowledge_json, topic)
        except (ValueError, msgspec.DecodeError, BusError) as exc:
            log.warning("bad_knowledge", topic=topic, error=str(exc)[:200])
            return
        self.knowledge_arrived.set()
        log.info("knowledge_received", site=msg.site, checkpoint=msg.checkpoint_sha256[:12])

    async def _call(self, service: str, msg: Any, *, budget_s: float, key: str, expect: type[Any], sid: str) -> Any:
        """A nested request, retried with the same idempotency key on a retryable error (:data:`NESTED_RETRYABLE`)
        until ``budget_s`` seconds are spent; the last error is raised then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        pause = RETRY_PAUSE_S
        while True:
            try:
                return await self.bus.request(service, msg, timeout=max(deadline - loop.time(), RETRY_PAUSE_S),
                                              idempotency_key=key, expect=expect, session=sid)
            except NESTED_RETRYABLE as exc:
                remaining = deadline - loop.time()
                if remaining <= pause:
                    raise
                log.warning("nested_call_retry", session=sid, service=service, key=key, error=type(exc).__name__,
                            remaining_s=round(remaining, 1))
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE_MAX_S)

    def stop_following(self) -> None:
        if self._listener is not None:
            self._listener.cancel()

    async def last_state(self, session_id: str) -> SessionState | None:
        """The session's retained state on the bus (None for a new session)."""
        topic = takeover_topic(session_id)
        retained = await self.bus.retained(topic)
        msg = retained.get(topic)
        return msg if isinstance(msg, SessionState) and msg.header.session_id == session_id else None

    async def _knowledge_for(self, site: str) -> tuple[str, TppKnowledge]:
        """The site and knowledge published for ``site``; for a site without its own, another site's (it is written
        in site-agnostic roles, as the paper guided liver with prostate knowledge)."""
        deadline = time.monotonic() + KNOWLEDGE_WAIT_S
        while not self.knowledge:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LookupError(f"no knowledge on {knowledge_topic(site)!r}: is a drl-advisor running?")
            self.knowledge_arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.knowledge_arrived.wait(), remaining)
        if site in self.knowledge:
            return site, self.knowledge[site]
        other = sorted(self.knowledge)[0]
        log.info("cross_site_knowledge", site=site, knowledge_site=other)
        return other, self.knowledge[other]

    async def run(self, req: SessionRequest) -> SessionResult:
        """Run (or resume) the session ``req``; :class:`HandOver` when :meth:`stop_sessions` cut it short."""
        body = asyncio.get_running_loop().create_task(self._run(req))
        self._sessions.add(body)
        try:
            return await body
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if body.cancelled() and self.handover and (me is None or not me.cancelling()):
                raise HandOver(f"planner {self.planner_name} is stopping: session {req.session_id} "
                               "continues elsewhere") from None
            raise
        finally:
            self._sessions.discard(body)

    async def _phase(self, sid: str, step: int, phase: PhaseName, evaluation: Evaluation | None = None) -> None:
        """Publish the phase a step enters (progress only: a failed publish is logged, never fatal)."""
        msg = StepPhase(
            session_id=sid, step=step, phase=phase, started_at=time.time(), decider=self.decider.name,
            score=evaluation.total if evaluation is not None else None,
            max_score=evaluation.max_score if evaluation is not None else None,
            failing=[c.label for c in evaluation.criteria if not c.passed] if evaluation is not None else [],
        )
        if self.on_phase is not None:
            self.on_phase(msg)
        try:
            await self.bus.publish(session_topic(sid), msg, session=sid)
        except BusError as exc:
            log.warning("phase_not_published", session=sid, step=step, phase=phase, error=str(exc)[:200])

    async def _run(self, req: SessionRequest) -> SessionResult:
        if req.step_cap < 0:
            raise ValueError(f"step_cap must be >= 0, got {req.step_cap}")
        sc = load_scenario(req.scenario)
        sid = req.session_id
        started = time.perf_counter()
        state = await self.last_state(sid)
        if state is not None and state.outcome is not None:
            log.info("session_already_done", session=sid)
            return self._result(state, started)
        if state is not None:
            log.info("session_resumed", session=sid, step=len(state.steps), previous_planner=state.header.planner)
            header = msgspec.structs.replace(state.header, planner=self.planner_name)
            state = msgspec.structs.replace(state, header=header,
                                            planners=sorted({*state.planners, self.planner_name}))
            step, tpps, warm = len(state.steps), dict(state.next_tpps), state.fluence
        else:
            step, warm = 0, None
            tpps = dict(req.initial_tpps) if req.initial_tpps else sc.initial_tpp_set(req.case_seed).as_dict()
        while True:
            t0 = time.perf_counter()
            await self._phase(sid, step, "planning")
            plan: DosePlanResult = await self._call(
                DOSE_PLAN, DosePlanRequest(scenario=req.scenario, case_seed=req.case_seed, tpps=tpps, warm_start=warm),
                budget_s=DOSE_TIMEOUT_S, key=f"{sid}:{step}:dose", expect=DosePlanResult, sid=sid,
            )
            await self._phase(sid, step, "scoring")
            evaluation: Evaluation = await self._call(
                EVALUATE, EvaluateRequest(protocol=sc.protocol.name, metrics=plan.metrics, scenario=sc.name),
                budget_s=EVALUATE_TIMEOUT_S, key=f"{sid}:{step}:evaluate", expect=Evaluation, sid=sid,
            )
            plan_s = time.perf_counter() - t0
            if state is None:
                header = SessionHeader(session_id=sid, scenario=req.scenario, case_id=plan.case_id,
                                       case_seed=req.case_seed, mode=req.mode, step_cap=req.step_cap,
                                       planner=self.planner_name, rx_gy=plan.rx_gy)
                state = SessionState(header=header, steps=[], initial_score=evaluation.total, next_tpps={},
                                     fluence=None, history=[], dvh_bins_gy=plan.dvh_bins_gy,
                                     initial_structures=plan.structures, final_structures=plan.structures,
                                     planners=[self.planner_name])
            record = Step(step=step, score=evaluation.total, max_score=evaluation.max_score, tpps=dict(plan.tpps),
                          failing=list(evaluation.failing), criteria=list(evaluation.criteria), plan_s=plan_s)
            at_max = evaluation.total >= evaluation.max_score - SCORE_TOLERANCE
            if at_max or step >= req.step_cap:
                outcome = Outcome.MAXIMUM_SCORE if at_max else Outcome.STEP_CAP
                return await self._finish(state, record, plan, outcome, started)
            knowledge, knowledge_site = None, None
            if req.mode == "guided" or self.decider.needs_knowledge:
                knowledge_site, learned = await self._knowledge_for(sc.site)
                knowledge = relabel_knowledge(learned, sc.roles)
            advice = None
            if req.mode == "guided" or self.decider.needs_advice:
                await self._phase(sid, step, "advising", evaluation)
                advice = await self._call(
                    ADVISE, AdviseRequest(scenario=req.scenario, tpps=plan.tpps, dvh_bins_gy=plan.dvh_bins_gy,
                                          structures=plan.structures, k=ADVICE_K),
                    budget_s=ADVISE_TIMEOUT_S, key=f"{sid}:{step}:advise", expect=Advice, sid=sid,
                )
            situation = situation_from(sc, step, req.step_cap, plan, evaluation, state.history, knowledge, advice,
                                       knowledge_site)
            await self._phase(sid, step, "deciding", evaluation)
            mode = req.mode

            def refuse(answer: Answer, situation: Situation = situation, mode: Mode = mode) -> str:
                return refusal(situation, answer, mode, sc.oar_names)

            outcome_ = await self.decider.decide(situation, mode, req.with_advice and mode == "guided", refuse)
            guarded: GuardResult = guard(situation, outcome_.raw, mode, sc.oar_names, first=outcome_.first)
            decision = decision_record(outcome_, guarded)
            record = msgspec.structs.replace(record, decision=decision)
            if guarded.stop:  # no admissible move at all (every TPP at the bound it would move to)
                return await self._finish(state, record, plan, Outcome.NO_ADMISSIBLE_ACTION, started)
            next_tpps = dict(plan.tpps) | {c.tpp: c.after for c in guarded.changes}
            TppSet.from_dict(next_tpps, sc.oar_names)  # every value in its valid range (raises TppRangeError)
            history = [*state.history, HistoryEntry(step=step, move=guarded.move, score=evaluation.total,
                                                    changes=decision.changes)]
            state = msgspec.structs.replace(state, steps=[*state.steps, record], next_tpps=next_tpps,
                                            fluence=plan.fluence, history=history[-HISTORY_STEPS:],
                                            final_structures=plan.structures)
            await self._publish(state, record, None)
            log.info("session_step", session=sid, step=step, score=evaluation.total, action=guarded.words(),
                     source=guarded.source, vetoes=len(guarded.vetoes))
            step, tpps, warm = step + 1, next_tpps, plan.fluence
            if self.handover:
                raise HandOver(f"planner {self.planner_name} is stopping: session {sid} continues elsewhere")

    async def _finish(self, state: SessionState, record: Step, plan: DosePlanResult, outcome: Outcome,
                      started: float) -> SessionResult:
        """Record the last step, publish the ended state (a later request for the session gets the same result)
        and answer."""
        state = msgspec.structs.replace(state, steps=[*state.steps, record], outcome=outcome, fluence=plan.fluence,
                                        final_structures=plan.structures)
        await self._publish(state, record, outcome)
        return self._result(state, started)

    async def _publish(self, state: SessionState, record: Step, outcome: Outcome | None) -> None:
        sid = state.header.session_id
        await self.bus.publish(takeover_topic(sid), state, retain=True, session=sid)
        event = StepEvent(header=state.header, record=record, initial_score=state.initial_score, outcome=outcome)
        await self.bus.publish(session_topic(sid), event, session=sid)
        if self.on_step is not None:
            self.on_step(record, str(outcome) if outcome is not None else None)

    def _result(self, state: SessionState, started: float) -> SessionResult:
        return session_result(state, time.perf_counter() - started)


def session_result(state: SessionState, wall_s: float) -> SessionResult:
    """The :class:`SessionResult` of an ended session's state (``outcome`` set; also a client's record of an
    interrupted session, whose state it read from ``takeover.<id>``)."""
    if state.outcome is None:
        raise ValueError("a session result needs an ended session")
    decisions = [s.decision for s in state.steps if s.decision is not None]
    last = state.steps[-1]
    return SessionResult(
        header=state.header, outcome=state.outcome, steps=state.steps, initial_score=state.initial_score,
        final_score=last.score, max_score=last.max_score, dvh_bins_gy=state.dvh_bins_gy,
        initial_structures=state.initial_structures, final_structures=state.final_structures,
        invalid_answers=sum(not d.valid for d in decisions), vetoes=sum(len(d.vetoes) for d in decisions),
        fallbacks=sum(d.source == "safe" for d in decisions), planners=state.planners, wall_s=wall_s,
        final_fluence=state.fluence,
    )


def _proposal(answer: Answer | None) -> Proposal | None:
    if answer is None:
        return None
    return Proposal(action="stop" if answer.stop else "change", move=answer.move, rationale=answer.rationale,
                    changes=_value_changes(answer.changes), form=answer.form)


def _value_changes(changes: tuple[Change, ...]) -> list[ValueChange]:
    return list(changes)


def decision_record(outcome: DecisionOutcome, guarded: GuardResult) -> Decision:
    """The :class:`Decision` of one step from what the decider answered and what the guard made of it."""
    return Decision(
        proposal=_proposal(outcome.proposal), retry=_proposal(outcome.retry), action=guarded.move,
        changes=_value_changes(guarded.changes), source=guarded.source, vetoes=list(guarded.vetoes),
        valid=outcome.valid, retries=outcome.retries, error=outcome.error, answers=list(outcome.answers),
        decision_s=outcome.latency_s, form=outcome.form,
    )


class _PlannerAgent(Agent, abc.ABC):
    """The planner agent: serves ``plan.session`` and keeps the knowledge it subscribed to."""

    @abc.abstractmethod
    def make_decider(self) -> Decider:
        """Who proposes each step (the implementation's one difference); may block (it runs in a thread)."""

    def setup_detail(self) -> str:
        """What :meth:`make_decider` is doing, announced with the ``starting`` state ("" for nothing slow)."""
        return ""

    async def setup(self) -> None:
        if detail := self.setup_detail():
            await self.report_setup(detail)
        # In a thread, so that a SIGTERM during a long model load stops the agent at once.
        decider = await asyncio.to_thread(self.make_decider)
        self.runner = SessionRunner(self.bus, decider, f"{self.ctx.impl}:{self.ctx.name}")
        self.runner.follow_knowledge()

    def handlers(self) -> dict[str, Handlers]:
        return {SESSION: {SessionRequest: self.on_session}}

    async def on_session(self, msg: SessionRequest, ctx: RequestContext) -> SessionResult:
        return await self.runner.run(msg)

    def begin_drain(self) -> None:
        self.runner.stop_sessions()

    async def close(self) -> None:
        self.runner.stop_following()


REQUEST_FORMATS = ("json_schema", "json_object_schema")
"""The values of the ``llm`` planner's ``request_format`` option (``m2m.agents.llm.clients.RequestFormat``)."""


def client_spec_from_options(options: Mapping[str, str], agent: str = "planner/llm") -> ModelClientSpec:
    """The model client an ``llm`` planner's options describe (``model=embedded`` by default); a value it cannot
    use raises :class:`AgentConfigError` naming ``agent``, the option and what is allowed. Cheap: it loads no
    model and opens no file (:meth:`LlmPlannerAgent.check_options` runs it when a stack config is read)."""
    from m2m.agents.llm.clients import ModelClientSpec
    from m2m.agents.llm.models import REGISTRY

    kind = options.get("model", "embedded")
    if kind not in ("embedded", "openai", "replay"):
        raise AgentConfigError(f"{agent}: option model must be embedded, openai or replay, got {kind!r}",
                               option="model")
    if kind == "replay" and "replay" not in options:
        raise AgentConfigError(f"{agent}: model=replay needs replay=FILE (a JSON array of recorded answers)",
                               option="replay")
    if kind == "openai" and "base_url" not in options:
        raise AgentConfigError(f"{agent}: model=openai needs base_url=URL (and model_name=, api_key_env= as the "
                               "server wants)", option="base_url")
    if kind == "embedded" and "model_name" in options and options["model_name"] not in REGISTRY:
        raise AgentConfigError(f"{agent}: option model_name of model=embedded must be one of {sorted(REGISTRY)}, "
                               f"got {options['model_name']!r}", option="model_name")
    if options.get("request_format", REQUEST_FORMATS[0]) not in REQUEST_FORMATS:
        raise AgentConfigError(f"{agent}: option request_format must be one of {list(REQUEST_FORMATS)}, got "
                               f"{options['request_format']!r}", option="request_format")
    kw: dict[str, Any] = {"kind": kind}
    if "replay_delay" in options:
        try:
            delay = float(options["replay_delay"])
        except ValueError:
            delay = -1.0
        if kind != "replay" or not 0 <= delay < float("inf"):
            raise AgentConfigError(f"{agent}: replay_delay must be seconds >= 0 with model=replay, got "
                                   f"{options['replay_delay']!r} with model={kind}", option="replay_delay")
        kw["replay_delay_s"] = delay
    if "model_name" in options:
        kw["model"] = options["model_name"]
    for key in ("base_url", "api_key_env", "request_format"):
        if key in options:
            kw[key] = options[key]
    if "replay" in options:
        kw["replay_path"] = Path(options["replay"])
    return ModelClientSpec(**kw)


def decision_form(options: Mapping[str, str], agent: str = "planner/llm") -> DecisionForm:
    """The ``llm`` planner's ``decision`` option (default :data:`DEFAULT_FORM`); another value raises
    :class:`AgentConfigError` naming ``agent``, the option and the forms."""
    form = options.get("decision", DEFAULT_FORM)
    if form not in FORMS:
        raise AgentConfigError(f"{agent}: option decision must be one of {', '.join(FORMS)}, got {form!r}",
                               option="decision")
    return form


def replay_client(answers: list[str]) -> Any:
    """autogen's replay model client answering with ``answers`` in order (recorded raw LLM texts)."""
    from m2m.agents.llm.clients import ModelClientSpec, make_client

    return make_client(ModelClientSpec(kind="replay", replay_answers=tuple(answers)))


class LlmPlannerAgent(_PlannerAgent):
    """Options: ``decision`` (the decision form: ``step``, ``values`` or ``quantile``, default
    :data:`DEFAULT_FORM`), ``model`` (``embedded``, ``openai`` or ``replay``), ``model_name``, ``base_url``,
    ``api_key_env``, ``request_format``, ``replay`` (a file of recorded answers), ``replay_delay`` (seconds each
    replayed answer takes, computed in a worker thread as the embedded model's are: demos and tests of progress
    and interruption)."""

    known_options: ClassVar[frozenset[str]] = frozenset(
        {"model", "model_name", "base_url", "api_key_env", "request_format", "replay", "replay_delay", "decision"}
    )

    @classmethod
    def check_options(cls, agent: str, options: Mapping[str, str]) -> None:
        super().check_options(agent, options)
        client_spec_from_options(options, agent)
        decision_form(options, agent)

    def setup_detail(self) -> str:
        spec = client_spec_from_options(dict(self.ctx.options), f"{self.ctx.role}/{self.ctx.impl}")
        return (f"loading the model {spec.model} and reading the planner's instructions" if spec.kind == "embedded"
                else "")

    def make_decider(self) -> Decider:
        from m2m.agents.llm.clients import make_client, warm_up

        spec = client_spec_from_options(dict(self.ctx.options), f"{self.ctx.role}/{self.ctx.impl}")
        form = decision_form(dict(self.ctx.options), f"{self.ctx.role}/{self.ctx.impl}")
        client = make_client(spec)
        seconds = warm_up(client)  # the system text's KV cache, ready before the first decision
        if seconds:
            log.info("llm_prefix_warmed", seconds=round(seconds, 2))
        return LlmDecider(client, form=form, name=f"llm:{spec.kind}")


class DrlPlannerAgent(_PlannerAgent):
    """The DRL's best admissible action at every step (a baseline and a swap target)."""

    def make_decider(self) -> Decider:
        return DrlDecider()


class RulesPlannerAgent(_PlannerAgent):
    """The rule-based baseline (:class:`RulesDecider`)."""

    def make_decider(self) -> Decider:
        return RulesDecider()


class KnowledgePlannerAgent(_PlannerAgent):
    """The knowledge baseline (:class:`KnowledgeDecider`): every TPP to the knowledge median, then the rules."""

    def make_decider(self) -> Decider:
        return KnowledgeDecider()
