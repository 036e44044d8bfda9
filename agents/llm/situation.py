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
from functools import cache
from typing import TYPE_CHECKING, Literal

from m2m.physics.tpp import PTV, RANGES, STEP_FACTORS, clamp_value, split_name

if TYPE_CHECKING:
    from m2m.agents.drl.knowledge import TppKnowledge
    from m2m.physics.protocol import Criterion

Mode = Literal["unguided", "guided"]
MODES: tuple[Mode, ...] = ("unguided", "guided")
#: Past steps shown in the prompt; older ones cost prompt tokens and rarely change the next move.
HISTORY_SHOWN = 3
#: Earliest-moved TPPs of the DRL policy shown in the knowledge block (each costs ~4 prompt tokens).
PRIORITIES_SHOWN = 5
#: Span assumed (as a fraction of |limit|) for a criterion the scenario's protocol does not know by its label.
FALLBACK_SPAN_FRACTION = 0.05

SYSTEM_PROMPT = """\
You tune the treatment planning parameters (TPPs) of a radiotherapy plan optimizer, one step per turn, \
to reach the maximum protocol score.
Each structure s (ptv = the target; the others are organs at risk, OARs) has three TPPs:
- t_s: dose threshold, fraction of the prescription (Rx); dose above t_s*Rx is penalised.
- lambda_s: penalty weight. Every OAR weight is divided by lambda_ptv.
- v_s: fraction of the hottest volume of s the penalty acts on.
A step multiplies one TPP: raise (t_ptv x1.01, other t x1.25, lambda x1.65, v x1.25) or \
lower (t_ptv x0.91, other t x0.6, lambda x0.6, v x0.8), clipped to its valid range.
To lower an OAR's dose (tighten it): lower t_oar, raise lambda_oar or raise v_oar.
To lower the PTV hot spot: lower t_ptv, raise v_ptv or raise lambda_ptv (raising lambda_ptv loosens every OAR; \
lowering it tightens every OAR).
The opposite moves loosen a structure and free dose for the others. PTV coverage is fixed by normalisation.
Rules:
1. If every criterion passes, reply stop.
2. Otherwise tighten the structure of the worst failing criterion.
3. Never loosen a structure whose criterion fails or is near its limit.
4. A TPP at a bound cannot move further that way.
DRL knowledge, if given, tells where a DRL planner's successful plans ended (keep TPPs inside its 5-95 % ranges) \
and which TPPs it moves first; DRL advice is a hint for this plan, not an order.
Reply with one JSON object only:
{"action": "change", "tpp": "<TPP name>", "direction": "raise" or "lower", "rationale": "<short reason>"}
or {"action": "stop", "tpp": "", "direction": "none", "rationale": "<short reason>"}"""


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
    """One past step: ``change`` as words (e.g. ``"raise lambda_rectum"``) and the ``score`` it led to."""

    step: int
    change: str
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

    ``tpps``: every TPP of the scenario by name (``t_ptv``, ``lambda_rectum``, …). ``dose_summary``: per structure
    ``{"dmax_pct_rx", "dmean_pct_rx", "d95_pct_rx"}`` in % Rx. ``history``: past steps, oldest first (only the last
    :data:`HISTORY_SHOWN` are rendered). ``knowledge`` and ``advice``: the DRL advisor's, used by the guided mode.
    """

    scenario: str
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


@cache
def _protocol_spans(scenario: str) -> dict[str, float]:
    from m2m.scenarios import load_scenario

    try:
        protocol = load_scenario(scenario).protocol
    except ValueError:  # an unknown scenario (ScenarioError): every span falls back on the limit
        return {}
    return {c.label: abs(c.zero - c.limit) for c in protocol.criteria}


def criterion_span(scenario: str, criterion: CriterionView) -> float:
    """The limit-to-zero span of ``criterion`` (its unit) in ``scenario``'s protocol, or
    :data:`FALLBACK_SPAN_FRACTION` of its limit when the protocol has no criterion with that label."""
    known = _protocol_spans(scenario).get(criterion.label)
    return known if known is not None else FALLBACK_SPAN_FRACTION * max(abs(criterion.limit), 1e-9)


def worst_failing(situation: Situation) -> list[CriterionView]:
    """The failing criteria, worst first: fewest points, then the largest overshoot relative to the span."""
    return sorted(
        (c for c in situation.criteria if not c.passed),
        key=lambda c: (c.points, c.room / criterion_span(situation.scenario, c)),
    )


def stepped_value(name: str, value: float, direction: int) -> float:
    """``value`` of TPP ``name`` after one raise (+1) or lower (−1) step, clipped to its range (as
    :func:`m2m.physics.tpp.step` does); equal to ``value`` when the step is a no-op at a bound."""
    param, structure = split_name(name)
    up, down = STEP_FACTORS[("ptv" if structure == PTV else "oar", param)]
    return clamp_value(name, value * (up if direction > 0 else down))


def change_words(tpp: str, direction: int) -> str:
    """``("lambda_rectum", +1)`` → ``"raise lambda_rectum"``."""
    return f"{'raise' if direction > 0 else 'lower'} {tpp}"


def _num(x: float, digits: int = 4) -> str:
    # Digits cost one prompt token each (Qwen and Gemma tokenise numbers per digit): no more than the decision needs.
    text = f"{x:.{digits}g}"
    return text.replace("e+0", "e").replace("e+", "e")


def _range_text(name: str) -> str:
    param, structure = split_name(name)
    low, high, low_inclusive = RANGES[("ptv" if structure == PTV else "oar", param)]
    return f"{'[' if low_inclusive else '('}{_num(low)},{_num(high)}]"


def _bound_note(name: str, value: float) -> str:
    stuck = [w for d, w in ((1, "max"), (-1, "min")) if stepped_value(name, value, d) == value]
    return f" at {stuck[0]}" if stuck else ""


def _criterion_line(c: CriterionView) -> str:
    state = f"pass, margin {_num(c.room)}" if c.passed else f"FAIL, over by {_num(-c.room)}, {c.points:.2f} pt"
    return f"- {c.label}: {_num(c.value)} {c.unit} ({state})"


def _state_lines(s: Situation) -> list[str]:
    lines = [
        f"Scenario {s.scenario}, step {s.step} of {s.step_cap}. Score {s.score:.2f} of {s.max_score:g}.",
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
            f"{h.step}: {h.change} -> score {h.score:.2f}" for h in s.history[-HISTORY_SHOWN:]
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
    lines = [f"DRL knowledge (final TPPs of {k.provenance.n_at_max} plans at max score; median, 5-95 % range):"]
    for stats in k.tpps:
        if stats.count == 0:
            continue
        q = {p: 10.0 ** v if stats.scale == "log10" else v for p, v in stats.quantiles.items()}
        now = s.tpps[stats.label]
        where = " now below" if now < q["5"] else " now above" if now > q["95"] else ""
        digits = 2 if stats.scale == "log10" else 3  # weights matter by their order of magnitude only
        lines.append(f"- {stats.label}: {_num(q['50'], digits)} ({_num(q['5'], digits)}-{_num(q['95'], digits)})"
                     f"{where}")
    by_role = {f"{p}_{r}": f"{p}_{st}" for r, st in k.roles.items() for p in ("t", "lambda", "v")}
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

