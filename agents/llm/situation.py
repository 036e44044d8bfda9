"""What the LLM planner sees at one decision, and the prompt it is given.

A :class:`Situation` is a plain, frozen snapshot of a planning session after a plan was scored: the protocol
criteria, the TPPs, a DVH summary, the last few steps and, for the guided mode, the DRL advisor's knowledge and
advice. :func:`render` turns it into the user prompt; the fixed instructions are :data:`SYSTEM_PROMPT`, identical for
every decision and both modes, so a local model keeps their KV cache across decisions (prompt evaluation dominates
latency on a CPU).

Modes: ``"unguided"`` renders the plan state only; ``"guided"`` renders exactly the same lines plus one block with
the knowledge (and, when asked, the advice). Dose values are percent of the prescription (% Rx) unless a criterion
names its own unit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from m2m.agents.llm.answer import LADDER_STEPS, Change, changes_words, ladder_target, stepped_value
from m2m.physics.tpp import (
    PARAMETERS,
    PARAMS,
    PTV,
    Direction,
    Move,
    Role,
    ValidRange,
    spec_of,
    split_name,
)

if TYPE_CHECKING:
    from m2m.agents.drl.knowledge import TppKnowledge
    from m2m.physics.protocol import Criterion, Protocol
    from m2m.scenarios import Scenario

Mode = Literal["unguided", "guided"]
MODES: tuple[Mode, ...] = ("unguided", "guided")
#: Past steps shown in the prompt; older ones cost prompt tokens and rarely change the next move.
HISTORY_SHOWN = 3
#: Earliest-moved TPPs of the DRL policy shown in the knowledge block (each costs ~4 prompt tokens).
PRIORITIES_SHOWN = 5
#: Span assumed (as a fraction of |limit|) for a criterion the scenario's protocol does not know by its label.
FALLBACK_SPAN_FRACTION = 0.05
#: The knowledge quantiles (percent keys of ``TppStats.quantiles``) that bound the support of the DRL planner's
#: successful final TPPs: named in the prompt and enforced by the guard.
SUPPORT_QUANTILES = ("5", "95")

_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_EFFECT_WORDS = {1: "tightens", -1: "loosens"}


def _factor_list(direction: Direction) -> str:
    """Each parameter's step factor in ``direction`` (:data:`m2m.physics.tpp.PARAMETERS`), one entry per parameter
    unless the PTV's differs from the OARs': ``"t_ptv x1.01, other t x1.25, lambda x1.65, v x1.25"``."""
    parts: list[str] = []
    for p in PARAMETERS.values():
        ptv, oar = p.ptv.factor(direction), p.oar.factor(direction)
        parts += [f"{p.name} x{oar:g}"] if ptv == oar else [f"{p.name}_{PTV} x{ptv:g}", f"other {p.name} x{oar:g}"]
    return ", ".join(parts)


def _tightening_text(role: Role) -> str:
    """The moves that tighten a structure of ``role``, in table order but those that also move every OAR last, with
    what they do to the OARs: ``"lower t_oar, raise lambda_oar or raise v_oar"``."""
    specs = sorted(PARAMETERS.values(), key=lambda p: p.of(role).tightens_oars != 0)
    moves = [f"{Direction(p.tightens).word} {p.name}_{role}" for p in specs]
    side = [f"raising {p.name}_{role} {_EFFECT_WORDS[p.of(role).tightens_oars]} every OAR; "
            f"lowering it {_EFFECT_WORDS[-p.of(role).tightens_oars]} every OAR"
            for p in specs if p.of(role).tightens_oars]
    return f"{', '.join(moves[:-1])} or {moves[-1]}" + (f" ({'; '.join(side)})" if side else "")


def _ranges_text() -> str:
    """Each parameter's valid range (:data:`m2m.physics.tpp.PARAMETERS`), one entry per parameter unless the PTV's
    differs from the OARs': ``"t_ptv [1,1.2], other t (0,1], lambda (0,1e+05], …"``."""
    def text(r: ValidRange) -> str:
        return f"{'[' if r.low_inclusive else '('}{r.low:g},{r.high:g}]"

    parts: list[str] = []
    for p in PARAMETERS.values():
        ptv, oar = p.ptv.valid, p.oar.valid
        parts += ([f"{p.name} {text(oar)}"] if ptv == oar
                  else [f"{p.name}_{PTV} {text(ptv)}", f"other {p.name} {text(oar)}"])
    return ", ".join(parts)


#: Each decision form's answer, as the system text shows it (the JSON schema enforces it; these lines tell the
#: model what the fields mean).
REPLY_FORMATS: dict[str, str] = {
    "step": '{"action": "change", "tpp": "<TPP name>", "direction": "raise" or "lower", "rationale": "<short>"}; '
            'a step multiplies one TPP: raise (RAISE) or lower (LOWER), clipped to its valid range',
    "values": '{"action": "change", "changes": {"<TPP name>": <new value>, ...}, "rationale": "<short>"} with 1-3 '
              "TPPs; small changes do little (a useful change of t is 10-40 %, of lambda a factor 2-10)",
    "quantile": '{"action": "change", "changes": {"<TPP name>": "<one of its choices>", ...}, "rationale": '
                '"<short>"} with 1-3 TPPs, each moved to that point of the DRL knowledge (p5 ... p95) or, where no '
                f'point helps, that many steps beyond it ({", ".join(ladder_target(k) for k in LADDER_STEPS)})',
}


def system_prompt() -> str:
    """The fixed instructions, one text for every decision form and both modes (the user prompt names the form to
    answer in), so a local model keeps its KV cache across every decision of a planner process, whichever session,
    mode or form. What each parameter is, its step factors, valid ranges and which direction tightens come from
    the parameter table (:data:`m2m.physics.tpp.PARAMETERS`), the knowledge support from
    :data:`SUPPORT_QUANTILES`."""
    return "\n".join([
        "You tune the treatment planning parameters (TPPs) of a radiotherapy plan optimizer to reach the maximum "
        "protocol score in as few turns as possible.",
        f"Each structure s (ptv = the target; the others are organs at risk, OARs) has "
        f"{_COUNT_WORDS[len(PARAMETERS)]} TPPs:",
        *(f"- {p.name}_s: {p.description}" for p in PARAMETERS.values()),
        f"Valid ranges: {_ranges_text()}.",
        f"To lower an OAR's dose (tighten it): {_tightening_text('oar')}.",
        f"To lower the PTV hot spot: {_tightening_text('ptv')}.",
        "The opposite moves loosen a structure and free dose for the others. PTV coverage is fixed by normalisation.",
        "Rules:",
        "1. If every criterion passes, reply stop.",
        "2. Otherwise tighten the structure of the worst failing criterion.",
        "3. Never loosen a structure whose criterion fails or is near its limit.",
        "4. A TPP at a bound cannot move further that way; if a change did not raise the score, go further or change "
        "another TPP of that structure.",
        "DRL knowledge, if given, tells where a DRL planner's successful plans ended (keep TPPs inside its "
        f"{'-'.join(SUPPORT_QUANTILES)} % ranges) and which TPPs it moves first; DRL advice is a hint for this plan, "
        "not an order.",
        "Reply with one JSON object only, in the form the question names:",
        *(f"- {form} form: " + text.replace("RAISE", _factor_list(Direction.RAISE)).replace(
            "LOWER", _factor_list(Direction.LOWER)) for form, text in REPLY_FORMATS.items()),
        '- to stop, in any form: {"action": "stop", "tpp": "", "direction": "none", ...} (step) or '
        '{"action": "stop", "changes": {}, ...}',
    ])


#: The fixed instructions (:func:`system_prompt`).
SYSTEM_PROMPT = system_prompt()


@dataclass(frozen=True)
class CriterionView:
    """One protocol criterion of the current plan: ``value`` and ``limit`` in ``unit``, ``points`` (0..1) and
    whether it ``passed``; ``upper``: the limit is a maximum (lower is better)."""

    label: str
    structure: str
    value: float
    limit: float
    unit: str
    points: float
    passed: bool
    upper: bool
    #: The protocol metric (``"D95%"``); empty where the view was made without it.
    metric: str = ""

    @classmethod
    def of(cls, criterion: Criterion, value: float) -> CriterionView:
        """The view of protocol ``criterion`` at the measured ``value`` (points and pass as the protocol scores)."""
        return cls(criterion.label, criterion.structure, value, criterion.limit, criterion.unit,
                   criterion.points(value), criterion.passed(value), criterion.upper, criterion.metric)

    @property
    def room(self) -> float:
        """Distance to the limit on the passing side, in ``unit`` (negative: by how much it fails)."""
        return self.limit - self.value if self.upper else self.value - self.limit


@dataclass(frozen=True)
class StepView:
    """One past step: the action made from it (a published ``move``, or its value ``changes``) and the ``score`` it
    had."""

    step: int
    move: Move | None
    score: float
    changes: tuple[Change, ...] = ()

    @property
    def action(self) -> str:
        """``"raise t_ptv"`` or ``"t_ptv 1.1->1 (p50)"``."""
        return str(self.move) if self.move is not None else changes_words(self.changes)


@dataclass(frozen=True)
class AdviceView:
    """One DRL advice: ``tpp`` in the scenario's names, ``direction`` +1 raise / −1 lower, its probability."""

    tpp: str
    direction: int
    probability: float


@dataclass(frozen=True)
class Situation:
    """The planning state at one decision.

    ``scenario``: the scenario planned (its protocol scales the criteria, its site decides whether the knowledge's
    ranges are enforced). ``tpps``: every TPP of the scenario by name (``t_ptv``, ``lambda_rectum``, …).
    ``dose_summary``: per structure ``{"dmax_pct_rx", "dmean_pct_rx", "d95_pct_rx"}`` in % Rx. ``history``: past
    steps, oldest first (only the last :data:`HISTORY_SHOWN` are rendered). ``knowledge`` and ``advice``: the DRL
    advisor's, used by the guided mode; ``knowledge_site``: the site the knowledge was learned on (None: unknown,
    and the guard enforces none of its ranges).
    """

    scenario: Scenario
    step: int
    step_cap: int
    score: float
    max_score: float
    criteria: tuple[CriterionView, ...]
    tpps: Mapping[str, float]
    dose_summary: Mapping[str, Mapping[str, float]]
    history: tuple[StepView, ...] = ()
    knowledge: TppKnowledge | None = None
    advice: tuple[AdviceView, ...] = ()
    knowledge_site: str | None = None

    @property
    def at_max(self) -> bool:
        """Every criterion passes (the score is the protocol's maximum)."""
        return all(c.passed for c in self.criteria)

    def usable_knowledge(self) -> TppKnowledge | None:
        """The knowledge when it describes this scenario's TPPs (every label it has is a TPP here), else None.

        Knowledge of another site names other structures (and its PTV statistics belong to another anatomy), so it
        is ignored rather than half applied.
        """
        k = self.knowledge
        if k is None or not k.tpps or any(s.label not in self.tpps for s in k.tpps):
            return None
        return k


#: A criterion passing with less room than this fraction of its limit-to-zero span counts as at risk. Not calibrated:
#: 10 % of rectum V70Gy's 5-point span would be 0.5 percentage points, less than one loosening step (t ×1.25, lambda
#: ×0.6) usually moves such a point, so twice that.
NEAR_LIMIT_FRACTION = 0.2


def criterion_span(protocol: Protocol, criterion: CriterionView) -> float:
    """The limit-to-zero span ``|zero - limit|`` of ``criterion`` (its unit) in ``protocol``, or
    :data:`FALLBACK_SPAN_FRACTION` of its limit when the protocol has no criterion with that label."""
    known = next((abs(c.zero - c.limit) for c in protocol.criteria if c.label == criterion.label), None)
    return known if known is not None else FALLBACK_SPAN_FRACTION * max(abs(criterion.limit), 1e-9)


def span(situation: Situation, criterion: CriterionView) -> float:
    """The limit-to-zero span of ``criterion`` in its unit (:func:`criterion_span`)."""
    return criterion_span(situation.scenario.protocol, criterion)


def at_risk(situation: Situation, criterion: CriterionView) -> bool:
    """Fails, or passes with less room than :data:`NEAR_LIMIT_FRACTION` of its span (the guard never loosens its
    structure; the prompt names it). A criterion the plan normalisation holds (the PTV's D95 lower limit at or below
    Rx: :func:`~m2m.physics.optimizer.held_by_normalisation`) sits at its limit by construction and is never at
    risk: no TPP can move it."""
    from m2m.physics.optimizer import held_by_normalisation  # scipy: imported on first use, not with the module

    if held_by_normalisation(criterion.structure, criterion.metric, criterion.unit, criterion.limit, criterion.upper,
                             situation.scenario.rx_gy):
        return False
    return not criterion.passed or criterion.room < NEAR_LIMIT_FRACTION * span(situation, criterion)


def worst_failing(situation: Situation) -> list[CriterionView]:
    """The failing criteria, worst first: fewest points, then the largest overshoot relative to the span."""
    return sorted(
        (c for c in situation.criteria if not c.passed),
        key=lambda c: (c.points, c.room / criterion_span(situation.scenario.protocol, c)),
    )


def change_words(tpp: str, direction: int) -> str:
    """``("lambda_rectum", +1)`` → ``"raise lambda_rectum"`` (rendered by :class:`~m2m.physics.tpp.Move`)."""
    return str(Move(tpp, Direction(direction)))


def _num(x: float, digits: int = 4) -> str:
    # Digits cost one prompt token each (Qwen and Gemma tokenise numbers per digit): no more than the decision needs.
    text = f"{x:.{digits}g}"
    return text.replace("e+0", "e").replace("e+", "e")


def _range_text(name: str) -> str:
    valid = spec_of(name).valid
    return f"{'[' if valid.low_inclusive else '('}{_num(valid.low)},{_num(valid.high)}]"


def _bound_note(name: str, value: float) -> str:
    stuck = [w for d, w in ((1, "max"), (-1, "min")) if stepped_value(name, value, d) == value]
    return f" at {stuck[0]}" if stuck else ""


def _criterion_line(c: CriterionView) -> str:
    state = f"FAIL {c.points:.2f} pt" if not c.passed else "near limit"
    return f"- {c.label}: {_num(c.value)} ({state})"


def _tpp_lines(s: Situation, names: list[str]) -> list[str]:
    """``names`` grouped by structure, one line each: ``"- t_ptv=1.04 at max, lambda_ptv=3, v_ptv=0.12"``."""
    by_structure: dict[str, list[str]] = {}
    for name in names:
        value = s.tpps[name]
        by_structure.setdefault(split_name(name)[1], []).append(f"{name}={_num(value, 3)}{_bound_note(name, value)}")
    return [f"- {', '.join(items)}" for items in by_structure.values()]


def _state_lines(s: Situation, form: str = "step") -> list[str]:
    """The plan state: score, a DVH summary (max and mean dose of each scored structure), the failing and near-limit
    criteria (the others only counted), the TPPs (left to the knowledge table in the guided quantile form) and the
    last steps."""
    shown = [c for c in s.criteria if at_risk(s, c)]
    lines = [
        f"Scenario {s.scenario.name}, step {s.step} of {s.step_cap}. Score {s.score:.2f} of {s.max_score:g}.",
        "Dose % Rx (max/mean): " + ", ".join(
            f"{name} {_num(d['dmax_pct_rx'], 3)}/{_num(d['dmean_pct_rx'], 3)}" for name, d in s.dose_summary.items()
        ),
        f"Criteria failing or near their limit ({len(s.criteria) - len(shown)} others pass with room):",
        *(_criterion_line(c) for c in shown),
    ]
    in_table = set(knowledge_points(s)) if form == "quantile" else set()
    rest = [n for n in s.tpps if n not in in_table]
    if rest:
        lines.append("TPPs:" if not in_table else "TPPs the knowledge does not cover:")
        lines += _tpp_lines(s, rest)
    if s.history:
        lines.append("Last steps: " + "; ".join(
            f"{h.step}: {h.action} -> score {h.score:.2f}" for h in s.history[-HISTORY_SHOWN:]
        ))
    return lines


def _closing_line(s: Situation, form: str = "step") -> str:
    # Last, where a small model reads it just before answering: which criterion decides the move, or that none does.
    failing = worst_failing(s)
    if not failing:
        return f"Every criterion passes. Next step ({form} form)?"
    return f"Worst failing: {failing[0].label}. Next step ({form} form)?"


def knowledge_points(s: Situation) -> dict[str, dict[str, float]]:
    """Per TPP label of the usable knowledge, its quantiles as TPP values: ``{"t_rectum": {"p5": 0.53, …}}``
    (log10 statistics turned back into weights); empty without usable knowledge."""
    k = s.usable_knowledge()
    if k is None:
        return {}
    return {stats.label: {f"p{q}": 10.0 ** v if stats.scale == "log10" else v for q, v in stats.quantiles.items()}
            for stats in k.tpps if stats.count > 0}


def knowledge_value(s: Situation, tpp: str, target: str) -> float | None:
    """The knowledge's value of ``tpp`` at quantile ``target`` (``"p50"``, …), None when it has none."""
    return knowledge_points(s).get(tpp, {}).get(target)


def _where(now: float, points: Mapping[str, float]) -> str:
    """Where ``now`` sits among the quantile ``points`` (ascending): ``"<p5"``, ``"p25-p50"``, ``"=p50"``, …"""
    names = list(points)
    for name in names:
        if math.isclose(now, points[name], rel_tol=0.02):
            return f"={name}"
    if now < points[names[0]]:
        return f"<{names[0]}"
    for lo, hi in itertools.pairwise(names):
        if now < points[hi]:
            return f"{lo}-{hi}"
    return f">{names[-1]}"


def _knowledge_lines(s: Situation, form: str = "step",
                     menu: Mapping[str, Sequence[tuple[str, float]]] | None = None) -> list[str]:
    """The guided block. ``quantile`` form: each TPP with where it sits among the knowledge's quantiles and, for
    the TPPs in ``menu``, the points the answer may choose (the guard's :func:`~m2m.agents.llm.guard.quantile_menu`);
    other forms: each TPP's median and 5-95 % range. Then the DRL's priority order."""
    k = s.usable_knowledge()
    points = knowledge_points(s)
    if k is None or not points:
        return []
    low, high = (f"p{q}" for q in SUPPORT_QUANTILES)
    if form == "quantile":
        lines = [f"DRL knowledge of {k.provenance.n_at_max} plans at max: each TPP among "
                 f"{'/'.join(next(iter(points.values())))}; choices help a failing criterion"]
    else:
        lines = [f"DRL knowledge (TPPs of {k.provenance.n_at_max} successful plans; median, {low}-{high} range):"]
    by_structure: dict[str, list[str]] = {}
    for name, q in points.items():
        now, structure = s.tpps[name], split_name(name)[1]
        digits = 2 if PARAMETERS[split_name(name)[0]].log_scale else 3  # weights matter by their magnitude only
        if form != "quantile":
            where = " now below" if now < q[low] else " now above" if now > q[high] else ""
            item = f"{name} {_num(q['p50'], digits)} ({_num(q[low], digits)}-{_num(q[high], digits)}){where}"
        elif menu and name in menu:
            choices = " ".join(f"{p}={_num(v, 2)}" for p, v in menu[name])
            item = f"{name}={_num(now, digits)}, choices: {choices}"
        else:
            item = f"{name} {_where(now, q)}"
        by_structure.setdefault(structure, []).append(item)
    lines += [f"- {'; '.join(items)}" for items in by_structure.values()]
    by_role = {f"{p}_{r}": f"{p}_{st}" for r, st in k.roles.items() for p in PARAMS}
    # The priority order only, without directions: a listed "raise X 22 %" is copied by small models whatever the plan.
    lines.append("DRL priority: " + ", ".join(by_role.get(p, p) for p in k.priority[:PRIORITIES_SHOWN]))
    return lines


def _advice_lines(s: Situation) -> list[str]:
    if not s.advice:
        return []
    return ["DRL advice now: " + "; ".join(f"{change_words(a.tpp, a.direction)} (p={a.probability:.2f})"
                                           for a in s.advice)]


def render(situation: Situation, mode: Mode, *, with_advice: bool, form: str = "step",
           menu: Mapping[str, Sequence[tuple[str, float]]] | None = None) -> str:
    """The user prompt for one decision in decision ``form`` (see the module docstring); ``with_advice`` only
    matters when guided.

    The guided block (knowledge, then advice) sits between the plan state and the closing line (the worst failing
    criterion and the question). In the ``step`` and ``values`` forms removing it gives the unguided prompt
    exactly; in the ``quantile`` form the knowledge table also carries the current TPP values, which the plan
    state then leaves out (each TPP once: prompt tokens are decision time on a CPU).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    guided: list[str] = []
    if mode == "guided":
        guided = _knowledge_lines(situation, form, menu) + (_advice_lines(situation) if with_advice else [])
    state = _state_lines(situation, form if mode == "guided" else "step")
    return "\n".join([*state, *guided, _closing_line(situation, form)])
