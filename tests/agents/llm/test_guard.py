"""The guard's rules (m2m.agents.llm.guard), each on a situation built from the shipped protocols."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec
import pytest

from m2m.agents.drl.knowledge import Provenance, TppKnowledge, TppStats
from m2m.agents.llm.answer import Answer, Change
from m2m.agents.llm.bench import LIVER_PASS, LIVER_TPPS, PROSTATE_PASS, PROSTATE_TPPS, situation_from_values
from m2m.agents.llm.decision import TppDecision, to_answer
from m2m.agents.llm.guard import (
    GuardResult,
    effects,
    enforced_knowledge,
    quantile_menu,
    rule_vetoes,
    safe_action,
    value_vetoes,
)
from m2m.agents.llm.guard import guard as judge
from m2m.agents.llm.situation import NEAR_LIMIT_FRACTION, CriterionView, Situation, StepView, at_risk, span
from m2m.physics.tpp import Direction, Move

OARS = ("bladder", "rectum")


def as_answer(decision: TppDecision, s: Situation) -> Answer:
    """The step-form answer ``decision`` stands for; an unknown TPP or a change without a direction is kept as the
    malformed answer it is (decide() would have re-asked), so the guard's own checks are exercised."""
    if decision.action == "change" and decision.tpp not in s.tpps:
        assert decision.move is not None
        return Answer("step", False, (Change(decision.tpp, 1.0, 2.0),), decision.move)
    if decision.action == "change" and decision.direction == "none":
        return Answer("step", False, ())
    return to_answer(decision, s)


def guard(s: Situation, decision: TppDecision | Answer | None, mode: str, oars: tuple[str, ...]) -> GuardResult:
    answer = as_answer(decision, s) if isinstance(decision, TppDecision) else decision
    return judge(s, answer, mode, oars)  # type: ignore[arg-type]


def taken(result: GuardResult) -> tuple[str, int]:
    """The guarded action as (tpp, ±1), or ("", 0) for a stop."""
    return ("", 0) if result.move is None else (result.move.tpp, int(result.move.direction))


def prostate(over: dict[str, float] | None = None, tpps: dict[str, float] | None = None,
             advice: list[tuple[str, int, float]] | None = None) -> Situation:
    return situation_from_values("prostate-basic", 3, {**PROSTATE_PASS, **(over or {})},
                                 {**PROSTATE_TPPS, **(tpps or {})}, advice or [])


def change(tpp: str, direction: str) -> TppDecision:
    return TppDecision(action="change", tpp=tpp, direction=direction, rationale="test")  # type: ignore[arg-type]


STOP = TppDecision(action="stop", tpp="", direction="none", rationale="done")
RECTUM_FAILS = {"rectum V70Gy": 28.6}


def knowledge(stats: dict[str, tuple[float, float, str]], scenario: str = "prostate-basic") -> TppKnowledge:
    """Knowledge whose TPP labels and 5/95 % quantiles are ``{label: (q5, q95, scale)}``."""
    return TppKnowledge(
        roles={"ptv": "ptv", "oar1": "bladder", "oar2": "rectum"},
        tpps=[TppStats(name=label, label=label, scale=scale, count=10, mean=(lo + hi) / 2, sd=0.1,
                       quantiles={"5": lo, "25": lo, "50": (lo + hi) / 2, "75": hi, "95": hi})
              for label, (lo, hi, scale) in stats.items()],
        lambda_ratios=[], moves=[], priority=[],
        provenance=Provenance(checkpoint_sha256="0" * 64, decision_rule="greedy", scenario=scenario,
                              cohort="knowledge", seeds=[0], n_cases=10, n_at_max=10, success_rate=1.0,
                              mean_final_score=9.0, max_score=9.0, created_utc="2026-01-01T00:00:00+00:00"),
    )


def test_effects_follow_the_objective():
    assert effects("t_rectum", -1, OARS) == {"rectum": 1}
    assert effects("lambda_rectum", 1, OARS) == {"rectum": 1}
    assert effects("v_bladder", -1, OARS) == {"bladder": -1}
    assert effects("t_ptv", 1, OARS) == {"ptv": -1}
    # lambda_ptv divides every OAR weight: raising it tightens the hot spot and loosens every OAR.
    assert effects("lambda_ptv", 1, OARS) == {"ptv": 1, "bladder": -1, "rectum": -1}
    assert effects("lambda_ptv", -1, OARS) == {"ptv": -1, "bladder": 1, "rectum": 1}


def test_a_valid_change_passes_unchanged_in_both_modes():
    s = prostate(RECTUM_FAILS)
    for mode in ("unguided", "guided"):
        result = guard(s, change("lambda_rectum", "raise"), mode, OARS)
        assert (*taken(result), result.source, result.vetoes) == ("lambda_rectum", 1, "proposal", ())


def test_unknown_tpp_is_vetoed_and_replaced_by_the_safe_action():
    result = guard(prostate(RECTUM_FAILS), change("lambda_femur", "raise"), "unguided", OARS)
    assert [v.reason for v in result.vetoes] == ["unknown_tpp"]
    assert (*taken(result), result.source) == ("lambda_rectum", 1, "safe")


def test_a_step_at_a_bound_is_a_no_op_and_vetoed():
    s = prostate(RECTUM_FAILS, {"t_rectum": 1.0})
    result = guard(s, change("t_rectum", "raise"), "unguided", OARS)
    assert [v.reason for v in result.vetoes] == ["no_op_at_bound"]
    assert "upper bound" in result.vetoes[0].detail
    assert result.source == "safe"
    # The same TPP in the other direction is fine.
    assert guard(s, change("t_rectum", "lower"), "unguided", OARS).source == "proposal"


def test_stop_is_allowed_only_at_the_maximum_score():
    at_max = prostate()
    assert at_max.at_max
    result = guard(at_max, STOP, "unguided", OARS)
    assert (*taken(result), result.source, result.vetoes) == ("", 0, "proposal", ())
    below = guard(prostate(RECTUM_FAILS), STOP, "guided", OARS)
    assert [v.reason for v in below.vetoes] == ["early_stop"]
    assert (*taken(below), below.source) == ("lambda_rectum", 1, "safe")


def test_no_decision_takes_the_safe_action_and_stops_at_the_maximum():
    result = guard(prostate(RECTUM_FAILS), None, "unguided", OARS)
    assert [v.reason for v in result.vetoes] == ["invalid_decision"]
    assert (*taken(result), result.source) == ("lambda_rectum", 1, "safe")
    at_max = guard(prostate(advice=[("t_bladder", 1, 0.9)]), None, "guided", OARS)
    assert (*taken(at_max), at_max.source) == ("", 0, "safe")


def test_a_change_without_direction_is_invalid():
    decision = TppDecision(action="change", tpp="t_rectum", direction="none", rationale="?")
    result = guard(prostate(RECTUM_FAILS), decision, "unguided", OARS)
    assert [v.reason for v in result.vetoes] == ["invalid_decision"]
    assert result.source == "safe"


def test_loosening_a_failing_structure_is_vetoed_only_when_guided():
    s = prostate(RECTUM_FAILS)
    loosen = change("t_rectum", "raise")
    assert guard(s, loosen, "unguided", OARS).source == "proposal"
    guided = guard(s, loosen, "guided", OARS)
    assert "loosens_at_risk" in [v.reason for v in guided.vetoes]
    assert "rectum V70Gy" in guided.vetoes[0].detail
    assert taken(guided) == ("lambda_rectum", 1)


def test_near_limit_uses_the_protocol_span():
    s = prostate({"rectum V70Gy": 24.6})
    c = next(c for c in s.criteria if c.label.startswith("rectum V70Gy"))
    assert c.passed
    assert span(s, c) == pytest.approx(5.0)  # limit 25 %, zero point 30 %
    assert at_risk(s, c)  # 0.4 points of room < 20 % of 5
    far = next(c for c in s.criteria if c.label.startswith("rectum V60Gy"))
    assert not at_risk(s, far)
    edge = dataclasses.replace(c, value=25.0 - NEAR_LIMIT_FRACTION * 5.0 - 0.01)
    assert not at_risk(s, edge)


def test_guided_vetoes_loosening_a_near_limit_oar_through_lambda_ptv():
    near = prostate({"ptv D0.03cc": 108.5, "rectum V70Gy": 24.6})
    raise_lambda_ptv = change("lambda_ptv", "raise")
    result = guard(near, raise_lambda_ptv, "guided", OARS)
    assert [v.reason for v in result.vetoes] == ["loosens_at_risk"]
    assert "loosens rectum" in result.vetoes[0].detail
    # Every OAR with room: the same move is admissible.
    assert guard(prostate({"ptv D0.03cc": 108.5}), raise_lambda_ptv, "guided", OARS).source == "proposal"


def test_guided_vetoes_moving_further_outside_the_knowledge_support():
    k = knowledge({"t_rectum": (0.5, 0.9, "linear"), "lambda_rectum": (-1.0, 1.0, "log10"),
                   "t_bladder": (0.5, 0.9, "linear")})
    s = dataclasses.replace(prostate(RECTUM_FAILS, {"t_rectum": 0.45, "lambda_rectum": 9.0, "t_bladder": 0.45}),
                            knowledge=k, knowledge_site="prostate")
    # t_rectum 0.45 is below the 5 % quantile 0.5: lowering it goes further out.
    lower_t = guard(s, change("t_rectum", "lower"), "guided", OARS)
    assert [v.reason for v in lower_t.vetoes] == ["outside_knowledge"]
    assert guard(s, change("t_rectum", "lower"), "unguided", OARS).source == "proposal"
    # lambda_rectum 9 is inside [0.1, 10] on the log scale; ×1.65 = 14.9 leaves the support.
    raise_lambda = guard(s, change("lambda_rectum", "raise"), "guided", OARS)
    assert [v.reason for v in raise_lambda.vetoes] == ["outside_knowledge"]
    assert taken(raise_lambda) == ("v_rectum", 1)  # the next safe move
    # Moving back towards the support is fine (the bladder passes with room, so loosening it is allowed).
    assert not rule_vetoes(s, "t_bladder", 1, "guided", OARS)
    assert rule_vetoes(s, "t_bladder", -1, "guided", OARS)[0].reason == "outside_knowledge"


def test_knowledge_from_another_site_is_shown_but_vetoes_nothing():
    from m2m.agents.drl.knowledge import relabel_knowledge
    from m2m.scenarios import load_scenario

    k = knowledge({"t_rectum": (0.52, 1.0, "linear")}, scenario="prostate-basic")
    stomach_fails = {**LIVER_PASS, "stomach D10cc": 19.0}
    liver = dataclasses.replace(
        situation_from_values("liver", 1, stomach_fails, {**LIVER_TPPS, "t_stomach": 0.62}),
        knowledge=relabel_knowledge(msgspec.structs.replace(k, tpps=[
            msgspec.structs.replace(k.tpps[0], name="t_oar2")]), load_scenario("liver").roles),
        knowledge_site="prostate",
    )
    assert liver.usable_knowledge() is not None  # the LLM sees it (labelled t_stomach) ...
    assert next(t.label for t in liver.usable_knowledge().tpps) == "t_stomach"
    # ... but lowering t_stomach to 0.37, below the prostate range, is allowed on liver
    assert guard(liver, change("t_stomach", "lower"), "guided", ("liver_normal", "stomach")).source == "proposal"
    # the same knowledge on its own site is enforced
    prostate_s = dataclasses.replace(prostate(RECTUM_FAILS, {"t_rectum": 0.62}), knowledge=k, knowledge_site="prostate")
    assert [v.reason for v in guard(prostate_s, change("t_rectum", "lower"), "guided", OARS).vetoes] == [
        "outside_knowledge"]


def test_knowledge_of_unknown_origin_vetoes_nothing():
    k = knowledge({"t_rectum": (0.52, 1.0, "linear")})
    s = dataclasses.replace(prostate(RECTUM_FAILS, {"t_rectum": 0.62}), knowledge=k)  # knowledge_site: None
    assert s.usable_knowledge() is not None and enforced_knowledge(s) is None
    assert not rule_vetoes(s, "t_rectum", -1, "guided", OARS)


def test_knowledge_of_another_scenario_is_ignored():
    k = knowledge({"t_ptv": (1.1, 1.2, "linear")}, scenario="prostate-basic")
    k = msgspec.structs.replace(k, tpps=[*k.tpps, TppStats(name="t_oar1", label="t_bladder", scale="linear", count=3,
                                                          mean=0.5, sd=0.1, quantiles={"5": 0.4, "95": 0.6})])
    liver = situation_from_values("liver", 1, {**LIVER_PASS, "ptv D0.03cc": 109.0}, {**LIVER_TPPS, "t_ptv": 1.05})
    liver = dataclasses.replace(liver, knowledge=k, knowledge_site="prostate")
    assert liver.usable_knowledge() is None
    # With the prostate knowledge applied, lowering t_ptv (1.05 < 1.1) would be vetoed; here it is not.
    assert guard(liver, change("t_ptv", "lower"), "guided", ("liver_normal", "stomach")).source == "proposal"


def test_guided_replaces_a_vetoed_proposal_by_the_first_admissible_advice_that_tightens_what_fails():
    s = prostate(RECTUM_FAILS, {"v_rectum": 1.0},
                 advice=[("v_rectum", 1, 0.4), ("t_rectum", 1, 0.3), ("t_bladder", 1, 0.2), ("t_rectum", -1, 0.1)])
    result = guard(s, change("t_rectum", "raise"), "guided", OARS)
    assert result.source == "drl_advice"
    # v_rectum is at its bound, raising t_rectum loosens the failing rectum, raising t_bladder is admissible (the
    # bladder passes with room) but does nothing for the rectum
    assert taken(result) == ("t_rectum", -1)
    assert [v.reason for v in result.vetoes] == ["loosens_at_risk"]
    # Unguided never takes the advice.
    assert guard(s, STOP, "unguided", OARS).source == "safe"


def test_guided_without_admissible_advice_takes_the_safe_action():
    s = prostate(RECTUM_FAILS, advice=[("t_rectum", 1, 0.7), ("lambda_ptv", 1, 0.2), ("v_bladder", -1, 0.1)])
    result = guard(s, None, "guided", OARS)
    assert (*taken(result), result.source) == ("lambda_rectum", 1, "safe")


def test_safe_action_tightens_the_worst_failing_criterion():
    # Bladder V75Gy barely fails (0.9 pt), rectum V70Gy fails badly (0 pt): the rectum first.
    s = prostate({"bladder V75Gy": 25.5, "rectum V70Gy": 31.0})
    assert safe_action(s, "unguided", OARS) == ("lambda_rectum", 1)
    # lambda at its upper bound: the next move in the list.
    assert safe_action(prostate(RECTUM_FAILS, {"lambda_rectum": 1e5}), "unguided", OARS) == ("t_rectum", -1)
    assert safe_action(prostate(), "guided", OARS) == ("", 0)


def test_safe_action_for_the_ptv_hot_spot():
    hot = {"ptv D0.03cc": 109.0}
    assert safe_action(prostate(hot, {"t_ptv": 1.1}), "unguided", OARS) == ("t_ptv", -1)
    assert safe_action(prostate(hot, {"t_ptv": 1.0}), "unguided", OARS) == ("v_ptv", 1)
    assert safe_action(prostate(hot, {"t_ptv": 1.0, "v_ptv": 0.3}), "unguided", OARS) == ("lambda_ptv", 1)
    # Guided with a near-limit OAR, raising lambda_ptv is not admissible; the range rule alone then decides.
    near = prostate({**hot, "rectum V70Gy": 24.6}, {"t_ptv": 1.0, "v_ptv": 0.3})
    assert rule_vetoes(near, "lambda_ptv", 1, "guided", OARS)
    assert safe_action(near, "guided", OARS) == ("lambda_ptv", 1)


def test_safe_action_for_a_failing_lower_limit_loosens():
    s = prostate()
    coverage = CriterionView("ptv D98% ≥ 95 %Rx", "ptv", 93.0, 95.0, "%Rx", 0.3, False, False)
    s = dataclasses.replace(s, criteria=(*s.criteria, coverage))
    assert span(s, coverage) == pytest.approx(0.05 * 95.0)  # not in the protocol: the fallback span
    assert safe_action(s, "unguided", OARS) == ("t_ptv", 1)


def test_nothing_admissible_stops_with_a_veto():
    stuck = {"t_rectum": 5e-324, "lambda_rectum": 1e5, "v_rectum": 1.0}
    s = prostate(RECTUM_FAILS, stuck)
    result = guard(s, None, "unguided", OARS)
    assert (*taken(result), result.source) == ("", 0, "safe")
    assert [v.reason for v in result.vetoes] == ["invalid_decision", "no_admissible_action"]


def test_packaged_knowledge_loads():
    """The shipped knowledge applies to prostate-basic situations."""
    from m2m.agents.drl import DEFAULT_KNOWLEDGE
    from m2m.agents.drl.knowledge import load_knowledge

    path = Path(DEFAULT_KNOWLEDGE)
    assert path.is_file(), f"{path} is not shipped (m2m drl knowledge --out writes it)"
    s = dataclasses.replace(prostate(), knowledge=load_knowledge(path))
    assert s.usable_knowledge() is not None


def test_a_value_change_is_judged_by_its_direction_and_a_non_change_is_refused():
    s = prostate(RECTUM_FAILS)
    assert [v.reason for v in value_vetoes(s, "t_rectum", PROSTATE_TPPS["t_rectum"], "unguided", OARS)] == [
        "no_change"]
    assert not value_vetoes(s, "t_rectum", 0.5, "guided", OARS)  # tightens the failing rectum
    loosen = value_vetoes(s, "t_rectum", 0.95, "guided", OARS)
    assert [v.reason for v in loosen] == ["loosens_at_risk"] and "0.8->0.95" in loosen[0].detail
    assert not value_vetoes(s, "t_rectum", 0.95, "unguided", OARS)  # unguided: validity only


def test_a_multi_tpp_answer_is_taken_whole_or_not_at_all():
    s = prostate(RECTUM_FAILS)
    good = Answer("values", False, (Change("t_rectum", 0.8, 0.5), Change("lambda_rectum", 1.5, 6.0)))
    result = judge(s, good, "guided", OARS)
    assert result.source == "proposal" and result.changes == good.changes and result.move is None
    mixed = Answer("values", False, (Change("t_rectum", 0.8, 0.5), Change("t_bladder", 0.85, 0.85)))
    refused = judge(s, mixed, "guided", OARS)
    assert refused.source != "proposal" and refused.vetoes[0].reason == "no_change"


def test_the_retry_is_the_source_when_the_feedback_turn_fixed_the_answer():
    s = prostate(RECTUM_FAILS)
    first = Answer("values", False, (Change("t_rectum", 0.8, 0.95),))
    retry = Answer("values", False, (Change("t_rectum", 0.8, 0.5),))
    result = judge(s, retry, "guided", OARS, first=first)
    assert result.source == "retry" and result.changes == retry.changes
    assert [v.reason for v in result.vetoes] == ["loosens_at_risk"]  # the first answer's refusal is kept
    # no valid second answer (decide() hands the first back): replaced, the refusal recorded once
    again = judge(s, first, "guided", OARS, first=first)
    assert again.source in ("drl_advice", "safe") and [v.reason for v in again.vetoes] == ["loosens_at_risk"]


def test_quantile_menu_holds_only_admissible_points_that_help_a_failing_structure():
    k = knowledge({"t_rectum": (0.5, 0.95, "linear"), "lambda_rectum": (-1.0, 1.5, "log10"),
                   "t_bladder": (0.5, 0.95, "linear"), "lambda_ptv": (-1.0, 1.0, "log10")})
    s = dataclasses.replace(prostate(RECTUM_FAILS), knowledge=k, knowledge_site="prostate")
    menu = quantile_menu(s, "guided", OARS)
    assert "t_bladder" not in menu  # moving it cannot help the failing rectum
    assert all(after < s.tpps["t_rectum"] for _, after in menu["t_rectum"])  # lower t tightens
    assert all(after > s.tpps["lambda_rectum"] for _, after in menu["lambda_rectum"])
    assert all(after < s.tpps["lambda_ptv"] for _, after in menu["lambda_ptv"])  # lower lambda_ptv: every OAR
    for tpp, options in menu.items():
        distances = [abs(after - s.tpps[tpp]) for _, after in options]
        assert distances == sorted(distances, reverse=True)  # the boldest first: the model anchors on the first
        assert all(not value_vetoes(s, tpp, after, "guided", OARS) for _, after in options)
    assert quantile_menu(dataclasses.replace(prostate(), knowledge=k, knowledge_site="prostate"), "guided",
                         OARS) == {}  # at the maximum nothing helps


def test_the_menu_offers_steps_beyond_the_knowledge_only_where_no_point_helps():
    # The experiment's slow guided case: PTV hot spot fails, t_ptv and v_ptv at their bounds, lambda_ptv already
    # above the knowledge's p95 (no point helps), OARs far from their limits.
    k = knowledge({"t_ptv": (1.0, 1.04, "linear"), "v_ptv": (0.1, 0.27, "linear"), "lambda_ptv": (0.5, 1.84, "log10"),
                   "t_rectum": (0.5, 0.95, "linear")})
    hot = {"ptv D0.03cc": 108.0, "rectum V70Gy": 5.0, "bladder V70Gy": 5.0}
    s = dataclasses.replace(prostate(hot, {"t_ptv": 1.0, "v_ptv": 0.3, "lambda_ptv": 76.0}), knowledge=k,
                            knowledge_site="prostate")
    menu = quantile_menu(s, "guided", OARS)
    assert set(menu) == {"lambda_ptv"}  # t_ptv and v_ptv cannot move that way; the rectum needs nothing
    assert [t for t, _ in menu["lambda_ptv"]] == ["6steps", "3steps", "1step"]
    assert [v for _, v in menu["lambda_ptv"]] == pytest.approx([76.0 * 1.65**6, 76.0 * 1.65**3, 76.0 * 1.65])
    # The guard takes a choice of the menu as it is, although it leaves the knowledge's range ...
    jump = Answer("quantile", False, (Change("lambda_ptv", 76.0, menu["lambda_ptv"][0][1], target="6steps"),))
    assert judge(s, jump, "guided", OARS).source == "proposal"
    # ... while the same value asked for as a free number is still held to the range rule.
    free = Answer("values", False, (Change("lambda_ptv", 76.0, menu["lambda_ptv"][0][1]),))
    assert [v.reason for v in judge(s, free, "guided", OARS).vetoes] == ["outside_knowledge"]
    # With an OAR near its limit, raising lambda_ptv (it loosens every OAR) is off the ladder as well.
    near = dataclasses.replace(prostate({**hot, "rectum V70Gy": 24.5}, {"t_ptv": 1.0, "v_ptv": 0.3,
                                                                         "lambda_ptv": 76.0}),
                               knowledge=k, knowledge_site="prostate")
    assert "lambda_ptv" not in quantile_menu(near, "guided", OARS)
    # Where a knowledge point helps, it is offered and no ladder is added for that TPP.
    inside = dataclasses.replace(prostate(hot, {"t_ptv": 1.0, "v_ptv": 0.3, "lambda_ptv": 3.0}), knowledge=k,
                                 knowledge_site="prostate")
    assert all(t.startswith("p") for t, _ in quantile_menu(inside, "guided", OARS)["lambda_ptv"])
    # The ladder is a structure's last resort: t_rectum below the knowledge gets none while lambda_rectum, far below
    # its range, has knowledge points (the weight is the lever; case 3002 drove t_rectum to 0.001 instead).
    k2 = knowledge({"t_rectum": (0.5, 0.95, "linear"), "lambda_rectum": (0.0, 1.5, "log10")})
    low = dataclasses.replace(prostate(RECTUM_FAILS, {"t_rectum": 0.3, "lambda_rectum": 0.12}), knowledge=k2,
                              knowledge_site="prostate")
    menu = quantile_menu(low, "guided", OARS)
    assert "t_rectum" not in menu and all(t.startswith("p") for t, _ in menu["lambda_rectum"])


def test_the_menu_leaves_out_a_move_that_did_not_raise_the_score_while_others_remain():
    k = knowledge({"t_rectum": (0.5, 0.95, "linear"), "lambda_rectum": (-1.0, 1.5, "log10"),
                   "lambda_ptv": (0.5, 1.84, "log10")})
    s = dataclasses.replace(prostate(RECTUM_FAILS, {"t_rectum": 0.96}), knowledge=k, knowledge_site="prostate")
    assert {"t_rectum", "lambda_rectum"} <= set(quantile_menu(s, "guided", OARS))
    lowered = Change("t_rectum", 0.99, 0.96, target="p95")
    stalled = dataclasses.replace(s, history=(StepView(2, None, s.score, changes=(lowered,)),))
    menu = quantile_menu(stalled, "guided", OARS)
    assert "t_rectum" not in menu and "lambda_rectum" in menu  # the lever left, not further down the same TPP
    rising = dataclasses.replace(s, history=(StepView(2, None, s.score - 0.5, changes=(lowered,)),))
    assert "t_rectum" in quantile_menu(rising, "guided", OARS)
    # Only the stalled TPP can help (the hot spot, t_ptv and v_ptv at their bounds): going further stays offered.
    hot = {"ptv D0.03cc": 108.0, "rectum V70Gy": 5.0, "bladder V70Gy": 5.0}
    only = dataclasses.replace(prostate(hot, {"t_ptv": 1.0, "v_ptv": 0.3, "lambda_ptv": 76.0}), knowledge=k,
                               knowledge_site="prostate")
    raised = Change("lambda_ptv", 46.0, 76.0, target="1step")
    only = dataclasses.replace(only, history=(StepView(2, None, only.score, changes=(raised,)),))
    assert set(quantile_menu(only, "guided", OARS)) == {"lambda_ptv"}


def test_safe_action_escalates_past_a_move_that_did_not_raise_the_score():
    s = prostate(RECTUM_FAILS)
    assert safe_action(s, "unguided", OARS) == ("lambda_rectum", 1)
    stalled = dataclasses.replace(s, history=(StepView(2, Move("lambda_rectum", Direction.RAISE), s.score + 0.5),))
    assert safe_action(stalled, "unguided", OARS) == ("t_rectum", -1)
    rising = dataclasses.replace(s, history=(StepView(2, Move("lambda_rectum", Direction.RAISE), s.score - 0.5),))
    assert safe_action(rising, "unguided", OARS) == ("lambda_rectum", 1)


def test_a_criterion_the_normalisation_holds_is_never_at_risk():
    """TG-119's PTV D95 ≥ 50 Gy at Rx 50 Gy: every plan is scaled to D95 = Rx, so it sits exactly at its limit and no
    TPP can move it; it must not make the guard refuse loosening the PTV (it did: 5 raises of lambda_ptv in the
    TG-119 guided run). A D98 limit, or a D95 limit above Rx, is still judged by its room."""
    s = prostate()
    d95 = CriterionView("ptv D95% ≥ 79.2 Gy", "ptv", 79.2, 79.2, "Gy", 1.0, True, False, "D95%")
    d95_pct = dataclasses.replace(d95, label="ptv D95% ≥ 100 %Rx", value=100.0, limit=100.0, unit="%Rx")
    d98 = dataclasses.replace(d95, label="ptv D98% ≥ 79.2 Gy", metric="D98%")
    above = dataclasses.replace(d95, label="ptv D95% ≥ 80 Gy", value=80.0, limit=80.0)
    assert not at_risk(s, d95) and not at_risk(s, d95_pct)
    assert at_risk(s, d98) and at_risk(s, above)
    raised = 2.0 * s.tpps["lambda_ptv"]  # tightens the PTV: loosening its coverage, a lower limit

    def loosening_vetoes(extra: CriterionView) -> list[str]:
        situation = dataclasses.replace(s, criteria=(*s.criteria, extra))
        return [v.detail for v in value_vetoes(situation, "lambda_ptv", raised, "guided", OARS)
                if v.reason == "loosens_at_risk"]

    assert loosening_vetoes(d95) == []
    assert loosening_vetoes(d98) == [f"raise lambda_ptv ({s.tpps['lambda_ptv']:.3g}->{raised:.3g}) loosens ptv: "
                                     "ptv D98% ≥ 79.2 Gy is within 0 Gy of its limit"]
