"""Treatment-planning parameters (TPPs): the knobs a planner (human, DRL agent or LLM) turns.

Each structure carrying TPPs has three:

* ``t`` – dose threshold as a fraction of the prescription ``rx_gy``: dose above ``t·Rx`` is penalised.
  PTV: the hot-spot threshold, valid in [1.0, 1.2]. OAR: valid in (0, 1].
* ``lam`` – penalty weight, valid in (0, 1e5]. The optimizer weights OAR ``o`` by ``lam_o / lam_ptv``.
* ``v`` – fraction of the structure's volume (its hottest voxels) the penalty acts on.
  PTV: valid in (0, 0.3]; OAR: valid in (0, 1].

Names are ``t_ptv, lambda_ptv, v_ptv, t_<oar>, lambda_<oar>, v_<oar>, …`` in a stable order: the PTV first,
then the OARs in the order they were given. Defaults are 1 everywhere except ``v_ptv = 0.1``.

The discrete action set follows the virtual-treatment-planner papers (Shen et al., Med Phys 2019/2020):
each TPP can be raised or lowered by a fixed factor, see :data:`STEP_FACTORS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

PTV = "ptv"
Param = Literal["t", "lambda", "v"]
PARAMS: tuple[Param, ...] = ("t", "lambda", "v")

#: (low, high, low_inclusive) per (role, param); the high end is always inclusive.
RANGES: dict[tuple[str, str], tuple[float, float, bool]] = {
    ("ptv", "t"): (1.0, 1.2, True),
    ("ptv", "lambda"): (0.0, 1e5, False),
    ("ptv", "v"): (0.0, 0.3, False),
    ("oar", "t"): (0.0, 1.0, False),
    ("oar", "lambda"): (0.0, 1e5, False),
    ("oar", "v"): (0.0, 1.0, False),
}

#: Multiplicative (up, down) step per (role, param), as published for the virtual treatment planner.
STEP_FACTORS: dict[tuple[str, str], tuple[float, float]] = {
    ("ptv", "t"): (1.01, 0.91),
    ("oar", "t"): (1.25, 0.6),
    ("ptv", "lambda"): (1.65, 0.6),
    ("oar", "lambda"): (1.65, 0.6),
    ("ptv", "v"): (1.25, 0.8),
    ("oar", "v"): (1.25, 0.8),
}

#: Ranges random initial TPPs are drawn from: (low, high, log_uniform). Wide, like the papers' random starts:
#: lambda spans three decades log-uniformly; OAR thresholds from well below to at the prescription.
TRAINING_RANGES: dict[tuple[str, str], tuple[float, float, bool]] = {
    ("ptv", "t"): (1.0, 1.2, False),
    ("ptv", "lambda"): (0.1, 100.0, True),
    ("ptv", "v"): (0.02, 0.3, False),
    ("oar", "t"): (0.4, 1.0, False),
    ("oar", "lambda"): (0.1, 100.0, True),
    ("oar", "v"): (0.1, 1.0, False),
}


class TppRangeError(ValueError):
    """A TPP value outside its valid range (the message names the TPP, the value and the range)."""

    def __init__(self, name: str, value: float, low: float, high: float, low_inclusive: bool) -> None:
        bracket = "[" if low_inclusive else "("
        self.name, self.value, self.low, self.high = name, value, low, high
        super().__init__(f"TPP {name} = {value!r} is outside its valid range {bracket}{low:g}, {high:g}]")


@dataclass(frozen=True)
class StructureTpp:
    """The three TPPs of one structure: ``t`` (fraction of Rx), ``lam`` (weight), ``v`` (volume fraction)."""

    t: float = 1.0
    lam: float = 1.0
    v: float = 1.0

    def get(self, param: str) -> float:
        """The value of ``param`` (``"t"``, ``"lambda"`` or ``"v"``)."""
        return {"t": self.t, "lambda": self.lam, "v": self.v}[param]

    def replace(self, param: str, value: float) -> StructureTpp:
        """A copy with ``param`` set to ``value``."""
        values = {"t": self.t, "lam": self.lam, "v": self.v}
        values["lam" if param == "lambda" else param] = float(value)
        return StructureTpp(**values)


def _role(structure: str) -> str:
    return "ptv" if structure == PTV else "oar"


def split_name(name: str) -> tuple[str, str]:
    """``"lambda_rectum"`` → ``("lambda", "rectum")``; raises KeyError for a malformed name."""
    param, sep, structure = name.partition("_")
    if not sep or param not in PARAMS or not structure:
        raise KeyError(f"not a TPP name: {name!r} (expected t_<structure>, lambda_<structure> or v_<structure>)")
    return param, structure


def check_value(name: str, value: float) -> None:
    """Raise :class:`TppRangeError` if ``value`` is outside the valid range of TPP ``name``."""
    param, structure = split_name(name)
    low, high, low_inclusive = RANGES[(_role(structure), param)]
    ok_low = value >= low if low_inclusive else value > low
    if not (math.isfinite(value) and ok_low and value <= high):
        raise TppRangeError(name, value, low, high, low_inclusive)


def clamp_value(name: str, value: float) -> float:
    """``value`` moved into the valid range of ``name`` (an open lower end clamps to a tiny positive value)."""
    param, structure = split_name(name)
    low, high, low_inclusive = RANGES[(_role(structure), param)]
    floor = low if low_inclusive else math.nextafter(low, math.inf)
    return float(min(max(value, floor), high))


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
        """All TPPs 1 except ``v_ptv = 0.1``."""
        return cls(StructureTpp(v=0.1), {name: StructureTpp() for name in oar_names})

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
        if len(values) != 3 * (1 + len(oars)):
            raise ValueError(f"expected {3 * (1 + len(oars))} TPP values for OARs {oars}, got {len(values)}")
        triples = [StructureTpp(*values[3 * i : 3 * i + 3]) for i in range(1 + len(oars))]
        return cls(triples[0], dict(zip(oars, triples[1:], strict=True)))

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

    def as_dict(self) -> dict[str, float]:
        """``{name: value}`` in :meth:`names` order."""
        return dict(zip(self.names(), (float(x) for x in self.to_vector()), strict=True))


def step(tpps: TppSet, name: str, direction: int) -> TppSet:
    """Apply the published action: multiply TPP ``name`` by its up (``+1``) or down (``-1``) factor, clamped."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    param, structure = split_name(name)
    up, down = STEP_FACTORS[(_role(structure), param)]
    value = tpps.get(name) * (up if direction == 1 else down)
    return tpps.with_value(name, clamp_value(name, value))


def tightening_steps(structure: str, need: int = 1) -> tuple[tuple[str, int], ...]:
    """The single steps that lower ``structure``'s dose (``need`` = −1: that raise it), in the order a planner tries
    them: for the PTV hot spot lower ``t_ptv``, raise ``v_ptv``, raise ``lambda_ptv``; for an OAR raise ``lambda``,
    lower ``t``, raise ``v``. Each is ``(tpp name, direction)`` for :func:`step`."""
    if need not in (1, -1):
        raise ValueError(f"need must be +1 or -1, got {need!r}")
    if structure == PTV:
        moves = (("t_ptv", -1), ("v_ptv", 1), ("lambda_ptv", 1))
    else:
        moves = ((f"lambda_{structure}", 1), (f"t_{structure}", -1), (f"v_{structure}", 1))
    return tuple((name, direction * need) for name, direction in moves)


def random_tpps(
    rng: np.random.Generator,
    oar_names: Iterable[str],
    ranges: Mapping[tuple[str, str], tuple[float, float, bool]] = TRAINING_RANGES,
) -> TppSet:
    """TPPs drawn from ``ranges`` (default :data:`TRAINING_RANGES`; uniform, or log-uniform where flagged), PTV
    first then each OAR. Drawn values must lie in the valid ranges (:class:`TppRangeError` otherwise)."""

    def draw(role: str) -> StructureTpp:
        values = []
        for param in PARAMS:
            low, high, log = ranges[(role, param)]
            x = math.exp(rng.uniform(math.log(low), math.log(high))) if log else rng.uniform(low, high)
            values.append(float(x))
        return StructureTpp(*values)

    ptv = draw("ptv")
    return TppSet(ptv, {name: draw("oar") for name in oar_names})
