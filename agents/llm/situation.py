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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from m2m.physics.tpp import PARAMETERS, PARAMS, PTV, Direction, Move, Role, clamp_value, spec_of, split_name

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


#: The fixed instructions. What each parameter is, its step factors and which direction tightens come from the
#: parameter table (:data:`m2m.physics.tpp.PARAMETERS`), the knowledge support from :data:`SUPPORT_QUANTILES`.
SYSTEM_PROMPT = "\n".join([
    "You tune the treatment planning parameters (TPPs) of a radiotherapy plan optimizer, one step per turn, "
    "to reach the maximum protocol score.",
    f"Each structure s (ptv = the target; the others are organs at risk, OARs) has {_COUNT_WORDS[len(PARAMETERS)]} "
    "TPPs:",
    *(f"- {p.name}_s: {p.description}" for p in PARAMETERS.values()),
    f"A step multiplies one TPP: raise ({_factor_list(Direction.RAISE)}) or lower ({_factor_list(Direction.LOWER)}), "
    "clipped to its valid range.",
    f"To lower an OAR's dose (tighten it): {_tightening_text('oar')}.",
    f"To lower the PTV hot spot: {_tightening_text('ptv')}.",
    "The opposite moves loosen a structure and free dose for the others. PTV coverage is fixed by normalisation.",
    "Rules:",
    "1. If every criterion passes, reply stop.",
    "2. Otherwise tighten the structure of the worst failing criterion.",
    "3. Never loosen a structure whose criterion fails or is near its limit.",
    "4. A TPP at a bound cannot move further that way.",
    "DRL knowledge, if given, tells where a DRL planner's successful plans ended (keep TPPs inside its "
    f"{'-'.join(SUPPORT_QUANTILES)} % ranges) and which TPPs it moves first; DRL advice is a hint for this plan, "
    "not an order.",
    "Reply with one JSON object only:",
    '{"action": "change", "tpp": "<TPP name>", "direction": "raise" or "lower", "rationale": "<short reason>"}',
    'or {"action": "stop", "tpp": "", "direction": "none", "rationale": "<short reason>"}',
])


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

    @classmethod
    def of(cls, criterion: Criterion, value: float) -> CriterionView:
        """The view of protocol ``criterion`` at the measured ``value`` (points and pass as the protocol scores)."""
        return cls(criterion.label, criterion.structure, value, criterion.limit, criterion.unit,
                   criterion.points(value), criterion.passed(value), criterion.upper)

    @property
    def room(self) -> float:
        """Distance to the limit on the passing side, in ``unit`` (negative: by how much it fails)."""
        return self.limit - self.value if self.upper else self.value - self.limit


@dataclass(frozen=True)
class StepView:
    """One past step: the ``move`` made from it and the ``score`` it had."""

    step: int
    move: Move
    score: float


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


def criterion_span(protocol: Protocol, criterion: CriterionView) -> float:
    """The limit-to-zero span ``|zero - limit|`` of ``criterion`` (its unit) in ``protocol``, or
    :data:`FALLBACK_SPAN_FRACTION` of its limit when the protocol has no criterion with that label."""
    known = next((abs(c.zero - c.limit) for c in protocol.criteria if c.label == criterion.label), None)
    return known if known is not None else FALLBACK_SPAN_FRACTION * max(abs(criterion.limit), 1e-9)


def worst_failing(situation: Situation) -> list[CriterionView]:
    """The failing criteria, worst first: fewest points, then the largest overshoot relative to the span."""
    return sorted(
        (c for c in situation.criteria if not c.passed),
        key=lambda c: (c.points, c.room / criterion_span(situation.scenario.protocol, c)),
    )


def stepped_value(name: str, value: float, direction: int) -> float:
    """``value`` of TPP ``name`` after one raise (+1) or lower (−1) step, clipped to its range (as
    :func:`m2m.physics.tpp.step` does); equal to ``value`` when the step is a no-op at a bound."""
    return clamp_value(name, value * spec_of(name).factor(direction))


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
    state = f"pass, margin {_num(c.room)}" if c.passed else f"FAIL, over by {_num(-c.room)}, {c.points:.2f} pt"
    return f"- {c.label}: {_num(c.value)} {c.unit} ({state})"


def _state_lines(s: Situation) -> list[str]:
    lines = [
        f"Scenario {s.scenario.name}, step {s.step} of {s.step_cap}. Score {s.score:.2f} of {s.max_score:g}.",
        "Dose (% Rx): " + "; ".join(
            f"{name} max {_num(d['dmax_pct_rx'])} mean {_num(d['dmean_pct_rx'])} D95 {_num(d['d95_pct_rx'])}"
            for name, d in s.dose_summary.items()
        ),
        "Criteria:",
        *(_criterion_line(c) for c in s.criteria),
        "TPPs (value, valid range):",
    ]
    by_structure: dict[str, list[str]] = {}
    for name, value in s.tpps.items():
        by_structure.setdefault(split_name(name)[1], []).append(
            f"{name}={_num(value, 3)} {_range_text(name)}{_bound_note(name, value)}"
        )
    lines += [f"- {'; '.join(items)}" for items in by_structure.values()]
    if s.history:
        lines.append("Last steps: " + "; ".join(
            f"{h.step}: {h.move} -> score {h.score:.2f}" for h in s.history[-HISTORY_SHOWN:]
        ))
    return lines


def _closing_line(s: Situation) -> str:
    # Last, where a small model reads it just before answering: which criterion decides the move, or that none does.
    failing = worst_failing(s)
    if not failing:
        return "Every criterion passes. Next step?"
    others = f"; also failing: {', '.join(c.label for c in failing[1:])}" if len(failing) > 1 else ""
    return f"Worst failing: {failing[0].label} ({failing[0].points:.2f} pt){others}. Next step?"


def _knowledge_lines(s: Situation) -> list[str]:
    k = s.usable_knowledge()
    if k is None:
        return []
    low, high = SUPPORT_QUANTILES
    lines = [f"DRL knowledge (final TPPs of {k.provenance.n_at_max} plans at max score; median, {low}-{high} % range):"]
    for stats in k.tpps:
        if stats.count == 0:
            continue
        q = {p: 10.0 ** v if stats.scale == "log10" else v for p, v in stats.quantiles.items()}
        now = s.tpps[stats.label]
        where = " now below" if now < q[low] else " now above" if now > q[high] else ""
        digits = 2 if stats.scale == "log10" else 3  # weights matter by their order of magnitude only
        lines.append(f"- {stats.label}: {_num(q['50'], digits)} ({_num(q[low], digits)}-{_num(q[high], digits)})"
                     f"{where}")
    by_role = {f"{p}_{r}": f"{p}_{st}" for r, st in k.roles.items() for p in PARAMS}
    # The priority order only, without directions: a listed "raise X 22 %" is copied by small models whatever the plan.
    lines.append("DRL priority (TPPs it moves first, over all plans): "
                 + ", ".join(by_role.get(p, p) for p in k.priority[:PRIORITIES_SHOWN]))
    return lines


def _advice_lines(s: Situation) -> list[str]:
    if not s.advice:
        return []
    return ["DRL advice now: " + "; ".join(f"{change_words(a.tpp, a.direction)} (p={a.probability:.2f})"
                                           for a in s.advice)]


def render(situation: Situation, mode: Mode, *, with_advice: bool) -> str:
    """The user prompt for one decision (see the module docstring); ``with_advice`` only matters when guided.

    The guided block (knowledge, then advice) sits between the plan state and the closing line (the worst failing
    criterion and the question), so removing it gives the unguided prompt exactly.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    guided: list[str] = []
    if mode == "guided":
        guided = _knowledge_lines(situation) + (_advice_lines(situation) if with_advice else [])
    return "\n".join([*_state_lines(situation), *guided, _closing_line(situation)])

