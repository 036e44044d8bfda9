"""The typed, versioned messages the four planning agents exchange on the bus (one class per message type).

Services and topics:

* ``dose.plan`` — :class:`DosePlanRequest` → :class:`DosePlanResult` (dose engine);
* ``plan.evaluate`` — :class:`EvaluateRequest` → :class:`Evaluation` (evaluator);
* ``drl.advise`` — :class:`AdviseRequest` → :class:`Advice` (DRL advisor);
* ``plan.session`` — :class:`SessionRequest` → :class:`SessionResult` (planner);
* ``supervisor.control`` — :class:`StatusRequest` / :class:`SwapRequest` / :class:`DownRequest` (supervisor);
* topics ``knowledge.tpp.<site>`` (retained :class:`KnowledgeMessage`), ``session.<id>`` (retained
  :class:`StepEvent`, the session's state after each step) and ``agents.status.<name>`` (retained
  :class:`AgentStatus`).

Doses are in Gy, DVH volumes in % of the structure, TPP thresholds ``t`` in fractions of Rx. Requests are
stateless: the warm-start fluence travels in the request, so any dose-engine instance gives the same plan.
"""

from __future__ import annotations

import uuid

import msgspec
import numpy as np

from m2m.bus.messages import Message

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
    """The optimised plan: DVHs, the protocol's metric values (keyed by criterion label, in the criterion's
    unit), the fluence (for the next warm start) and how the solve went."""

    schema = "m2m.dose.plan-result"
    scenario: str
    case_id: str
    case_seed: int
    rx_gy: float
    tpps: dict[str, float]
    dvh_bins_gy: np.ndarray
    structures: list[StructureDose]
    metrics: dict[str, float]
    fluence: np.ndarray
    solve_s: float
    iterations: int
    engine: str


# ------------------------------------------------------------------------------------------------ evaluator
class EvaluateRequest(Message):
    """Score metric values (criterion label → value) against ``protocol``."""

    schema = "m2m.plan.evaluate-request"
    protocol: str
    metrics: dict[str, float]


class CriterionResult(msgspec.Struct, frozen=True, kw_only=True):
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
    protocol: str
    criteria: list[CriterionResult]
    total: float
    max_score: float
    failing: list[str]


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
    """One admissible action (it changes the TPP): ``direction`` +1 raises ``tpp``, −1 lowers it."""

    tpp: str
    direction: int
    probability: float
    q: float


class Advice(Message):
    schema = "m2m.drl.advice"
    actions: list[AdvisedAction]
    checkpoint_sha256: str


# ------------------------------------------------------------------------------------------------ planner
class SessionRequest(Message):
    """Plan ``case_seed`` of ``scenario`` autonomously until the maximum score or ``step_cap`` steps.

    ``mode`` is ``"guided"`` (the knowledge is in the LLM's context and guards its proposals) or
    ``"unguided"``; ``with_advice`` also renders the DRL's per-step advice (guided only). ``initial_tpps``
    overrides the scenario's initial TPPs for the case.
    """

    schema = "m2m.plan.session-request"
    session_id: str
    scenario: str
    case_seed: int
    mode: str = "guided"
    step_cap: int = 20
    with_advice: bool = False
    initial_tpps: dict[str, float] | None = None


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A past step as the planner remembers it: the change made from it and the score it had."""

    step: int
    change: str
    score: float


class Veto(msgspec.Struct, frozen=True, kw_only=True):
    reason: str
    detail: str


class StepEvent(Message):
    """The session after step ``step`` (0 = the initial plan): its score and criteria, the TPPs it was planned
    with, and the decision taken from it (empty at the last step). ``raw_*`` is the LLM's own proposal,
    ``action_*`` what was done after the guard; ``llm_answers`` are the model's raw texts (for replay).

    Published retained on ``session.<id>``: a planner that takes over a session resumes from the last one
    (``next_tpps`` and ``fluence``)."""

    schema = "m2m.plan.step"
    session_id: str
    scenario: str
    case_id: str
    case_seed: int
    mode: str
    planner: str
    step: int
    step_cap: int
    initial_score: float
    score: float
    max_score: float
    criteria: list[CriterionResult]
    tpps: dict[str, float]
    done: bool
    outcome: str = ""
    raw_action: str = ""
    raw_tpp: str = ""
    raw_direction: str = ""
    rationale: str = ""
    action_tpp: str = ""
    action_direction: int = 0
    action_source: str = ""
    vetoes: list[Veto] = msgspec.field(default_factory=list)
    valid: bool = True
    retries: int = 0
    llm_answers: list[str] = msgspec.field(default_factory=list)
    decision_s: float = 0.0
    plan_s: float = 0.0
    next_tpps: dict[str, float] = msgspec.field(default_factory=dict)
    fluence: np.ndarray | None = None
    history: list[HistoryEntry] = msgspec.field(default_factory=list)
    dvh_bins_gy: np.ndarray | None = None
    structures: list[StructureDose] = msgspec.field(default_factory=list)


class SessionResult(Message):
    schema = "m2m.plan.session-result"
    session_id: str
    scenario: str
    case_id: str
    mode: str
    initial_score: float
    final_score: float
    max_score: float
    steps: int
    reached_max: bool
    invalid_answers: int
    vetoes: int
    fallbacks: int
    planners: list[str]
    wall_s: float


# ------------------------------------------------------------------------------------------------ runtime
class AgentStatus(Message):
    """An agent process's state (``starting``, ``ready``, ``draining``, ``stopped``), retained per agent."""

    schema = "m2m.agent.status"
    name: str
    role: str
    impl: str
    pid: int
    incarnation: int
    state: str
    services: list[str]
    detail: str = ""


class StatusRequest(Message):
    schema = "m2m.supervisor.status-request"


class AgentInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    impl: str
    pid: int
    state: str
    restarts: int
    uptime_s: float


class StackStatus(Message):
    schema = "m2m.supervisor.status"
    endpoint: str
    transcript: str
    agents: list[AgentInfo]


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
