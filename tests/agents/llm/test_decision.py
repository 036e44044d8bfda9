"""decide() through autogen's AssistantAgent on a replay client: valid answers, one retry, fallback, client errors,
the three decision forms and the guard's feedback turn."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from autogen_core.models import UserMessage
from pydantic import ValidationError

from m2m.agents.drl import DEFAULT_KNOWLEDGE
from m2m.agents.drl.knowledge import load_knowledge
from m2m.agents.llm.answer import Answer
from m2m.agents.llm.bench import PROSTATE_PASS, PROSTATE_TPPS, situation_from_values
from m2m.agents.llm.clients import ModelClientSpec, make_client
from m2m.agents.llm.decision import (
    MAX_CHANGES,
    RATIONALE_CHARS,
    TppDecision,
    ValuesDecision,
    check,
    decide,
    decision_type,
)
from m2m.agents.llm.guard import guard, quantile_menu, refusal
from m2m.agents.llm.situation import SYSTEM_PROMPT, knowledge_value, render
from m2m.physics.tpp import Direction, Move

SITUATION = situation_from_values("prostate-basic", 2, {**PROSTATE_PASS, "rectum V70Gy": 28.6}, PROSTATE_TPPS)
GOOD = json.dumps({"action": "change", "tpp": "lambda_rectum", "direction": "raise", "rationale": "rectum fails"})


def run(answers: list[str], mode: str = "unguided"):
    client = make_client(ModelClientSpec("replay", replay_answers=tuple(answers)))
    return asyncio.run(decide(client, SITUATION, mode)), client  # type: ignore[arg-type]


def test_a_valid_answer():
    outcome, client = run([GOOD])
    assert outcome.valid and outcome.retries == 0 and outcome.error == ""
    assert outcome.raw == Answer.of_move(SITUATION.tpps, Move("lambda_rectum", Direction.RAISE), "rectum fails")
    assert outcome.raw.changes[0].after == pytest.approx(SITUATION.tpps["lambda_rectum"] * 1.65)
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
    assert outcome.raw is not None and outcome.raw.move == Move("lambda_rectum", Direction.RAISE)
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
        TppDecision.model_validate({"action": "stop", "tpp": "", "direction": "none",
                                    "rationale": "r" * (RATIONALE_CHARS + 1)})
    narrowed = decision_type(("t_ptv", "lambda_ptv"))
    assert issubclass(narrowed, TppDecision)
    assert narrowed is decision_type(("t_ptv", "lambda_ptv"))
    with pytest.raises(ValidationError):
        narrowed.model_validate({"action": "change", "tpp": "t_rectum", "direction": "raise", "rationale": ""})
    assert set(TppDecision.model_json_schema()["properties"]) == {"action", "tpp", "direction", "rationale"}


GUIDED = dataclasses.replace(SITUATION, knowledge=load_knowledge(DEFAULT_KNOWLEDGE), knowledge_site="prostate")


def values_answer(*changes: tuple[str, float]) -> str:
    return json.dumps({"action": "change", "changes": dict(changes), "rationale": "r"})


def test_values_form_clamps_and_flags_and_lists_the_tpps_in_the_schema():
    client = make_client(ModelClientSpec("replay", replay_answers=(values_answer(("t_rectum", 0.5),
                                                                                   ("lambda_rectum", 1e9)),)))
    outcome = asyncio.run(decide(client, SITUATION, "unguided", form="values"))
    assert outcome.form == "values" and outcome.raw is not None and outcome.raw.move is None
    t, lam = outcome.raw.changes
    assert (t.tpp, t.before, t.after, t.clamped) == ("t_rectum", SITUATION.tpps["t_rectum"], 0.5, False)
    assert lam.after == 1e5 and lam.clamped  # the valid range's upper end, flagged
    call = client.create_calls[0]
    assert call["messages"][0].content == SYSTEM_PROMPT and outcome.prompt.endswith("(values form)?")
    values = call["json_output"].model_json_schema()["$defs"]["Values"]
    assert list(values["properties"]) == list(SITUATION.tpps) and values["additionalProperties"] is False
    too_many = ValuesDecision(action="change", rationale="", changes={t: 0.5 for t in list(SITUATION.tpps)[:4]})
    assert f"1 to {MAX_CHANGES} entries" in check(too_many, SITUATION)


def test_a_values_entry_that_changes_nothing_is_dropped_when_another_changes_something():
    same = SITUATION.tpps["v_rectum"]
    client = make_client(ModelClientSpec("replay", replay_answers=(values_answer(("v_rectum", same),
                                                                                   ("t_rectum", 0.5)),)))
    outcome = asyncio.run(decide(client, SITUATION, "unguided", form="values"))
    assert outcome.raw is not None and [c.tpp for c in outcome.raw.changes] == ["t_rectum"]


def test_values_check_rules():
    def v(*tpps: str) -> ValuesDecision:
        return ValuesDecision(action="change", changes=dict.fromkeys(tpps, 0.5), rationale="")

    assert check(v("t_rectum"), SITUATION) == ""
    assert "needs 1 to" in check(v(), SITUATION)
    assert "not one of" in check(v("t_liver"), SITUATION)
    assert check(ValuesDecision(action="stop", changes={}, rationale=""), SITUATION) == ""
    assert "no changes" in check(ValuesDecision(action="stop", changes={"t_rectum": 0.5}, rationale=""), SITUATION)


def test_quantile_form_offers_only_the_guards_menu_and_sets_the_knowledge_value():
    menu = quantile_menu(GUIDED, "guided", GUIDED.scenario.oar_names)
    # rectum V70Gy fails: every choice helps the rectum (lower t_rectum, raise lambda/v_rectum, lower lambda_ptv)
    assert menu and set(menu) <= {"t_rectum", "lambda_rectum", "v_rectum", "lambda_ptv"}
    assert all(after < GUIDED.tpps["t_rectum"] for _, after in menu.get("t_rectum", []))
    target = menu["lambda_rectum"][0][0]
    answer = json.dumps({"action": "change", "changes": {"lambda_rectum": target}, "rationale": "r"})
    client = make_client(ModelClientSpec("replay", replay_answers=(answer,)))
    outcome = asyncio.run(decide(client, GUIDED, "guided", form="quantile"))
    assert outcome.form == "quantile" and outcome.raw is not None
    (change,) = outcome.raw.changes
    assert change.target == target and change.after == pytest.approx(knowledge_value(GUIDED, "lambda_rectum", target))
    assert "choices:" in outcome.prompt and target in outcome.prompt
    targets = client.create_calls[0]["json_output"].model_json_schema()["$defs"]["Targets"]["properties"]
    assert list(targets) == list(menu)  # no choice helps the failing rectum by moving v_bladder: not offered
    for tpp, options in menu.items():
        offered = targets[tpp].get("enum", [targets[tpp].get("const")])
        assert offered == [q for q, _ in options]


def test_quantile_form_is_asked_as_values_without_knowledge():
    client = make_client(ModelClientSpec("replay", replay_answers=(values_answer(("t_rectum", 0.5)),)))
    outcome = asyncio.run(decide(client, SITUATION, "guided", form="quantile"))
    assert outcome.form == "values" and outcome.raw is not None


def test_a_refused_answer_gets_one_feedback_turn_and_the_retry_is_kept():
    oars = SITUATION.scenario.oar_names
    loosen = values_answer(("t_rectum", 0.95))  # loosens the failing rectum: the guided guard refuses it
    tighten = values_answer(("t_rectum", 0.5))
    client = make_client(ModelClientSpec("replay", replay_answers=(loosen, tighten)))

    def refuse(a: Answer) -> str:
        return refusal(SITUATION, a, "guided", oars)

    outcome = asyncio.run(decide(client, SITUATION, "guided", form="values", refuse=refuse))
    assert outcome.first is not None and outcome.first.changes[0].after == 0.95
    assert outcome.retry is outcome.raw and outcome.raw is not None and outcome.raw.changes[0].after == 0.5
    assert "loosens rectum" in outcome.feedback
    feedback = client.create_calls[1]["messages"][-1].content
    assert "was refused because" in feedback and "loosens rectum" in feedback
    result = guard(SITUATION, outcome.raw, "guided", oars, first=outcome.first)
    assert result.source == "retry" and [v.reason for v in result.vetoes] == ["loosens_at_risk"]
    # the same loosening answer twice: the guard replaces it, and both are recorded as refused
    again = make_client(ModelClientSpec("replay", replay_answers=(loosen, loosen)))
    twice = asyncio.run(decide(again, SITUATION, "guided", form="values", refuse=refuse))
    replaced = guard(SITUATION, twice.raw, "guided", oars, first=twice.first)
    assert replaced.source in ("drl_advice", "safe") and len(replaced.vetoes) == 2
