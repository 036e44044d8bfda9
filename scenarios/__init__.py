"""Planning scenarios as data: site, prescription, beams, protocol, TPP structures, cohorts, step cap.

Each scenario is ``scenario_<name>.toml`` in this package (``-`` in the name becomes ``_``); its protocol is
``protocol_<protocol>.toml`` (see :mod:`m2m.physics.protocol`). :func:`load_scenario` reads the file through
:mod:`m2m.physics.config_file` (the structs below give its keys, types and defaults), checks what the types cannot
(``ptv`` first, structures the site's phantoms and the protocol know, disjoint cohorts, one role per OAR) and
returns frozen objects; cohort seed ranges are half-open ``[start, stop)`` and never overlap.

**A case from a file.** Instead of ``[cohorts]`` of phantoms, a scenario may hold a ``[case]`` table
(:class:`CaseSource`): a DICOM folder (CT series + RTSTRUCT, or a ``.zip`` of one) or a matRad ``.mat`` file, the map
of the planner's structure names to the file's (``[case.structures]``, matched case-insensitively) and an optional
dose grid to resample to. Such a scenario has one case, seed 0, in every cohort; its ``site`` may be ``"other"``;
its structures are the map's keys (``ptv`` the target). A relative ``path`` is looked up beside the scenario file,
then in the data directories (:func:`m2m.scenarios.cases.data_dirs`).

**User scenarios.** Scenarios written by users live outside the package: :func:`register_scenario` (``m2m plan
--scenario FILE.toml``) and :func:`register_table` (``m2m plan --case-file``) validate one, resolve its relative paths
and store it, as JSON, in :func:`user_scenario_dir`; :func:`load_scenario` finds a name there when the package has
none, so every agent process on the host plans it by name. ``protocol`` may be a packaged protocol's name or a
protocol file's path (:func:`m2m.physics.protocol.load_protocol_file`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, NoReturn

import msgspec
import numpy as np
from msgspec import Meta

from m2m.physics.config_file import ConfigError, convert, expected, key_path, read_toml, toml_repr
from m2m.physics.protocol import Protocol, ProtocolError, load_protocol, load_protocol_file
from m2m.physics.tpp import PARAMETERS, PARAMS, PTV, ROLES, TRAINING_RANGES, DrawRanges, TppSet, random_tpps

#: A scenario's anatomical site: the phantom family of a cohort scenario; a case-file scenario may say ``"other"``
#: (its knowledge then comes from another site, through the role map).
Site = Literal["prostate", "liver", "other"]
#: The file format of a case source: a DICOM-RT folder (or .zip) or a matRad .mat file.
CaseFormat = Literal["dicom", "matrad"]
SCENARIO_DIR_ENV = "M2M_SCENARIO_DIR"
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


#: Structure names a case file may map to: what TPP names and criteria can carry (``lambda_<name>``).
_STRUCTURE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class CaseFetch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[case.fetch]``: where ``m2m data`` gets a packaged scenario's case file from: ``member`` of the wheel
    (``kind = "wheel"``) or source distribution (``"sdist"``) of ``requirement`` (e.g. ``"pydosert==1.5.0"``) on the
    package index, downloaded with pip (:mod:`m2m.scenarios.data`)."""

    requirement: Annotated[str, Meta(min_length=1)]
    kind: Literal["wheel", "sdist"]
    member: Annotated[str, Meta(min_length=1)]


class CaseSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[case]`` of a scenario: one case read from a file (see the module docstring).

    ``structures`` maps the planner's name of each structure (``ptv`` for the target; lower-case identifiers, e.g.
    ``bladder``, ``femoral_head_l``) to its name in the file. ``dose_grid_mm`` (z, y, x) resamples the CT to that
    grid (:func:`m2m.physics.resample.resample_case`); None keeps the file's grid. ``starts``: how many seeds (random
    initial plans of the one anatomy) the scenario's cohorts hold. ``sha256``, when given, must match the file (a
    folder: not checked). ``fetch``: where ``m2m data`` downloads it from (:class:`CaseFetch`).
    """

    format: CaseFormat
    path: Annotated[str, Meta(min_length=1)]
    structures: Annotated[dict[str, str], Meta(min_length=2)]
    dose_grid_mm: Annotated[tuple[float, ...], Meta(min_length=3, max_length=3,
                                                    description="an array of 3 spacings (z, y, x) in mm")] | None = None
    starts: Annotated[int, Meta(ge=1, le=1000)] = 1
    sha256: str | None = None
    fetch: CaseFetch | None = None


def file_cohorts(starts: int) -> Cohorts:
    """The cohorts of a case-file scenario: seeds ``0 … starts-1`` in every cohort, each the same anatomy with its own
    random starting TPPs (:meth:`Scenario.random_tpps` of that seed), so an experiment can plan one patient from many
    initial plans."""
    return Cohorts(*(SeedRange(0, starts) for _ in COHORTS))


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
    #: The case file this scenario plans (None: phantoms of ``site`` drawn from ``cohorts``).
    case: CaseSource | None = None
    #: sha256 of the validated table (with resolved paths): changes whenever the scenario does.
    fingerprint: str = ""
    #: The protocol file the scenario names (None: a packaged protocol by name).
    protocol_file: str | None = None
    #: ``(role, param) → (low, high, log_uniform)``: what the scenario's random initial TPPs are drawn from (the
    #: ``[tpp.initial_ranges]`` table over :data:`~m2m.physics.tpp.TRAINING_RANGES`); DRL training draws its
    #: episodes' starts from the same ranges.
    initial_ranges: DrawRanges = field(default_factory=lambda: TRAINING_RANGES, hash=False)

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
        return random_tpps(np.random.default_rng([self.initial_seed, case_seed]), self.oar_names, self.initial_ranges)

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


_RANGE = "an array [low, high] of two numbers"


class _TppTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    structures: Annotated[tuple[str, ...], Meta(min_length=2, description=_TPP_STRUCTURES)]
    initial: InitialPolicy = "default"
    initial_seed: Annotated[int, Meta(ge=0)] = 0
    #: ``[tpp.initial_ranges.<role>]``: ``<param> = [low, high]`` overriding the training range of that role's
    #: parameter (log-uniform for a log-scale parameter such as lambda).
    initial_ranges: dict[str, dict[str, Annotated[tuple[float, float], Meta(description=_RANGE)]]] = {}


def _initial_ranges(table: Mapping[str, Mapping[str, tuple[float, float]]],
                    fail: Callable[..., NoReturn]) -> DrawRanges:
    """:data:`~m2m.physics.tpp.TRAINING_RANGES` with a scenario's ``[tpp.initial_ranges]`` over it; each range lies in
    the parameter's valid range and has ``low ≤ high``."""
    ranges = dict(TRAINING_RANGES)
    for role, params in table.items():
        if role not in ROLES:
            fail(expected(f"one of {toml_repr(list(ROLES))}", role), "tpp", "initial_ranges")
        for param, (low, high) in params.items():
            if param not in PARAMETERS:
                fail(expected(f"one of {toml_repr(list(PARAMETERS))}", param), "tpp", "initial_ranges", role)
            spec = PARAMETERS[param].of(role)
            if not (spec.valid.contains(low) and spec.valid.contains(high) and low <= high):
                fail(expected(f"low <= high, both in {spec.valid}", [low, high]), "tpp", "initial_ranges", role, param)
            ranges[(role, param)] = (float(low), float(high), PARAMETERS[param].log_scale)
    return MappingProxyType(ranges)


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
    cohorts: Cohorts | None = None
    case: CaseSource | None = None


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


def user_scenario_dir() -> Path:
    """Where registered user scenarios live: ``$M2M_SCENARIO_DIR``, else ``~/.local/share/m2m/scenarios``."""
    env = os.environ.get(SCENARIO_DIR_ENV)
    return Path(env) if env else Path.home() / ".local" / "share" / "m2m" / "scenarios"


def _user_file(name: str) -> Path:
    return user_scenario_dir() / f"{_PREFIX}{name}.json"


#: Scenarios already parsed, by name: the files they came from (path, mtime, size) and the scenario. Agents load a
#: scenario on every request (the dose engine, the evaluator): unchanged files cost a stat, not a parse (~1 ms).
_LOADED: dict[str, tuple[tuple[tuple[str, int, int], ...], Scenario]] = {}


def _stamp(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...] | None:
    """(path, mtime, size) of each file; None when one cannot be stat'ed (a packaged resource in a zip, a file gone)."""
    try:
        return tuple((str(p), (st := p.stat()).st_mtime_ns, st.st_size) for p in paths)
    except (OSError, TypeError):
        return None


def _sources(name: str, protocol: str | None = None) -> list[Path]:
    """The files scenario ``name`` is read from: its packaged TOML or registered JSON, and a protocol file."""
    packaged = resources.files(__name__) / scenario_file(name)
    files = [Path(str(packaged)) if packaged.is_file() else _user_file(name)]
    if protocol is not None and protocol.endswith(".toml"):
        files.append(Path(protocol))
    return files


def load_scenario(name: str) -> Scenario:
    """Load and validate scenario ``name``: a packaged one (``"prostate-basic"``, ``"prostate-complex"``,
    ``"liver"``, ``"tg119"``, ``"alderson"``), else a registered user scenario (:func:`register_scenario`). A
    scenario whose files have not changed since it was last loaded is returned as it was parsed."""
    known = _LOADED.get(name)
    if known is not None and known[0] == _stamp(Path(p) for p, _, _ in known[0]):
        return known[1]
    scenario = _parse_named(name)
    stamp = _stamp(_sources(name, scenario.protocol_file))
    if stamp is not None:
        _LOADED[name] = (stamp, scenario)
    return scenario


def _parse_named(name: str) -> Scenario:
    where = scenario_file(name)
    if not (resources.files(__name__) / where).is_file():
        user = _user_file(name)
        if _NAME.match(name) and user.is_file():
            try:
                data = json.loads(user.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ScenarioError(f"cannot read: {exc}", str(user)) from None
            return parse_scenario(data, str(user))
    scenario = parse_scenario(read_scenario_data(name), where)
    if scenario.name != name:
        raise ScenarioError(expected(f"{toml_repr(name)} as in the file name", scenario.name), where, "name")
    return scenario


#: A user scenario's name: it names a file.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def register_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Validate the scenario TOML at ``path`` and register it under its ``name`` (relative paths in it are taken
    relative to the file); returns it. :class:`ScenarioError` naming the file and the key when it is invalid."""
    path = Path(path).expanduser().resolve()
    return register_table(read_toml(path, str(path), ScenarioError), path.parent, str(path))


def register_table(data: Mapping[str, Any], base_dir: str | os.PathLike[str], where: str = "<scenario>") -> Scenario:
    """Validate a scenario table, resolve its relative ``protocol`` and ``[case] path`` against ``base_dir``, store it
    in :func:`user_scenario_dir` and return it. A packaged scenario's name cannot be taken."""
    name = str(data.get("name", ""))
    if not _NAME.match(name):
        raise ScenarioError(expected("a name of letters, digits, '.', '_' or '-'", name), where, "name")
    if (resources.files(__name__) / scenario_file(name)).is_file():
        raise ScenarioError(f"{name!r} is a packaged scenario; give yours another name", where, "name")
    table = _resolved(data, Path(base_dir))
    parse_scenario(table, where)
    target = _user_file(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(target)
    return load_scenario(name)


def _resolved(data: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of ``data`` with a relative protocol file and a relative case path made absolute against ``base_dir``
    (a case path is kept relative when no such file exists there: the data directories are searched at load)."""
    table = json.loads(json.dumps(data))
    protocol = table.get("protocol")
    if isinstance(protocol, str) and protocol.endswith(".toml"):
        table["protocol"] = str((base_dir / Path(protocol).expanduser()).resolve())
    case = table.get("case")
    if isinstance(case, dict) and isinstance(case.get("path"), str):
        candidate = base_dir / Path(case["path"]).expanduser()
        if candidate.exists():
            case["path"] = str(candidate.resolve())
    return dict(table)


def parse_scenario(data: Mapping[str, Any], where: str = "<scenario>") -> Scenario:
    """Validate a scenario table (as read from TOML); ``where`` names its source in error messages."""
    file = convert(data, _ScenarioFile, where, ScenarioError)

    def fail(problem: str, *key: str | int) -> NoReturn:
        raise ScenarioError(problem, where, key_path(*key))

    try:
        if file.protocol.endswith(".toml"):
            protocol = load_protocol_file(file.protocol)
        else:
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
    site_structures, source = _structures_known(file, fail)
    have = "has" if file.case is not None else "have"
    if unknown := sorted(set(structures) - site_structures):
        fail(f"{source} {have} no {toml_repr(unknown)}; expected structures among "
             f"{toml_repr(sorted(site_structures))}", "tpp", "structures")
    if unknown := sorted(set(protocol.structures) - site_structures):
        fail(f"protocol {protocol.name} scores {toml_repr(unknown)}, which {source} "
             f"{'does' if file.case is not None else 'do'} not have", "protocol")
    if unscored := sorted(set(structures) - set(protocol.structures)):
        fail(f"TPP structures {toml_repr(unscored)} are not in protocol {protocol.name}", "tpp", "structures")
    if file.cohorts is not None:
        _check_cohorts(file.cohorts, fail)
    fingerprint = hashlib.sha256(json.dumps(dict(data), sort_keys=True, default=str).encode()).hexdigest()
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
        cohorts=file.cohorts if file.cohorts is not None else file_cohorts(file.case.starts if file.case else 1),
        roles=_roles(file.roles, structures[1:], fail),
        case=file.case,
        fingerprint=fingerprint,
        protocol_file=file.protocol if file.protocol.endswith(".toml") else None,
        initial_ranges=_initial_ranges(file.tpp.initial_ranges, fail),
    )


def _structures_known(file: _ScenarioFile, fail: Callable[..., NoReturn]) -> tuple[frozenset[str], str]:
    """The structure names criteria and TPPs may use and what provides them (for messages): the site's phantoms
    for a cohort scenario, the ``[case.structures]`` map for a case-file scenario."""
    if file.case is None:
        if file.cohorts is None:
            fail("expected a [cohorts] table (phantom cases) or a [case] table (a case file)", "cohorts")
        if file.site not in SITE_STRUCTURES:
            fail(f"site {file.site!r} has no phantoms; give a [case] table with a case file", "site")
        return SITE_STRUCTURES[file.site], f"{file.site} phantoms"
    if file.cohorts is not None:
        fail("a scenario with a [case] file plans that one anatomy (its seeds are starts); remove [cohorts]", "cohorts")
    for name in file.case.structures:
        if not _STRUCTURE_NAME.match(name):
            fail(expected("a lower-case identifier (letters, digits, _) as the planner's structure name", name),
                 "case", "structures")
    if PTV not in file.case.structures:
        fail(f"no {toml_repr(PTV)} entry: map the target to {toml_repr(PTV)}", "case", "structures")
    if file.case.dose_grid_mm is not None and min(file.case.dose_grid_mm) <= 0:
        fail(expected("three positive spacings (z, y, x) in mm", list(file.case.dose_grid_mm)), "case", "dose_grid_mm")
    return frozenset(file.case.structures), "the [case.structures] map"


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
