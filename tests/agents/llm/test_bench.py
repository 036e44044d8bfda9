"""The benchmark set and its scoring (no model: replay clients), and the ``m2m bench llm`` command's errors."""

from __future__ import annotations

import asyncio
import json

from m2m.agents.llm.bench import (
    BASELINE_DRL,
    BASELINE_STOP,
    STOP,
    baseline_records,
    bench_cases,
    run_model,
    summarise,
    table,
    with_knowledge,
)
from m2m.agents.llm.clients import ModelClientSpec, make_client
from m2m.agents.llm.guard import rule_vetoes, safe_action
from m2m.cli.main import main


def _move(answer: str) -> tuple[str, int]:
    direction, tpp = answer.split()
    return tpp, 1 if direction == "raise" else -1


def test_the_set_covers_both_sites_and_stops():
    cases = bench_cases()
    assert len(cases) >= 20
    assert len({c.name for c in cases}) == len(cases)
    scenarios = {c.situation.scenario.name for c in cases}
    assert scenarios == {"prostate-basic", "liver"}
    stops = [c for c in cases if c.acceptable == {STOP}]
    assert stops and all(c.situation.at_max for c in stops)
    assert all(STOP not in c.acceptable for c in cases if not c.situation.at_max)
    assert all(len(c.situation.advice) == 3 for c in cases)


def test_every_acceptable_change_is_admissible_and_the_safe_action_is_acceptable():
    for case in bench_cases():
        s = case.situation
        oars = s.scenario.oar_names
        for answer in case.acceptable - {STOP}:
            assert not rule_vetoes(s, *_move(answer), "guided", oars), (case.name, answer)
        tpp, direction = safe_action(s, "guided", oars)
        taken = STOP if direction == 0 else f"{'raise' if direction > 0 else 'lower'} {tpp}"
        assert taken in case.acceptable, case.name


def test_baselines():
    cases = bench_cases()
    rows = {r.model: r for r in summarise(baseline_records(cases))}
    stops = sum(c.acceptable == {STOP} for c in cases)
    assert rows[BASELINE_STOP].correct == stops and rows[BASELINE_STOP].distinct == 1
    drl_right = sum(f"{'raise' if c.situation.advice[0].direction > 0 else 'lower'} {c.situation.advice[0].tpp}"
                    in c.acceptable for c in cases)
    assert rows[BASELINE_DRL].correct == drl_right
    assert 0 < drl_right < len(cases) - stops  # plausible advice: right often, not always


def test_run_model_scores_raw_and_guarded_answers():
    cases = bench_cases()[:3]
    chosen = [sorted(c.acceptable)[-1] for c in cases]
    right = [json.dumps({"action": "change", "tpp": _move(a)[0], "direction": a.split()[0], "rationale": "ok"})
             for a in chosen]
    stop = json.dumps({"action": "stop", "tpp": "", "direction": "none", "rationale": "done"})
    # Unguided: every answer right; guided: always an (early) stop, which the guard turns into an accepted action.
    client = make_client(ModelClientSpec("replay", replay_answers=(*right, *[stop, stop] * len(cases))))
    records = asyncio.run(run_model("replayed", client, with_knowledge(cases, None)))
    rows = {r.mode: r for r in summarise(records)}
    assert (rows["unguided"].correct, rows["unguided"].guarded_correct, rows["unguided"].valid) == (3, 3, 3)
    assert rows["unguided"].distinct == len(set(chosen)) > 1
    assert (rows["guided"].correct, rows["guided"].guarded_correct, rows["guided"].valid) == (0, 3, 3)
    assert rows["guided"].distinct == 1 and rows["guided"].retries == 0
    assert table(summarise(records), "t").row_count == 2


def test_command_fails_clearly_without_knowledge(tmp_path, capsys):
    assert main(["bench", "llm", "--knowledge", str(tmp_path / "none.json")]) == 2
    assert "no DRL knowledge" in capsys.readouterr().err
    (tmp_path / "k.json").write_text("{}")
    assert main(["bench", "llm", "--knowledge", str(tmp_path / "k.json"), "--models", "gpt-9"]) == 2
    assert "unknown" in capsys.readouterr().err
