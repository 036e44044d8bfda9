"""``m2m bench llm``: candidate models in every decision form on fixed planning situations, both modes, against
rule-made baselines.

The set (:func:`bench_cases`): 24 situations (14 prostate-basic, 10 liver) built from the scenarios' own protocols
with realistic criterion values, TPPs, DVH summaries and a plausible DRL top-3 (``advice``: right on most, wrong
where a DQN policy is: it has no ``stop`` action and keeps habits such as raising ``t_bladder`` first), and a
held-out set of 20 prostate situations (:func:`held_out_cases`) that a one-rule planner ("tighten the worst failing
criterion's structure with its first move") gets wrong or slowly: that move is at its bound or leaves the DRL
knowledge's range (``bound``), the TPPs are so far from the knowledge that a jump into its p25-p75 range saves
several steps (``jump``), or the PTV hot spot fails with its own moves exhausted and the rule's move (raise
``lambda_ptv``) loosens another failing structure (``two-fail``). A situation past its first step carries the step
before it (written with the case, or :func:`previous_step`: the most pressing criterion's first tightening move,
which raised the score), as a planning session's would; so the knowledge baseline, which jumps to the knowledge's
medians at a session's first step only, jumps on step-0 situations only.

Judged by EFFECT (:func:`judge`), one definition for every decision form: an answer is **correct** when it passes
the guided guard's rules (:func:`~m2m.agents.llm.guard.answer_vetoes`) and one of its changes tightens the structure
the plan needs (:func:`need_of`: the worst failing criterion's — the worst whose structure some admissible change
can help, when the worst's own moves are all vetoed), or it is ``stop`` exactly when every criterion passes; it is
**harmful** when it loosens a structure whose criterion fails or is near its limit (the guard's
``loosens_at_risk``) or stops below the maximum. A correct answer also scores the published **steps it saves**: each
change that helps counts as the number of published steps it spans (credited up to the far edge of the knowledge's
p25-p75 range; a TPP without knowledge counts one step at most), less the one step any answer makes; a **jump** is
a helping change of more than one published step that reaches the knowledge's p25-p75 range from outside.

Every model answers every situation in each mode × form (:func:`mode_forms`; the unguided mode has no knowledge to
choose points from, so it asks ``quantile`` as ``values``, as the planner does), through
:func:`~m2m.agents.llm.decision.decide` with the guard's refusal as the one feedback turn, then the guard. Baselines
answer the same set through the same path (:func:`run_decider`): "always stop", "copy the DRL's top action", the
guard's safe action alone, and the rules and knowledge planners (their deciders come from the caller, as
:mod:`m2m.agents.planner` sits above this package). Reported per (model, mode, form) (:func:`summarise`): raw
correct (the first answer, before the guard), correct after the guard (the feedback retry included), harmful raw
answers, ownership (the guard took the planner's own answer or retry), published steps saved and jumps, prompt
tokens, seconds per decision, valid answers, re-asks and feedback retries.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from rich.table import Table

from m2m.agents.drl.knowledge import relabel_knowledge
from m2m.agents.llm.answer import FORMS, Answer, DecisionForm
from m2m.agents.llm.decision import DecisionOutcome, decide
from m2m.agents.llm.guard import (
    OWN_SOURCES,
    GuardResult,
    answer_vetoes,
    effects,
    guard,
    refusal,
    safe_action,
    value_vetoes,
)
from m2m.agents.llm.situation import (
    MODES,
    SYSTEM_PROMPT,
    AdviceView,
    CriterionView,
    Mode,
    Situation,
    StepView,
    knowledge_points,
    span,
    stepped_value,
    worst_failing,
)
from m2m.physics.tpp import Direction, Move, clamp_value, spec_of, tightening_steps
from m2m.scenarios import load_scenario

if TYPE_CHECKING:
    from autogen_core.models import ChatCompletionClient

    from m2m.agents.drl.knowledge import TppKnowledge

log = structlog.get_logger()

STOP = "stop"
INVALID = "invalid"
BASELINE_STOP = "baseline: always stop"
BASELINE_DRL = "baseline: DRL top action"
BASELINE_SAFE = "baseline: guard's safe action"
BASELINE_RULES = "baseline: rules planner"
BASELINE_KNOWLEDGE = "baseline: knowledge p50+rules"
#: The rule the judgement applies whatever mode answered: the guided guard's (the stricter).
JUDGING_MODE: Mode = "guided"
#: What the previous step of a situation past its first step scored below the current score, by default.
PREVIOUS_STEP_GAIN = 0.3
#: The held-out kinds (module doc).
HELD_OUT_KINDS = ("bound", "jump", "two-fail")

#: The guard's refusal of an answer (text, "" when accepted), as the planner gives it to its decider.
Refuse = Callable[[Answer], str]
#: A decider's ``decide`` (:class:`m2m.agents.planner.Decider`): situation, mode, with_advice, refuse.
DecideFn = Callable[[Situation, Mode, bool, Refuse | None], Awaitable[DecisionOutcome]]
#: Counts the tokens of a text for the model benchmarked (None: not counted).
TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class BenchCase:
    """One situation: ``name`` (``prostate/…``, ``liver/…``, ``held-out/…``), which ``kind`` of situation it is
    (``base`` or one of :data:`HELD_OUT_KINDS`) and ``why`` it is in the set."""

    name: str
    situation: Situation
    kind: str = "base"
    why: str = ""

    @property
    def held_out(self) -> bool:
        return self.kind != "base"


# ---------------------------------------------------------------------------------------------------------------
# Judgement by effect


@dataclass(frozen=True)
class Need:
    """What the next answer must do: tighten (``sign`` +1; −1 for a failing lower limit: loosen) ``structure`` for
    ``criterion``; ``structure`` None: every criterion passes, the answer must be ``stop``."""

    structure: str | None
    sign: int = 0
    criterion: str = ""

    def __str__(self) -> str:
        if self.structure is None:
            return STOP
        return f"{'tighten' if self.sign > 0 else 'loosen'} {self.structure} ({self.criterion})"


def _candidate_values(s: Situation, tpp: str, direction: int) -> list[float]:
    """Values a change of ``tpp`` in ``direction`` might take: one published step, a small move (2 %) and the
    knowledge's points on that side."""
    now = s.tpps[tpp]
    values = [stepped_value(tpp, now, direction), clamp_value(tpp, now * (1 + 0.02 * direction))]
    values += [clamp_value(tpp, v) for v in knowledge_points(s).get(tpp, {}).values()
               if (v - now) * direction > 0]
    return values


def can_help(s: Situation, structure: str, sign: int, mode: Mode = JUDGING_MODE) -> bool:
    """Whether some change admissible under ``mode``'s rules moves ``structure`` the way ``sign`` needs (+1
    tighten), trying for every TPP that does: a published step, a small move and the knowledge's points."""
    oars = s.scenario.oar_names
    for tpp, now in s.tpps.items():
        for direction in (1, -1):
            if effects(tpp, direction, oars).get(structure) != sign:
                continue
            for value in _candidate_values(s, tpp, direction):
                if (value - now) * direction > 0 and not value_vetoes(s, tpp, value, mode, oars):
                    return True
    return False


def need_of(s: Situation) -> Need:
    """What ``s`` needs (:class:`Need`): stop at the maximum; else the worst failing criterion's structure moved
    its way (tightened for an upper limit) — the worst whose structure some admissible change can help
    (:func:`can_help`), so that when the worst's own moves are all vetoed (e.g. the PTV hot spot with ``t_ptv`` and
    ``v_ptv`` at their bounds and another structure failing, which raising ``lambda_ptv`` would loosen) the next
    failing criterion is the target, as it is for the guard's safe action."""
    failing = worst_failing(s)
    if not failing:
        return Need(None)
    for c in failing:
        sign = 1 if c.upper else -1
        if can_help(s, c.structure, sign):
            return Need(c.structure, sign, c.label)
    worst = failing[0]
    return Need(worst.structure, 1 if worst.upper else -1, worst.label)


def published_steps(tpp: str, before: float, after: float) -> float:
    """How many published steps of ``tpp`` (its raise or lower factor) the change ``before`` → ``after`` spans."""
    if before <= 0 or after <= 0 or after == before:
        return 0.0
    direction = 1 if after > before else -1
    return abs(math.log(after / before) / math.log(spec_of(tpp).factor(direction)))


def _credited_steps(s: Situation, tpp: str, before: float, after: float) -> tuple[float, bool]:
    """The published steps a helping change is credited with (module doc) and whether it is a jump."""
    spanned = published_steps(tpp, before, after)
    points = knowledge_points(s).get(tpp)
    if not points or "p25" not in points or "p75" not in points:
        return min(spanned, 1.0), False
    low, high = points["p25"], points["p75"]
    if after > before:
        credited = published_steps(tpp, before, min(after, high)) if before < high else 0.0
        reached = before < low <= after * (1 + 1e-9)
    else:
        credited = published_steps(tpp, before, max(after, low)) if before > low else 0.0
        reached = after * (1 - 1e-9) <= high < before
    return max(credited, min(spanned, 1.0)), reached and spanned > 1.0


@dataclass(frozen=True)
class Judgement:
    """How one answer does in its situation (module doc): ``correct``, ``harmful``, the published ``steps_saved``
    (0 unless correct) and whether it made a ``jump`` into the knowledge's p25-p75 range."""

    correct: bool
    harmful: bool
    steps_saved: float = 0.0
    jump: bool = False


HARMFUL_REASONS = frozenset({"loosens_at_risk", "early_stop"})


def judge(s: Situation, answer: Answer | None, need: Need | None = None) -> Judgement:
    """:class:`Judgement` of ``answer`` in ``s`` (``need``: :func:`need_of`, computed when not given)."""
    if answer is None:
        return Judgement(False, False)
    need = need if need is not None else need_of(s)
    oars = s.scenario.oar_names
    vetoes = answer_vetoes(s, answer, JUDGING_MODE, oars)
    harmful = any(v.reason in HARMFUL_REASONS for v in vetoes)
    if need.structure is None or answer.stop:
        return Judgement(answer.stop and need.structure is None and not vetoes, harmful)
    helping = [c for c in answer.changes
               if c.direction and effects(c.tpp, c.direction, oars).get(need.structure) == need.sign]
    if vetoes or not helping:
        return Judgement(False, harmful)
    credits = [_credited_steps(s, c.tpp, c.before, c.after) for c in helping]
    saved = max(0.0, sum(steps for steps, _ in credits) - 1.0)
    return Judgement(True, harmful, round(saved, 2), any(jump for _, jump in credits))


def guarded_answer(result: GuardResult) -> Answer:
    """The action the guard took, as an :class:`Answer` (to judge it as any other)."""
    if result.stop:
        return Answer.of_stop()
    return Answer("step" if result.move is not None else "values", False, result.changes, result.move)


def move_answer(s: Situation, tpp: str, direction: int) -> Answer:
    """The answer that makes one published step (``direction`` 0: stop)."""
    if direction == 0:
        return Answer.of_stop()
    return Answer.of_move(s.tpps, Move(tpp, Direction(direction)))


# ---------------------------------------------------------------------------------------------------------------
# The situations

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

Advice = Sequence[tuple[str, int, float]]
History = Sequence[tuple[str, float]]


def situation_from_values(
    scenario: str,
    step: int,
    values: Mapping[str, float],
    tpps: Mapping[str, float],
    advice: Advice = (),
    history: History = (),
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


def previous_step(s: Situation) -> tuple[str, float]:
    """The step a situation past its first step is given by default: the first tightening move of its most pressing
    criterion (least room relative to its span), which raised the score by :data:`PREVIOUS_STEP_GAIN`."""
    pressing = min(s.criteria, key=lambda c: c.room / span(s, c))
    tpp, direction = tightening_steps(pressing.structure, 1 if pressing.upper else -1)[0]
    return str(Move(tpp, Direction(direction))), max(0.0, round(s.score - PREVIOUS_STEP_GAIN, 2))


def _case(scenario: str, name: str, step: int, values: Mapping[str, float], tpps: Mapping[str, float],
          advice: Advice, history: History | None, kind: str, why: str) -> BenchCase:
    s = situation_from_values(scenario, step, values, tpps, advice)
    if history is None:
        history = (previous_step(s),) if step > 0 else ()
    if history:
        s = situation_from_values(scenario, step, values, tpps, advice, history)
    return BenchCase(name, s, kind, why)


def _prostate(name: str, step: int, over: Mapping[str, float], tpps: Mapping[str, float], advice: Advice,
              why: str = "", history: History | None = None) -> BenchCase:
    return _case("prostate-basic", f"prostate/{name}", step, {**PROSTATE_PASS, **over}, {**PROSTATE_TPPS, **tpps},
                 advice, history, "base", why)


def _liver(name: str, step: int, over: Mapping[str, float], tpps: Mapping[str, float], advice: Advice,
           why: str = "", history: History | None = None) -> BenchCase:
    return _case("liver", f"liver/{name}", step, {**LIVER_PASS, **over}, {**LIVER_TPPS, **tpps}, advice, history,
                 "base", why)


def _held_out(kind: str, name: str, step: int, over: Mapping[str, float], tpps: Mapping[str, float],
              advice: Advice, why: str, history: History | None = None) -> BenchCase:
    assert kind in HELD_OUT_KINDS, kind
    return _case("prostate-basic", f"held-out/{name}", step, {**PROSTATE_PASS, **over}, {**PROSTATE_TPPS, **tpps},
                 advice, history, kind, why)


def base_cases() -> tuple[BenchCase, ...]:
    """The 24 situations of the first benchmark (module doc), each written by hand."""
    return (
        _prostate("rectum-v70-fails", 2, {"rectum V70Gy": 28.6, "rectum V65Gy": 33.0}, {},
                  [("lambda_rectum", 1, 0.55), ("t_rectum", -1, 0.2), ("t_bladder", 1, 0.1)],
                  "one OAR criterion fails, everything else has room"),
        _prostate("rectum-all-fail", 0, {"rectum V75Gy": 19.0, "rectum V70Gy": 31.0, "rectum V65Gy": 41.0,
                                         "rectum V60Gy": 53.0},
                  {"t_rectum": 1.0, "lambda_rectum": 0.4, "v_rectum": 0.3},
                  [("t_rectum", -1, 0.48), ("lambda_rectum", 1, 0.3), ("lambda_ptv", -1, 0.1)],
                  "a loose rectum at the first step: all four rectum criteria fail"),
        _prostate("bladder-v75-fails", 4, {"bladder V75Gy": 27.2, "bladder V70Gy": 34.0}, {"lambda_bladder": 0.5},
                  [("t_bladder", 1, 0.41), ("lambda_bladder", 1, 0.35), ("t_bladder", -1, 0.1)],
                  "the DRL's habit (raise t_bladder) loosens the failing bladder"),
        _prostate("rectum-worse-than-bladder", 3, {"bladder V70Gy": 36.0, "rectum V70Gy": 29.5},
                  {"lambda_rectum": 0.9},
                  [("lambda_rectum", 1, 0.5), ("lambda_bladder", 1, 0.3), ("t_ptv", -1, 0.1)],
                  "two OARs fail: the worst (rectum) comes first"),
        _prostate("ptv-hotspot-fails", 1, {"ptv D0.03cc": 109.0}, {"t_ptv": 1.1, "lambda_ptv": 0.5},
                  [("t_ptv", -1, 0.62), ("lambda_ptv", 1, 0.2), ("v_ptv", 1, 0.1)],
                  "the PTV hot spot fails with every PTV move open"),
        _prostate("ptv-hotspot-fails-t-at-min", 5, {"ptv D0.03cc": 108.2}, {"t_ptv": 1.0, "v_ptv": 0.08},
                  [("lambda_ptv", 1, 0.44), ("v_ptv", 1, 0.31), ("t_bladder", 1, 0.15)],
                  "the PTV hot spot fails with t_ptv at its minimum"),
        _prostate("ptv-fails-rectum-near", 6, {"ptv D0.03cc": 108.6, "rectum V70Gy": 24.6},
                  {"t_ptv": 1.08},
                  [("lambda_ptv", 1, 0.47), ("t_ptv", -1, 0.38), ("v_ptv", 1, 0.08)],
                  "the PTV fails and the rectum is near its limit: raising lambda_ptv would loosen it"),
        _prostate("all-pass", 4, {}, {},
                  [("t_bladder", 1, 0.36), ("lambda_ptv", 1, 0.3), ("v_rectum", -1, 0.12)],
                  "every criterion passes: stop (the DRL has no stop action)",
                  [("raise lambda_rectum", 8.4), ("lower t_rectum", 9.0)]),
        _prostate("all-pass-late", 12, {"bladder V70Gy": 30.0, "rectum V70Gy": 22.0}, {"lambda_ptv": 12.0},
                  [("lambda_ptv", 1, 0.33), ("t_rectum", 1, 0.3), ("v_ptv", -1, 0.2)],
                  "every criterion passes late in a session: stop",
                  [("raise lambda_bladder", 8.7), ("lower t_bladder", 8.9), ("raise lambda_rectum", 9.0)]),
        _prostate("rectum-fails-v-at-max", 7, {"rectum V65Gy": 37.5, "rectum V60Gy": 49.0},
                  {"v_rectum": 1.0, "lambda_rectum": 4.0},
                  [("t_bladder", 1, 0.4), ("lambda_rectum", 1, 0.35), ("t_rectum", -1, 0.15)],
                  "the rectum fails with v_rectum at its maximum"),
        _prostate("bladder-fails-low-t", 9, {"bladder V65Gy": 53.0}, {"t_bladder": 0.35, "lambda_bladder": 6.0},
                  [("lambda_bladder", 1, 0.52), ("v_bladder", 1, 0.25), ("t_ptv", 1, 0.1)],
                  "the bladder fails with t_bladder already low"),
        _prostate("rectum-v60-just-over", 8, {"rectum V60Gy": 50.8, "rectum V65Gy": 34.0}, {"lambda_rectum": 2.5},
                  [("t_rectum", -1, 0.4), ("lambda_rectum", 1, 0.4), ("t_bladder", 1, 0.1)],
                  "a criterion just over its limit"),
        _prostate("bladder-v65-after-progress", 10, {"bladder V65Gy": 51.5, "bladder V70Gy": 33.5},
                  {"lambda_bladder": 3.3},
                  [("t_bladder", 1, 0.45), ("lambda_bladder", 1, 0.4), ("lambda_ptv", -1, 0.1)],
                  "two steps of progress on the bladder: go on",
                  [("raise lambda_bladder", 7.2), ("raise lambda_bladder", 7.9)]),
        _prostate("max-with-bladder-near", 11, {"bladder V70Gy": 34.6, "rectum V70Gy": 24.7}, {},
                  [("lambda_bladder", 1, 0.38), ("t_rectum", 1, 0.3), ("t_bladder", 1, 0.2)],
                  "every criterion passes, two of them near their limits: stop"),
        _liver("stomach-d10cc-fails", 1, {"stomach D10cc": 19.5}, {},
               [("lambda_stomach", 1, 0.58), ("t_stomach", -1, 0.22), ("v_ptv", 1, 0.1)],
               "liver: one stomach criterion fails"),
        _liver("stomach-both-fail", 0, {"stomach D0.03cc": 34.0, "stomach D10cc": 21.0},
               {"t_stomach": 0.9, "lambda_stomach": 0.3},
               [("t_stomach", -1, 0.5), ("lambda_stomach", 1, 0.4), ("lambda_liver_normal", 1, 0.05)],
               "liver: a loose stomach at the first step"),
        _liver("liver-normal-fails", 2, {"liver_normal Dmean": 16.2}, {"lambda_liver_normal": 0.2},
               [("lambda_liver_normal", 1, 0.5), ("t_liver_normal", -1, 0.3), ("t_stomach", 1, 0.1)],
               "liver: the normal liver's mean dose fails"),
        _liver("ptv-hotspot-fails", 3, {"ptv D0.03cc": 108.8}, {"t_ptv": 1.12, "lambda_ptv": 0.6},
               [("t_ptv", -1, 0.6), ("v_ptv", 1, 0.25), ("lambda_stomach", 1, 0.1)],
               "liver: the PTV hot spot fails"),
        _liver("ptv-fails-stomach-near", 5, {"ptv D0.03cc": 109.0, "stomach D10cc": 17.6}, {"t_ptv": 1.06},
               [("lambda_ptv", 1, 0.5), ("t_ptv", -1, 0.3), ("v_ptv", 1, 0.1)],
               "liver: the PTV fails and the stomach is near its limit (raising lambda_ptv loosens it)"),
        _liver("all-pass", 3, {}, {},
               [("t_stomach", 1, 0.4), ("lambda_ptv", 1, 0.3), ("v_ptv", -1, 0.2)],
               "liver: every criterion passes: stop",
               [("raise lambda_stomach", 3.6), ("lower t_stomach", 4.0)]),
        _liver("all-pass-late", 15, {"stomach D10cc": 16.8, "liver_normal Dmean": 12.0}, {"lambda_stomach": 20.0},
               [("lambda_stomach", -1, 0.45), ("t_ptv", -1, 0.3), ("v_stomach", -1, 0.1)],
               "liver: every criterion passes late: stop"),
        _liver("stomach-fails-v-at-max", 6, {"stomach D0.03cc": 33.5}, {"v_stomach": 1.0, "lambda_stomach": 8.0},
               [("lambda_stomach", 1, 0.45), ("t_stomach", -1, 0.35), ("v_ptv", 1, 0.1)],
               "liver: the stomach fails with v_stomach at its maximum"),
        _liver("ptv-very-hot-random-start", 0, {"ptv D0.03cc": 125.0}, {"t_ptv": 1.18, "lambda_ptv": 0.2,
                                                                       "v_ptv": 0.05},
               [("t_ptv", -1, 0.7), ("lambda_ptv", 1, 0.2), ("v_ptv", 1, 0.05)],
               "liver: a random start with a very hot PTV"),
        _liver("stomach-fails-ptv-near", 4, {"stomach D10cc": 18.8, "ptv D0.03cc": 106.8}, {},
               [("lambda_ptv", -1, 0.45), ("lambda_stomach", 1, 0.4), ("t_stomach", -1, 0.1)],
               "liver: the stomach fails and the PTV is near its limit (lowering lambda_ptv loosens it)"),
    )


def held_out_cases() -> tuple[BenchCase, ...]:
    """20 prostate situations a one-rule planner gets wrong or slowly (module doc), each written by hand; ``why``
    says what each is there for."""
    b, j, t = HELD_OUT_KINDS
    exhausted = {"t_ptv": 1.0, "v_ptv": 0.3}  # the PTV's first two moves at their bounds: only lambda_ptv is left
    return (
        # --- bound: the worst criterion's first tightening move is a no-op or leaves the knowledge's 5-95 % range
        _held_out(b, "t-ptv-at-min", 3, {"ptv D0.03cc": 108.4}, {"t_ptv": 1.0},
                  [("t_ptv", -1, 0.5), ("v_ptv", 1, 0.3), ("lambda_ptv", 1, 0.1)],
                  "PTV hot spot fails with t_ptv at its minimum 1.0: lower t_ptv is a no-op"),
        _held_out(b, "t-ptv-at-min-v-ptv-above-p95", 6, {"ptv D0.03cc": 108.0}, {"t_ptv": 1.0, "v_ptv": 0.28},
                  [("v_ptv", 1, 0.45), ("t_ptv", -1, 0.3), ("lambda_ptv", 1, 0.2)],
                  "t_ptv at its minimum and v_ptv above the knowledge's p95: only lambda_ptv may rise"),
        _held_out(b, "t-ptv-at-min-rectum-near", 4, {"ptv D0.03cc": 108.2, "rectum V70Gy": 24.4}, {"t_ptv": 1.0},
                  [("lambda_ptv", 1, 0.5), ("t_ptv", -1, 0.3), ("v_ptv", 1, 0.1)],
                  "t_ptv at its minimum and the rectum near its limit: raise v_ptv, not lambda_ptv"),
        _held_out(b, "lambda-rectum-above-p95", 7, {"rectum V70Gy": 27.5, "rectum V65Gy": 36.0},
                  {"lambda_rectum": 40.0, "t_rectum": 0.95},
                  [("lambda_rectum", 1, 0.55), ("t_rectum", -1, 0.3), ("v_rectum", 1, 0.1)],
                  "lambda_rectum is above the knowledge's p95: raising it is vetoed, lower t_rectum instead"),
        _held_out(b, "lambda-bladder-above-p95-t-bladder-low", 8, {"bladder V65Gy": 52.5},
                  {"lambda_bladder": 60.0, "t_bladder": 0.6},
                  [("lambda_bladder", 1, 0.5), ("t_bladder", -1, 0.35), ("t_bladder", 1, 0.1)],
                  "lambda_bladder above p95, and a t_bladder step (x0.6) would leave p5: v_bladder or a small t move"),
        _held_out(b, "rectum-lambda-and-t-outside-knowledge", 9, {"rectum V75Gy": 17.0},
                  {"t_rectum": 0.5, "lambda_rectum": 50.0},
                  [("lambda_rectum", 1, 0.45), ("t_rectum", -1, 0.4), ("t_bladder", 1, 0.1)],
                  "t_rectum below p5 and lambda_rectum above p95: only v_rectum (or lambda_ptv) is left"),
        _held_out(b, "v-rectum-at-max-lambda-above-p95", 10, {"rectum V60Gy": 52.0},
                  {"v_rectum": 1.0, "lambda_rectum": 35.0, "t_rectum": 0.9},
                  [("lambda_rectum", 1, 0.5), ("v_rectum", 1, 0.3), ("t_rectum", -1, 0.15)],
                  "v_rectum at its maximum, lambda_rectum above p95: lower t_rectum (or lambda_ptv)"),
        # --- jump: the failing structure's TPPs are far from the knowledge: a jump into its p25-p75 range saves steps
        _held_out(j, "rectum-lambda-far-below-knowledge", 0,
                  {"rectum V75Gy": 18.0, "rectum V70Gy": 31.0, "rectum V65Gy": 41.0, "rectum V60Gy": 53.0},
                  {"lambda_rectum": 0.05, "t_rectum": 1.0, "v_rectum": 0.2},
                  [("lambda_rectum", 1, 0.5), ("t_rectum", -1, 0.3), ("v_rectum", 1, 0.1)],
                  "lambda_rectum 0.05 is four steps below the knowledge's p25 0.38"),
        _held_out(j, "bladder-start-far-from-knowledge", 0, {"bladder V70Gy": 38.0, "bladder V65Gy": 54.0},
                  {"lambda_bladder": 0.08, "v_bladder": 0.15, "t_bladder": 1.0},
                  [("t_bladder", 1, 0.4), ("lambda_bladder", 1, 0.35), ("v_bladder", 1, 0.15)],
                  "lambda_bladder and v_bladder both far below the knowledge's p25"),
        _held_out(j, "ptv-v-and-lambda-low", 0, {"ptv D0.03cc": 109.5},
                  {"t_ptv": 1.0, "v_ptv": 0.02, "lambda_ptv": 0.1},
                  [("t_ptv", -1, 0.6), ("v_ptv", 1, 0.25), ("lambda_ptv", 1, 0.1)],
                  "v_ptv 0.02 is seven steps below the knowledge's p25 0.095 (t_ptv at its minimum)"),
        _held_out(j, "rectum-lambda-below-p25-after-three-steps", 6, {"rectum V70Gy": 27.0},
                  {"lambda_rectum": 0.15, "t_rectum": 0.95},
                  [("lambda_rectum", 1, 0.6), ("t_rectum", -1, 0.25), ("v_rectum", 1, 0.1)],
                  "three single lambda_rectum steps each gained little: a jump to the knowledge saves the rest",
                  [("raise lambda_rectum", 7.3), ("raise lambda_rectum", 7.5), ("raise lambda_rectum", 7.7)]),
        _held_out(j, "both-oars-with-low-lambdas", 0, {"rectum V70Gy": 28.5, "bladder V70Gy": 38.0},
                  {"lambda_rectum": 0.1, "lambda_bladder": 0.1, "lambda_ptv": 20.0},
                  [("lambda_bladder", 1, 0.4), ("lambda_rectum", 1, 0.35), ("lambda_ptv", -1, 0.2)],
                  "both OAR weights ten times below the knowledge's p25 and lambda_ptv high: one answer fixes both"),
        _held_out(j, "v-rectum-far-below-knowledge", 0, {"rectum V65Gy": 38.5},
                  {"t_rectum": 1.0, "v_rectum": 0.15, "lambda_rectum": 0.5},
                  [("t_rectum", -1, 0.45), ("lambda_rectum", 1, 0.35), ("v_rectum", 1, 0.15)],
                  "v_rectum 0.15 is four steps below the knowledge's p25 0.38"),
        _held_out(j, "ptv-t-at-max-start", 0, {"ptv D0.03cc": 112.0},
                  {"t_ptv": 1.2, "lambda_ptv": 0.3, "v_ptv": 0.05},
                  [("t_ptv", -1, 0.65), ("v_ptv", 1, 0.2), ("lambda_ptv", 1, 0.1)],
                  "t_ptv at its maximum and v_ptv low: t_ptv to 1.0 and v_ptv to p25 are two steps each"),
        # --- two-fail: the PTV fails with t_ptv and v_ptv at their bounds; the rule's raise lambda_ptv loosens another
        _held_out(t, "ptv-exhausted-rectum-fails", 9, {"ptv D0.03cc": 108.5, "rectum V70Gy": 27.0}, exhausted,
                  [("lambda_ptv", 1, 0.5), ("lambda_rectum", 1, 0.3), ("t_ptv", -1, 0.1)],
                  "the rule raises lambda_ptv, which loosens the failing rectum: tighten the rectum first"),
        _held_out(t, "ptv-exhausted-bladder-fails", 8, {"ptv D0.03cc": 109.2, "bladder V65Gy": 52.0},
                  {**exhausted, "lambda_bladder": 3.0},
                  [("lambda_ptv", 1, 0.45), ("t_bladder", 1, 0.3), ("lambda_bladder", 1, 0.2)],
                  "the rule raises lambda_ptv, which loosens the failing bladder"),
        _held_out(t, "ptv-exhausted-three-fail", 7,
                  {"ptv D0.03cc": 108.0, "rectum V60Gy": 51.5, "bladder V70Gy": 36.0}, exhausted,
                  [("lambda_ptv", 1, 0.4), ("lambda_rectum", 1, 0.35), ("lambda_bladder", 1, 0.2)],
                  "three criteria fail: raising lambda_ptv loosens both failing OARs"),
        _held_out(t, "ptv-exhausted-rectum-near-bladder-fails", 10,
                  {"ptv D0.03cc": 108.8, "rectum V70Gy": 24.5, "bladder V80Gy": 16.0}, exhausted,
                  [("lambda_ptv", 1, 0.5), ("lambda_bladder", 1, 0.3), ("t_rectum", 1, 0.1)],
                  "raising lambda_ptv loosens the failing bladder and the near-limit rectum"),
        _held_out(t, "ptv-exhausted-after-v-ptv-steps", 9, {"ptv D0.03cc": 108.3, "rectum V65Gy": 36.0}, exhausted,
                  [("lambda_ptv", 1, 0.55), ("v_ptv", 1, 0.25), ("lambda_rectum", 1, 0.1)],
                  "two raise v_ptv steps reached its bound: the next PTV move would loosen the failing rectum",
                  [("raise v_ptv", 7.6), ("raise v_ptv", 7.9)]),
        _held_out(t, "ptv-exhausted-lambda-ptv-high", 11, {"ptv D0.03cc": 108.6, "rectum V70Gy": 26.5},
                  {**exhausted, "lambda_ptv": 60.0},
                  [("lambda_ptv", 1, 0.45), ("t_rectum", -1, 0.3), ("lambda_rectum", 1, 0.2)],
                  "lambda_ptv already high and the rectum fails: raising it again loosens the rectum"),
    )


def bench_cases(*, held_out: bool = True) -> tuple[BenchCase, ...]:
    """The benchmark set: :func:`base_cases` then (``held_out``) :func:`held_out_cases`."""
    return base_cases() + (held_out_cases() if held_out else ())


def select_cases(cases: Sequence[BenchCase], patterns: Iterable[str] = (), limit: int | None = None
                 ) -> tuple[BenchCase, ...]:
    """``cases`` whose name matches any of ``patterns`` (fnmatch; a pattern without a wildcard matches as a
    substring; none: every case), then the first ``limit``."""
    from fnmatch import fnmatchcase

    wanted = [p if any(ch in p for ch in "*?[") else f"*{p}*" for p in patterns if p]
    chosen = [c for c in cases if not wanted or any(fnmatchcase(c.name, p) for p in wanted)]
    return tuple(chosen[:limit] if limit is not None else chosen)


def with_knowledge(
    cases: Iterable[BenchCase], knowledge: TppKnowledge | None, site: str | None = None
) -> tuple[BenchCase, ...]:
    """``cases`` with ``knowledge`` attached, learned on ``site`` (default: its provenance scenario's site) and
    relabelled to each scenario's structures through its roles (prostate knowledge guiding liver, as the planner
    does); the guard enforces its ranges only on the site it was learned on."""
    if knowledge is not None and site is None:
        site = load_scenario(knowledge.provenance.scenario).site
    out = []
    for c in cases:
        k = relabel_knowledge(knowledge, c.situation.scenario.roles) if knowledge is not None else None
        out.append(dataclasses.replace(c, situation=dataclasses.replace(c.situation, knowledge=k,
                                                                        knowledge_site=site)))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Running


def mode_forms(forms: Sequence[DecisionForm], mode: Mode) -> tuple[DecisionForm, ...]:
    """The forms asked in ``mode``: all of ``forms`` guided; unguided, ``quantile`` is asked as ``values`` (it has
    no knowledge to choose points from: :func:`~m2m.agents.llm.decision.form_for`), once."""
    asked = forms if mode == "guided" else tuple("values" if f == "quantile" else f for f in forms)
    return tuple(dict.fromkeys(asked))


@dataclass(frozen=True)
class DecisionRecord:
    """One decision: who (``model``) in which ``mode`` and decision ``form`` (``asked``: the form the model was
    actually asked in) on which ``case``. ``proposal``: the first valid answer in words (``"invalid"`` when there
    was none), judged ``correct`` / ``harmful`` with its ``steps_saved`` and ``jump`` (:func:`judge`); ``retry``:
    the answer after the guard's feedback (``""``: no feedback turn); ``guarded``: the action the guard took, from
    ``source`` (``own``: the planner's proposal or retry), judged ``guarded_correct``. ``prompt_tokens``: the user
    prompt's tokens (None: not counted); ``system_tokens``: the system prompt's for ``asked``."""

    model: str
    mode: str
    form: str
    asked: str
    case: str
    kind: str
    need: str
    proposal: str
    correct: bool
    harmful: bool
    steps_saved: float
    jump: bool
    retry: str
    retry_correct: bool
    guarded: str
    source: str
    own: bool
    guarded_correct: bool
    valid: bool
    retries: int
    feedback: str
    prompt_tokens: int | None
    system_tokens: int | None
    latency_s: float
    error: str
    answers: tuple[str, ...] = ()

    @property
    def held_out(self) -> bool:
        return self.kind != "base"


def _words(answer: Answer | None) -> str:
    return answer.words() if answer is not None else INVALID


def record_of(model: str, mode: Mode, form: str, case: BenchCase, outcome: DecisionOutcome,
              count_tokens: TokenCounter | None = None, system_tokens: int | None = None) -> DecisionRecord:
    """The :class:`DecisionRecord` of ``outcome`` (what a decider answered on ``case`` in ``mode``) after the
    guard."""
    s = case.situation
    need = need_of(s)
    proposal = outcome.proposal
    verdict = judge(s, proposal, need)
    retry = outcome.retry
    result = guard(s, outcome.raw, mode, s.scenario.oar_names, first=outcome.first)
    return DecisionRecord(
        model=model, mode=mode, form=form, asked=outcome.form if outcome.prompt else form, case=case.name,
        kind=case.kind, need=str(need),
        proposal=_words(proposal), correct=verdict.correct, harmful=verdict.harmful,
        steps_saved=verdict.steps_saved, jump=verdict.jump,
        retry=_words(retry) if outcome.first is not None else "",
        retry_correct=judge(s, retry, need).correct,
        guarded=result.words(), source=result.source, own=result.source in OWN_SOURCES,
        guarded_correct=judge(s, guarded_answer(result), need).correct,
        valid=outcome.valid, retries=outcome.retries, feedback=outcome.feedback,
        prompt_tokens=count_tokens(outcome.prompt) if count_tokens is not None and outcome.prompt else None,
        system_tokens=system_tokens if outcome.prompt else None,
        latency_s=outcome.latency_s, error=outcome.error, answers=tuple(outcome.answers),
    )


async def run_decider(
    model: str, decide_fn: DecideFn, cases: Sequence[BenchCase], *, form: str, modes: Sequence[Mode] = MODES,
    with_advice: bool = True, count_tokens: TokenCounter | None = None, system_tokens: int | None = None,
) -> list[DecisionRecord]:
    """Every case in every mode through ``decide_fn`` (with the guard's refusal in that mode as the feedback) and
    the guard, as the planner runs a step."""
    records = []
    for mode in modes:
        for case in cases:
            s = case.situation

            def refuse(answer: Answer, s: Situation = s, mode: Mode = mode) -> str:
                return refusal(s, answer, mode, s.scenario.oar_names)

            outcome = await decide_fn(s, mode, with_advice and mode == "guided", refuse)
            record = record_of(model, mode, form, case, outcome, count_tokens, system_tokens)
            records.append(record)
            if outcome.prompt:  # a model's decision (the rule-made baselines' would flood the log)
                log.info("bench_llm_decision", model=model, mode=mode, form=form, case=case.name,
                         answer=record.proposal, correct=record.correct, guarded=record.guarded,
                         seconds=round(outcome.latency_s, 2))
    return records


async def run_model(
    model: str, client: ChatCompletionClient, cases: Sequence[BenchCase], *, with_advice: bool = True,
    modes: Sequence[Mode] = MODES, forms: Sequence[DecisionForm] = FORMS, count_tokens: TokenCounter | None = None,
) -> list[DecisionRecord]:
    """Every case in every mode × form (:func:`mode_forms`) through :func:`~m2m.agents.llm.decision.decide`, the
    guard's feedback turn and the guard; one form at a time, so the system prompt's KV cache is reused."""
    records: list[DecisionRecord] = []
    for mode in modes:
        for form in mode_forms(forms, mode):

            async def ask(s: Situation, m: Mode, advice: bool, refuse: Refuse | None,
                          form: DecisionForm = form) -> DecisionOutcome:
                return await decide(client, s, m, with_advice=advice, form=form, refuse=refuse)

            system = count_tokens(SYSTEM_PROMPT) if count_tokens is not None else None
            records += await run_decider(model, ask, cases, form=form, modes=(mode,), with_advice=with_advice,
                                         count_tokens=count_tokens, system_tokens=system)
    return records


def _made(answer: Answer | None, error: str = "") -> DecisionOutcome:
    """A rule-made decision outcome (no model, no prompt)."""
    return DecisionOutcome(raw=answer, valid=answer is not None, retries=0, error=error, latency_s=0.0, prompt="",
                           form=answer.form if answer is not None else "step")


async def always_stop(s: Situation, mode: Mode, with_advice: bool, refuse: Refuse | None) -> DecisionOutcome:
    """The "always stop" baseline."""
    return _made(Answer.of_stop(rationale="always stop"))


async def drl_top(s: Situation, mode: Mode, with_advice: bool, refuse: Refuse | None) -> DecisionOutcome:
    """The DRL's top action as the proposal (none without advice)."""
    if not s.advice:
        return _made(None, error="no DRL advice")
    return _made(move_answer(s, s.advice[0].tpp, s.advice[0].direction))


async def guard_safe(s: Situation, mode: Mode, with_advice: bool, refuse: Refuse | None) -> DecisionOutcome:
    """The guard's safe action in ``mode`` (:func:`~m2m.agents.llm.guard.safe_action`) as the proposal."""
    return _made(move_answer(s, *safe_action(s, mode, s.scenario.oar_names)))


#: The baselines this module makes itself: name → (decide, form label).
OWN_BASELINES: Mapping[str, tuple[DecideFn, str]] = {
    BASELINE_STOP: (always_stop, "step"),
    BASELINE_DRL: (drl_top, "step"),
    BASELINE_SAFE: (guard_safe, "step"),
}


async def run_baselines(
    cases: Sequence[BenchCase], deciders: Mapping[str, tuple[DecideFn, str]] = {}, *,
    modes: Sequence[Mode] = MODES, with_advice: bool = True,
) -> list[DecisionRecord]:
    """:data:`OWN_BASELINES` and the caller's ``deciders`` (name → (decide, form label): the planner's rules and
    knowledge deciders, which live above this package) on ``cases`` in every mode."""
    records: list[DecisionRecord] = []
    for name, (decide_fn, form) in {**OWN_BASELINES, **deciders}.items():
        records += await run_decider(name, decide_fn, cases, form=form, modes=modes, with_advice=with_advice)
    return records


def baseline_records(cases: Sequence[BenchCase], deciders: Mapping[str, tuple[DecideFn, str]] = {}, *,
                     modes: Sequence[Mode] = MODES) -> list[DecisionRecord]:
    """:func:`run_baselines` outside an event loop."""
    import asyncio

    return asyncio.run(run_baselines(cases, deciders, modes=modes))


# ---------------------------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class SummaryRow:
    """One line of the table, counts over ``total`` decisions (``held_out`` of them held-out situations):
    ``correct`` raw, ``guarded_correct`` after the guard, ``harmful`` raw, ``own`` (the guard took the planner's
    proposal or retry), ``valid`` answers, ``retries`` (re-asks after invalid answers), ``feedback`` (decisions with
    a feedback turn), ``steps_saved`` (published steps saved in all) and ``jumps``; ``mean_prompt_tokens`` (user
    prompt; None: not counted) and ``system_tokens`` (the system prompt, sent once); seconds per decision (s);
    ``distinct`` proposals across situations (one answer whatever the input shows up as 1 or 2)."""

    model: str
    mode: str
    form: str
    total: int
    correct: int
    guarded_correct: int
    harmful: int
    own: int
    valid: int
    retries: int
    feedback: int
    held_out: int
    held_out_correct: int
    held_out_guarded: int
    steps_saved: float
    jumps: int
    mean_prompt_tokens: float | None
    system_tokens: int | None
    mean_s: float
    median_s: float
    distinct: int
    asked_as: dict[str, int] = field(default_factory=dict)


def summarise(records: Sequence[DecisionRecord]) -> list[SummaryRow]:
    """One row per (model, mode, form), in first-seen order."""
    groups: dict[tuple[str, str, str], list[DecisionRecord]] = {}
    for r in records:
        groups.setdefault((r.model, r.mode, r.form), []).append(r)
    rows = []
    for (model, mode, form), rs in groups.items():
        held = [r for r in rs if r.held_out]
        tokens = [r.prompt_tokens for r in rs if r.prompt_tokens is not None]
        systems = Counter(r.system_tokens for r in rs if r.system_tokens is not None and r.asked == form)
        systems = systems or Counter(r.system_tokens for r in rs if r.system_tokens is not None)
        rows.append(SummaryRow(
            model=model, mode=mode, form=form, total=len(rs), correct=sum(r.correct for r in rs),
            guarded_correct=sum(r.guarded_correct for r in rs), harmful=sum(r.harmful for r in rs),
            own=sum(r.own for r in rs), valid=sum(r.valid for r in rs), retries=sum(r.retries for r in rs),
            feedback=sum(bool(r.feedback) for r in rs), held_out=len(held),
            held_out_correct=sum(r.correct for r in held), held_out_guarded=sum(r.guarded_correct for r in held),
            steps_saved=round(sum(r.steps_saved for r in rs), 2), jumps=sum(r.jump for r in rs),
            mean_prompt_tokens=statistics.fmean(tokens) if tokens else None,
            system_tokens=systems.most_common(1)[0][0] if systems else None,
            mean_s=statistics.fmean(r.latency_s for r in rs), median_s=statistics.median(r.latency_s for r in rs),
            distinct=len({r.proposal for r in rs}),
            asked_as=dict(Counter(r.asked for r in rs if r.asked != form)),
        ))
    return rows


def table(rows: Sequence[SummaryRow], title: str) -> Table:
    """The rich table printed by ``m2m bench llm``."""
    t = Table(title=title)
    columns = ("model", "mode", "form", "raw ok", "guarded ok", "harmful", "held-out raw/grd", "own", "valid",
               "feedback", "re-asks", "saved (jumps)", "tokens (+sys)", "mean s", "median s", "distinct")
    for column in columns:
        t.add_column(column, justify="left" if column in ("model", "mode", "form") else "right")
    for r in rows:
        form = r.form + "".join(f" ({n} as {f})" for f, n in r.asked_as.items())
        tokens = "-" if r.mean_prompt_tokens is None else f"{r.mean_prompt_tokens:.0f}"
        if r.system_tokens is not None:
            tokens += f" (+{r.system_tokens})"
        t.add_row(r.model, r.mode, form, f"{r.correct}/{r.total}", f"{r.guarded_correct}/{r.total}",
                  f"{r.harmful}/{r.total}", f"{r.held_out_correct}/{r.held_out_guarded}/{r.held_out}",
                  f"{r.own}/{r.total}", f"{r.valid}/{r.total}", str(r.feedback), str(r.retries),
                  f"{r.steps_saved:g} ({r.jumps})", tokens, f"{r.mean_s:.2f}", f"{r.median_s:.2f}", str(r.distinct))
    return t


def case_rows(cases: Sequence[BenchCase]) -> list[dict[str, Any]]:
    """The situations benchmarked, for the JSON report: name, scenario, kind, why, what each needs."""
    return [{"name": c.name, "scenario": c.situation.scenario.name, "kind": c.kind, "why": c.why,
             "need": str(need_of(c.situation)), "at_max": c.situation.at_max, "step": c.situation.step}
            for c in cases]


def report(rows: Sequence[SummaryRow], records: Sequence[DecisionRecord], cases: Sequence[BenchCase],
           **header: Any) -> dict[str, Any]:
    """The JSON document ``m2m bench llm --json`` writes: ``header`` items, then ``cases``, ``summary`` and every
    decision (``decisions``)."""
    return {**header, "cases": case_rows(cases), "summary": [dataclasses.asdict(r) for r in rows],
            "decisions": [dataclasses.asdict(r) for r in records]}
