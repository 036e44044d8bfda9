"""Planning scenarios as data: site, prescription, beams, protocol, TPP structures, cohorts, step cap.

Each scenario is ``scenario_<name>.toml`` in this package (``-`` in the name becomes ``_``); its protocol is
``protocol_<protocol>.toml`` (see :mod:`m2m.physics.protocol`). :func:`load_scenario` validates the file and
returns frozen dataclasses; cohort seed ranges are half-open ``[start, stop)`` and never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, cast

import numpy as np

from m2m.physics.protocol import Protocol, ProtocolError, load_protocol, read_packaged_toml
from m2m.physics.tpp import PTV, TppSet, random_tpps

Site = Literal["prostate", "liver"]
InitialPolicy = Literal["default", "random"]
COHORTS = ("train", "validation", "test", "knowledge", "paper")
#: Structures the phantoms of each site provide (m2m.physics.phantoms) that criteria and TPPs may name.
SITE_STRUCTURES: dict[str, frozenset[str]] = {
    "prostate": frozenset({"ptv", "bladder", "rectum", "femoral_head_l", "femoral_head_r"}),
    "liver": frozenset({"ptv", "liver_normal", "stomach", "spinal_cord", "kidney_l", "kidney_r"}),
}
_PREFIX = "scenario_"


class ScenarioError(ValueError):
    """A scenario file that is malformed or inconsistent (the message names the file and the field)."""


@dataclass(frozen=True)
class SeedRange:
    """Phantom seeds ``start ≤ seed < stop``."""

    start: int
    stop: int

    @property
    def seeds(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def overlaps(self, other: SeedRange) -> bool:
        return self.start < other.stop and other.start < self.stop


@dataclass(frozen=True)
class Cohorts:
    """Disjoint seed ranges: ``train``/``validation``/``test`` for learning, ``knowledge`` for the LLM's
    knowledge base, ``paper`` for the paper-style experiment."""

    train: SeedRange
    validation: SeedRange
    test: SeedRange
    knowledge: SeedRange
    paper: SeedRange

    def get(self, name: str) -> SeedRange:
        if name not in COHORTS:
            raise KeyError(f"unknown cohort {name!r}; expected one of {COHORTS}")
        rng: SeedRange = getattr(self, name)
        return rng


@dataclass(frozen=True)
class BeamSpec:
    """Coplanar beams: explicit ``gantry_deg``, or one every ``every_deg`` degrees, or (both None) the dose
    engine's default set; ``bixel_mm`` is the beamlet size (mm)."""

    gantry_deg: tuple[float, ...] | None
    every_deg: float | None
    bixel_mm: float

    def angles(self) -> tuple[float, ...]:
        """Gantry angles in degrees."""
        if self.gantry_deg is not None:
            return self.gantry_deg
        # The dose engine owns the default set and the spacing rule; imported here to keep loading light.
        from m2m.physics.beams import DEFAULT_GANTRY_DEG, every_n_degrees

        if self.every_deg is not None:
            return every_n_degrees(self.every_deg)
        return tuple(float(a) for a in DEFAULT_GANTRY_DEG)


@dataclass(frozen=True)
class Scenario:
    """One planning scenario (see the module docstring); ``tpp_structures`` starts with ``"ptv"``."""

    name: str
    description: str
    site: Site
    rx_gy: float
    beams: BeamSpec
    protocol: Protocol
    tpp_structures: tuple[str, ...]
    initial_tpps: InitialPolicy
    initial_seed: int
    step_cap: int
    cohorts: Cohorts

    @property
    def oar_names(self) -> tuple[str, ...]:
        """The OARs that carry TPPs, in TPP order."""
        return self.tpp_structures[1:]

    @property
    def n_tpps(self) -> int:
        return 3 * len(self.tpp_structures)

    def default_tpps(self) -> TppSet:
        return TppSet.default(self.oar_names)

    def random_tpps(self, case_seed: int) -> TppSet:
        """Random TPPs for one case: a pure function of (``initial_seed``, ``case_seed``)."""
        return random_tpps(np.random.default_rng([self.initial_seed, case_seed]), self.oar_names)

    def initial_tpp_set(self, case_seed: int) -> TppSet:
        """The starting TPPs for a case under this scenario's policy."""
        return self.default_tpps() if self.initial_tpps == "default" else self.random_tpps(case_seed)


def scenario_file(name: str) -> str:
    return f"{_PREFIX}{name.replace('-', '_')}.toml"


def list_scenarios() -> tuple[str, ...]:
    """Names of the scenarios shipped in this package, sorted."""
    names = []
    for entry in resources.files(__name__).iterdir():
        if entry.name.startswith(_PREFIX) and entry.name.endswith(".toml"):
            data = read_packaged_toml(entry.name, ScenarioError) or {}
            names.append(str(data.get("name", entry.name)))
    return tuple(sorted(names))


_TOP_KEYS = {"name", "description", "site", "rx_gy", "protocol", "step_cap", "beams", "tpp", "cohorts"}


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ScenarioError(f"{where}: {message}")


def _table(data: dict[str, Any], key: str, allowed: set[str], where: str) -> dict[str, Any]:
    table = data.get(key)
    _require(isinstance(table, dict), where, f"missing table [{key}]")
    assert isinstance(table, dict)
    unknown = set(table) - allowed
    _require(not unknown, where, f"unknown keys in [{key}]: {sorted(unknown)}")
    return table


def _parse_beams(data: dict[str, Any], where: str) -> BeamSpec:
    table = _table(data, "beams", {"gantry_deg", "every_deg", "bixel_mm"}, where)
    gantry, every = table.get("gantry_deg"), table.get("every_deg")
    _require(gantry is None or every is None, where, "[beams] takes gantry_deg or every_deg, not both")
    bixel = table.get("bixel_mm", 5.0)
    _require(isinstance(bixel, int | float) and bixel > 0, where, f"bixel_mm must be > 0, got {bixel!r}")
    angles: tuple[float, ...] | None = None
    if gantry is not None:
        _require(
            isinstance(gantry, list) and len(gantry) > 0 and all(isinstance(a, int | float) for a in gantry),
            where,
            "gantry_deg must be a non-empty list of numbers",
        )
        angles = tuple(float(a) % 360.0 for a in gantry)
        _require(len(set(angles)) == len(angles), where, f"duplicate gantry angles in {gantry}")
    if every is not None:
        _require(isinstance(every, int | float) and 0 < every <= 180, where, f"every_deg must be in (0, 180]: {every}")
    return BeamSpec(angles, None if every is None else float(every), float(bixel))


def _parse_cohorts(data: dict[str, Any], where: str) -> Cohorts:
    table = _table(data, "cohorts", set(COHORTS), where)
    ranges: dict[str, SeedRange] = {}
    for name in COHORTS:
        value = table.get(name)
        _require(
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value),
            where,
            f"cohort {name} must be [start, stop) as two integers, got {value!r}",
        )
        assert isinstance(value, list)
        start, stop = value
        _require(0 <= start < stop, where, f"cohort {name} [{start}, {stop}) is empty or negative")
        ranges[name] = SeedRange(start, stop)
    for i, a in enumerate(COHORTS):
        for b in COHORTS[i + 1 :]:
            _require(not ranges[a].overlaps(ranges[b]), where, f"cohorts {a} and {b} overlap")
    return Cohorts(**ranges)


def read_scenario_data(name: str) -> dict[str, Any]:
    """The raw TOML table of scenario ``name``."""
    data = read_packaged_toml(scenario_file(name), ScenarioError)
    if data is None:
        raise ScenarioError(f"unknown scenario {name!r}; available: {list_scenarios()}")
    return data


def load_scenario(name: str) -> Scenario:
    """Load and validate scenario ``name`` (``"prostate-basic"``, ``"prostate-complex"``, ``"liver"``)."""
    data = read_scenario_data(name)
    _require(data.get("name") == name, scenario_file(name), f"name {data.get('name')!r} does not match {name!r}")
    return parse_scenario(data, scenario_file(name))


def parse_scenario(data: dict[str, Any], where: str = "<scenario>") -> Scenario:
    """Validate a scenario table (as read from TOML); ``where`` names its source in error messages."""
    unknown = set(data) - _TOP_KEYS
    _require(not unknown, where, f"unknown keys {sorted(unknown)}")
    name = data.get("name")
    _require(isinstance(name, str) and bool(name), where, f"name must be a non-empty string, got {name!r}")
    assert isinstance(name, str)
    site = data.get("site")
    _require(site in ("prostate", "liver"), where, f"site must be 'prostate' or 'liver', got {site!r}")
    rx = data.get("rx_gy")
    _require(isinstance(rx, int | float) and rx > 0, where, f"rx_gy must be a positive number, got {rx!r}")
    step_cap = data.get("step_cap", 20)
    _require(isinstance(step_cap, int) and step_cap > 0, where, f"step_cap must be a positive int, got {step_cap!r}")
    try:
        protocol = load_protocol(str(data.get("protocol")))
    except (ProtocolError, FileNotFoundError) as exc:
        raise ScenarioError(f"{where}: protocol: {exc}") from exc
    tpp = _table(data, "tpp", {"structures", "initial", "initial_seed"}, where)
    structures = tpp.get("structures")
    _require(
        isinstance(structures, list) and len(structures) >= 2 and structures[0] == PTV,
        where,
        f"[tpp] structures must list 'ptv' first and at least one OAR, got {structures!r}",
    )
    assert isinstance(structures, list)
    _require(len(set(structures)) == len(structures), where, f"duplicate TPP structures {structures}")
    unknown_structures = (set(structures) | set(protocol.structures)) - SITE_STRUCTURES[str(site)]
    _require(not unknown_structures, where, f"{site} phantoms have no {sorted(unknown_structures)}")
    unscored = set(structures) - set(protocol.structures)
    _require(not unscored, where, f"TPP structures {sorted(unscored)} are not in protocol {protocol.name}")
    initial = tpp.get("initial", "default")
    _require(initial in ("default", "random"), where, f"[tpp] initial must be 'default' or 'random': {initial!r}")
    seed = tpp.get("initial_seed", 0)
    _require(isinstance(seed, int) and seed >= 0, where, f"[tpp] initial_seed must be an int >= 0: {seed!r}")
    return Scenario(
        name=name,
        description=str(data.get("description", "")),
        site=cast(Site, site),
        rx_gy=float(cast(float, rx)),
        beams=_parse_beams(data, where),
        protocol=protocol,
        tpp_structures=tuple(str(s) for s in structures),
        initial_tpps=initial,
        initial_seed=seed,
        step_cap=step_cap,
        cohorts=_parse_cohorts(data, where),
    )
