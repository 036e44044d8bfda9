"""The typed, versioned messages the four planning agents exchange on the bus (one class per message type).

Services and topics:

* ``dose.plan`` — :class:`DosePlanRequest` → :class:`DosePlanResult` (dose engine);
* ``plan.evaluate`` — :class:`EvaluateRequest` → :class:`Evaluation` (evaluator);
* ``drl.advise`` — :class:`AdviseRequest` → :class:`Advice` (DRL advisor);
* ``plan.session`` — :class:`SessionRequest` → :class:`SessionResult` (planner): the reply carries the whole
  step list, so a client's record never depends on best-effort events;
* ``supervisor.control`` — :class:`StatusRequest` / :class:`SwapRequest` / :class:`DownRequest` (supervisor);
* topics ``knowledge.tpp.<site>`` (retained :class:`KnowledgeMessage`), ``session.<id>`` (:class:`StepPhase`
  before each request and decision of a step, and :class:`StepEvent` after each step: live progress),
  ``takeover.<id>`` (retained :class:`SessionState`: what a planner taking over the
  session resumes from) and ``agents.status.<name>`` (retained :class:`AgentStatus`).

The session vocabulary is typed end to end: a step of a TPP is a :class:`~m2m.physics.tpp.Move`, criteria are keyed
by :attr:`~m2m.physics.protocol.Criterion.id`, and modes, outcomes, action sources, veto reasons and agent states are
enums or Literals. One step schema, :class:`Step`, is used by the bus event, the session reply, the session folder
and the experiment records.

Doses are in Gy, DVH volumes in % of the structure, TPP thresholds ``t`` in fractions of Rx. Requests are
stateless: the warm-start fluence travels in the request, so any dose-engine instance gives the same plan.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Literal, TypeAlias

import msgspec
import numpy as np

from m2m.agents.llm.answer import Change, DecisionForm, changes_words
from m2m.agents.llm.guard import OWN_SOURCES, ActionSource, Veto
from m2m.agents.llm.situation import Mode
from m2m.bus.messages import Message
from m2m.physics.protocol import CriterionId
from m2m.physics.tpp import Direction, Move

DOSE_PLAN = "dose.plan"
EVALUATE = "plan.evaluate"
ADVISE = "drl.advise"
SESSION = "plan.session"
CONTROL = "supervisor.control"


def new_session_id() -> str:
    """A fresh session id (also the idempotency key of the session request)."""
    return uuid.uuid4().hex[:16]


def knowledge_topic(site: str) -> str:
    return f"knowledge.tpp.{site}"


def session_topic(session_id: str) -> str:
    return f"session.{session_id}"


def takeover_topic(session_id: str) -> str:
    return f"takeover.{session_id}"


def status_topic(agent_name: str) -> str:
    return f"agents.status.{agent_name}"


# ------------------------------------------------------------------------------------------------ dose engine
class DosePlanRequest(Message):
    """Optimise case ``case_seed`` of ``scenario`` with ``tpps``; ``warm_start`` is the previous plan's fluence."""

    schema = "m2m.dose.plan-request"
    scenario: str
    case_seed: int
    tpps: dict[str, float]
    warm_start: np.ndarray | None = None


class StructureDose(msgspec.Struct, frozen=True, kw_only=True):
    """One structure's cumulative DVH (% volume at each of the result's ``dvh_bins_gy``) and summary doses."""

    name: str
    dvh_pct: np.ndarray
    dmax_gy: float
    dmean_gy: float
    d95_gy: float


class DosePlanResult(Message):
    """The optimised plan: DVHs, the protocol's metric values (keyed by criterion id, in the criterion's unit),
    the fluence (for the next warm start) and how the solve went."""

    schema = "m2m.dose.plan-result"
    version = 2
    scenario: str
    case_id: str
    case_seed: int
    rx_gy: float
    tpps: dict[str, float]
    dvh_bins_gy: np.ndarray
    structures: list[StructureDose]
    metrics: dict[CriterionId, float]
    fluence: np.ndarray
    solve_s: float
    iterations: int
    engine: str


# ------------------------------------------------------------------------------------------------ evaluator
class EvaluateRequest(Message):
    """Score metric values (criterion id → value) against ``protocol``: a packaged protocol's name, or, with
    ``scenario`` set, the protocol that scenario names (a user scenario's protocol file, found through the
    scenario)."""

    schema = "m2m.plan.evaluate-request"
    version = 2
    protocol: str
    metrics: dict[CriterionId, float]
    scenario: str | None = None


class CriterionResult(msgspec.Struct, frozen=True, kw_only=True):
    """One criterion of a scored plan: ``id`` is its stable key, ``label`` its rendering for people; ``value``,
    ``limit`` and ``zero`` in ``unit``, ``points`` 0..1."""

    id: CriterionId
    label: str
    structure: str
    metric: str
    unit: str
    value: float
    limit: float
    zero: float
    points: float
    passed: bool


class Evaluation(Message):
    schema = "m2m.plan.evaluation"
    version = 2
    protocol: str
    criteria: list[CriterionResult]
    total: float
    max_score: float
    failing: list[CriterionId]


# ------------------------------------------------------------------------------------------------ DRL advisor
class KnowledgeMessage(Message):
    """The DRL advisor's published TPP knowledge: the JSON of :class:`m2m.agents.drl.knowledge.TppKnowledge`
    (kept as its own versioned document so the bus need not know its fields)."""

    schema = "m2m.drl.knowledge"
    site: str
    scenario: str
    checkpoint_sha256: str
    knowledge_json: str


class AdviseRequest(Message):
    """The state the policy sees: the plan's DVHs and Dmax for each controlled structure plus the TPPs."""

    schema = "m2m.drl.advise-request"
    scenario: str
    tpps: dict[str, float]
    dvh_bins_gy: np.ndarray
    structures: list[StructureDose]
    k: int = 3


class AdvisedAction(msgspec.Struct, frozen=True, kw_only=True):
    """One admissible move (it changes the TPPs), its policy probability and Q value."""

    move: Move
    probability: float
    q: float


class Advice(Message):
    schema = "m2m.drl.advice"
    version = 2
    actions: list[AdvisedAction]
    checkpoint_sha256: str


# ------------------------------------------------------------------------------------------------ planner
class Outcome(StrEnum):
    """Why a session ended."""

    MAXIMUM_SCORE = "maximum score"
    STEP_CAP = "step cap"
    NO_ADMISSIBLE_ACTION = "no admissible action"
    INTERRUPTED = "interrupted"
    """The client stopped the session (Ctrl-C): its folder holds the steps done so far. No planner sends it."""


class SessionRequest(Message):
    """Plan ``case_seed`` of ``scenario`` autonomously until the maximum score or ``step_cap`` steps.

    ``mode``: ``"guided"`` (the knowledge is in the LLM's context and guards its proposals) or ``"unguided"``;
    ``with_advice`` also renders the DRL's per-step advice (guided only). ``initial_tpps`` overrides the scenario's
    initial TPPs for the case.
    """

    schema = "m2m.plan.session-request"
    version = 2
    session_id: str
    scenario: str
    case_seed: int
    mode: Mode = "guided"
    step_cap: int = 20
    with_advice: bool = False
    initial_tpps: dict[str, float] | None = None


#: A new value of one TPP on the wire: :class:`~m2m.agents.llm.answer.Change` (``tpp`` from ``before`` to ``after``,
#: ``clamped`` into its valid range, the knowledge ``target`` chosen), the one type the planner, the guard and the
#: records share.
ValueChange: TypeAlias = Change


class Proposal(msgspec.Struct, frozen=True, kw_only=True):
    """The planner's own answer at a step, before the guard: ``change`` or ``stop``, with its ``rationale``.
    A change is ``move`` (one published step, the ``step`` form) or ``changes`` (new values of one to three TPPs,
    the ``values`` and ``quantile`` forms; the values of a quantile answer are the knowledge's). ``form``: the
    decision form it was asked in (:data:`~m2m.agents.llm.decision.DecisionForm`)."""

    action: Literal["change", "stop"]
    move: Move | None = None
    rationale: str = ""
    changes: list[ValueChange] = msgspec.field(default_factory=list)
    form: DecisionForm = "step"

    def words(self) -> str:
        """``"raise t_ptv"``, ``"t_ptv 1.1->1 (p50)"`` or ``"stop"``."""
        if self.action == "stop":
            return "stop"
        return str(self.move) if self.move is not None else changes_words(self.changes) or "change (nothing)"


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The decision taken from a step. ``proposal`` is the planner's own first answer (None: no valid answer,
    ``error`` says why); ``retry`` its second answer after the guard refused the first and told it why (None: no
    feedback retry). ``action`` the published step made after the guard, or ``changes`` the TPP values set (both
    empty: the session stopped; a step also fills ``changes`` with its one new value), ``source`` who chose it and
    ``vetoes`` what the guard refused (of both answers). ``answers`` are the model's raw texts (a replay feeds them
    back); ``retries`` the re-asks after an invalid answer; ``decision_s`` its wall time (s); ``form`` the decision
    form asked."""

    proposal: Proposal | None
    action: Move | None
    source: ActionSource
    vetoes: list[Veto] = msgspec.field(default_factory=list)
    valid: bool = True
    retries: int = 0
    error: str = ""
    answers: list[str] = msgspec.field(default_factory=list)
    decision_s: float = 0.0
    retry: Proposal | None = None
    changes: list[ValueChange] = msgspec.field(default_factory=list)
    form: DecisionForm = "step"
    """The decision form the planner was asked in (a replay asks in it again)."""

    @property
    def stopped(self) -> bool:
        """No TPP changed: the session stopped here."""
        return self.action is None and not self.changes

    @property
    def owned(self) -> bool:
        """The action taken is the planner's own answer (first or after the feedback retry), unchanged or only
        clamped into range."""
        return self.source in OWN_SOURCES

    def moves(self) -> list[Move]:
        """The action as one :class:`Move` per changed TPP (its direction): a step, or one per value change."""
        if self.action is not None:
            return [self.action]
        return [Move(c.tpp, Direction(c.direction or 1)) for c in self.changes]

    def action_words(self) -> str:
        """``"raise t_ptv"``, ``"t_ptv 1.1->1 (p50), v_ptv 0.05->0.17"`` or ``"stop"``."""
        if self.action is not None:
            return str(self.action)
        return changes_words(self.changes) if self.changes else "stop"


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a session — THE step schema: the bus event, the session reply, the session folder and the
    experiment records all hold these. Step 0 is the initial plan. ``score`` in protocol points; ``criteria`` the
    scored plan; ``failing`` the ids of the failing criteria (kept beside ``criteria`` because records converted
    from the first experiment format have no criterion values); ``tpps`` the TPPs the plan was made with;
    ``plan_s`` the wall time (s) of planning and scoring it; ``decision`` the decision taken from it (None at the
    last step)."""

    step: int
    score: float
    max_score: float
    tpps: dict[str, float]
    failing: list[CriterionId]
    criteria: list[CriterionResult] = msgspec.field(default_factory=list)
    plan_s: float = 0.0
    decision: Decision | None = None

    @property
    def action(self) -> Move | None:
        """The published step made from this step (None at the last step, when the session stopped or when TPP
        values were set instead: see :attr:`Decision.changes`)."""
        return self.decision.action if self.decision is not None else None


class SessionHeader(msgspec.Struct, frozen=True, kw_only=True):
    """What a session is: case, scenario, mode, cap and the planner implementation that serves it now."""

    session_id: str
    scenario: str
    case_id: str
    case_seed: int
    mode: Mode
    step_cap: int
    planner: str
    rx_gy: float


class StepEvent(Message):
    """Live progress, published on ``session.<id>`` after each step (best effort: a lost event loses only a
    progress line, never the record). ``outcome`` is set on the last step."""

    schema = "m2m.plan.step"
    version = 2
    header: SessionHeader
    record: Step
    initial_score: float
    outcome: Outcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None


#: What a planner is doing within a step: ``planning`` (the dose engine optimises the plan), ``scoring`` (the
#: evaluator scores it), ``advising`` (the DRL advisor's advice) or ``deciding`` (the decider — the LLM, the DRL's
#: choice or the rules — proposes the next move).
PhaseName = Literal["planning", "scoring", "advising", "deciding"]


class StepPhase(Message):
    """Live progress within a step, published on ``session.<id>`` before each request and before the decision
    (best effort, like :class:`StepEvent`). ``started_at`` is the planner's wall clock (Unix time, s) when the
    phase began; ``decider`` who decides (e.g. ``llm:embedded``, ``drl``, ``rules``). From ``advising`` on, the
    step's plan is scored: ``score``, ``max_score`` and the ``failing`` criteria's labels (for people; the step's
    ids are in :class:`StepEvent`) are set."""

    schema = "m2m.plan.step-phase"
    session_id: str
    step: int
    phase: PhaseName
    started_at: float
    decider: str
    score: float | None = None
    max_score: float | None = None
    failing: list[str] = msgspec.field(default_factory=list)


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A past step as the planner remembers it: the action made from it (``move``, a published step, or the TPP
    value ``changes``) and the score it had."""

    step: int
    move: Move | None
    score: float
    changes: list[ValueChange] = msgspec.field(default_factory=list)

    def words(self) -> str:
        return str(self.move) if self.move is not None else changes_words(self.changes)


class SessionState(Message):
    """Everything a planner taking over a session resumes from, retained on ``takeover.<id>`` after each step:
    the steps so far, the next TPPs and the last fluence (warm start), the remembered history, and the DVHs of the
    first plan and of the last recorded step's plan (``final_structures``: the record of a session cut short has
    them at hand). ``outcome`` is set once the session ended."""

    schema = "m2m.plan.session-state"
    header: SessionHeader
    steps: list[Step]
    initial_score: float
    next_tpps: dict[str, float]
    fluence: np.ndarray | None
    history: list[HistoryEntry]
    dvh_bins_gy: np.ndarray
    initial_structures: list[StructureDose]
    final_structures: list[StructureDose]
    planners: list[str]
    outcome: Outcome | None = None


class SessionResult(Message):
    """The finished session: every step (no fluences but the final plan's), the first and final plans' DVHs, and
    summary counts."""

    schema = "m2m.plan.session-result"
    version = 2
    header: SessionHeader
    outcome: Outcome
    steps: list[Step]
    initial_score: float
    final_score: float
    max_score: float
    dvh_bins_gy: np.ndarray
    initial_structures: list[StructureDose]
    final_structures: list[StructureDose]
    invalid_answers: int
    vetoes: int
    fallbacks: int
    planners: list[str]
    wall_s: float
    #: Beamlet weights of the final plan (normalised; the dose engine's column order): what an exported RTDOSE is
    #: computed from. None in records written before it was carried.
    final_fluence: np.ndarray | None = None

    @property
    def reached_max(self) -> bool:
        return self.outcome is Outcome.MAXIMUM_SCORE

    @property
    def n_steps(self) -> int:
        """Decisions taken (the index of the last step)."""
        return self.steps[-1].step


# ------------------------------------------------------------------------------------------------ runtime
#: An agent process's life: ``starting`` (setting up), ``ready`` (serving), ``draining`` (finishing its requests
#: before it stops), ``stopped``, or ``failed`` (its setup raised; ``detail`` says why, and it exits).
AgentState = Literal["starting", "ready", "draining", "stopped", "failed"]
#: What the supervisor shows for a process: the agent's own state, ``unresponsive`` while its watchdog is silent
#: (hung or stopped; killed and restarted after the stack's ``hang_timeout_s``), or ``exited`` once it is gone.
ProcessState = Literal["starting", "ready", "draining", "stopped", "failed", "unresponsive", "exited"]


class AgentStatus(Message):
    """An agent process's :data:`AgentState`, retained per agent on ``agents.status.<name>``."""

    schema = "m2m.agent.status"
    version = 2
    name: str
    role: str
    impl: str
    pid: int
    incarnation: int
    state: AgentState
    services: list[str]
    detail: str = ""


class StatusRequest(Message):
    schema = "m2m.supervisor.status-request"


class AgentInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    impl: str
    pid: int
    state: ProcessState
    restarts: int
    uptime_s: float


class StackStatus(Message):
    """A running stack: its id (its runtime folder's name, ``m2m status --stack ID``), its bus, its transcript
    (whose folder holds the logs) and every agent. ``stack_id`` and ``pub_endpoint`` are empty from a supervisor
    older than the stack registry."""

    schema = "m2m.supervisor.status"
    version = 2
    endpoint: str
    transcript: str
    agents: list[AgentInfo]
    stack_id: str = ""
    pub_endpoint: str = ""


class SwapRequest(Message):
    """Replace every instance of ``role`` by implementation ``impl`` (with ``options``, as ``key=value``)."""

    schema = "m2m.supervisor.swap-request"
    role: str
    impl: str
    options: list[str] = msgspec.field(default_factory=list)


class SwapResult(Message):
    schema = "m2m.supervisor.swap-result"
    role: str
    impl: str
    started: list[str]
    stopped: list[str]


class DownRequest(Message):
    schema = "m2m.supervisor.down-request"


class DownResult(Message):
    schema = "m2m.supervisor.down-result"
    stopped: list[str]
