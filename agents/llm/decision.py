"""One LLM decision: the structured answer, how it is asked for, validated and retried.

The answer is a :class:`TppDecision`: change one TPP by one step in a direction, or stop. Direction only, never a
new value: the step sizes are the published action factors (:data:`m2m.physics.tpp.PARAMETERS`), which keeps the
schema to two enums and two strings that tiny models follow under constrained decoding (the issue allowed "a
direction or a new value within the valid range"; the direction form is the one used here).

:func:`decide` asks through autogen-agentchat's ``AssistantAgent`` with a structured output type. The type is a
subclass of :class:`TppDecision` whose ``tpp`` is narrowed to the situation's TPP names (plus ``""``), so a client
that constrains decoding to the JSON schema (the embedded llama.cpp one does) cannot produce an unknown TPP; the
result handed back is a plain :class:`TppDecision`. A fresh agent per decision keeps the context bounded to that
decision: the situation itself carries the last few steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import structlog
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import StructuredMessage
from autogen_core.model_context import BufferedChatCompletionContext
from autogen_core.models import AssistantMessage, ChatCompletionClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from m2m.agents.llm.situation import SYSTEM_PROMPT, Mode, Situation, render
from m2m.physics.tpp import Direction, Move

log = structlog.get_logger()

#: Longest rationale (characters): a sentence; longer ones cost decoding time on a CPU and say nothing more.
RATIONALE_CHARS = 100
#: The agent's context: prompt, answer, correction, answer.
CONTEXT_MESSAGES = 4
#: Longest validation error text fed back to the model (characters); the first lines say what is wrong.
ERROR_CHARS = 400


class TppDecision(BaseModel):
    """The LLM planner's structured answer.

    ``action``: ``"change"`` one TPP or ``"stop"`` planning. ``tpp``: a TPP name of the situation (``""`` when
    stopping). ``direction``: ``"raise"`` or ``"lower"`` by one published step (``"none"`` when stopping).
    ``rationale``: one short sentence.
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


@dataclass(frozen=True)
class DecisionOutcome:
    """What :func:`decide` got: the validated decision (``raw``, None when both attempts failed), whether it is
    ``valid``, the ``retries`` used (0 or 1), the last ``error`` text, the wall time ``latency_s`` (s) of the whole
    decision, the user ``prompt`` sent first, and the model's raw ``answers`` in order (fed to a replay client they
    reproduce the decision, retry included)."""

    raw: TppDecision | None
    valid: bool
    retries: int
    error: str
    latency_s: float
    prompt: str
    answers: tuple[str, ...] = ()


@lru_cache(maxsize=32)
def decision_type(tpp_names: tuple[str, ...]) -> type[TppDecision]:
    """:class:`TppDecision` with ``tpp`` narrowed to ``tpp_names`` or ``""`` (the JSON schema then lists them)."""
    names = Literal[("", *tpp_names)]  # type: ignore[valid-type]
    narrowed: type[TppDecision] = create_model(
        "TppDecision",
        __base__=TppDecision,
        tpp=(names, Field(description='a TPP name from the prompt, "" when stopping')),
    )
    return narrowed


def check(decision: TppDecision, situation: Situation) -> str:
    """Why ``decision`` is not a well-formed answer for ``situation`` ("" when it is): the TPP must exist, a change
    needs a direction, a stop names no TPP and no direction."""
    if decision.action == "stop":
        if decision.tpp or decision.direction != "none":
            return 'a stop must have tpp "" and direction "none"'
        return ""
    if decision.tpp not in situation.tpps:
        return f"tpp {decision.tpp!r} is not one of {', '.join(situation.tpps)}"
    if decision.direction == "none":
        return 'a change needs direction "raise" or "lower"'
    return ""


def _error_text(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in exc.errors(include_url=False)]
    return "; ".join(parts)[:ERROR_CHARS]


async def decide(
    client: ChatCompletionClient, situation: Situation, mode: Mode, *, with_advice: bool = False
) -> DecisionOutcome:
    """Ask ``client`` for the next step in ``situation`` (prompt: :func:`~m2m.agents.llm.situation.render`).

    An answer that fails to parse or :func:`check` is retried once, with the error text appended to the same
    conversation; a second failure returns ``raw=None`` (the guard then takes its safe action). A client failure
    (transport, server) is not retried. Never raises on model output or client errors; cancellation propagates.
    """
    prompt = render(situation, mode, with_advice=with_advice)
    agent = AssistantAgent(
        "tpp_planner",
        model_client=client,
        system_message=SYSTEM_PROMPT,
        output_content_type=decision_type(tuple(situation.tpps)),
        reflect_on_tool_use=False,
        model_context=BufferedChatCompletionContext(buffer_size=CONTEXT_MESSAGES),
    )
    start = time.perf_counter()

    async def outcome(raw: TppDecision | None, retries: int, error: str) -> DecisionOutcome:
        # The agent adds each answer to its context before parsing it, so unparseable answers are there too.
        answers = tuple(m.content for m in await agent.model_context.get_messages()
                        if isinstance(m, AssistantMessage) and isinstance(m.content, str))
        return DecisionOutcome(raw, raw is not None, retries, error, time.perf_counter() - start, prompt, answers)

    task, error = prompt, ""
    for attempt in range(2):
        try:
            result = await agent.run(task=task)
            message = result.messages[-1]
            if not isinstance(message, StructuredMessage):
                raise TypeError(f"expected a structured answer, got {type(message).__name__}")
            decision = TppDecision.model_validate(message.content.model_dump())
            error = check(decision, situation)
        except ValidationError as exc:
            error = _error_text(exc)
        except Exception as exc:  # a broken client or server must not take the planner down
            log.warning("llm_decision_failed", error=repr(exc), attempt=attempt)
            return await outcome(None, attempt, f"{type(exc).__name__}: {exc}")
        if not error:
            return await outcome(decision, attempt, "")
        log.info("llm_decision_invalid", error=error, attempt=attempt)
        task = f"That answer was invalid: {error}\nReply again with one corrected JSON object."
    return await outcome(None, 1, error)
