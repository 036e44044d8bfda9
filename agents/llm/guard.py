"""The guard between the LLM's proposal and the plan: rules every step must pass, and the action taken instead.

Rules in both modes:

* the TPP must exist and the step must change its value inside the valid range (a step at a bound is a no-op);
* ``stop`` only at the maximum score (every criterion passes);
* no valid decision at all (``None``) → the safe action.

Rules added in the guided mode:

* no step may LOOSEN a structure that has an at-risk criterion: one that fails, or passes with less room than
  :data:`NEAR_LIMIT_FRACTION` of its limit-to-zero span (the protocol's scoring span, e.g. 5 percentage points for
  rectum V70Gy ≤ 25 %, 3 % Rx for the PTV hot spot);
* no step may move a TPP further outside the DRL knowledge's 5–95 % support of successful final values (on log10
  for the lambdas, as the knowledge stores them) — only for knowledge learned on the scenario's own site. Knowledge
  from another site (prostate knowledge guiding liver, relabelled through the roles) is shown to the LLM but vetoes
  nothing: its ranges describe another anatomy, and enforcing them blocked the one effective move (in the paper
  experiment's liver setting 1, lowering t_stomach to 0.37, below the prostate rectum's 5 % quantile 0.52, was vetoed
  for 18 steps while the unguided planner reached 4/4 with it in 2).

A vetoed proposal is replaced, in the guided mode, by the DRL's best admissible advice among the moves that tighten
a failing criterion's structure (:func:`tightening_moves`: advice that moves something else, e.g. loosens a passing
OAR while the PTV hot spot fails, is passed over), otherwise, and always in the unguided mode, by the SAFE ACTION:
tighten the structure of the worst failing criterion (fewest points, then largest overshoot relative to its span)
with the first admissible of

* an OAR: raise ``lambda_<oar>``, lower ``t_<oar>``, raise ``v_<oar>``;
* the PTV hot spot: lower ``t_ptv``, raise ``v_ptv``, raise ``lambda_ptv`` (last: it loosens every OAR);

(for a failing lower limit, the same list reversed in direction: the structure needs more dose). At the maximum score
the safe action, and the replacement of any vetoed proposal, is ``stop``. When nothing in those lists is admissible
under the mode's rules, the range rule alone decides; when even that leaves nothing, the guard stops (direction 0)
with a veto that says so, the only stop below the maximum.

Effects follow the optimizer objective (:mod:`m2m.physics.optimizer`): lowering ``t_s`` or raising ``lambda_s`` or
``v_s`` tightens structure ``s``; ``lambda_ptv`` also divides every OAR weight, so raising it loosens every OAR and
lowering it tightens every OAR.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from m2m.agents.llm.decision import TppDecision
from m2m.agents.llm.situation import (
    SUPPORT_QUANTILES,
    CriterionView,
    Mode,
    Situation,
    change_words,
    criterion_span,
    stepped_value,
    worst_failing,
)
from m2m.physics.tpp import PARAMETERS, Direction, Move, role_of, split_name, tightening_steps

if TYPE_CHECKING:
    from m2m.agents.drl.knowledge import TppKnowledge

#: A criterion passing with less room than this fraction of its limit-to-zero span counts as at risk. Not calibrated:
#: 10 % of rectum V70Gy's 5-point span would be 0.5 percentage points, less than one loosening step (t ×1.25, lambda
#: ×0.6) usually moves such a point, so twice that.
NEAR_LIMIT_FRACTION = 0.2

#: Who chose the action taken at a step: the planner's own ``proposal`` (the LLM's, the DRL planner's or the rules
#: planner's, unchanged), the DRL's advice replacing a vetoed proposal (``drl_advice``), or the ``safe`` action.
ActionSource = Literal["proposal", "drl_advice", "safe"]
#: Why the guard refused a proposal (see the module docstring for each rule).
VetoReason = Literal[
    "unknown_tpp", "no_op_at_bound", "loosens_at_risk", "outside_knowledge", "invalid_decision", "early_stop",
    "no_admissible_action",
]


@dataclass(frozen=True)
class Veto:
    """Why a proposal was refused: a ``reason`` code and a human-readable ``detail``."""

    reason: VetoReason
    detail: str


@dataclass(frozen=True)
class GuardResult:
    """The action actually taken (``move``; None: stop), the vetoes raised against the proposal, and where the
    action came from."""

    move: Move | None
    vetoes: tuple[Veto, ...]
    source: ActionSource

    @property
    def stop(self) -> bool:
        return self.move is None


def _taken(tpp: str, direction: int, vetoes: Iterable[Veto], source: ActionSource) -> GuardResult:
    return GuardResult(Move(tpp, Direction(direction)) if direction else None, tuple(vetoes), source)


def span(situation: Situation, criterion: CriterionView) -> float:
    """The limit-to-zero span of ``criterion`` in its unit (:func:`~m2m.agents.llm.situation.criterion_span`)."""
    return criterion_span(situation.scenario.protocol, criterion)


def at_risk(situation: Situation, criterion: CriterionView) -> bool:
    """Fails, or passes with less room than :data:`NEAR_LIMIT_FRACTION` of its span."""
    return not criterion.passed or criterion.room < NEAR_LIMIT_FRACTION * span(situation, criterion)


def effects(tpp: str, direction: int, oar_names: Iterable[str]) -> dict[str, int]:
    """``{structure: +1 tightened / −1 loosened}`` by one step of ``tpp`` in ``direction``: its own structure by
    :attr:`~m2m.physics.tpp.ParameterSpec.tightens`, every other OAR by
    :attr:`~m2m.physics.tpp.RoleSpec.tightens_oars` (see the module doc)."""
    param, structure = split_name(tpp)
    spec = PARAMETERS[param]
    out = {structure: direction * spec.tightens}
    on_oars = spec.of(role_of(structure)).tightens_oars
    if on_oars:
        out.update({oar: direction * on_oars for oar in oar_names if oar != structure})
    return out


def _support_distance(value: float, low: float, high: float) -> float:
    return max(low - value, 0.0, value - high)


def enforced_knowledge(situation: Situation) -> TppKnowledge | None:
    """The knowledge whose ranges the guard enforces: the usable knowledge when it was learned on the situation's
    site (:attr:`Situation.knowledge_site`), else ``None`` (see the module doc)."""
    knowledge = situation.usable_knowledge()
    if knowledge is None or situation.knowledge_site != situation.scenario.site:
        return None
    return knowledge


def rule_vetoes(situation: Situation, tpp: str, direction: int, mode: Mode, oar_names: Sequence[str]) -> list[Veto]:
    """Every rule a change of ``tpp`` in ``direction`` breaks in ``situation`` under ``mode`` (empty: admissible)."""
    if tpp not in situation.tpps:
        return [Veto("unknown_tpp", f"{tpp!r} is not a TPP of {situation.scenario.name}")]
    value = situation.tpps[tpp]
    new = stepped_value(tpp, value, direction)
    if new == value:
        return [Veto("no_op_at_bound", f"{tpp}={value:g} is at its {'upper' if direction > 0 else 'lower'} bound")]
    if mode != "guided":
        return []
    vetoes: list[Veto] = []
    words = change_words(tpp, direction)
    moved = effects(tpp, direction, oar_names)
    for c in situation.criteria:
        need = 1 if c.upper else -1  # an upper limit needs the structure tightened, a lower limit loosened
        if moved.get(c.structure, need) != need and at_risk(situation, c):
            state = "fails" if not c.passed else f"is within {c.room:g} {c.unit} of its limit"
            vetoes.append(Veto("loosens_at_risk", f"{words} loosens {c.structure}: {c.label} {state}"))
    knowledge = enforced_knowledge(situation)
    stats = next((s for s in knowledge.tpps if s.label == tpp), None) if knowledge is not None else None
    if stats is not None and stats.count > 0:
        log_scale = stats.scale == "log10"
        before, after = (math.log10(x) if log_scale else x for x in (value, new))
        low, high = (stats.quantiles[q] for q in SUPPORT_QUANTILES)
        if _support_distance(after, low, high) > _support_distance(before, low, high):
            shown = (10.0**low, 10.0**high) if log_scale else (low, high)
            vetoes.append(Veto("outside_knowledge",
                               f"{words} moves {tpp} further outside the DRL's {'-'.join(SUPPORT_QUANTILES)} % range "
                               f"{shown[0]:.3g}-{shown[1]:.3g} (now {value:.3g})"))
    return vetoes


def tightening_moves(situation: Situation) -> list[tuple[str, int]]:
    """The moves that tighten each failing criterion's structure, worst criterion first, in the order of the module
    doc, admissible or not."""
    return [m for c in worst_failing(situation) for m in tightening_steps(c.structure, 1 if c.upper else -1)]


def safe_action(situation: Situation, mode: Mode, oar_names: Sequence[str]) -> tuple[str, int]:
    """The documented safe action (module doc): ``("", 0)`` at the maximum score or when nothing is admissible."""
    if situation.at_max:
        return "", 0
    ordered = tightening_moves(situation)
    for rules in (mode, "unguided"):
        for tpp, direction in ordered:
            if not rule_vetoes(situation, tpp, direction, rules, oar_names):
                return tpp, direction
    return "", 0


def guard(situation: Situation, decision: TppDecision | None, mode: Mode, oar_names: Sequence[str]) -> GuardResult:
    """The action to take for ``decision`` in ``situation`` (see the module docstring for every rule)."""
    if decision is None:
        vetoes = [Veto("invalid_decision", "no valid decision from the LLM")]
    elif decision.action == "stop":
        if situation.at_max:
            return GuardResult(None, (), "proposal")
        failing = sum(1 for c in situation.criteria if not c.passed)
        vetoes = [Veto("early_stop", f"stop at score {situation.score:.2f} of {situation.max_score:g} "
                                     f"with {failing} failing criteria")]
    else:
        direction = decision.signed_direction
        vetoes = ([Veto("invalid_decision", "a change without a direction")] if direction == 0
                  else rule_vetoes(situation, decision.tpp, direction, mode, oar_names))
        if not vetoes:
            return _taken(decision.tpp, direction, (), "proposal")
    if mode == "guided" and not situation.at_max:
        helpful = set(tightening_moves(situation))
        for advice in situation.advice:
            move = (advice.tpp, advice.direction)
            if move in helpful and not rule_vetoes(situation, *move, mode, oar_names):
                return _taken(advice.tpp, advice.direction, vetoes, "drl_advice")
    tpp, direction = safe_action(situation, mode, oar_names)
    if direction == 0 and not situation.at_max:
        vetoes.append(Veto("no_admissible_action", "no step passes the range rule: stopping"))
    return _taken(tpp, direction, vetoes, "safe")
