"""The guard between the LLM's proposal and the plan: rules every step must pass, and the action taken instead.

A proposal is an :class:`~m2m.agents.llm.answer.Answer`: a published step of one TPP (``step`` form) or new values
of one to three TPPs (``values`` and ``quantile`` forms; out-of-range values were already clamped and flagged). Every
changed TPP is judged by the direction it moves; a multi-TPP answer is taken whole or not at all.

Rules in both modes:

* the TPP must exist and the change must be real: a step at a bound is a no-op (``no_op_at_bound``), a value within
  0.5 % of the current one is no change (``no_change``);
* ``stop`` only at the maximum score (every criterion passes);
* no valid decision at all (``None``) → the replacement below.

Rules added in the guided mode:

* no change may LOOSEN a structure that has an at-risk criterion: one that fails, or passes with less room than
  :data:`NEAR_LIMIT_FRACTION` of its limit-to-zero span (the protocol's scoring span, e.g. 5 percentage points for
  rectum V70Gy ≤ 25 %, 3 % Rx for the PTV hot spot);
* no step may move a TPP further outside the DRL knowledge's 5–95 % support of successful final values (on log10
  for the lambdas, as the knowledge stores them) — only for knowledge learned on the scenario's own site. Knowledge
  from another site (prostate knowledge guiding liver, relabelled through the roles) is shown to the LLM but vetoes
  nothing: its ranges describe another anatomy, and enforcing them blocked the one effective move (in the paper
  experiment's liver setting 1, lowering t_stomach to 0.37, below the prostate rectum's 5 % quantile 0.52, was vetoed
  for 18 steps while the unguided planner reached 4/4 with it in 2).

A vetoed LLM proposal first gets ONE feedback turn (:func:`refusal` says why, in the same conversation; see
:func:`m2m.agents.llm.decision.decide`); a retry that passes is taken (source ``retry``, the LLM's own step). The
``quantile`` form's choices are computed by the same rules beforehand (:func:`quantile_menu`), so a quantile answer
is admissible by construction and the guard's work there is the multi-TPP whole-or-nothing check.

A proposal still vetoed is replaced, in the guided mode, by the DRL's best admissible advice among the moves that
tighten a failing criterion's structure (:func:`tightening_moves`: advice that moves something else, e.g. loosens a
passing OAR while the PTV hot spot fails, is passed over), otherwise, and always in the unguided mode, by the SAFE
ACTION: tighten the structure of the worst failing criterion (fewest points, then largest overshoot relative to its
span) with the first admissible of

* an OAR: raise ``lambda_<oar>``, lower ``t_<oar>``, raise ``v_<oar>``;
* the PTV hot spot: lower ``t_ptv``, raise ``v_ptv``, raise ``lambda_ptv`` (last: it loosens every OAR);

(for a failing lower limit, the same list reversed in direction: the structure needs more dose), escalating: the move
the last step made without raising the score is tried last (:func:`stalled_move`). At the maximum score
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

from m2m.agents.llm.answer import LADDER_STEPS, Answer, Change, changes_words, ladder_target, stepped_value
from m2m.agents.llm.situation import (
    SUPPORT_QUANTILES,
    Mode,
    Situation,
    StepView,
    at_risk,
    change_words,
    knowledge_points,
    worst_failing,
)
from m2m.physics.protocol import SCORE_TOLERANCE
from m2m.physics.tpp import PARAMETERS, Direction, Move, clamp_value, role_of, split_name, tightening_steps

if TYPE_CHECKING:
    from m2m.agents.drl.knowledge import TppKnowledge


#: Who chose the action taken at a step: the planner's own ``proposal`` (the LLM's, the DRL planner's or the rules
#: planner's, unchanged or only clamped into range), its second answer after the guard refused the first and said why
#: (``retry``), the DRL's advice replacing a vetoed proposal (``drl_advice``), or the ``safe`` action.
ActionSource = Literal["proposal", "retry", "drl_advice", "safe"]
#: The sources that count as the planner's own action (its "ownership" of the step).
OWN_SOURCES: tuple[ActionSource, ...] = ("proposal", "retry")
#: Why the guard refused a proposal (see the module docstring for each rule).
VetoReason = Literal[
    "unknown_tpp", "no_op_at_bound", "no_change", "loosens_at_risk", "outside_knowledge", "invalid_decision",
    "early_stop", "no_admissible_action",
]


@dataclass(frozen=True)
class Veto:
    """Why a proposal was refused: a ``reason`` code and a human-readable ``detail``."""

    reason: VetoReason
    detail: str


@dataclass(frozen=True)
class GuardResult:
    """The action actually taken — ``changes`` (new TPP values; empty: stop), with ``move`` when it is one published
    step — the vetoes raised against the proposal(s), and where the action came from."""

    move: Move | None
    vetoes: tuple[Veto, ...]
    source: ActionSource
    changes: tuple[Change, ...] = ()

    @property
    def stop(self) -> bool:
        return not self.changes

    def words(self) -> str:
        if self.stop:
            return "stop"
        return str(self.move) if self.move is not None else changes_words(self.changes)


def _taken(situation: Situation, tpp: str, direction: int, vetoes: Iterable[Veto], source: ActionSource) -> GuardResult:
    if not direction:
        return GuardResult(None, tuple(vetoes), source)
    answer = Answer.of_move(situation.tpps, Move(tpp, Direction(direction)))
    return GuardResult(answer.move, tuple(vetoes), source, answer.changes)


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


def value_vetoes(situation: Situation, tpp: str, new: float, mode: Mode, oar_names: Sequence[str]) -> list[Veto]:
    """Every rule that setting ``tpp`` to ``new`` (already inside its valid range) breaks in ``situation`` under
    ``mode`` (empty: admissible): it must be a TPP of the scenario and a real change (more than
    :data:`~m2m.agents.llm.decision.SAME_VALUE_RTOL`); guided, it must not loosen an at-risk structure nor move the
    TPP further outside the knowledge's support."""
    if tpp not in situation.tpps:
        return [Veto("unknown_tpp", f"{tpp!r} is not a TPP of {situation.scenario.name}")]
    value = situation.tpps[tpp]
    direction = Change(tpp, value, new).direction
    if direction == 0:
        return [Veto("no_change", f"{tpp} is already {value:.3g}")]
    if mode != "guided":
        return []
    vetoes: list[Veto] = []
    words = f"{change_words(tpp, direction)} ({value:.3g}->{new:.3g})"
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
        tolerance = 1e-9 * max(abs(low), abs(high), 1.0)  # a knowledge point itself is inside
        if _support_distance(after, low, high) > _support_distance(before, low, high) + tolerance:
            shown = (10.0**low, 10.0**high) if log_scale else (low, high)
            vetoes.append(Veto("outside_knowledge",
                               f"{words} moves {tpp} further outside the DRL's {'-'.join(SUPPORT_QUANTILES)} % range "
                               f"{shown[0]:.3g}-{shown[1]:.3g} (now {value:.3g})"))
    return vetoes


def rule_vetoes(situation: Situation, tpp: str, direction: int, mode: Mode, oar_names: Sequence[str]) -> list[Veto]:
    """Every rule one published step of ``tpp`` in ``direction`` breaks in ``situation`` under ``mode`` (empty:
    admissible): :func:`value_vetoes` of the stepped value, and no step at the bound it would move past."""
    if tpp not in situation.tpps:
        return [Veto("unknown_tpp", f"{tpp!r} is not a TPP of {situation.scenario.name}")]
    value = situation.tpps[tpp]
    new = stepped_value(tpp, value, direction)
    if new == value:
        return [Veto("no_op_at_bound", f"{tpp}={value:g} is at its {'upper' if direction > 0 else 'lower'} bound")]
    return value_vetoes(situation, tpp, new, mode, oar_names)


def answer_vetoes(situation: Situation, answer: Answer | None, mode: Mode, oar_names: Sequence[str]) -> list[Veto]:
    """Every rule ``answer`` breaks (empty: it is taken as it is): no answer, a stop below the maximum, or any of
    its changes vetoed (a multi-TPP answer is taken whole or not at all)."""
    if answer is None:
        return [Veto("invalid_decision", "no valid decision from the LLM")]
    if answer.stop:
        if situation.at_max:
            return []
        failing = sum(1 for c in situation.criteria if not c.passed)
        return [Veto("early_stop", f"stop at score {situation.score:.2f} of {situation.max_score:g} "
                                   f"with {failing} failing criteria")]
    if not answer.changes:
        return [Veto("invalid_decision", "a change that changes nothing")]
    if answer.move is not None:
        return rule_vetoes(situation, answer.move.tpp, int(answer.move.direction), mode, oar_names)
    # A quantile choice is admissible by construction (quantile_menu applied the rules, and allows the ladder beyond
    # the knowledge); anything else is judged value by value.
    menu = quantile_menu(situation, mode, oar_names) if answer.form == "quantile" and mode == "guided" else {}
    vetoes: list[Veto] = []
    for c in answer.changes:
        if not _on_menu(menu, c):
            vetoes += value_vetoes(situation, c.tpp, c.after, mode, oar_names)
    return vetoes


def refusal(situation: Situation, answer: Answer, mode: Mode, oar_names: Sequence[str]) -> str:
    """Why the guard refuses ``answer``, in words for the model's feedback turn ("" when it does not)."""
    return "; ".join(v.detail for v in answer_vetoes(situation, answer, mode, oar_names))


#: A quantile answer's choices: per TPP, ``(target, value)`` pairs, the farthest from the current value first. The
#: 1.5B model mostly takes the first choice listed: ordered nearest first, it crept through them one step at a time
#: (``v_ptv`` p50, p75, p95, then 1step, each a decision and a plan; prostate-basic guided 5.1 steps on 8 sessions).
Menu = dict[str, list[tuple[str, float]]]
#: At most this many choices per TPP (the nearest): each costs ~5 prompt tokens, and with two failing structures
#: five per TPP took the knowledge block to 316 tokens; the knowledge's far tails are rarely the right jump.
MENU_CHOICES = 3


def quantile_menu(situation: Situation, mode: Mode, oar_names: Sequence[str]) -> Menu:
    """The choices a ``quantile`` answer may make, per TPP. First the knowledge points
    (:func:`~m2m.agents.llm.situation.knowledge_points`) that move the TPP in the direction that helps the structure
    of a failing criterion (tighten it, or for a failing lower limit loosen it) and that pass every rule of ``mode``
    (:func:`value_vetoes`), the :data:`MENU_CHOICES` nearest, listed farthest first (:data:`Menu`). Then, for each
    failing structure no knowledge point helps, for each of its tightening moves (module doc), the **ladder beyond
    the knowledge**:
    :data:`~m2m.agents.llm.answer.LADDER_STEPS` published steps in that direction (the longest first), each passing
    every rule of ``mode`` but the knowledge range (the safe action leaves the range too when nothing inside it
    helps; offering the jump lets the model take it in one step). Choices that move a TPP the way the last step
    moved it without raising the score (:func:`stalled_changes`) are left out while others remain.
    Empty at the maximum score. The prompt lists them and the answer schema offers only them, so the model chooses
    which TPPs to move and how far, and the guard's rules are known to it before it answers; the guard takes a
    choice of this menu as admissible (:func:`answer_vetoes`)."""
    now = situation.tpps
    need: dict[str, int] = {}
    for c in worst_failing(situation):
        need.setdefault(c.structure, 1 if c.upper else -1)
    menu: Menu = {}
    helped: set[str] = set()  # the failing structures some knowledge point helps
    points = knowledge_points(situation)
    for tpp, tpp_points in points.items():
        options: list[tuple[str, float]] = []
        for target, value in tpp_points.items():
            new = clamp_value(tpp, value)
            direction = Change(tpp, now[tpp], new).direction
            if direction == 0:
                continue
            moved = effects(tpp, direction, oar_names)
            helps = {structure for structure, n in need.items() if moved.get(structure) == n}
            if helps and not value_vetoes(situation, tpp, new, mode, oar_names):
                options.append((target, new))
                helped |= helps
        if options:
            nearest = sorted(options, key=lambda o: abs(o[1] - now[tpp]))[:MENU_CHOICES]
            menu[tpp] = nearest[::-1]  # the boldest first (module doc: the model anchors on the first choice)
    # The ladder is the last resort of a structure: with a knowledge point for one of its TPPs on the menu, its other
    # TPPs get none (case 3002: t_rectum laddered to 0.001 while lambda_rectum sat at 0.12, far below the
    # knowledge's range, with its points on the menu; the rectum weight, not its threshold, was the lever).
    for structure, sign in need.items():
        if structure in helped:
            continue
        for tpp, direction in tightening_steps(structure, sign):
            if tpp in menu or tpp not in points:
                continue
            ladder: list[tuple[str, float]] = []
            for steps in LADDER_STEPS:
                new = stepped_value(tpp, now[tpp], direction, steps)
                if Change(tpp, now[tpp], new).direction != direction or any(v == new for _, v in ladder):
                    continue  # at its bound, or clamped to the value of a shorter jump
                if all(v.reason == "outside_knowledge" for v in value_vetoes(situation, tpp, new, mode, oar_names)):
                    ladder.append((ladder_target(steps), new))
            if ladder:
                menu[tpp] = ladder[::-1]
    # Escalation, as for the safe action: a TPP the last step moved this way without raising the score is offered
    # that way again only when nothing else is (e.g. t_rectum driven to 0 while lambda_rectum, the lever left, was
    # on the menu: prostate-basic case 3002 stuck at 8.0 for 12 steps). Going further then is the one way on.
    stalled = stalled_changes(situation)
    fresh = {tpp: kept for tpp, options in menu.items()
             if (kept := [o for o in options if (tpp, Change(tpp, now[tpp], o[1]).direction) not in stalled])}
    return fresh or menu


def _on_menu(menu: Menu, change: Change) -> bool:
    return bool(change.target) and (change.target, change.after) in menu.get(change.tpp, ())


def tightening_moves(situation: Situation) -> list[tuple[str, int]]:
    """The moves that tighten each failing criterion's structure, worst criterion first, in the order of the module
    doc, admissible or not."""
    return [m for c in worst_failing(situation) for m in tightening_steps(c.structure, 1 if c.upper else -1)]


def _stalled_step(situation: Situation) -> StepView | None:
    """The last step when it did not raise the score, else None (also at the first step)."""
    last = situation.history[-1] if situation.history else None
    return None if last is None or situation.score > last.score + SCORE_TOLERANCE else last


def stalled_changes(situation: Situation) -> frozenset[tuple[str, int]]:
    """Every ``(tpp, direction)`` the last step moved (its published move, or each of its value changes) when it
    did not raise the score; empty when it did, or at the first step."""
    last = _stalled_step(situation)
    if last is None:
        return frozenset()
    moved = {(c.tpp, c.direction) for c in last.changes if c.direction}
    if last.move is not None:
        moved.add((last.move.tpp, int(last.move.direction)))
    return frozenset(moved)


def stalled_move(situation: Situation) -> tuple[str, int] | None:
    """The last step's published move when it did not raise the score (a planner should not repeat it), else None."""
    last = _stalled_step(situation)
    return None if last is None or last.move is None else (last.move.tpp, int(last.move.direction))


def safe_action(situation: Situation, mode: Mode, oar_names: Sequence[str]) -> tuple[str, int]:
    """The documented safe action (module doc): ``("", 0)`` at the maximum score or when nothing is admissible.
    It escalates: the move the last step made without raising the score comes last."""
    if situation.at_max:
        return "", 0
    ordered = tightening_moves(situation)
    stalled = stalled_move(situation)
    if stalled in ordered:
        ordered = [m for m in ordered if m != stalled] + [stalled]
    for rules in (mode, "unguided"):
        for tpp, direction in ordered:
            if not rule_vetoes(situation, tpp, direction, rules, oar_names):
                return tpp, direction
    return "", 0


def guard(
    situation: Situation,
    answer: Answer | None,
    mode: Mode,
    oar_names: Sequence[str],
    *,
    first: Answer | None = None,
) -> GuardResult:
    """The action to take for the planner's ``answer`` in ``situation`` (see the module docstring for every rule).

    ``first``: the answer the guard refused before the planner's feedback turn (``answer`` is then the retry;
    taken, its source is ``retry``; the vetoes of both are recorded)."""
    retried = first is not None
    earlier = answer_vetoes(situation, first, mode, oar_names) if retried else []
    repeated = retried and answer is first  # the feedback turn gave no new valid answer
    vetoes = [] if repeated else answer_vetoes(situation, answer, mode, oar_names)
    if answer is not None and not repeated and not vetoes:
        source: ActionSource = "retry" if retried else "proposal"
        return GuardResult(answer.move, tuple(earlier), source, answer.changes)
    vetoes = earlier + vetoes
    if mode == "guided" and not situation.at_max:
        helpful = set(tightening_moves(situation))
        for advice in situation.advice:
            move = (advice.tpp, advice.direction)
            if move in helpful and not rule_vetoes(situation, *move, mode, oar_names):
                return _taken(situation, advice.tpp, advice.direction, vetoes, "drl_advice")
    tpp, direction = safe_action(situation, mode, oar_names)
    if direction == 0 and not situation.at_max:
        vetoes.append(Veto("no_admissible_action", "no step passes the range rule: stopping"))
    return _taken(situation, tpp, direction, vetoes, "safe")
