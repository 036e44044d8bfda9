"""Treatment-planning parameters (TPPs): the knobs a planner (human, DRL agent or LLM) turns.

Each structure carrying TPPs has one of each parameter of :data:`PARAMETERS`, the single table of what a parameter
is (valid range, published step factors, scale, which direction tightens the structure, default, random-start
range and the words the LLM prompt uses to explain it):

* ``t`` – dose threshold as a fraction of the prescription ``rx_gy``: dose above ``t·Rx`` is penalised.
* ``lambda`` – penalty weight (dimensionless, log scale). The optimizer weights OAR ``o`` by ``lam_o / lam_ptv``.
* ``v`` – fraction of the structure's volume (its hottest voxels) the penalty acts on.

Names are ``t_ptv, lambda_ptv, v_ptv, t_<oar>, lambda_<oar>, v_<oar>, …`` in a stable order: the PTV first,
then the OARs in the order they were given, each structure's parameters in table order (:data:`PARAMS`).

The discrete action set follows the virtual-treatment-planner papers (Shen et al., Med Phys 2019/2020):
each TPP can be raised or lowered by a fixed factor (:attr:`RoleSpec.raise_factor`, :attr:`RoleSpec.lower_factor`).

A new parameter kind is one :class:`ParameterSpec` row here, its field in :class:`StructureTpp` and its term in
the objective (:mod:`m2m.physics.optimizer`); the DRL observation, the knowledge, the guard, the prompt and the
report read the table (a trained policy must be retrained: its observation grows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Literal

import numpy as np

PTV = "ptv"
Param = Literal["t", "lambda", "v"]
#: Which TPPs a structure carries: the PTV's (``"ptv"``) or an OAR's (``"oar"``); see :func:`role_of`.
Role = Literal["ptv", "oar"]
ROLES: tuple[Role, ...] = ("ptv", "oar")


@dataclass(frozen=True)
class ValidRange:
    """The values a TPP may take: ``low < x ≤ high`` (``low ≤ x ≤ high`` when ``low_inclusive``); the high end is
    always inclusive."""

    low: float
    high: float
    low_inclusive: bool = False

    def contains(self, x: float) -> bool:
        """``x`` is finite and inside the range."""
        ok_low = x >= self.low if self.low_inclusive else x > self.low
        return math.isfinite(x) and ok_low and x <= self.high

    def __str__(self) -> str:
        """The interval as written in messages: ``(0, 1]``, ``[1, 1.2]``."""
        return f"{'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}]"

    def clamp(self, x: float) -> float:
        """``x`` moved into the range (an open lower end clamps to the next float above ``low``)."""
        floor = self.low if self.low_inclusive else math.nextafter(self.low, math.inf)
        return float(min(max(x, floor), self.high))


@dataclass(frozen=True)
class RoleSpec:
    """One parameter for one role (the PTV or an OAR).

    ``valid``: its valid range. ``raise_factor`` / ``lower_factor``: the published multiplicative step up / down.
    ``default``: the value of :meth:`TppSet.default`. ``training``: ``(low, high, log_uniform)`` that random
    initial TPPs are drawn from (:func:`random_tpps`; wide, like the papers' random starts). ``tighten_rank``: the
    order (0 first) in which planners try the role's parameters to tighten a structure (:func:`tightening_steps`).
    ``tightens_oars``: what raising it does to every OAR's dose besides its own structure's: +1 tightens (lowers
    their dose), −1 loosens, 0 nothing.
    """

    valid: ValidRange
    raise_factor: float
    lower_factor: float
    default: float
    training: tuple[float, float, bool]
    tighten_rank: int
    tightens_oars: int = 0

    def factor(self, direction: int) -> float:
        """The step factor for ``direction`` (+1 raise, −1 lower)."""
        return self.raise_factor if direction > 0 else self.lower_factor


@dataclass(frozen=True)
class ParameterSpec:
    """What one TPP parameter is: its ``name`` (``<name>_<structure>``; no ``_`` in it), the :class:`StructureTpp`
    ``attribute`` holding it, whether its natural scale is ``log_scale`` (multiplicative: statistics, plots and the
    DRL observation use ``log10`` of it), ``tightens``: +1 when raising it tightens its own structure (lowers the
    structure's dose), −1 when raising it loosens it; ``description``: the prompt's one line about it (``s`` stands
    for the structure); and its :class:`RoleSpec` for the PTV and for an OAR."""

    name: Param
    attribute: str
    log_scale: bool
    tightens: int
    description: str
    ptv: RoleSpec
    oar: RoleSpec

    def of(self, role: str) -> RoleSpec:
        """The spec for ``role`` (``"ptv"`` or ``"oar"``)."""
        if role not in ROLES:
            raise KeyError(f"unknown TPP role {role!r}; expected one of {ROLES}")
        spec: RoleSpec = getattr(self, role)
        return spec


#: The parameter table, in vector order. Factors as published for the virtual treatment planner; training ranges:
#: lambda spans three decades log-uniformly, OAR thresholds from well below to at the prescription.
PARAMETERS: Mapping[str, ParameterSpec] = MappingProxyType({p.name: p for p in (
    ParameterSpec(
        name="t", attribute="t", log_scale=False, tightens=-1,
        description="dose threshold, fraction of the prescription (Rx); dose above t_s*Rx is penalised.",
        ptv=RoleSpec(valid=ValidRange(1.0, 1.2, low_inclusive=True), raise_factor=1.01, lower_factor=0.91,
                     default=1.0, training=(1.0, 1.2, False), tighten_rank=0),
        oar=RoleSpec(valid=ValidRange(0.0, 1.0), raise_factor=1.25, lower_factor=0.6,
                     default=1.0, training=(0.4, 1.0, False), tighten_rank=1),
    ),
    ParameterSpec(
        name="lambda", attribute="lam", log_scale=True, tightens=1,
        description="penalty weight. Every OAR weight is divided by lambda_ptv.",
        ptv=RoleSpec(valid=ValidRange(0.0, 1e5), raise_factor=1.65, lower_factor=0.6,
                     default=1.0, training=(0.1, 100.0, True), tighten_rank=2, tightens_oars=-1),
        oar=RoleSpec(valid=ValidRange(0.0, 1e5), raise_factor=1.65, lower_factor=0.6,
                     default=1.0, training=(0.1, 100.0, True), tighten_rank=0),
    ),
    ParameterSpec(
        name="v", attribute="v", log_scale=False, tightens=1,
        description="fraction of the hottest volume of s the penalty acts on.",
        ptv=RoleSpec(valid=ValidRange(0.0, 0.3), raise_factor=1.25, lower_factor=0.8,
                     default=0.1, training=(0.02, 0.3, False), tighten_rank=1),
        oar=RoleSpec(valid=ValidRange(0.0, 1.0), raise_factor=1.25, lower_factor=0.8,
                     default=1.0, training=(0.1, 1.0, False), tighten_rank=2),
    ),
)})
#: The parameter names in vector order.
PARAMS: tuple[Param, ...] = tuple(p.name for p in PARAMETERS.values())

#: What random TPPs are drawn from: ``(role, param) → (low, high, log_uniform)`` (:func:`random_tpps`).
DrawRanges = Mapping[tuple[str, str], tuple[float, float, bool]]

#: :attr:`RoleSpec.training` per (role, param): the default ``ranges`` of :func:`random_tpps` (a view of the table;
#: pass a modified copy to draw from other ranges).
TRAINING_RANGES: DrawRanges = MappingProxyType(
    {(role, p.name): p.of(role).training for role in ROLES for p in PARAMETERS.values()}
)


def role_of(structure: str) -> Role:
    """``"ptv"`` for the PTV, ``"oar"`` for any other structure."""
    return "ptv" if structure == PTV else "oar"


def spec_of(name: str) -> RoleSpec:
    """The :class:`RoleSpec` of TPP ``name`` (e.g. ``"lambda_rectum"`` → the OAR lambda)."""
    param, structure = split_name(name)
    return PARAMETERS[param].of(role_of(structure))


class TppRangeError(ValueError):
    """A TPP value outside its valid range (the message names the TPP, the value and the range)."""

    def __init__(self, name: str, value: float, valid: ValidRange) -> None:
        self.name, self.value, self.low, self.high = name, value, valid.low, valid.high
        super().__init__(f"TPP {name} = {value!r} is outside its valid range {valid}")


@dataclass(frozen=True)
class StructureTpp:
    """The TPPs of one structure, one field per :data:`PARAMETERS` row (its ``attribute``): ``t`` (fraction of Rx),
    ``lam`` (weight), ``v`` (volume fraction); the defaults are an OAR's."""

    t: float = PARAMETERS["t"].oar.default
    lam: float = PARAMETERS["lambda"].oar.default
    v: float = PARAMETERS["v"].oar.default

    def get(self, param: str) -> float:
        """The value of ``param`` (a :data:`PARAMS` name: ``"t"``, ``"lambda"``, …)."""
        value: float = getattr(self, PARAMETERS[param].attribute)
        return value

    def replace(self, param: str, value: float) -> StructureTpp:
        """A copy with ``param`` set to ``value``."""
        return dataclasses.replace(self, **{PARAMETERS[param].attribute: float(value)})

    @classmethod
    def of_values(cls, values: Iterable[float]) -> StructureTpp:
        """The TPPs from one value per parameter, in :data:`PARAMS` order."""
        return cls(**{p.attribute: float(x) for p, x in zip(PARAMETERS.values(), values, strict=True)})


def split_name(name: str) -> tuple[str, str]:
    """``"lambda_rectum"`` → ``("lambda", "rectum")``; raises KeyError for a malformed name."""
    param, sep, structure = name.partition("_")
    if not sep or param not in PARAMS or not structure:
        expected = ", ".join(f"{p}_<structure>" for p in PARAMS)
        raise KeyError(f"not a TPP name: {name!r} (expected one of {expected})")
    return param, structure


def check_value(name: str, value: float) -> None:
    """Raise :class:`TppRangeError` if ``value`` is outside the valid range of TPP ``name``."""
    valid = spec_of(name).valid
    if not valid.contains(value):
        raise TppRangeError(name, value, valid)


def clamp_value(name: str, value: float) -> float:
    """``value`` moved into the valid range of ``name`` (an open lower end clamps to a tiny positive value)."""
    return spec_of(name).valid.clamp(value)


@dataclass(frozen=True)
class TppSet:
    """TPPs of the PTV and of each OAR that carries them; validated on construction.

    ``oars`` keeps the given order (it fixes the order of :meth:`names` and :meth:`to_vector`) and is
    read-only.
    """

    ptv: StructureTpp = field(default_factory=lambda: StructureTpp(v=0.1))
    oars: Mapping[str, StructureTpp] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if PTV in self.oars:
            raise ValueError("the PTV cannot also be listed as an OAR")
        object.__setattr__(self, "oars", MappingProxyType(dict(self.oars)))
        for name, value in zip(self.names(), self.to_vector(), strict=True):
            check_value(name, float(value))

    @classmethod
    def default(cls, oar_names: Iterable[str]) -> TppSet:
        """Every TPP at its :attr:`RoleSpec.default`."""

        def default(role: Role) -> StructureTpp:
            return StructureTpp.of_values(p.of(role).default for p in PARAMETERS.values())

        return cls(default("ptv"), {name: default("oar") for name in oar_names})

    @property
    def oar_names(self) -> tuple[str, ...]:
        return tuple(self.oars)

    @property
    def structures(self) -> tuple[str, ...]:
        """``("ptv", *oar_names)``."""
        return (PTV, *self.oars)

    def names(self) -> tuple[str, ...]:
        """TPP names in vector order: ``t_ptv, lambda_ptv, v_ptv, t_<oar>, lambda_<oar>, v_<oar>, …``."""
        return tuple(f"{p}_{s}" for s in self.structures for p in PARAMS)

    def of(self, structure: str) -> StructureTpp:
        """The TPPs of one structure."""
        return self.ptv if structure == PTV else self.oars[structure]

    def get(self, name: str) -> float:
        """The value of TPP ``name`` (e.g. ``"lambda_rectum"``)."""
        param, structure = split_name(name)
        return self.of(structure).get(param)

    def to_vector(self) -> np.ndarray:
        """All TPPs as float64, in :meth:`names` order."""
        return np.array([self.of(s).get(p) for s in self.structures for p in PARAMS], dtype=np.float64)

    @classmethod
    def from_vector(cls, vector: Sequence[float] | np.ndarray, oar_names: Iterable[str]) -> TppSet:
        """Inverse of :meth:`to_vector` for the given OAR order; validates ranges."""
        oars = tuple(oar_names)
        values = [float(x) for x in np.asarray(vector, dtype=np.float64).ravel()]
        k = len(PARAMS)
        if len(values) != k * (1 + len(oars)):
            raise ValueError(f"expected {k * (1 + len(oars))} TPP values for OARs {oars}, got {len(values)}")
        per_structure = [StructureTpp.of_values(values[k * i : k * i + k]) for i in range(1 + len(oars))]
        return cls(per_structure[0], dict(zip(oars, per_structure[1:], strict=True)))

    def with_value(self, name: str, value: float) -> TppSet:
        """A copy with TPP ``name`` set to ``value`` (validated: out of range raises TppRangeError)."""
        param, structure = split_name(name)
        if structure == PTV:
            return TppSet(self.ptv.replace(param, value), self.oars)
        if structure not in self.oars:
            raise KeyError(f"no TPPs for structure {structure!r}; have {self.structures}")
        oars = dict(self.oars)
        oars[structure] = oars[structure].replace(param, value)
        return TppSet(self.ptv, oars)

    @classmethod
    def from_dict(cls, values: Mapping[str, float], oar_names: Iterable[str]) -> TppSet:
        """A validated set for ``oar_names`` from ``{tpp name: value}``; every TPP must be given exactly once."""
        oars = tuple(oar_names)
        expected = cls.default(oars).names()
        missing = [n for n in expected if n not in values]
        extra = sorted(set(values) - set(expected))
        if missing or extra:
            raise ValueError(f"TPPs must be exactly {list(expected)}; missing {missing}, unexpected {extra}")
        return cls.from_vector([values[n] for n in expected], oars)

    def as_dict(self) -> dict[str, float]:
        """``{name: value}`` in :meth:`names` order."""
        return dict(zip(self.names(), (float(x) for x in self.to_vector()), strict=True))


def step(tpps: TppSet, name: str, direction: int) -> TppSet:
    """Apply the published action: multiply TPP ``name`` by its up (``+1``) or down (``-1``) factor, clamped."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    value = tpps.get(name) * spec_of(name).factor(direction)
    return tpps.with_value(name, clamp_value(name, value))


def tightening_steps(structure: str, need: int = 1) -> tuple[tuple[str, int], ...]:
    """The single steps that lower ``structure``'s dose (``need`` = −1: that raise it), in the order a planner tries
    them (:attr:`RoleSpec.tighten_rank`; each in the direction of :attr:`ParameterSpec.tightens`): for the PTV hot
    spot lower ``t_ptv``, raise ``v_ptv``, raise ``lambda_ptv``; for an OAR raise ``lambda``, lower ``t``, raise
    ``v``. Each is ``(tpp name, direction)`` for :func:`step`."""
    if need not in (1, -1):
        raise ValueError(f"need must be +1 or -1, got {need!r}")
    role = role_of(structure)
    ordered = sorted(PARAMETERS.values(), key=lambda p: p.of(role).tighten_rank)
    return tuple((f"{p.name}_{structure}", p.tightens * need) for p in ordered)


def random_tpps(
    rng: np.random.Generator,
    oar_names: Iterable[str],
    ranges: DrawRanges = TRAINING_RANGES,
) -> TppSet:
    """TPPs drawn from ``ranges`` (default :data:`TRAINING_RANGES`; uniform, or log-uniform where flagged), PTV
    first then each OAR. Drawn values must lie in the valid ranges (:class:`TppRangeError` otherwise)."""

    def draw(role: str) -> StructureTpp:
        values = []
        for param in PARAMS:
            low, high, log = ranges[(role, param)]
            x = math.exp(rng.uniform(math.log(low), math.log(high))) if log else rng.uniform(low, high)
            values.append(float(x))
        return StructureTpp.of_values(values)

    ptv = draw("ptv")
    return TppSet(ptv, {name: draw("oar") for name in oar_names})


class Direction(IntEnum):
    """One published step of a TPP: up by its raise factor (+1) or down by its lower factor (−1)."""

    RAISE = 1
    LOWER = -1

    @property
    def word(self) -> str:
        """``"raise"`` or ``"lower"``: the word the prompt, the logs and the reports use."""
        return self.name.lower()


@dataclass(frozen=True)
class Move:
    """One step of one TPP, the unit every planner proposes and the session records: ``tpp`` by name
    (``t_ptv``, ``lambda_rectum``, …; checked on construction) in ``direction``. ``str(move)`` is its one rendering,
    e.g. ``"raise lambda_rectum"``."""

    tpp: str
    direction: Direction

    def __post_init__(self) -> None:
        try:
            split_name(self.tpp)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        object.__setattr__(self, "direction", Direction(self.direction))

    def __str__(self) -> str:
        return f"{self.direction.word} {self.tpp}"

    @classmethod
    def parse(cls, words: str) -> Move:
        """The move ``str(move)`` renders: ``"raise lambda_rectum"`` → ``Move("lambda_rectum", Direction.RAISE)``."""
        word, _, tpp = words.strip().partition(" ")
        try:
            direction = Direction[word.upper()]
        except KeyError:
            raise ValueError(f"not a move: {words!r} (expected 'raise <tpp>' or 'lower <tpp>')") from None
        return cls(tpp, direction)

    def apply(self, tpps: TppSet) -> TppSet:
        """The TPPs after this move (:func:`step`)."""
        return step(tpps, self.tpp, int(self.direction))
