"""Clinical scoring protocols as data, and plan scoring.

A protocol is a list of criteria, each on one structure's dose. Each criterion scores 1 point at or better
than its ``limit``, 0 at or beyond its ``zero`` point, linearly in between; ``zero > limit`` means "lower is
better" (an upper limit, the usual case), ``zero < limit`` "higher is better". Protocols live in
``scenarios/protocol_<name>.toml`` (``-`` in the name becomes ``_``); ``extends = "<name>"`` prepends another
protocol's criteria.

A criterion may carry a ``tag`` (e.g. ``"easy"``/``"hard"``) so that one protocol can score two goals on the same
metric (TG-119's core D10 ≤ 25 Gy easy and ≤ 10 Gy hard); the tag becomes part of the criterion's id. A protocol is
named by its package name (``load_protocol``) or read from any file (``load_protocol_file``), where ``extends`` names
a packaged protocol or a file beside it.

Metrics (``metric`` / allowed ``unit`` of ``limit`` and ``zero``):

* ``D<x>cc`` (dose to the hottest x cm³, at least one voxel), ``D<x>%`` (dose to the hottest x % of the
  volume), ``Dmean``, ``Dmax``: unit ``Gy`` or ``%Rx``.
* ``V<x>Gy`` (volume receiving ≥ x Gy), ``V<x>%Rx`` (≥ x % of Rx): unit ``%`` (of the structure) or ``cc``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NewType
from typing import Protocol as TypingProtocol

import msgspec
import numpy as np

from m2m.physics import dvh
from m2m.physics.config_file import ConfigError, convert, expected, key_path, read_toml, toml_repr

_DOSE_UNITS = ("Gy", "%Rx")
_VOLUME_UNITS = ("%", "cc")
_METRIC = re.compile(r"^(?:D(?P<dcc>\d+(?:\.\d+)?)cc|D(?P<dpct>\d+(?:\.\d+)?)%|Dmean|Dmax|V(?P<vgy>\d+(?:\.\d+)?)Gy"
                     r"|V(?P<vrx>\d+(?:\.\d+)?)%Rx)$")


#: Scores (protocol points) closer than this are equal: "at the maximum" means ``total >= max_score - SCORE_TOLERANCE``.
SCORE_TOLERANCE = 1e-9

#: Metric values within this relative distance of a criterion's limit count as at the limit: a float32 dose normalised
#: to PTV D95 = Rx measures D95 = 49.999996 Gy against a 50 Gy goal (TG-119), a difference no dosimetry resolves.
LIMIT_TOLERANCE = 1e-6

#: A criterion's stable key within its protocol (:attr:`Criterion.id`), e.g. ``"rectum:V70Gy"``.
CriterionId = NewType("CriterionId", str)

#: A metric's kind (see the module docstring): dose to the hottest x cm³, dose to the hottest x % of the volume, mean
#: dose, maximum dose, volume receiving ≥ x Gy, volume receiving ≥ x % of Rx.
MetricKind = Literal["Dcc", "D%", "Dmean", "Dmax", "VGy", "V%Rx"]
_METRIC_GROUPS: tuple[tuple[str, MetricKind], ...] = (("dcc", "Dcc"), ("dpct", "D%"), ("vgy", "VGy"), ("vrx", "V%Rx"))


def parse_metric(metric: str) -> tuple[MetricKind, float | None]:
    """The kind of ``metric`` and the number in its name (cm³, %, Gy or % Rx; None for ``Dmean``/``Dmax``):
    ``"D0.03cc"`` → ``("Dcc", 0.03)``, ``"V70Gy"`` → ``("VGy", 70.0)``. ValueError for an unknown metric."""
    match = _METRIC.match(metric)
    if match is None:
        raise ValueError(f"unknown metric {metric!r} (use D<x>cc, D<x>%, Dmean, Dmax, V<x>Gy, V<x>%Rx)")
    for group, kind in _METRIC_GROUPS:
        if match[group] is not None:
            return kind, float(match[group])
    return ("Dmean", None) if metric == "Dmean" else ("Dmax", None)


class ProtocolError(ConfigError):
    """A protocol file or criterion that is malformed (the message names the file and the key)."""


@dataclass(frozen=True)
class Criterion:
    """One scored constraint: ``metric`` of ``structure``, in ``unit``, scoring 1 at ``limit``, 0 at ``zero``."""

    structure: str
    metric: str
    unit: str
    limit: float
    zero: float
    source: str = ""
    tag: str = ""

    def __post_init__(self) -> None:
        if self.tag and not re.fullmatch(r"[A-Za-z0-9_-]+", self.tag):
            raise ProtocolError(f"{self.structure} {self.metric}: tag {self.tag!r} must be letters, digits, _ or -")
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
    def id(self) -> CriterionId:
        """The stable key of this criterion within its protocol, e.g. ``"rectum:V70Gy"``: structure and metric,
        unchanged when the limit or zero point is recalibrated (a protocol may not hold two criteria with one id).
        Metric values and scores travel keyed by it; :attr:`label` is for people. A tagged criterion's id ends in
        ``":<tag>"`` (``"core:D10%:hard"``)."""
        base = f"{self.structure}:{self.metric}"
        return CriterionId(f"{base}:{self.tag}" if self.tag else base)

    @property
    def label(self) -> str:
        """E.g. ``"rectum V70Gy ≤ 25 %"`` (a tagged criterion: ``"core D10% ≤ 10 Gy (hard)"``)."""
        text = f"{self.structure} {self.metric} {'≤' if self.upper else '≥'} {self.limit:g} {self.unit}"
        return f"{text} ({self.tag})" if self.tag else text

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
        value = self._at_limit(value)
        return float(np.clip((self.zero - value) / (self.zero - self.limit), 0.0, 1.0))

    def passed(self, value: float) -> bool:
        """Whether ``value`` is at or better than the limit."""
        value = self._at_limit(value)
        return value <= self.limit if self.upper else value >= self.limit

    def _at_limit(self, value: float) -> float:
        """``value``, or the limit when it is within :data:`LIMIT_TOLERANCE` of it."""
        return self.limit if abs(value - self.limit) <= LIMIT_TOLERANCE * max(1.0, abs(self.limit)) else value


@dataclass(frozen=True)
class Protocol:
    """A named list of criteria; the maximum score is one point per criterion."""

    name: str
    criteria: tuple[Criterion, ...]
    description: str = ""

    def __post_init__(self) -> None:
        ids = [c.id for c in self.criteria]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ProtocolError(f"protocol {self.name}: criteria {twice} appear more than once (one per structure "
                                "and metric)")

    def criterion(self, criterion_id: str) -> Criterion:
        """The criterion with id ``criterion_id`` (KeyError naming the known ids otherwise)."""
        for c in self.criteria:
            if c.id == criterion_id:
                return c
        known = [c.id for c in self.criteria]
        raise KeyError(f"protocol {self.name} has no criterion {criterion_id!r}; it has {known}")

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
) -> dict[CriterionId, float]:
    """Every criterion's metric value (in its unit), keyed by :attr:`Criterion.id`, for a plan (anything with
    ``.dose``) or a ``{structure: dose in Gy per voxel}`` mapping.

    ``voxel_volume_cc`` (cm³) is needed by D(cc) and V(cc) metrics; ``rx_gy`` (Gy) by %Rx units.
    """
    dose = plan_or_dose_by_structure if isinstance(plan_or_dose_by_structure, Mapping) else (
        plan_or_dose_by_structure.dose
    )
    missing = [s for s in protocol.structures if s not in dose]
    if missing:
        raise KeyError(f"protocol {protocol.name} needs dose for {missing}; got {sorted(dose)}")
    return {c.id: c.measure(dose[c.structure], voxel_volume_cc, rx_gy) for c in protocol.criteria}


def score_values(protocol: Protocol, values: Mapping[CriterionId, float]) -> ScoreReport:
    """Score metric ``values`` keyed by criterion id (as :func:`measure_all` returns them); a missing id raises
    ``KeyError`` naming it, a non-finite value ``ValueError``."""
    items = []
    for c in protocol.criteria:
        if c.id not in values:
            raise KeyError(f"protocol {protocol.name}: no value for criterion {c.id!r} ({c.label})")
        value = float(values[c.id])
        if not np.isfinite(value):
            raise ValueError(f"protocol {protocol.name}: {c.id!r} = {value} is not finite")
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


class _CriterionTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ``[[criteria]]`` table as written: the fields of a :class:`Criterion`, which checks their values."""

    structure: str
    metric: str
    unit: str
    limit: float
    zero: float
    source: str = ""
    tag: str = ""


class _ProtocolFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ``protocol_<name>.toml`` as written: its ``[[criteria]]`` follow those of the protocol it ``extends``."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    description: str = ""
    extends: str | None = None
    criteria: tuple[_CriterionTable, ...] = ()


def parse_protocol(data: Mapping[str, Any], where: str = "<protocol>") -> Protocol:
    """Validate a protocol table (as read from TOML), loading the protocol it ``extends``; ``where`` names its
    source in errors."""
    return _protocol(convert(data, _ProtocolFile, where, ProtocolError), where, ())


def load_protocol_file(path: str | os.PathLike[str], _seen: tuple[str, ...] = ()) -> Protocol:
    """Load a protocol from any TOML file (a user-written protocol): the same keys and checks as a packaged one
    (``name`` is free); ``extends`` names a packaged protocol or, when it ends in ``.toml``, a file relative to this
    one. ``FileNotFoundError`` when ``path`` does not exist; :class:`ProtocolError` naming the file, the key and what
    is wrong otherwise."""
    path = Path(path).expanduser().resolve()
    where = str(path)
    if where in _seen:
        raise ProtocolError(f"protocol {where!r} extends itself through {_seen}")
    if not path.is_file():
        raise FileNotFoundError(f"no protocol file {where}")
    table = convert(read_toml(path, where, ProtocolError), _ProtocolFile, where, ProtocolError)
    return _protocol(table, where, (*_seen, where), base_dir=path.parent)


def load_protocol(name: str, _seen: tuple[str, ...] = ()) -> Protocol:
    """Load protocol ``name`` (e.g. ``"prostate-basic"``) from the scenarios package, resolving ``extends``;
    ``FileNotFoundError`` when there is no such protocol, :class:`ProtocolError` when its file is malformed."""
    if name in _seen:
        raise ProtocolError(f"protocol {name!r} extends itself through {_seen}")
    file_name = protocol_file(name)
    resource = resources.files("m2m.scenarios") / file_name
    if not resource.is_file():
        raise FileNotFoundError(f"no {file_name} in m2m.scenarios")
    table = convert(read_toml(resource, file_name, ProtocolError), _ProtocolFile, file_name, ProtocolError)
    if table.name != name:
        raise ProtocolError(expected(f"{toml_repr(name)} as in the file name", table.name), file_name, "name")
    return _protocol(table, file_name, _seen)


def _protocol(table: _ProtocolFile, where: str, seen: tuple[str, ...], base_dir: Path | None = None) -> Protocol:
    """The :class:`Protocol` of a converted file: the checks that span the criteria (and ``extends``)."""
    base: tuple[Criterion, ...] = ()
    if table.extends is not None:
        try:
            if table.extends.endswith(".toml") and base_dir is not None:
                base = load_protocol_file(base_dir / table.extends, seen).criteria
            else:
                base = load_protocol(table.extends, (*seen, table.name)).criteria
        except FileNotFoundError as exc:
            raise ProtocolError(str(exc), where, "extends") from None
    own = []
    for i, entry in enumerate(table.criteria):
        try:
            own.append(Criterion(**msgspec.structs.asdict(entry)))
        except ProtocolError as exc:  # an unknown metric, a unit that does not fit it, limit == zero
            raise ProtocolError(exc.problem, where, key_path("criteria", i)) from None
    criteria = base + tuple(own)
    if not criteria:
        raise ProtocolError("no criteria; expected at least one [[criteria]] table", where, "criteria")
    try:
        return Protocol(name=table.name, criteria=criteria, description=table.description)
    except ProtocolError as exc:  # a criterion that appears twice
        raise ProtocolError(exc.problem, where, "criteria") from None
