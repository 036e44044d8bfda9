"""A planner's answer in one shape for every decision form: stop, or new values of TPPs (with the published step
when it was one). The guard judges it, the planner applies it, the session records its :class:`Change` items as
they are (:data:`m2m.agents.messages.ValueChange`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from m2m.physics.tpp import Move, clamp_value, spec_of

DecisionForm = Literal["step", "values", "quantile"]
FORMS: tuple[DecisionForm, ...] = ("step", "values", "quantile")
#: A new value within this relative distance of the current one is no change (the guard's ``no_change``): the prompt
#: shows TPPs to 3 significant digits, so a copied value differs from the current one by up to 0.5 %; the smallest
#: published step (t_ptv x1.01) is 1 %.
SAME_VALUE_RTOL = 0.005


#: How many published steps a ``quantile`` choice beyond the knowledge goes (:func:`ladder_target`): offered for a
#: TPP of a failing structure when none of the knowledge's points helps it (e.g. the PTV hot spot fails with
#: ``lambda_ptv`` already above the knowledge's p95: in the experiment of issue 20 the safe action then needed 6-9
#: single x1.65 steps, ``lambda_ptv`` 76 -> 1528, to reach 9/9).
LADDER_STEPS = (1, 3, 6)


def ladder_target(steps: int) -> str:
    """The choice name of ``steps`` published steps: ``"1step"``, ``"3steps"``, …"""
    return f"{steps}step" if steps == 1 else f"{steps}steps"


def stepped_value(name: str, value: float, direction: int, steps: int = 1) -> float:
    """``value`` of TPP ``name`` after ``steps`` raise (+1) or lower (−1) steps, clipped to its range (as
    :func:`m2m.physics.tpp.step` does, ``value × factor^steps``); equal to ``value`` when the step is a no-op at a
    bound."""
    return clamp_value(name, value * spec_of(name).factor(direction) ** steps)


@dataclass(frozen=True)
class Change:
    """One TPP value change: ``tpp`` from ``before`` to ``after`` (its unit: a fraction of Rx for ``t``, a weight for
    ``lambda``, a volume fraction for ``v``); ``clamped``: the planner asked for a value outside the valid range and
    got the nearest valid one; ``target``: the choice it made in the quantile form: a knowledge point (``"p50"``, …)
    or a number of published steps beyond the knowledge (``"3steps"``, :func:`ladder_target`)."""

    tpp: str
    before: float
    after: float
    clamped: bool = False
    target: str = ""

    @property
    def direction(self) -> int:
        """+1 when the value rises, −1 when it falls, 0 when it (practically) stays."""
        if abs(self.after - self.before) <= SAME_VALUE_RTOL * max(abs(self.before), 1e-12):
            return 0
        return 1 if self.after > self.before else -1

    def __str__(self) -> str:
        return f"{self.tpp} {self.before:.3g}->{self.after:.3g}" + (f" ({self.target})" if self.target else "")


def changes_words(changes: Iterable[Change]) -> str:
    """``"t_ptv 1.1->1 (p50), lambda_ptv 0.5->9"``: the one rendering of a set of value changes."""
    return ", ".join(str(c) for c in changes)


@dataclass(frozen=True)
class Answer:
    """A planner's answer in one shape for every form: ``stop``, or ``changes`` (new values) with the published
    ``move`` when it was a step; ``form`` it was asked in; ``rationale``."""

    form: DecisionForm
    stop: bool
    changes: tuple[Change, ...] = ()
    move: Move | None = None
    rationale: str = ""

    def words(self) -> str:
        """``"stop"``, ``"raise t_ptv"`` or ``"t_ptv 1.1->1 (p50), v_ptv 0.05->0.17"``."""
        if self.stop:
            return "stop"
        return str(self.move) if self.move is not None else changes_words(self.changes)

    @classmethod
    def of_move(cls, tpps: Mapping[str, float], move: Move, rationale: str = "") -> Answer:
        """The answer that makes the published step ``move`` from ``tpps`` (its new value clipped to the range)."""
        before = tpps[move.tpp]
        after = stepped_value(move.tpp, before, int(move.direction))
        return cls("step", False, (Change(move.tpp, before, after),), move, rationale)

    @classmethod
    def of_stop(cls, form: DecisionForm = "step", rationale: str = "") -> Answer:
        return cls(form, True, rationale=rationale)


