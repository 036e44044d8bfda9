"""One LLM decision: the structured answer, how it is asked for, validated, retried and refused once with feedback.

Three decision forms (:data:`DecisionForm`, the ``llm`` planner's ``decision`` option):

* ``step`` (:class:`TppDecision`): change one TPP by one published step (:data:`m2m.physics.tpp.PARAMETERS`) in a
  direction, or stop;
* ``values`` (:class:`ValuesDecision`): new values for one to :data:`MAX_CHANGES` TPPs, or stop (the paper's
  "updated TPPs"); a value outside the valid range is clamped and flagged;
* ``quantile`` (:class:`QuantileDecision`, guided only): for one to :data:`MAX_CHANGES` TPPs, a named point of the
  DRL knowledge's distribution of successful final values (``p5`` … ``p95``, :data:`QUANTILE_TARGETS`), each shown
  in the prompt with its value; the value set is the knowledge's.

Every answer becomes one :class:`Answer`: the proposal in values (``changes``, ``(tpp, before, after, clamped,
target)``) or a published step, which the guard and the planner handle alike.

:func:`decide` asks through autogen-agentchat's ``AssistantAgent`` with a structured output type whose ``tpp`` is
narrowed to the situation's TPP names, so a client that constrains decoding to the JSON schema (the embedded
llama.cpp one does) cannot produce an unknown TPP. An answer that fails to parse or :func:`check` is re-asked once
with the error; a valid answer the guard refuses (``refuse``: the guard's verdict, text or ``""``) gets one feedback
turn in the same conversation ("your proposal X was refused because …"), and the second answer is recorded beside
the first. A fresh agent per decision keeps the context bounded to that decision: the situation carries the last
few steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import structlog
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import StructuredMessage
from autogen_core.model_context import BufferedChatCompletionContext
from autogen_core.models import AssistantMessage, ChatCompletionClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from m2m.agents.drl.knowledge import QUANTILES
from m2m.agents.llm.answer import Answer, Change, DecisionForm
from m2m.agents.llm.guard import Menu, quantile_menu
from m2m.agents.llm.situation import SYSTEM_PROMPT, Mode, Situation, render
from m2m.physics.tpp import Direction, Move, clamp_value

log = structlog.get_logger()

#: The named points of the knowledge a ``quantile`` answer chooses from: ``p5`` … ``p95`` (the knowledge's own
#: quantiles, :data:`m2m.agents.drl.knowledge.QUANTILES`).
QUANTILE_TARGETS: tuple[str, ...] = tuple(f"p{q}" for q in QUANTILES)
#: Most TPPs one ``values``/``quantile`` answer may change: enough to move one structure's three TPPs together.
MAX_CHANGES = 3
#: Longest rationale (characters): a few words; every token costs decoding time on a CPU (≈ 15 tokens/s with the
#: JSON grammar on 2 cores), and the structured fields say what was done.
RATIONALE_CHARS = 40
#: The agent's context: prompt, answer, correction or feedback, answer, feedback, answer.
CONTEXT_MESSAGES = 6
#: Longest validation error text fed back to the model (characters); the first lines say what is wrong.
ERROR_CHARS = 400


class TppDecision(BaseModel):
    """The ``step`` form's answer.

    ``action``: ``"change"`` one TPP or ``"stop"`` planning. ``tpp``: a TPP name of the situation (``""`` when
    stopping). ``direction``: ``"raise"`` or ``"lower"`` by one published step (``"none"`` when stopping).
    ``rationale``: one short clause.
    """

    model_config = ConfigDict(extra="forbid")

    action: Literal["change", "stop"]
    tpp: str = Field(description='a TPP name from the prompt, "" when stopping')
    direction: Literal["raise", "lower", "none"]
    rationale: str = Field(max_length=RATIONALE_CHARS)

    @property
    def signed_direction(self) -> int:
        """+1 raise, −1 lower, 0 none."""
        return {"raise": 1, "lower": -1, "none": 0}[self.direction]

    def words(self) -> str:
        """``"raise lambda_rectum"`` or ``"stop"``."""
        return "stop" if self.action == "stop" else str(self.move)

    @property
    def move(self) -> Move | None:
        """The proposed :class:`~m2m.physics.tpp.Move` (None for a stop or a change without a direction)."""
        if self.action == "stop" or self.direction == "none":
            return None
        return Move(self.tpp, Direction.RAISE if self.direction == "raise" else Direction.LOWER)


class ValuesDecision(BaseModel):
    """The ``values`` form's answer: ``"change"`` with new values for one to :data:`MAX_CHANGES` TPPs, keyed by TPP
    name (a TPP cannot appear twice), or ``"stop"`` with none."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["change", "stop"]
    changes: dict[str, float]
    rationale: str = Field(max_length=RATIONALE_CHARS)


class QuantileDecision(BaseModel):
    """The ``quantile`` form's answer: ``"change"`` with one to :data:`MAX_CHANGES` TPPs, keyed by name, each moved
    to a named knowledge point (one of :data:`QUANTILE_TARGETS`), or ``"stop"`` with none."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["change", "stop"]
    changes: dict[str, str]
    rationale: str = Field(max_length=RATIONALE_CHARS)


AnyDecision = TppDecision | ValuesDecision | QuantileDecision
BASE_TYPES: dict[DecisionForm, type[BaseModel]] = {
    "step": TppDecision, "values": ValuesDecision, "quantile": QuantileDecision,
}


def to_answer(decision: AnyDecision, situation: Situation, menu: Menu | None = None) -> Answer:
    """The :class:`Answer` a well-formed (:func:`check`) ``decision`` stands for in ``situation``."""
    if decision.action == "stop":
        form: DecisionForm = ("step" if isinstance(decision, TppDecision)
                              else "values" if isinstance(decision, ValuesDecision) else "quantile")
        return Answer.of_stop(form, decision.rationale)
    if isinstance(decision, TppDecision):
        move = decision.move
        assert move is not None  # check() refuses a change without a direction
        return Answer.of_move(situation.tpps, move, decision.rationale)
    changes: list[Change] = []
    if isinstance(decision, ValuesDecision):
        for tpp, value in decision.changes.items():
            after = clamp_value(tpp, value)
            changes.append(Change(tpp, situation.tpps[tpp], after, clamped=after != value))
        # An entry that changes nothing has no effect: dropped when the answer changes something else.
        moved = [c for c in changes if c.direction != 0]
        return Answer("values", False, tuple(moved or changes), None, decision.rationale)
    for tpp, target in decision.changes.items():
        chosen = dict((menu or {}).get(tpp, ())).get(target)
        assert chosen is not None  # check() refuses a target the menu lacks
        after = clamp_value(tpp, chosen)
        changes.append(Change(tpp, situation.tpps[tpp], after, clamped=after != chosen, target=target))
    return Answer("quantile", False, tuple(changes), None, decision.rationale)


@dataclass(frozen=True)
class DecisionOutcome:
    """What :func:`decide` got: the answer taken as the planner's (``raw``: the retried answer when the guard
    refused the first, else the first; None when no valid answer came), the ``first`` answer when a feedback retry
    replaced it, whether an answer was ``valid``, the re-asks after invalid answers (``retries``), the last
    ``error`` text, the ``feedback`` sent (the guard's refusal, "" for none), the wall time ``latency_s`` (s) of
    the whole decision, the user ``prompt`` sent first, and the model's raw ``answers`` in order (fed to a replay
    client they reproduce the decision, retries included)."""

    raw: Answer | None
    valid: bool
    retries: int
    error: str
    latency_s: float
    prompt: str
    answers: tuple[str, ...] = ()
    first: Answer | None = None
    feedback: str = ""
    form: DecisionForm = "step"
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def proposal(self) -> Answer | None:
        """The first valid answer (the one the guard judged first)."""
        return self.first if self.first is not None else self.raw

    @property
    def retry(self) -> Answer | None:
        """The valid answer after the feedback turn (None: no feedback, or no valid second answer)."""
        return self.raw if self.first is not None and self.raw is not self.first else None


MenuKey = tuple[tuple[str, tuple[str, ...]], ...]


@lru_cache(maxsize=256)
def decision_type(tpp_names: tuple[str, ...], form: DecisionForm = "step", menu: MenuKey = ()) -> type[BaseModel]:
    """The form's answer model with ``tpp`` narrowed to ``tpp_names`` (and ``""`` for a step's stop) and, for the
    quantile form, each change narrowed to one TPP of ``menu`` with one of its targets (``((tpp, (target, …)),
    …)``: the guard's :func:`~m2m.agents.llm.guard.quantile_menu`); the JSON schema then lists them."""
    if form == "step":
        names = Literal[("", *tpp_names)]  # type: ignore[valid-type]
        narrowed: type[BaseModel] = create_model(
            "TppDecision", __base__=TppDecision,
            tpp=(names, Field(description='a TPP name from the prompt, "" when stopping')),
        )
        return narrowed
    if form == "values":
        values = create_model("Values", __config__=ConfigDict(extra="forbid"),
                              **{t: (float, None) for t in tpp_names})  # type: ignore[call-overload]
        return create_model("ValuesDecision", __base__=ValuesDecision, changes=(values, ...))
    if not menu:
        raise ValueError("a quantile decision needs a menu of knowledge points")
    # Each TPP of the menu an optional key whose value is one of its targets: no TPP twice, no target off the menu.
    targets = create_model("Targets", __config__=ConfigDict(extra="forbid"),
                           **{t: (Literal[q], None) for t, q in menu})  # type: ignore[call-overload]
    return create_model("QuantileDecision", __base__=QuantileDecision, changes=(targets, ...))


def check(decision: AnyDecision, situation: Situation, menu: Menu | None = None) -> str:
    """Why ``decision`` is not a well-formed answer for ``situation`` ("" when it is): every TPP must exist, a
    step's change needs a direction, a stop names nothing, a change names one to :data:`MAX_CHANGES` distinct
    TPPs, and a quantile target must be one of ``menu`` for that TPP."""
    if isinstance(decision, TppDecision):
        if decision.action == "stop":
            if decision.tpp or decision.direction != "none":
                return 'a stop must have tpp "" and direction "none"'
            return ""
        if decision.tpp not in situation.tpps:
            return f"tpp {decision.tpp!r} is not one of {', '.join(situation.tpps)}"
        if decision.direction == "none":
            return 'a change needs direction "raise" or "lower"'
        return ""
    if decision.action == "stop":
        return "" if not decision.changes else "a stop must have no changes"
    names = list(decision.changes)
    if not 1 <= len(names) <= MAX_CHANGES:
        return f"a change needs 1 to {MAX_CHANGES} entries in changes, got {len(names)}"
    unknown = [n for n in names if n not in situation.tpps]
    if unknown:
        return f"tpp {unknown[0]!r} is not one of {', '.join(situation.tpps)}"
    if isinstance(decision, QuantileDecision):
        for tpp, target in decision.changes.items():
            if target not in dict((menu or {}).get(tpp, ())):
                offered = ", ".join(t for t, _ in (menu or {}).get(tpp, ())) or "none"
                return f"{target} is not a choice for {tpp} (choices: {offered})"
    if isinstance(decision, ValuesDecision):
        for tpp, value in decision.changes.items():
            if value != value:  # NaN
                return f"value of {tpp} is not a number"
    return ""


def _error_text(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in exc.errors(include_url=False)]
    return "; ".join(parts)[:ERROR_CHARS]


def form_for(form: DecisionForm, situation: Situation, mode: Mode, menu: Menu) -> DecisionForm:
    """The form actually asked: ``quantile`` needs knowledge points to choose from, so without usable knowledge
    (the unguided mode, or knowledge of other TPPs) or with an empty ``menu`` below the maximum score (no knowledge
    point helps: the failing structures' TPPs are already past them) it is asked as ``values``."""
    if form == "quantile" and (mode != "guided" or situation.usable_knowledge() is None
                               or (not menu and not situation.at_max)):
        return "values"
    return form


async def decide(
    client: ChatCompletionClient,
    situation: Situation,
    mode: Mode,
    *,
    with_advice: bool = False,
    form: DecisionForm = "step",
    refuse: Callable[[Answer], str] | None = None,
) -> DecisionOutcome:
    """Ask ``client`` for the next step in ``situation`` in decision ``form`` (prompt:
    :func:`~m2m.agents.llm.situation.render`, system text :func:`~m2m.agents.llm.situation.system_prompt`).

    An answer that fails to parse or :func:`check` is re-asked once with the error appended to the same
    conversation; a second failure returns ``raw=None`` (the guard then takes its replacement). A valid answer
    that ``refuse`` refuses (its text says why) gets one feedback turn; the second answer, if valid, becomes
    ``raw`` (the first is kept in ``first``). A client failure (transport, server) is not retried. Never raises on
    model output or client errors; cancellation propagates.
    """
    oars = situation.scenario.oar_names
    menu = quantile_menu(situation, mode, oars) if form == "quantile" and mode == "guided" else {}
    form = form_for(form, situation, mode, menu)
    prompt = render(situation, mode, with_advice=with_advice, form=form, menu=menu)
    output_type = (decision_type(tuple(situation.tpps), form,
                                 tuple((t, tuple(q for q, _ in m)) for t, m in menu.items()))
                   if form == "quantile" and menu else decision_type(tuple(situation.tpps),
                                                                     "values" if form == "quantile" else form))
    agent = AssistantAgent(
        "tpp_planner",
        model_client=client,
        system_message=SYSTEM_PROMPT,
        output_content_type=output_type,
        reflect_on_tool_use=False,
        model_context=BufferedChatCompletionContext(buffer_size=CONTEXT_MESSAGES),
    )
    start = time.perf_counter()
    base = BASE_TYPES[form]

    async def outcome(raw: Answer | None, retries: int, error: str, first: Answer | None = None,
                      feedback: str = "") -> DecisionOutcome:
        # The agent adds each answer to its context before parsing it, so unparseable answers are there too.
        answers = tuple(m.content for m in await agent.model_context.get_messages()
                        if isinstance(m, AssistantMessage) and isinstance(m.content, str))
        return DecisionOutcome(raw, raw is not None, retries, error, time.perf_counter() - start, prompt, answers,
                               first, feedback, form)

    async def ask(task: str) -> tuple[Answer | None, str]:
        """One model turn: the answer, or the error text ("" never with None)."""
        result = await agent.run(task=task)
        message = result.messages[-1]
        if not isinstance(message, StructuredMessage):
            raise TypeError(f"expected a structured answer, got {type(message).__name__}")
        content = message.content.model_dump()
        if isinstance(content.get("changes"), dict):  # the narrowed object has every TPP key, absent ones None
            content["changes"] = {k: v for k, v in content["changes"].items() if v is not None}
        try:
            decision = base.model_validate(content)
        except ValidationError as exc:
            return None, _error_text(exc)
        error = check(decision, situation, menu)  # type: ignore[arg-type]
        return (None, error) if error else (to_answer(decision, situation, menu), "")  # type: ignore[arg-type]

    task, retries, error = prompt, 0, ""
    first: Answer | None = None
    feedback = ""
    try:
        while True:
            try:
                answer, error = await ask(task)
            except ValidationError as exc:
                answer, error = None, _error_text(exc)
            if answer is None:
                log.info("llm_decision_invalid", error=error, attempt=retries)
                if retries >= 1:  # the first answer (if the guard refused it) stands; the guard replaces it
                    return await outcome(first, retries, error, first, feedback)
                retries += 1
                task = f"That answer was invalid: {error}\nReply again with one corrected JSON object."
                continue
            if first is None and refuse is not None and (why := refuse(answer)):
                first, feedback = answer, why
                task = (f"Your proposal ({answer.words()}) was refused because {why}. "
                        "Propose something else (one JSON object).")
                continue
            return await outcome(answer, retries, "", first, feedback)
    except Exception as exc:  # a broken client or server must not take the planner down
        log.warning("llm_decision_failed", error=repr(exc), attempt=retries)
        return await outcome(first, retries, f"{type(exc).__name__}: {exc}", first, feedback)
