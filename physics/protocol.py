"""Clinical scoring protocols as data, and plan scoring.

A protocol is a list of criteria, each on one structure's dose. Each criterion scores 1 point at or better
than its ``limit``, 0 at or beyond its ``zero`` point, linearly in between; ``zero > limit`` means "lower is
better" (an upper limit, the usual case), ``zero < limit`` "higher is better". Protocols live in
``scenarios/protocol_<name>.toml`` (``-`` in the name becomes ``_``); ``extends = "<name>"`` prepends another
protocol's criteria.

Metrics (``metric`` / allowed ``unit`` of ``limit`` and ``zero``):

* ``D<x>cc`` (dose to the hottest x cm³, at least one voxel), ``D<x>%`` (dose to the hottest x % of the
  volume), ``Dmean``, ``Dmax``: unit ``Gy`` or ``%Rx``.
* ``V<x>Gy`` (volume receiving ≥ x Gy), ``V<x>%Rx`` (≥ x % of Rx): unit ``%`` (of the structure) or ``cc``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np

from m2m.physics import dvh

_DOSE_UNITS = ("Gy", "%Rx")
_VOLUME_UNITS = ("%", "cc")
_METRIC = re.compile(r"^(?:D(?P<dcc>\d+(?:\.\d+)?)cc|D(?P<dpct>\d+(?:\.\d+)?)%|Dmean|Dmax|V(?P<vgy>\d+(?:\.\d+)?)Gy"
                     r"|V(?P<vrx>\d+(?:\.\d+)?)%Rx)$")


class ProtocolError(ValueError):
    """A protocol file or criterion that is malformed (the message names the file and the field)."""


@dataclass(frozen=True)
class Criterion:
    """One scored constraint: ``metric`` of ``structure``, in ``unit``, scoring 1 at ``limit``, 0 at ``zero``."""

    structure: str
    metric: str
    unit: str
    limit: float
    zero: float
    source: str = ""

    def __post_init__(self) -> None:
        match = _METRIC.match(self.metric)
        if match is None:
            raise ProtocolError(f"unknown metric {self.metric!r} (use D<x>cc, D<x>%, Dmean, Dmax, V<x>Gy, V<x>%Rx)")
        units = _VOLUME_UNITS if self.metric.startswith("V") else _DOSE_UNITS
        if self.unit not in units:
            raise ProtocolError(f"{self.structure} {self.metric}: unit {self.unit!r} must be one of {units}")
        if self.limit == self.zero:
            raise ProtocolError(f"{self.structure} {self.metric}: limit and zero point are both {self.limit}")

    @property
    def upper(self) -> bool:
        """True when lower values are better (``limit`` is an upper limit)."""
        return self.zero > self.limit

    @property
    def label(self) -> str:
        """E.g. ``"rectum V70Gy ≤ 25 %"``."""
        return f"{self.structure} {self.metric} {'≤' if self.upper else '≥'} {self.limit:g} {self.unit}"

    def measure(self, dose: np.ndarray, voxel_volume_cc: float, rx_gy: float) -> float:
        """The metric of ``dose`` (Gy per voxel of the structure), in this criterion's ``unit``."""
        match = _METRIC.match(self.metric)
        assert match is not None  # checked in __post_init__
        if self.metric.startswith("V"):
            if match["vgy"] is not None:
                fraction = dvh.v_gy(dose, float(match["vgy"]))
            else:
                fraction = dvh.v_percent_rx(dose, float(match["vrx"]), rx_gy)
            return 100.0 * fraction if self.unit == "%" else fraction * dvh.volume_cc(dose, voxel_volume_cc)
        if match["dcc"] is not None:
            gy = dvh.d_cc(dose, float(match["dcc"]), voxel_volume_cc)
        elif match["dpct"] is not None:
            gy = dvh.d_percent(dose, float(match["dpct"]))
        elif self.metric == "Dmean":
            gy = dvh.mean_gy(dose)
        else:
            gy = dvh.max_gy(dose)
        return 100.0 * gy / rx_gy if self.unit == "%Rx" else gy

    def points(self, value: float) -> float:
        """1 at or better than ``limit``, 0 at or beyond ``zero``, linear between."""
        return float(np.clip((self.zero - value) / (self.zero - self.limit), 0.0, 1.0))

    def passed(self, value: float) -> bool:
        """Whether ``value`` is at or better than the limit."""
        return value <= self.limit if self.upper else value >= self.limit


@dataclass(frozen=True)
class Protocol:
    """A named list of criteria; the maximum score is one point per criterion."""

    name: str
    criteria: tuple[Criterion, ...]
    description: str = ""

    @property
    def max_score(self) -> float:
        return float(len(self.criteria))

    @property
    def structures(self) -> tuple[str, ...]:
        """Structures the criteria need dose for, in first-use order."""
        return tuple(dict.fromkeys(c.structure for c in self.criteria))


@dataclass(frozen=True)
class CriterionScore:
    """A criterion's measured ``value`` (in its unit), its ``points`` (0..1) and whether it ``passed``."""

    criterion: Criterion
    value: float
    points: float
    passed: bool


@dataclass(frozen=True)
class ScoreReport:
    """Per-criterion results, ``total`` points of ``max_score``, and the labels of the failing criteria."""

    protocol: str
    items: tuple[CriterionScore, ...]
    total: float
    max_score: float

    @property
    def failing(self) -> tuple[str, ...]:
        return tuple(i.criterion.label for i in self.items if not i.passed)

    @property
    def all_passed(self) -> bool:
        return all(i.passed for i in self.items)

    def margin(self) -> float:
        """Sum over criteria of (limit − value)/(zero − limit), capped at 1 per criterion.

        Finer than points for searches: it still moves while a criterion sits at 0 points, and the cap keeps
        criteria that already pass from outweighing the failing ones.
        """
        return float(
            sum(min(1.0, (i.criterion.limit - i.value) / (i.criterion.zero - i.criterion.limit)) for i in self.items)
        )


class _HasDose(TypingProtocol):
    dose: dict[str, np.ndarray]


def measure_all(
    protocol: Protocol,
    plan_or_dose_by_structure: _HasDose | Mapping[str, np.ndarray],
    voxel_volume_cc: float,
    rx_gy: float,
) -> dict[str, float]:
    """Every criterion's metric value (in its unit), keyed by :attr:`Criterion.label`, for a plan (anything with
    ``.dose``) or a ``{structure: dose in Gy per voxel}`` mapping.

    ``voxel_volume_cc`` (cm³) is needed by D(cc) and V(cc) metrics; ``rx_gy`` (Gy) by %Rx units.
    """
    dose = plan_or_dose_by_structure if isinstance(plan_or_dose_by_structure, Mapping) else (
        plan_or_dose_by_structure.dose
    )
    missing = [s for s in protocol.structures if s not in dose]
    if missing:
        raise KeyError(f"protocol {protocol.name} needs dose for {missing}; got {sorted(dose)}")
    return {c.label: c.measure(dose[c.structure], voxel_volume_cc, rx_gy) for c in protocol.criteria}


def score_values(protocol: Protocol, values: Mapping[str, float]) -> ScoreReport:
    """Score metric ``values`` keyed by criterion label (as :func:`measure_all` returns them); a missing label
    raises ``KeyError`` naming it, a non-finite value ``ValueError``."""
    items = []
    for c in protocol.criteria:
        if c.label not in values:
            raise KeyError(f"protocol {protocol.name}: no value for {c.label!r}")
        value = float(values[c.label])
        if not np.isfinite(value):
            raise ValueError(f"protocol {protocol.name}: {c.label!r} = {value} is not finite")
        items.append(CriterionScore(c, value, c.points(value), c.passed(value)))
    return ScoreReport(protocol.name, tuple(items), float(sum(i.points for i in items)), protocol.max_score)


def score(
    protocol: Protocol,
    plan_or_dose_by_structure: _HasDose | Mapping[str, np.ndarray],
    voxel_volume_cc: float,
    rx_gy: float,
) -> ScoreReport:
    """Score a plan (anything with ``.dose``) or a ``{structure: dose in Gy per voxel}`` mapping (see
    :func:`measure_all` for the units)."""
    return score_values(protocol, measure_all(protocol, plan_or_dose_by_structure, voxel_volume_cc, rx_gy))


def protocol_file(name: str) -> str:
    """The resource file name of protocol ``name`` in ``m2m.scenarios``."""
    return f"protocol_{name.replace('-', '_')}.toml"


def read_packaged_toml(file_name: str, error: type[Exception] = ProtocolError) -> dict[str, Any] | None:
    """The table of ``file_name`` packaged in ``m2m.scenarios``, or None if there is no such file; a syntax error
    raises ``error`` naming the file."""
    resource = resources.files("m2m.scenarios") / file_name
    if not resource.is_file():
        return None
    try:
        return tomllib.loads(resource.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{file_name}: {exc}") from exc


_CRITERION_KEYS = {"structure", "metric", "unit", "limit", "zero", "source"}


def parse_criteria(entries: list[dict[str, Any]], where: str) -> tuple[Criterion, ...]:
    """Criteria from TOML tables (``structure, metric, unit, limit, zero[, source]``)."""
    criteria = []
    for n, entry in enumerate(entries):
        unknown = set(entry) - _CRITERION_KEYS
        absent = _CRITERION_KEYS - {"source"} - set(entry)
        if unknown or absent:
            raise ProtocolError(f"{where} criterion {n}: unknown keys {sorted(unknown)}, missing {sorted(absent)}")
        try:
            criteria.append(
                Criterion(
                    structure=str(entry["structure"]),
                    metric=str(entry["metric"]),
                    unit=str(entry["unit"]),
                    limit=float(entry["limit"]),
                    zero=float(entry["zero"]),
                    source=str(entry.get("source", "")),
                )
            )
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{where} criterion {n}: {exc}") from exc
    return tuple(criteria)


def load_protocol(name: str, _seen: tuple[str, ...] = ()) -> Protocol:
    """Load protocol ``name`` (e.g. ``"prostate-basic"``) from the scenarios package, resolving ``extends``."""
    if name in _seen:
        raise ProtocolError(f"protocol {name!r} extends itself through {_seen}")
    file_name = protocol_file(name)
    data = read_packaged_toml(file_name)
    if data is None:
        raise FileNotFoundError(f"no {file_name} in m2m.scenarios")
    unknown = set(data) - {"name", "description", "extends", "criteria"}
    if unknown:
        raise ProtocolError(f"{file_name}: unknown keys {sorted(unknown)}")
    if data.get("name") != name:
        raise ProtocolError(f"{file_name}: name {data.get('name')!r} does not match {name!r}")
    base: tuple[Criterion, ...] = ()
    if "extends" in data:
        base = load_protocol(str(data["extends"]), (*_seen, name)).criteria
    criteria = base + parse_criteria(list(data.get("criteria", [])), file_name)
    if not criteria:
        raise ProtocolError(f"{file_name}: no criteria")
    return Protocol(name=name, criteria=criteria, description=str(data.get("description", "")))
