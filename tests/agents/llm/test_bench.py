"""The benchmark set, its judgement by effect and its scoring (no model: replay clients), and the ``m2m bench llm``
command's errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from functools import cache

from m2m.agents.drl import DEFAULT_KNOWLEDGE
from m2m.agents.drl.knowledge import load_knowledge
from m2m.agents.llm.answer import Answer, Change
from m2m.agents.llm.bench import (
    BASELINE_KNOWLEDGE,
    BASELINE_RULES,
    BASELINE_SAFE,
    BASELINE_STOP,
    HELD_OUT_KINDS,
    BenchCase,
    Need,
    bench_cases,
    can_help,
    judge,
    mode_forms,
    move_answer,
    need_of,
    report,
    run_baselines,
    run_model,
    select_cases,
    summarise,
    table,
    with_knowledge,
)
from m2m.agents.llm.clients import ModelClientSpec, make_client
from m2m.agents.llm.guard import quantile_menu, safe_action, tightening_moves
from m2m.agents.llm.situation import worst_failing
from m2m.agents.planner import KnowledgeDecider, RulesDecider
from m2m.cli.main import main
from m2m.physics.tpp import clamp_value


@cache
def cases() -> tuple[BenchCase, ...]:
    """The whole set with the packaged knowledge attached, as ``m2m bench llm`` runs it."""
    return with_knowledge(bench_cases(), load_knowledge(DEFAULT_KNOWLEDGE))


def _change(case: BenchCase, tpp: str, after: float) -> Answer:
    s = case.situation
    return Answer("values", False, (Change(tpp, s.tpps[tpp], clamp_value(tpp, after)),))


def _loosening(case: BenchCase, need: Need) -> Answer:
    """A values answer that loosens ``need``'s structure by 30 % of a TPP (one that can move that way)."""
    assert need.structure is not None
    s = case.situation
    for tpp, direction in tightening_moves(s):
        if tpp.endswith(f"_{need.structure}"):
            after = clamp_value(tpp, s.tpps[tpp] * (1.3 if direction < 0 else 0.7))
            if abs(after - s.tpps[tpp]) > 1e-3 * s.tpps[tpp]:
                return _change(case, tpp, after)
    raise AssertionError(f"{case.name}: nothing loosens {need.structure}")


def test_the_set_covers_both_sites_stops_and_a_held_out_prostate_set():
    all_cases = cases()
    assert len({c.name for c in all_cases}) == len(all_cases) == 44
    assert {c.situation.scenario.name for c in all_cases if not c.held_out} == {"prostate-basic", "liver"}
    held = [c for c in all_cases if c.held_out]
    assert len(held) == 20 and {c.situation.scenario.name for c in held} == {"prostate-basic"}
    assert all(c.why and c.kind in HELD_OUT_KINDS and c.name.startswith("held-out/") for c in held)
    assert all(sum(c.kind == kind for c in held) >= 6 for kind in HELD_OUT_KINDS)
    assert any(c.situation.at_max for c in all_cases)
    assert all(len(c.situation.advice) == 3 for c in all_cases)
    # A situation past its first step carries the step before it, as a session's does.
    assert all(bool(c.situation.history) == (c.situation.step > 0) for c in all_cases)
    assert bench_cases(held_out=False) == tuple(c for c in bench_cases() if not c.held_out)


def test_every_situation_is_judged_consistently():
    for case in cases():
        s = case.situation
        oars = s.scenario.oar_names
        need = need_of(s)
        safe = move_answer(s, *safe_action(s, "guided", oars))
        verdict = judge(s, safe, need)
        assert verdict.correct and not verdict.harmful, case.name  # the guided guard's own action is right
        stop = judge(s, Answer.of_stop(), need)
        assert stop.correct == s.at_max and stop.harmful == (not s.at_max), case.name
        assert not judge(s, None, need).correct and not judge(s, None, need).harmful
        if s.at_max:
            assert need.structure is None and safe.stop
            continue
        assert need.structure is not None and can_help(s, need.structure, need.sign), case.name
        # The judgement follows the needed direction: inverted, the same action is wrong.
        assert not judge(s, safe, Need(need.structure, -need.sign, need.criterion)).correct, case.name
        (c,) = safe.changes
        reverse = _change(case, c.tpp, c.before * c.before / c.after)
        assert not judge(s, reverse, need).correct, case.name
        # Loosening the structure of a failing criterion is harmful (and not correct).
        loosened = judge(s, _loosening(case, need), need)
        assert loosened.harmful and not loosened.correct, case.name


def test_held_out_situations_defeat_a_one_rule_planner():
    for case in (c for c in cases() if c.held_out):
        s = case.situation
        need = need_of(s)
        first = move_answer(s, *tightening_moves(s)[0])
        rules = asyncio.run(RulesDecider().decide(s, "guided", False, None)).raw
        assert rules is not None
        if case.kind == "bound":  # the first tightening move is a no-op or leaves the knowledge's range
            assert not judge(s, first, need).correct, case.name
            assert worst_failing(s)[0].structure == need.structure, case.name
        elif case.kind == "jump":  # one step saves nothing; a jump to a knowledge point saves several
            assert judge(s, first, need).steps_saved == 0 or not judge(s, first, need).correct
            jumps = [judge(s, _change(case, tpp, value), need)
                     for tpp, options in quantile_menu(s, "guided", s.scenario.oar_names).items()
                     for _, value in options]
            assert any(j.correct and j.jump and j.steps_saved >= 2 for j in jumps), case.name
        else:  # two-fail: the PTV's moves are exhausted and the rule's raise lambda_ptv loosens another failure
            assert worst_failing(s)[0].structure == "ptv" and need.structure != "ptv", case.name
            assert str(rules.move) == "raise lambda_ptv" and judge(s, rules, need).harmful, case.name


def test_steps_saved_credit_a_jump_up_to_the_knowledge_range():
    (case,) = select_cases(cases(), ["held-out/rectum-lambda-far-below-knowledge"])
    s = case.situation
    one_step = judge(s, move_answer(s, "lambda_rectum", 1))
    assert one_step.correct and one_step.steps_saved == 0 and not one_step.jump
    to_p50 = judge(s, _change(case, "lambda_rectum", 2.1))
    beyond = judge(s, _change(case, "lambda_rectum", 25.0))  # past the p75 (8.8): credited up to it
    assert to_p50.jump and 6 < to_p50.steps_saved < beyond.steps_saved < 10


def test_baselines():
    chosen = cases()
    deciders = {BASELINE_RULES: (RulesDecider().decide, "step"),
                BASELINE_KNOWLEDGE: (KnowledgeDecider().decide, "quantile")}
    records = asyncio.run(run_baselines(chosen, deciders))
    rows = {(r.model, r.mode): r for r in summarise(records)}
    n, stops, held = len(chosen), sum(c.situation.at_max for c in chosen), sum(c.held_out for c in chosen)
    assert rows[BASELINE_STOP, "guided"].correct == stops and rows[BASELINE_STOP, "guided"].distinct == 1
    assert rows[BASELINE_STOP, "guided"].harmful == n - stops
    assert rows[BASELINE_SAFE, "guided"].correct == rows[BASELINE_SAFE, "guided"].guarded_correct == n
    rules = rows[BASELINE_RULES, "guided"]
    assert rules.held_out == held and rules.held_out_correct <= held // 2 and rules.harmful > 0
    assert rules.guarded_correct == n and rules.own < n  # the guard repairs what the rule gets wrong
    knowledge = rows[BASELINE_KNOWLEDGE, "guided"]
    assert knowledge.steps_saved > 0 and knowledge.jumps > 0 and knowledge.harmful > 0
    assert all(r.mean_prompt_tokens is None and r.valid == r.total for r in rows.values())


def test_mode_forms_and_selection():
    assert mode_forms(("step", "values", "quantile"), "guided") == ("step", "values", "quantile")
    assert mode_forms(("step", "values", "quantile"), "unguided") == ("step", "values")
    assert mode_forms(("quantile",), "unguided") == ("values",)
    assert len(select_cases(bench_cases(), ["held-out"])) == 20
    assert [c.name for c in select_cases(bench_cases(), ["liver/*"], 2)] == ["liver/stomach-d10cc-fails",
                                                                            "liver/stomach-both-fail"]
    assert len(select_cases(bench_cases(), [], 3)) == 3


def _values(tpp: str, value: float) -> str:
    return json.dumps({"action": "change", "changes": {tpp: value}, "rationale": "r"})


def _quantile(tpp: str, target: str) -> str:
    return json.dumps({"action": "change", "changes": {tpp: target}, "rationale": "r"})


def test_replay_drives_the_bench_in_the_values_and_quantile_forms():
    chosen = select_cases(cases(), ["prostate/rectum-v70-fails", "held-out/rectum-lambda-far-below-knowledge"])
    assert len(chosen) == 2
    menus = [quantile_menu(c.situation, "guided", c.situation.scenario.oar_names) for c in chosen]
    assert all("p50" in dict(m["lambda_rectum"]) for m in menus)
    answers = (
        # unguided, values (quantile is asked as values unguided, once): right, then a loosening (not refused
        # unguided: the unguided guard does not protect a failing structure)
        _values("lambda_rectum", 2.5), _values("lambda_rectum", 0.02),
        # guided, values: a loosening refused with feedback, then a right retry; then right at once
        _values("lambda_rectum", 0.5), _values("lambda_rectum", 2.5), _values("lambda_rectum", 2.1),
        # guided, quantile: the knowledge median of lambda_rectum on both (a jump on the second)
        _quantile("lambda_rectum", "p50"), _quantile("lambda_rectum", "p50"),
    )
    client = make_client(ModelClientSpec("replay", replay_answers=answers))
    records = asyncio.run(run_model("replayed", client, chosen, forms=("values", "quantile"),
                                    count_tokens=lambda text: len(text.split())))
    rows = {(r.mode, r.form): r for r in summarise(records)}
    assert list(rows) == [("unguided", "values"), ("guided", "values"), ("guided", "quantile")]
    unguided, values, quantile = rows.values()
    assert (unguided.correct, unguided.harmful, unguided.guarded_correct, unguided.own) == (1, 1, 1, 2)
    assert (values.correct, values.harmful, values.guarded_correct, values.own, values.feedback) == (1, 1, 2, 2, 1)
    assert (quantile.correct, quantile.guarded_correct, quantile.jumps, quantile.valid) == (2, 2, 1, 2)
    assert quantile.steps_saved > 4 and quantile.held_out == quantile.held_out_correct == 1
    refused = next(r for r in records if r.feedback)
    assert refused.source == "retry" and refused.retry.startswith("lambda_rectum") and refused.retry_correct
    assert all(r.prompt_tokens and r.system_tokens for r in records)
    assert table(summarise(records), "t").row_count == 3
    doc = json.loads(json.dumps(report(summarise(records), records, chosen, title="t")))
    assert {"title", "cases", "summary", "decisions"} <= set(doc)
    assert {"model", "mode", "form", "total", "correct", "guarded_correct", "harmful", "own", "valid", "retries",
            "feedback", "held_out_correct", "steps_saved", "jumps", "mean_prompt_tokens", "system_tokens", "mean_s",
            } <= set(doc["summary"][0])
    assert len(doc["decisions"]) == 6 and doc["decisions"][0]["answers"]
    assert [c["need"] for c in doc["cases"]] == ["tighten rectum (rectum V70Gy ≤ 25 %)"] * 2


def test_a_case_without_knowledge_is_still_judged():
    (case,) = select_cases(bench_cases(), ["prostate/rectum-v70-fails"])
    bare = dataclasses.replace(case.situation, knowledge=None)
    verdict = judge(bare, _change(case, "lambda_rectum", 30.0))
    assert verdict.correct and verdict.steps_saved == 0  # without knowledge a change counts one step at most


def test_command_fails_clearly_on_bad_arguments(tmp_path, capsys):
    assert main(["bench", "llm", "--knowledge", str(tmp_path / "none.json")]) == 2
    assert "no DRL knowledge" in capsys.readouterr().err
    (tmp_path / "k.json").write_text("{}")
    assert main(["bench", "llm", "--knowledge", str(tmp_path / "k.json"), "--models", "gpt-9"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["bench", "llm", "--knowledge", str(tmp_path / "k.json"), "--models", "qwen-0.5b",
                 "--forms", "step,essay"]) == 2
    assert "--forms" in capsys.readouterr().err
    assert main(["bench", "llm", "--knowledge", str(tmp_path / "k.json"), "--models", "qwen-0.5b",
                 "--situations", "no-such-situation"]) == 2
    assert "no situation" in capsys.readouterr().err
