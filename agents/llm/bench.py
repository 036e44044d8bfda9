"""``m2m bench llm``: candidate models on a fixed set of planning situations, both modes, against two baselines.

:func:`bench_cases` builds 24 situations (14 prostate-basic, 10 liver) from the scenarios' own protocols, with
realistic criterion values, TPPs and DVH summaries, each with the set of answers a careful planner would accept
(e.g. rectum V70Gy fails and the PTV hot spot has room → tighten the rectum: raise ``lambda_rectum``, lower
``t_rectum``, raise ``v_rectum``, or lower ``lambda_ptv``, which tightens every OAR; a move that is a no-op at a
bound, or that loosens another at-risk structure, is not accepted; every criterion passing → ``stop``). Each
situation also carries a plausible DRL top-3 (``advice``): right on most, wrong where a DQN policy is (it has no
``stop`` action, and it keeps its habits such as raising ``t_bladder`` first).

Every model answers every situation in both modes (guided: with the DRL knowledge, which applies to the scenario it
was extracted for, and the advice); the baselines "always stop" and "copy the DRL's top action" answer the same set.
Scored: the raw LLM proposal before the guard (``correct``), the action after the guard (``guarded``), valid
answers, retries, seconds per decision and the number of distinct answers across situations (one model answering
the same whatever the input shows up as 1 or 2).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from rich.table import Table

from m2m.agents.llm.decision import decide
from m2m.agents.llm.guard import guard
from m2m.agents.llm.situation import MODES, AdviceView, CriterionView, Mode, Situation, StepView, change_words
from m2m.physics.tpp import Move, tightening_steps
from m2m.scenarios import load_scenario

if TYPE_CHECKING:
    from autogen_core.models import ChatCompletionClient

    from m2m.agents.drl.knowledge import TppKnowledge

log = structlog.get_logger()

STOP = "stop"
BASELINE_STOP = "baseline: always stop"
BASELINE_DRL = "baseline: DRL top action"


@dataclass(frozen=True)
class BenchCase:
    """One situation and the answers accepted for it (``"raise lambda_rectum"``, ``"stop"``, …)."""

    name: str
    situation: Situation
    acceptable: frozenset[str]


def tighten(structure: str, *, skip: Iterable[str] = ()) -> set[str]:
    """The moves that tighten ``structure`` (:func:`m2m.physics.tpp.tightening_steps`, as the guard's safe action
    tries them), in words, minus ``skip``."""
    return {change_words(tpp, direction) for tpp, direction in tightening_steps(structure)} - set(skip)


#: Criterion values (each in its unit) of plans that pass everything, and mid-range TPPs, that cases start from.
PROSTATE_PASS = {
    "ptv D0.03cc": 104.6, "bladder V80Gy": 4.0, "bladder V75Gy": 13.5, "bladder V70Gy": 21.0, "bladder V65Gy": 28.0,
    "rectum V75Gy": 6.5, "rectum V70Gy": 13.0, "rectum V65Gy": 20.0, "rectum V60Gy": 27.0,
}
LIVER_PASS = {"ptv D0.03cc": 105.2, "liver_normal Dmean": 8.5, "stomach D0.03cc": 27.0, "stomach D10cc": 13.5}
PROSTATE_TPPS = {"t_ptv": 1.04, "lambda_ptv": 3.0, "v_ptv": 0.12, "t_bladder": 0.85, "lambda_bladder": 1.2,
                  "v_bladder": 0.55, "t_rectum": 0.8, "lambda_rectum": 1.5, "v_rectum": 0.5}
LIVER_TPPS = {"t_ptv": 1.05, "lambda_ptv": 2.0, "v_ptv": 0.1, "t_liver_normal": 0.5, "lambda_liver_normal": 0.8,
               "v_liver_normal": 0.6, "t_stomach": 0.6, "lambda_stomach": 1.5, "v_stomach": 0.4}


def situation_from_values(
    scenario: str,
    step: int,
    values: Mapping[str, float],
    tpps: Mapping[str, float],
    advice: Sequence[tuple[str, int, float]] = (),
    history: Sequence[tuple[str, float]] = (),
) -> Situation:
    """A situation of ``scenario`` from criterion values keyed ``"<structure> <metric>"`` (each in its criterion's
    unit), ``advice`` as ``(tpp, direction, probability)`` and ``history`` as ``(change, score)``, oldest first."""
    sc = load_scenario(scenario)
    criteria = tuple(CriterionView.of(c, values[f"{c.structure} {c.metric}"]) for c in sc.protocol.criteria)
    hot_spot = next(c.value for c in criteria if c.structure == "ptv")
    dose = {"ptv": {"dmax_pct_rx": hot_spot, "dmean_pct_rx": 101.8, "d95_pct_rx": 100.0}}
    # Plausible OAR summaries that scale with how hard each organ is pushed against its own limits.
    for structure in sc.oar_names:
        load = max(c.value / c.limit for c in criteria if c.structure == structure)
        dose[structure] = {"dmax_pct_rx": round(min(104.0, 85.0 + 18.0 * load), 1),
                           "dmean_pct_rx": round(30.0 * load + 5.0, 1), "d95_pct_rx": round(4.0 * load, 1)}
    first = step - len(history)
    return Situation(
        scenario=sc,
        step=step,
        step_cap=sc.step_cap,
        score=sum(c.points for c in criteria),
        max_score=sc.protocol.max_score,
        criteria=criteria,
        tpps=dict(tpps),
        dose_summary=dose,
        history=tuple(StepView(first + i, Move.parse(change), score) for i, (change, score) in enumerate(history)),
        advice=tuple(AdviceView(t, d, p) for t, d, p in advice),
    )


def _prostate(name: str, step: int, over: Mapping[str, float], tpps: Mapping[str, float],
              advice: Sequence[tuple[str, int, float]], acceptable: set[str],
              history: Sequence[tuple[str, float]] = ()) -> BenchCase:
    situation = situation_from_values("prostate-basic", step, {**PROSTATE_PASS, **over}, {**PROSTATE_TPPS, **tpps},
                                      advice, history)
    return BenchCase(f"prostate/{name}", situation, frozenset(acceptable))


def _liver(name: str, step: int, over: Mapping[str, float], tpps: Mapping[str, float],
           advice: Sequence[tuple[str, int, float]], acceptable: set[str],
           history: Sequence[tuple[str, float]] = ()) -> BenchCase:
    situation = situation_from_values("liver", step, {**LIVER_PASS, **over}, {**LIVER_TPPS, **tpps}, advice, history)
    return BenchCase(f"liver/{name}", situation, frozenset(acceptable))


def bench_cases() -> tuple[BenchCase, ...]:
    """The fixed benchmark set (module docstring); every acceptable set was written by hand for its situation."""
    rectum = tighten("rectum") | {"lower lambda_ptv"}
    bladder = tighten("bladder") | {"lower lambda_ptv"}
    return (
        _prostate("rectum-v70-fails", 2, {"rectum V70Gy": 28.6, "rectum V65Gy": 33.0}, {},
                  [("lambda_rectum", 1, 0.55), ("t_rectum", -1, 0.2), ("t_bladder", 1, 0.1)], rectum),
        _prostate("rectum-all-fail", 0, {"rectum V75Gy": 19.0, "rectum V70Gy": 31.0, "rectum V65Gy": 41.0,
                                         "rectum V60Gy": 53.0},
                  {"t_rectum": 1.0, "lambda_rectum": 0.4, "v_rectum": 0.3},
                  [("t_rectum", -1, 0.48), ("lambda_rectum", 1, 0.3), ("lambda_ptv", -1, 0.1)],
                  rectum),
        _prostate("bladder-v75-fails", 4, {"bladder V75Gy": 27.2, "bladder V70Gy": 34.0}, {"lambda_bladder": 0.5},
                  [("t_bladder", 1, 0.41), ("lambda_bladder", 1, 0.35), ("t_bladder", -1, 0.1)], bladder),
        _prostate("rectum-worse-than-bladder", 3, {"bladder V70Gy": 36.0, "rectum V70Gy": 29.5},
                  {"lambda_rectum": 0.9},
                  [("lambda_rectum", 1, 0.5), ("lambda_bladder", 1, 0.3), ("t_ptv", -1, 0.1)],
                  rectum),
        _prostate("ptv-hotspot-fails", 1, {"ptv D0.03cc": 109.0}, {"t_ptv": 1.1, "lambda_ptv": 0.5},
                  [("t_ptv", -1, 0.62), ("lambda_ptv", 1, 0.2), ("v_ptv", 1, 0.1)], tighten("ptv")),
        _prostate("ptv-hotspot-fails-t-at-min", 5, {"ptv D0.03cc": 108.2}, {"t_ptv": 1.0, "v_ptv": 0.08},
                  [("lambda_ptv", 1, 0.44), ("v_ptv", 1, 0.31), ("t_bladder", 1, 0.15)],
                  tighten("ptv", skip={"lower t_ptv"})),
        _prostate("ptv-fails-rectum-near", 6, {"ptv D0.03cc": 108.6, "rectum V70Gy": 24.6},
                  {"t_ptv": 1.08},
                  [("lambda_ptv", 1, 0.47), ("t_ptv", -1, 0.38), ("v_ptv", 1, 0.08)],
                  tighten("ptv", skip={"raise lambda_ptv"})),
        _prostate("all-pass", 4, {}, {},
                  [("t_bladder", 1, 0.36), ("lambda_ptv", 1, 0.3), ("v_rectum", -1, 0.12)], {STOP},
                  [("raise lambda_rectum", 8.4), ("lower t_rectum", 9.0)]),
        _prostate("all-pass-late", 12, {"bladder V70Gy": 30.0, "rectum V70Gy": 22.0}, {"lambda_ptv": 12.0},
                  [("lambda_ptv", 1, 0.33), ("t_rectum", 1, 0.3), ("v_ptv", -1, 0.2)], {STOP},
                  [("raise lambda_bladder", 8.7), ("lower t_bladder", 8.9), ("raise lambda_rectum", 9.0)]),
        _prostate("rectum-fails-v-at-max", 7, {"rectum V65Gy": 37.5, "rectum V60Gy": 49.0},
                  {"v_rectum": 1.0, "lambda_rectum": 4.0},
                  [("t_bladder", 1, 0.4), ("lambda_rectum", 1, 0.35), ("t_rectum", -1, 0.15)],
                  rectum - {"raise v_rectum"}),
        _prostate("bladder-fails-low-t", 9, {"bladder V65Gy": 53.0}, {"t_bladder": 0.35, "lambda_bladder": 6.0},
                  [("lambda_bladder", 1, 0.52), ("v_bladder", 1, 0.25), ("t_ptv", 1, 0.1)], bladder),
        _prostate("rectum-v60-just-over", 8, {"rectum V60Gy": 50.8, "rectum V65Gy": 34.0}, {"lambda_rectum": 2.5},
                  [("t_rectum", -1, 0.4), ("lambda_rectum", 1, 0.4), ("t_bladder", 1, 0.1)], rectum),
        _prostate("bladder-v65-after-progress", 10, {"bladder V65Gy": 51.5, "bladder V70Gy": 33.5},
                  {"lambda_bladder": 3.3},
                  [("t_bladder", 1, 0.45), ("lambda_bladder", 1, 0.4), ("lambda_ptv", -1, 0.1)], bladder,
                  [("raise lambda_bladder", 7.2), ("raise lambda_bladder", 7.9)]),
        _prostate("max-with-bladder-near", 11, {"bladder V70Gy": 34.6, "rectum V70Gy": 24.7}, {},
                  [("lambda_bladder", 1, 0.38), ("t_rectum", 1, 0.3), ("t_bladder", 1, 0.2)], {STOP}),
        _liver("stomach-d10cc-fails", 1, {"stomach D10cc": 19.5}, {},
               [("lambda_stomach", 1, 0.58), ("t_stomach", -1, 0.22), ("v_ptv", 1, 0.1)],
               tighten("stomach") | {"lower lambda_ptv"}),
        _liver("stomach-both-fail", 0, {"stomach D0.03cc": 34.0, "stomach D10cc": 21.0},
               {"t_stomach": 0.9, "lambda_stomach": 0.3},
               [("t_stomach", -1, 0.5), ("lambda_stomach", 1, 0.4), ("lambda_liver_normal", 1, 0.05)],
               tighten("stomach") | {"lower lambda_ptv"}),
        _liver("liver-normal-fails", 2, {"liver_normal Dmean": 16.2}, {"lambda_liver_normal": 0.2},
               [("lambda_liver_normal", 1, 0.5), ("t_liver_normal", -1, 0.3), ("t_stomach", 1, 0.1)],
               tighten("liver_normal") | {"lower lambda_ptv"}),
        _liver("ptv-hotspot-fails", 3, {"ptv D0.03cc": 108.8}, {"t_ptv": 1.12, "lambda_ptv": 0.6},
               [("t_ptv", -1, 0.6), ("v_ptv", 1, 0.25), ("lambda_stomach", 1, 0.1)], tighten("ptv")),
        _liver("ptv-fails-stomach-near", 5, {"ptv D0.03cc": 109.0, "stomach D10cc": 17.6}, {"t_ptv": 1.06},
               [("lambda_ptv", 1, 0.5), ("t_ptv", -1, 0.3), ("v_ptv", 1, 0.1)],
               tighten("ptv", skip={"raise lambda_ptv"})),
        _liver("all-pass", 3, {}, {},
               [("t_stomach", 1, 0.4), ("lambda_ptv", 1, 0.3), ("v_ptv", -1, 0.2)], {STOP},
               [("raise lambda_stomach", 3.6), ("lower t_stomach", 4.0)]),
        _liver("all-pass-late", 15, {"stomach D10cc": 16.8, "liver_normal Dmean": 12.0}, {"lambda_stomach": 20.0},
               [("lambda_stomach", -1, 0.45), ("t_ptv", -1, 0.3), ("v_stomach", -1, 0.1)], {STOP}),
        _liver("stomach-fails-v-at-max", 6, {"stomach D0.03cc": 33.5}, {"v_stomach": 1.0, "lambda_stomach": 8.0},
               [("lambda_stomach", 1, 0.45), ("t_stomach", -1, 0.35), ("v_ptv", 1, 0.1)],
               tighten("stomach", skip={"raise v_stomach"}) | {"lower lambda_ptv"}),
        _liver("ptv-very-hot-random-start", 0, {"ptv D0.03cc": 125.0}, {"t_ptv": 1.18, "lambda_ptv": 0.2,
                                                                       "v_ptv": 0.05},
               [("t_ptv", -1, 0.7), ("lambda_ptv", 1, 0.2), ("v_ptv", 1, 0.05)], tighten("ptv")),
        _liver("stomach-fails-ptv-near", 4, {"stomach D10cc": 18.8, "ptv D0.03cc": 106.8}, {},
               [("lambda_ptv", -1, 0.45), ("lambda_stomach", 1, 0.4), ("t_stomach", -1, 0.1)],
               tighten("stomach")),
    )


def with_knowledge(
    cases: Iterable[BenchCase], knowledge: TppKnowledge | None, site: str | None = None
) -> tuple[BenchCase, ...]:
    """``cases`` with ``knowledge`` attached, learned on ``site`` (default: its provenance scenario's site); each
    situation uses it only where it applies."""
    if knowledge is not None and site is None:
        site = load_scenario(knowledge.provenance.scenario).site
    return tuple(dataclasses.replace(c, situation=dataclasses.replace(c.situation, knowledge=knowledge,
                                                                      knowledge_site=site))
                 for c in cases)


@dataclass(frozen=True)
class DecisionRecord:
    """One answer: who (``model``) in which ``mode`` on which ``case``; ``answer`` is the raw proposal in words
    (``"invalid"`` when there was none), ``guarded`` the action after the guard."""

    model: str
    mode: str
    case: str
    answer: str
    correct: bool
    guarded: str
    guarded_correct: bool
    valid: bool
    retries: int
    latency_s: float
    error: str


async def run_model(
    model: str, client: ChatCompletionClient, cases: Sequence[BenchCase], *, with_advice: bool = True,
    modes: Sequence[Mode] = MODES,
) -> list[DecisionRecord]:
    """Every case in every mode through :func:`~m2m.agents.llm.decision.decide` and the guard."""
    records = []
    for mode in modes:
        for case in cases:
            s = case.situation
            outcome = await decide(client, s, mode, with_advice=with_advice and mode == "guided")
            answer = outcome.raw.words() if outcome.raw is not None else "invalid"
            action = guard(s, outcome.raw, mode, s.scenario.oar_names)
            guarded = STOP if action.move is None else str(action.move)
            records.append(DecisionRecord(model, mode, case.name, answer, answer in case.acceptable, guarded,
                                          guarded in case.acceptable, outcome.valid, outcome.retries,
                                          outcome.latency_s, outcome.error))
            log.info("bench_llm_decision", model=model, mode=mode, case=case.name, answer=answer,
                     correct=answer in case.acceptable, seconds=round(outcome.latency_s, 2))
    return records


def baseline_records(cases: Sequence[BenchCase]) -> list[DecisionRecord]:
    """The two baselines on ``cases``: always stop, and the DRL's top action (``"invalid"`` without advice)."""
    records = []
    for case in cases:
        top = case.situation.advice[0] if case.situation.advice else None
        drl = change_words(top.tpp, top.direction) if top is not None else "invalid"
        for model, answer in ((BASELINE_STOP, STOP), (BASELINE_DRL, drl)):
            ok = answer in case.acceptable
            records.append(DecisionRecord(model, "-", case.name, answer, ok, answer, ok, True, 0, 0.0, ""))
    return records


@dataclass(frozen=True)
class SummaryRow:
    """One line of the table: counts over ``total`` decisions and seconds per decision (s)."""

    model: str
    mode: str
    total: int
    correct: int
    guarded_correct: int
    valid: int
    retries: int
    mean_s: float
    median_s: float
    distinct: int


def summarise(records: Sequence[DecisionRecord]) -> list[SummaryRow]:
    """One row per (model, mode), in first-seen order."""
    groups: dict[tuple[str, str], list[DecisionRecord]] = {}
    for r in records:
        groups.setdefault((r.model, r.mode), []).append(r)
    return [
        SummaryRow(model, mode, len(rs), sum(r.correct for r in rs), sum(r.guarded_correct for r in rs),
                   sum(r.valid for r in rs), sum(r.retries for r in rs),
                   statistics.fmean(r.latency_s for r in rs), statistics.median(r.latency_s for r in rs),
                   len({r.answer for r in rs}))
        for (model, mode), rs in groups.items()
    ]


def table(rows: Sequence[SummaryRow], title: str) -> Table:
    """The rich table printed by ``m2m bench llm``."""
    t = Table(title=title)
    for column in ("model", "mode", "correct (raw)", "correct (guarded)", "valid JSON", "retries", "mean s",
                   "median s", "distinct answers"):
        t.add_column(column, justify="left" if column in ("model", "mode") else "right")
    for r in rows:
        t.add_row(r.model, r.mode, f"{r.correct}/{r.total}", f"{r.guarded_correct}/{r.total}", f"{r.valid}/{r.total}",
                  str(r.retries), f"{r.mean_s:.2f}", f"{r.median_s:.2f}", str(r.distinct))
    return t

