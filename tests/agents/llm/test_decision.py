"""decide() through autogen's AssistantAgent on a replay client: valid answers, one retry, fallback, client errors."""

from __future__ import annotations

import asyncio
import json

import pytest
from autogen_core.models import UserMessage
from pydantic import ValidationError

from m2m.agents.llm.bench import PROSTATE_PASS, PROSTATE_TPPS, situation_from_values
from m2m.agents.llm.clients import ModelClientSpec, make_client
from m2m.agents.llm.decision import RATIONALE_CHARS, TppDecision, check, decide, decision_type
from m2m.agents.llm.situation import SYSTEM_PROMPT, render

SITUATION = situation_from_values("prostate-basic", 2, {**PROSTATE_PASS, "rectum V70Gy": 28.6}, PROSTATE_TPPS)
GOOD = json.dumps({"action": "change", "tpp": "lambda_rectum", "direction": "raise", "rationale": "rectum fails"})


def run(answers: list[str], mode: str = "unguided"):
    client = make_client(ModelClientSpec("replay", replay_answers=tuple(answers)))
    return asyncio.run(decide(client, SITUATION, mode)), client  # type: ignore[arg-type]


def test_a_valid_answer():
    outcome, client = run([GOOD])
    assert outcome.valid and outcome.retries == 0 and outcome.error == ""
    assert type(outcome.raw) is TppDecision
    assert (outcome.raw.action, outcome.raw.tpp, outcome.raw.signed_direction) == ("change", "lambda_rectum", 1)
    assert outcome.prompt == render(SITUATION, "unguided", with_advice=False)
    assert outcome.answers == (GOOD,)
    assert outcome.latency_s >= 0.0
    (call,) = client.create_calls
    system, user = call["messages"]
    assert system.content == SYSTEM_PROMPT and user.content == outcome.prompt
    # The structured-output type handed to the client lists exactly the situation's TPPs.
    schema = call["json_output"].model_json_schema()
    assert schema["properties"]["tpp"]["enum"] == ["", *SITUATION.tpps]
    assert schema["properties"]["rationale"]["maxLength"] == RATIONALE_CHARS


def test_invalid_then_valid_counts_one_retry_and_feeds_the_error_back():
    outcome, client = run(['{"action": "change", "tpp": "lambda_femur", "direction": "raise", "rationale": "x"}', GOOD])
    assert outcome.valid and outcome.retries == 1
    assert outcome.raw is not None and outcome.raw.tpp == "lambda_rectum"
    assert len(outcome.answers) == 2
    retry_messages = client.create_calls[1]["messages"]
    assert isinstance(retry_messages[-1], UserMessage)
    assert "invalid" in retry_messages[-1].content and "tpp" in retry_messages[-1].content
    # The first answer stays in the conversation so the model sees what it got wrong.
    assert "lambda_femur" in retry_messages[-2].content


def test_a_semantic_error_is_retried():
    stop_with_tpp = json.dumps({"action": "stop", "tpp": "t_ptv", "direction": "none", "rationale": "done"})
    outcome, client = run([stop_with_tpp, GOOD])
    assert outcome.valid and outcome.retries == 1
    assert 'a stop must have tpp ""' in client.create_calls[1]["messages"][-1].content


def test_invalid_twice_falls_back_without_raising():
    outcome, _ = run(["not json at all", '{"action": "change", "tpp": "t_rectum"}'])
    assert outcome.raw is None and not outcome.valid and outcome.retries == 1
    assert "direction" in outcome.error  # the second answer's error: the missing fields
    assert outcome.answers == ("not json at all", '{"action": "change", "tpp": "t_rectum"}')


def test_a_client_failure_is_not_retried_and_does_not_raise():
    outcome, client = run([])  # the replay client raises: no answer left
    assert outcome.raw is None and not outcome.valid and outcome.retries == 0
    assert "ValueError" in outcome.error
    assert len(client.create_calls) == 0


def test_replay_reproduces_a_recorded_decision():
    first, _ = run(["garbage", GOOD])
    again, _ = run(list(first.answers))
    assert again.raw == first.raw and again.retries == first.retries == 1


def test_check_rules():
    def d(action: str, tpp: str, direction: str) -> TppDecision:
        return TppDecision(action=action, tpp=tpp, direction=direction, rationale="")  # type: ignore[arg-type]

    assert check(d("stop", "", "none"), SITUATION) == ""
    assert check(d("stop", "", "raise"), SITUATION) != ""
    assert check(d("change", "v_rectum", "lower"), SITUATION) == ""
    assert "not one of" in check(d("change", "v_liver", "lower"), SITUATION)
    assert "needs direction" in check(d("change", "v_rectum", "none"), SITUATION)


def test_decision_schema_is_small_and_strict():
    with pytest.raises(ValidationError):
        TppDecision.model_validate({"action": "change", "tpp": "t_ptv", "direction": "up", "rationale": ""})
    with pytest.raises(ValidationError):
        TppDecision.model_validate({"action": "stop", "tpp": "", "direction": "none", "rationale": "", "x": 1})
    with pytest.raises(ValidationError):
        TppDecision.model_validate({"action": "stop", "tpp": "", "direction": "none", "rationale": "r" * 101})
    narrowed = decision_type(("t_ptv", "lambda_ptv"))
    assert issubclass(narrowed, TppDecision)
    assert narrowed is decision_type(("t_ptv", "lambda_ptv"))
    with pytest.raises(ValidationError):
        narrowed.model_validate({"action": "change", "tpp": "t_rectum", "direction": "raise", "rationale": ""})
    assert set(TppDecision.model_json_schema()["properties"]) == {"action", "tpp", "direction", "rationale"}
