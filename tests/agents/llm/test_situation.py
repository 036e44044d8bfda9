"""The prompt: what each mode and decision form renders, and that the step/values modes differ only by the guided
block."""

from __future__ import annotations

import dataclasses

import pytest

from m2m.agents.drl.knowledge import MoveStats, Provenance, TppKnowledge, TppStats
from m2m.agents.llm import situation as situation_module
from m2m.agents.llm.bench import LIVER_PASS, LIVER_TPPS, PROSTATE_PASS, PROSTATE_TPPS, situation_from_values
from m2m.agents.llm.situation import HISTORY_SHOWN, SYSTEM_PROMPT, CriterionView, render, stepped_value
from m2m.physics.tpp import PARAMETERS
from m2m.scenarios import load_scenario

HISTORY = [("raise lambda_rectum", 7.1), ("lower t_rectum", 7.6), ("raise v_rectum", 7.9), ("raise lambda_rectum", 8.2)]


def prostate_knowledge() -> TppKnowledge:
    return TppKnowledge(
        roles={"ptv": "ptv", "oar1": "bladder", "oar2": "rectum"},
        tpps=[
            TppStats(name="t_oar2", label="t_rectum", scale="linear", count=30, mean=0.8, sd=0.1,
                     quantiles={"5": 0.47, "25": 0.7, "50": 0.816, "75": 0.9, "95": 0.969}),
            TppStats(name="lambda_oar2", label="lambda_rectum", scale="log10", count=30, mean=0.3, sd=0.8,
                     quantiles={"5": -1.0, "25": -0.5, "50": 0.3, "75": 0.8, "95": 1.5}),
        ],
        lambda_ratios=[],
        moves=[MoveStats(tpp="t_oar1", label="t_bladder", direction=1, count=55, share=0.24, mean_stage=0.3,
                         first_move_count=12)],
        priority=["t_oar1", "t_ptv"],
        provenance=Provenance(checkpoint_sha256="0" * 64, decision_rule="greedy", scenario="prostate-basic",
                              cohort="knowledge", seeds=[0], n_cases=40, n_at_max=37, success_rate=0.925,
                              mean_final_score=8.9, max_score=9.0, created_utc="2026-01-01T00:00:00+00:00"),
    )


@pytest.fixture
def situation():
    s = situation_from_values("prostate-basic", 5, {**PROSTATE_PASS, "rectum V70Gy": 28.6},
                              {**PROSTATE_TPPS, "t_rectum": 1.0, "lambda_rectum": 40.0},
                              [("lambda_rectum", 1, 0.62), ("t_rectum", -1, 0.2)], HISTORY)
    return dataclasses.replace(s, knowledge=prostate_knowledge())


def test_unguided_renders_the_plan_state(situation):
    text = render(situation, "unguided", with_advice=False)
    assert "step 5 of 20" in text and "Score 8.28 of 9" in text
    assert "- rectum V70Gy ≤ 25 %: 28.6 (FAIL 0.28 pt)" in text
    assert "(8 others pass with room)" in text and "rectum V60Gy" not in text  # passing with room: counted only
    assert "t_rectum=1 at max" in text  # a raise would be a no-op
    assert "- t_ptv=1.04, lambda_ptv=3, v_ptv=0.12" in text
    assert "Dose % Rx (max/mean): ptv 105/102," in text
    # Only the last HISTORY_SHOWN steps.
    assert text.count("-> score") == HISTORY_SHOWN
    assert "7.10" not in text and "8.20" in text
    assert "DRL" not in text


def test_guided_adds_only_the_knowledge_and_advice_block(situation):
    unguided = render(situation, "unguided", with_advice=True).splitlines()
    guided = render(situation, "guided", with_advice=True).splitlines()
    block = guided[len(unguided) - 1 : -1]
    assert guided[: len(unguided) - 1] == unguided[:-1]
    assert guided[-1] == unguided[-1] == "Worst failing: rectum V70Gy ≤ 25 %. Next step (step form)?"
    assert block[0].startswith("DRL knowledge (TPPs of 37 successful plans")
    # log10 quantiles shown as values
    assert "- t_rectum 0.816 (0.47-0.969) now above; lambda_rectum 2 (0.1-32) now above" in block
    assert "DRL priority: t_bladder, t_ptv" in block
    assert not any("raise t_bladder" in line for line in block)  # no habits with directions to copy
    assert block[-1] == "DRL advice now: raise lambda_rectum (p=0.62); lower t_rectum (p=0.20)"
    without_advice = render(situation, "guided", with_advice=False).splitlines()
    assert without_advice == [line for line in guided if not line.startswith("DRL advice")]


def test_unguided_ignores_advice_and_knowledge(situation):
    bare = dataclasses.replace(situation, knowledge=None, advice=())
    assert render(situation, "unguided", with_advice=True) == render(bare, "unguided", with_advice=False)
    assert render(bare, "guided", with_advice=True) == render(bare, "unguided", with_advice=False)


def test_knowledge_of_another_site_is_not_rendered():
    liver = situation_from_values("liver", 2, LIVER_PASS, LIVER_TPPS, [("t_ptv", -1, 0.5)])
    liver = dataclasses.replace(liver, knowledge=prostate_knowledge())
    guided = render(liver, "guided", with_advice=True)
    assert "DRL knowledge" not in guided
    unguided = render(liver, "unguided", with_advice=False).splitlines()
    assert guided.splitlines() == [*unguided[:-1], "DRL advice now: lower t_ptv (p=0.50)", unguided[-1]]
    assert unguided[-1] == "Every criterion passes. Next step (step form)?"


def test_closing_line_names_the_worst_failing_criterion_first():
    s = situation_from_values("prostate-basic", 1, {**PROSTATE_PASS, "bladder V75Gy": 25.5, "rectum V70Gy": 31.0},
                              PROSTATE_TPPS)
    last = render(s, "unguided", with_advice=False).splitlines()[-1]
    assert last == "Worst failing: rectum V70Gy ≤ 25 %. Next step (step form)?"


def test_quantile_form_renders_each_tpp_once_with_where_it_sits_and_the_menu(situation):
    menu = {"t_rectum": [("p95", 0.969), ("p50", 0.816)]}
    text = render(situation, "guided", with_advice=False, form="quantile", menu=menu)
    lines = text.splitlines()
    # TPPs the knowledge covers appear only in its table, with their position among the quantiles
    assert "- t_rectum=1, choices: p95=0.97 p50=0.82; lambda_rectum >p95" in lines
    assert "TPPs the knowledge does not cover:" in lines and "- v_rectum=0.5" in lines
    assert sum("t_rectum=" in line for line in lines) == 1
    # the unguided prompt of the same form is the step form's plan state (there is no knowledge to choose from)
    assert render(situation, "unguided", with_advice=False, form="quantile").splitlines()[:-1] == render(
        situation, "unguided", with_advice=False).splitlines()[:-1]


def test_where_a_value_sits_among_the_quantiles():
    q = {"p5": 0.5, "p25": 0.7, "p50": 0.8, "p75": 0.9, "p95": 0.97}
    assert [situation_module._where(x, q) for x in (0.3, 0.5, 0.6, 0.85, 0.971, 1.0)] == [
        "<p5", "=p5", "p5-p25", "p50-p75", "=p95", ">p95"]


def test_render_rejects_an_unknown_mode(situation):
    with pytest.raises(ValueError, match="mode"):
        render(situation, "creative", with_advice=False)  # type: ignore[arg-type]


def test_system_prompt_states_the_tightening_directions():
    assert "lower t_oar, raise lambda_oar or raise v_oar" in SYSTEM_PROMPT
    assert "1. If every criterion passes, reply stop." in SYSTEM_PROMPT
    assert "raising lambda_ptv loosens every OAR" in SYSTEM_PROMPT
    assert '"action": "stop", "tpp": "", "direction": "none"' in SYSTEM_PROMPT
    assert "Valid ranges: t_ptv [1,1.2], other t (0,1], lambda (0,100000], v_ptv (0,0.3], other v (0,1]." in (
        SYSTEM_PROMPT)
    # one text for every form (the KV cache of a planner serving both modes stays valid): each form's answer
    assert SYSTEM_PROMPT.count('"changes": {"<TPP name>": ') == 2 and "- step form: " in SYSTEM_PROMPT
    assert "point of the DRL knowledge (p5 ... p95)" in SYSTEM_PROMPT and "(1step, 3steps, 6steps)" in SYSTEM_PROMPT


def test_system_prompt_is_generated_from_the_parameter_table(monkeypatch):
    # The text the benchmarks measured (a local model keeps its KV cache): a table change changes it deliberately.
    assert ("a step multiplies one TPP: raise (t_ptv x1.01, other t x1.25, lambda x1.65, v x1.25) or lower "
            "(t_ptv x0.91, other t x0.6, lambda x0.6, v x0.8), clipped to its valid range\n") in SYSTEM_PROMPT
    assert "has three TPPs:\n" in SYSTEM_PROMPT
    for p in PARAMETERS.values():
        assert f"\n- {p.name}_s: {p.description}\n" in SYSTEM_PROMPT
    v = PARAMETERS["v"]
    changed = {**PARAMETERS, "v": dataclasses.replace(v, ptv=dataclasses.replace(v.ptv, raise_factor=1.5))}
    monkeypatch.setattr(situation_module, "PARAMETERS", changed)
    assert situation_module._factor_list(1) == "t_ptv x1.01, other t x1.25, lambda x1.65, v_ptv x1.5, other v x1.25"
    assert situation_module._tightening_text("ptv") == (
        "lower t_ptv, raise v_ptv or raise lambda_ptv (raising lambda_ptv loosens every OAR; lowering it tightens "
        "every OAR)")


def test_stepped_value_matches_the_published_factors_and_bounds():
    assert stepped_value("lambda_rectum", 2.0, 1) == pytest.approx(3.3)
    assert stepped_value("t_rectum", 0.5, -1) == pytest.approx(0.3)
    assert stepped_value("t_ptv", 1.1, -1) == pytest.approx(1.001)
    assert stepped_value("t_ptv", 1.0, -1) == 1.0  # clipped at the lower bound: a no-op
    assert stepped_value("v_ptv", 0.3, 1) == 0.3


def test_criterion_view_scores_like_the_protocol():
    criterion = next(c for c in load_scenario("liver").protocol.criteria if c.metric == "D10cc")
    view = CriterionView.of(criterion, 19.0)
    assert (view.label, view.structure, view.unit, view.upper) == ("stomach D10cc ≤ 18 Gy", "stomach", "Gy", True)
    assert view.points == pytest.approx(0.8) and not view.passed
    assert view.room == pytest.approx(-1.0)
