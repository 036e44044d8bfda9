"""Planning scenarios as data: site, prescription, beams, protocol, TPP structures, cohorts, step cap.

Each scenario is ``scenario_<name>.toml`` in this package (``-`` in the name becomes ``_``); its protocol is
``protocol_<protocol>.toml`` (see :mod:`m2m.physics.protocol`). :func:`load_scenario` reads the file through
:mod:`m2m.physics.config_file` (the structs below give its keys, types and defaults), checks what the types cannot
(``ptv`` first, structures the site's phantoms and the protocol know, disjoint cohorts, one role per OAR) and
returns frozen objects; cohort seed ranges are half-open ``[start, stop)`` and never overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Annotated, Any, Literal, NoReturn

import msgspec
import numpy as np
from msgspec import Meta

from m2m.physics.config_file import ConfigError, convert, expected, key_path, read_toml, toml_repr
from m2m.physics.protocol import Protocol, ProtocolError, load_protocol
from m2m.physics.tpp import PARAMS, PTV, TppSet, random_tpps

Site = Literal["prostate", "liver"]
InitialPolicy = Literal["default", "random"]
#: Structures the phantoms of each site provide (m2m.physics.phantoms) that criteria and TPPs may name.
SITE_STRUCTURES: dict[str, frozenset[str]] = {
    "prostate": frozenset({"ptv", "bladder", "rectum", "femoral_head_l", "femoral_head_r"}),
    "liver": frozenset({"ptv", "liver_normal", "stomach", "spinal_cord", "kidney_l", "kidney_r"}),
}
_PREFIX = "scenario_"


class ScenarioError(ConfigError):
    """A scenario file that is malformed or inconsistent (the message names the file and the key)."""


class SeedRange(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Phantom seeds ``start ≤ seed < stop``; written ``[start, stop)`` in a scenario file."""

    start: int
    stop: int

    @property
    def seeds(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def overlaps(self, other: SeedRange) -> bool:
        return self.start < other.stop and other.start < self.stop


_Seeds = Annotated[SeedRange, Meta(description="an array of 2 integers [start, stop)")]


class Cohorts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Disjoint seed ranges: ``train``/``validation``/``test`` for learning, ``knowledge`` for the LLM's
    knowledge base, ``paper`` for the paper-style experiment. The ``[cohorts]`` table of a scenario."""

    train: _Seeds
    validation: _Seeds
    test: _Seeds
    knowledge: _Seeds
    paper: _Seeds

    def get(self, name: str) -> SeedRange:
        if name not in COHORTS:
            raise KeyError(f"unknown cohort {name!r}; expected one of {COHORTS}")
        rng: SeedRange = getattr(self, name)
        return rng


COHORTS: tuple[str, ...] = Cohorts.__struct_fields__


class BeamSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Coplanar beams: explicit ``gantry_deg``, or one every ``every_deg`` degrees, or (both None) the dose
    engine's default set; ``bixel_mm`` is the beamlet size (mm). The ``[beams]`` table of a scenario."""

    gantry_deg: Annotated[tuple[float, ...], Meta(min_length=1)] | None = None
    every_deg: Annotated[float, Meta(gt=0, le=180)] | None = None
    bixel_mm: Annotated[float, Meta(gt=0)] = 5.0

    def angles(self) -> tuple[float, ...]:
        """Gantry angles in degrees (``gantry_deg`` in [0, 360))."""
        if self.gantry_deg is not None:
            return tuple(a % 360.0 for a in self.gantry_deg)
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
    #: ``{role: structure}``, e.g. ``{"ptv": "ptv", "oar1": "bladder", "oar2": "rectum"}`` (:func:`role_map` of the
    #: ``[roles]`` table): the site-agnostic names a DRL policy and its knowledge use (:mod:`m2m.scenarios.roles`).
    roles: Mapping[str, str] = field(hash=False)

    @property
    def oar_names(self) -> tuple[str, ...]:
        """The OARs that carry TPPs, in TPP order."""
        return self.tpp_structures[1:]

    @property
    def n_tpps(self) -> int:
        return len(PARAMS) * len(self.tpp_structures)

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
            data = read_toml(entry, entry.name, ScenarioError)
            names.append(str(data.get("name", entry.name)))
    return tuple(sorted(names))


_TPP_STRUCTURES = f"an array of structure names, {toml_repr(PTV)} first, then at least one OAR"


class _TppTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    structures: Annotated[tuple[str, ...], Meta(min_length=2, description=_TPP_STRUCTURES)]
    initial: InitialPolicy = "default"
    initial_seed: Annotated[int, Meta(ge=0)] = 0


class _ScenarioFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A ``scenario_<name>.toml`` as written (keys in the order of the packaged files)."""

    name: Annotated[str, Meta(min_length=1)]
    description: str = ""
    site: Site
    rx_gy: Annotated[float, Meta(gt=0)]
    protocol: str
    step_cap: Annotated[int, Meta(gt=0)] = 20
    beams: BeamSpec
    tpp: _TppTable
    roles: dict[str, str]
    cohorts: Cohorts


def role_map(ranked_oars: Iterable[str]) -> dict[str, str]:
    """``{role: structure}``: ``{"ptv": "ptv", "oar1": <first ranked OAR>, …}`` (the ranking rule:
    :mod:`m2m.scenarios.roles`)."""
    return {PTV: PTV, **{f"oar{i + 1}": name for i, name in enumerate(ranked_oars)}}


def read_scenario_data(name: str) -> dict[str, Any]:
    """The raw TOML table of scenario ``name``."""
    resource = resources.files(__name__) / scenario_file(name)
    if not resource.is_file():
        raise ScenarioError(f"unknown scenario {name!r}; available: {list_scenarios()}")
    return read_toml(resource, scenario_file(name), ScenarioError)


def load_scenario(name: str) -> Scenario:
    """Load and validate scenario ``name`` (``"prostate-basic"``, ``"prostate-complex"``, ``"liver"``)."""
    where = scenario_file(name)
    scenario = parse_scenario(read_scenario_data(name), where)
    if scenario.name != name:
        raise ScenarioError(expected(f"{toml_repr(name)} as in the file name", scenario.name), where, "name")
    return scenario


def parse_scenario(data: Mapping[str, Any], where: str = "<scenario>") -> Scenario:
    """Validate a scenario table (as read from TOML); ``where`` names its source in error messages."""
    file = convert(data, _ScenarioFile, where, ScenarioError)

    def fail(problem: str, *key: str | int) -> NoReturn:
        raise ScenarioError(problem, where, key_path(*key))

    try:
        protocol = load_protocol(file.protocol)
    except (ProtocolError, FileNotFoundError) as exc:
        fail(str(exc), "protocol")
    if file.beams.gantry_deg is not None and file.beams.every_deg is not None:
        fail("expected gantry_deg or every_deg, not both", "beams")
    angles = file.beams.angles()
    if len(set(angles)) != len(angles):
        fail(f"duplicate gantry angles (modulo 360) in {toml_repr(file.beams.gantry_deg)}", "beams", "gantry_deg")
    structures = file.tpp.structures
    if structures[0] != PTV:
        fail(expected(_TPP_STRUCTURES, structures), "tpp", "structures")
    if len(set(structures)) != len(structures):
        fail(f"duplicate TPP structures in {toml_repr(structures)}", "tpp", "structures")
    site_structures = SITE_STRUCTURES[file.site]
    if unknown := sorted(set(structures) - site_structures):
        fail(f"{file.site} phantoms have no {toml_repr(unknown)}; expected structures among "
             f"{toml_repr(sorted(site_structures))}", "tpp", "structures")
    if unknown := sorted(set(protocol.structures) - site_structures):
        fail(f"protocol {protocol.name} scores {toml_repr(unknown)}, which {file.site} phantoms do not have",
             "protocol")
    if unscored := sorted(set(structures) - set(protocol.structures)):
        fail(f"TPP structures {toml_repr(unscored)} are not in protocol {protocol.name}", "tpp", "structures")
    _check_cohorts(file.cohorts, fail)
    return Scenario(
        name=file.name,
        description=file.description,
        site=file.site,
        rx_gy=file.rx_gy,
        beams=file.beams,
        protocol=protocol,
        tpp_structures=structures,
        initial_tpps=file.tpp.initial,
        initial_seed=file.tpp.initial_seed,
        step_cap=file.step_cap,
        cohorts=file.cohorts,
        roles=_roles(file.roles, structures[1:], fail),
    )


def _check_cohorts(cohorts: Cohorts, fail: Callable[..., NoReturn]) -> None:
    """Every cohort holds seeds ``0 ≤ start < stop``, and no two cohorts share one."""
    for name in COHORTS:
        r = cohorts.get(name)
        if not 0 <= r.start < r.stop:
            fail(f"[{r.start}, {r.stop}) holds no seeds; expected [start, stop) with 0 ≤ start < stop", "cohorts", name)
    for i, a in enumerate(COHORTS):
        for b in COHORTS[i + 1 :]:
            ra, rb = cohorts.get(a), cohorts.get(b)
            if ra.overlaps(rb):
                fail(f"[{rb.start}, {rb.stop}) overlaps {a} [{ra.start}, {ra.stop}); cohorts must be disjoint",
                     "cohorts", b)


def _roles(table: Mapping[str, str], oars: tuple[str, ...], fail: Callable[..., NoReturn]) -> Mapping[str, str]:
    """``[roles]``: ``oar1 = "<structure>"``, … giving each TPP OAR exactly one role; the PTV's is implied."""
    roles = [role for role in role_map(oars) if role != PTV]
    if sorted(table) != sorted(roles):
        fail(expected(f"exactly the keys {', '.join(roles)} (one per TPP OAR)", table), "roles")
    assigned = [table[role] for role in roles]
    if sorted(assigned) != sorted(oars):
        fail(expected(f"one role for each TPP OAR {toml_repr(list(oars))}", table), "roles")
    return MappingProxyType(role_map(assigned))
