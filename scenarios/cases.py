"""Cases assembled under a scenario: the scenario's beams, dij (cached), protocol and prescription around a case.

* :class:`PlanningCase` / :class:`CaseBank` / :func:`phantom_bank` — cases ready to plan (a dij each), built on
  first use and kept in a bounded LRU (the dose engine and the DRL environment plan from these);
* :class:`CaseOptimizer` / :func:`scenario_optimizer` — optimise and score TPP sets on one case (the calibration
  search and the experiments' difficulty probes use this);
* :func:`load_file_case` / :func:`scenario_case` / :func:`scenario_bank` — the same for a scenario whose case comes
  from a file (:class:`m2m.scenarios.CaseSource`): found in the data directories (:func:`data_dirs`), unpacked when
  zipped, loaded with its structure map, resampled to the scenario's dose grid; timed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import structlog

from m2m.physics.beams import BeamSet, beams_for
from m2m.physics.case import Case, CaseFileError, DicomReference, Grid, Structure
from m2m.physics.dij import Dij
from m2m.physics.dij_cache import default_cache_dir, load_or_compute_dij, resolved_structures
from m2m.physics.matrad import load_matrad, shared_data_dir
from m2m.physics.optimizer import PlanResult, optimize
from m2m.physics.phantoms import make_case
from m2m.physics.protocol import Protocol, ScoreReport, score
from m2m.physics.resample import resample_case
from m2m.physics.tpp import TppSet
from m2m.scenarios import CaseSource, Scenario

log = structlog.get_logger()

DATA_DIR_ENV = "M2M_DATA_DIR"


@dataclass(frozen=True, eq=False)
class PlanningCase:
    """One case ready to plan: its dij (rows for the TPP and protocol structures: what the optimizer and the score
    read) and identity.

    ``build_report_dij`` builds, on first use of :attr:`report_dij`, a second dij for the case's other targets and
    OARs (none: the case has no other), whose doses are reported beside the plan's but never optimised nor scored.
    It is a separate dij so that the planning dij stays exactly the one planned before: the dose engine's
    radiological-depth lattice depends on the voxels computed, so adding rows would move the planning dij's values
    by up to ~1 % of its maximum and change plans.
    """

    case_id: str
    seed: int
    dij: Dij
    build_report_dij: Callable[[], Dij | None] | None = field(default=None, repr=False)

    @cached_property
    def report_dij(self) -> Dij | None:
        """The dij of the case's targets and OARs outside :attr:`dij` (built once; None when there are none)."""
        if self.build_report_dij is None:
            return None
        dij = self.build_report_dij()
        if dij is not None and dij.n_beamlets != self.dij.n_beamlets:
            raise ValueError(f"case {self.case_id}: the report dij has {dij.n_beamlets} beamlets, the planning dij "
                             f"{self.dij.n_beamlets}")
        return dij

    def report_doses(self, fluence: np.ndarray) -> dict[str, np.ndarray]:
        """Dose (Gy per voxel) of beamlet weights ``fluence`` (a normalised plan's) on each structure of
        :attr:`report_dij` (empty when there is none): add it to ``PlanResult.dose`` for every clinical structure."""
        report = self.report_dij
        if report is None:
            return {}
        dose = report.dose(np.asarray(fluence, dtype=np.float64))
        return {name: dose[rows] for name, rows in report.rows.items()}


class CaseBank:
    """Planning cases for a list of phantom seeds, built on first use and kept in a bounded in-memory LRU.

    A 7-beam prostate dij takes ~2 M non-zeros (≈ 8 MB packed, 4 bytes each), so the default capacity of 48 cases
    stays under ~0.5 GB while covering a whole training cohort slice (a 180-beam one: ≈ 170 MB each).
    """

    def __init__(self, seeds: Sequence[int], build: Callable[[int], PlanningCase], capacity: int = 48) -> None:
        if not seeds:
            raise ValueError("a case bank needs at least one seed")
        self.seeds = tuple(int(s) for s in seeds)
        self._build = build
        self._capacity = capacity
        self._cache: OrderedDict[int, PlanningCase] = OrderedDict()

    def get(self, seed: int) -> PlanningCase:
        """The case of ``seed`` (built on first use)."""
        if seed in self._cache:
            self._cache.move_to_end(seed)
            return self._cache[seed]
        case = self._build(seed)
        self._cache[seed] = case
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return case


def data_dirs() -> tuple[Path, ...]:
    """Where a case file named by a relative path is looked for: ``$M2M_DATA_DIR`` (else ``~/.cache/m2m/data``, where
    ``make data`` puts the downloaded cases), then the shared reference data
    (:func:`~m2m.physics.matrad.shared_data_dir`)."""
    env = os.environ.get(DATA_DIR_ENV)
    return (Path(env) if env else Path.home() / ".cache" / "m2m" / "data", shared_data_dir())


def case_file_path(source: CaseSource) -> Path:
    """The file or folder ``source`` names (see :func:`data_dirs`); :class:`CaseFileError` when it is nowhere."""
    path = Path(source.path).expanduser()
    places = [path] if path.is_absolute() else [d / path for d in data_dirs()]
    for place in places:
        if place.exists():
            return place
    hint = " (run `make data` to fetch the packaged scenarios' cases)" if not path.is_absolute() else ""
    raise CaseFileError(source.path, f"not found; looked in {', '.join(str(p) for p in places)}{hint}")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unpacked(archive: Path, digest: str | None = None) -> Path:
    """A zipped DICOM case unpacked once into the data cache, in a folder named by the archive's content hash
    (``digest``, its sha256, when the caller already has it)."""
    digest = (digest or file_sha256(archive))[:16]
    target = data_dirs()[0] / "unpacked" / f"{archive.stem}-{digest}"
    if not (target / ".complete").exists():
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(target)
        except (OSError, zipfile.BadZipFile) as exc:
            raise CaseFileError(str(archive), f"cannot unpack: {exc}") from None
        (target / ".complete").touch()
    return target


@dataclass(frozen=True, eq=False)
class LoadedCase:
    """A case-file scenario's case on its dose grid, and the wall times (s) of reading and of resampling it (those
    of the first read when ``cached``: this one came from the case cache)."""

    case: Case
    path: Path
    load_s: float
    resample_s: float
    file_voxels: int
    cached: bool = False


#: The code a loaded case depends on besides its file: a change to any of these misses the case cache.
_LOADER_SOURCES = ("case.py", "dicom.py", "matrad.py", "resample.py")


def _case_key(source: CaseSource, path: Path, digest: str | None, rx_gy: float) -> str:
    """Content key of a loaded case: the file's sha256 (a folder: every file's relative path, size and mtime), the
    structure map, dose grid and prescription, and the loaders' source."""
    h = hashlib.sha256()
    if digest is not None:
        h.update(digest.encode())
    else:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps([source.format, sorted(source.structures.items()), source.dose_grid_mm, rx_gy]).encode())
    physics = Path(str(sys.modules[Case.__module__].__file__)).parent
    for name in _LOADER_SOURCES:
        h.update((physics / name).read_bytes())
    return h.hexdigest()


def _save_case(loaded: LoadedCase, path: Path) -> None:
    """``loaded`` as one .npz (density, packed masks, JSON metadata), written atomically."""
    case = loaded.case
    meta = {
        "case_id": case.case_id, "site": case.site, "rx_gy": case.rx_gy, "shape": case.grid.shape,
        "spacing_mm": case.grid.spacing_mm, "origin_mm": case.grid.origin_mm,
        "structures": [[s.name, s.role] for s in case.structures],
        "reference": None if case.reference is None else dataclasses.asdict(case.reference),
        "load_s": loaded.load_s, "resample_s": loaded.resample_s, "file_voxels": loaded.file_voxels,
    }
    masks = {f"mask_{i}": np.packbits(s.mask) for i, s in enumerate(case.structures)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    arrays: dict[str, np.ndarray] = {"density": case.density,
                                     "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **masks}
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


def _read_case(path: Path, file: Path) -> LoadedCase:
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes())
        shape = tuple(meta["shape"])
        n = int(np.prod(shape))
        structures = tuple(
            Structure(name, role, np.unpackbits(z[f"mask_{i}"], count=n).astype(bool).reshape(shape))
            for i, (name, role) in enumerate(meta["structures"])
        )
        grid = Grid(shape=shape, spacing_mm=tuple(meta["spacing_mm"]), origin_mm=tuple(meta["origin_mm"]))
        reference = None if meta["reference"] is None else DicomReference(**meta["reference"])
        case = Case(meta["case_id"], meta["site"], grid, np.asarray(z["density"]), structures, meta["rx_gy"],
                    reference=reference)
    return LoadedCase(case, file, meta["load_s"], meta["resample_s"], meta["file_voxels"], cached=True)


def load_file_case(scenario: Scenario) -> LoadedCase:
    """Read the case of a case-file scenario: find the file, check its sha256 if the scenario gives one, unpack a
    zip, load it with the structure map, resample to ``dose_grid_mm``. :class:`CaseFileError` (naming the file) for
    anything wrong with the file; ValueError when ``scenario`` has no case file.

    The loaded case is kept in the cache (``<dij cache>/cases/<key>.npz``, :func:`_case_key`): the Alderson CT takes
    ~10 s to read and resample, and each dose engine, the CLI and the RTDOSE export need it; a hit returns the times
    of the original read with ``cached`` set."""
    source = scenario.case
    if source is None:
        raise ValueError(f"scenario {scenario.name} plans phantoms, not a case file")
    path = case_file_path(source)
    digest = file_sha256(path) if path.is_file() else None
    if source.sha256 is not None and digest is not None and digest != source.sha256.lower():
        raise CaseFileError(str(path), f"sha256 {digest} differs from the scenario's {source.sha256}")
    cached = default_cache_dir() / "cases" / f"{_case_key(source, path, digest, scenario.rx_gy)}.npz"
    if cached.is_file():
        try:
            hit = _read_case(cached, path)
            return dataclasses.replace(hit, case=dataclasses.replace(hit.case, site=scenario.site))
        except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            log.warning("case_cache_unreadable", path=str(cached), error=repr(exc))
    loaded = _load_file_case(scenario, source, path, digest)
    try:
        _save_case(loaded, cached)
    except OSError as exc:  # a read-only cache costs the next reader the time, nothing else
        log.warning("case_cache_not_written", path=str(cached), error=repr(exc))
    return loaded


def _load_file_case(scenario: Scenario, source: CaseSource, path: Path, digest: str | None) -> LoadedCase:
    started = time.perf_counter()
    if source.format == "dicom":
        from m2m.physics.dicom import load_dicom

        folder = _unpacked(path, digest) if path.suffix.lower() == ".zip" else path
        # A DICOM export often puts each modality in a subfolder (CT/, RS/): read the whole tree.
        files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".")) \
            if folder.is_dir() else [folder]
        case = load_dicom(files, rx_gy=scenario.rx_gy, structures=source.structures, case_id=path.stem)
    else:
        case = load_matrad(path, rx_gy=scenario.rx_gy, structures=source.structures)
    load_s = time.perf_counter() - started
    file_voxels = case.grid.n_voxels
    resample_s = 0.0
    if source.dose_grid_mm is not None:
        try:
            resampled = resample_case(case, source.dose_grid_mm)
        except ValueError as exc:
            raise CaseFileError(str(path), str(exc)) from None
        case, resample_s = resampled.case, resampled.seconds
    case = dataclasses.replace(case, case_id=path.stem, site=scenario.site)
    log.info("file_case_loaded", scenario=scenario.name, path=str(path), load_s=round(load_s, 2),
             resample_s=round(resample_s, 2), grid=case.grid.shape)
    return LoadedCase(case, path, load_s, resample_s, file_voxels)


def scenario_case(scenario: Scenario, seed: int) -> Case:
    """Case ``seed`` of ``scenario``: its phantom, or its case file's anatomy (the same for every seed; the seed then
    picks the initial plan, :func:`m2m.scenarios.file_cohorts`)."""
    if scenario.case is None:
        return make_case(scenario.site, seed)
    return load_file_case(scenario).case


def scenario_bank(scenario: Scenario, seeds: Sequence[int], capacity: int = 48) -> CaseBank:
    """Planning cases of ``scenario``: :func:`phantom_bank`, or the case file's one anatomy, read and planned once and
    served for every seed."""
    if scenario.case is None:
        return phantom_bank(scenario, seeds, capacity)
    one = phantom_bank(scenario, [0], 1, make=lambda _seed: load_file_case(scenario).case)  # holds its one case

    def build(seed: int) -> PlanningCase:
        planning = one.get(0)
        return planning if seed == planning.seed else dataclasses.replace(planning, seed=seed)

    return CaseBank(seeds, build, capacity)


def phantom_bank(scenario: Scenario, seeds: Sequence[int], capacity: int = 48,
                 make: Callable[[int], Case] | None = None) -> CaseBank:
    """Cases of ``scenario`` for phantom ``seeds``, dijs from the on-disk dij cache (computed once per case).

    The planning dij has rows for the TPP and protocol structures; the report dij (built on first use, cached on
    disk under its own key) those of every other target and OAR of the case
    (:func:`~m2m.physics.dij_cache.resolved_structures`: not the body nor anatomical context), so a plan's DVHs can
    show every structure that matters clinically.
    """
    structures = tuple(dict.fromkeys((*scenario.tpp_structures, *scenario.protocol.structures)))
    make_one = make if make is not None else (lambda seed: make_case(scenario.site, seed))

    def case_and_beams(seed: int) -> tuple[Case, BeamSet]:
        case = make_one(seed)
        return case, beams_for(case, scenario.beams.angles(), scenario.beams.bixel_mm)

    def build(seed: int) -> PlanningCase:
        case, beams = case_and_beams(seed)
        others = tuple(n for n in resolved_structures(case, None) if n not in structures)

        # A case file's one case is kept (reading it again costs seconds).
        kept = (case, beams) if scenario.case is not None else None

        @functools.cache  # once, also for the copies scenario_bank makes of a case file's one case
        def build_report_dij() -> Dij | None:
            # A phantom is made again (≈ 0.4 s, once) rather than kept: a bank of 48 cases would hold ~400 MB of
            # grids for DVHs that training never asks for.
            return load_or_compute_dij(*(kept or case_and_beams(seed)), others) if others else None

        return PlanningCase(case.case_id, seed, load_or_compute_dij(case, beams, structures), build_report_dij)

    return CaseBank(seeds, build, capacity)


@dataclass(frozen=True, eq=False)
class ScoredPlan:
    """A plan for ``tpps`` and its protocol score."""

    tpps: TppSet
    plan: PlanResult
    report: ScoreReport

    @property
    def key(self) -> tuple[float, float]:
        """Ranking key: points first, then the summed clipped margins."""
        return (round(self.report.total, 9), self.report.margin())


class CaseOptimizer:
    """Plans and scores TPP sets on one case: a dij, a protocol and a prescription (Gy)."""

    def __init__(self, dij: Dij, protocol: Protocol, rx_gy: float, *, target: str = "ptv") -> None:
        self.dij, self.protocol, self.rx_gy, self.target = dij, protocol, rx_gy, target
        self.evaluations = 0

    def evaluate(self, tpps: TppSet, warm_start: np.ndarray | None = None) -> ScoredPlan:
        """Optimise (warm-started if given) and score."""
        self.evaluations += 1
        plan = optimize(
            self.dij, tpps, self.rx_gy, target=self.target, warm_start=warm_start,
            dose_structures=self.protocol.structures,
        )
        return ScoredPlan(tpps, plan, score(self.protocol, plan, self.dij.voxel_volume_cc, self.rx_gy))


def scenario_optimizer(scenario: Scenario, case: Case, *, cache_dir: str | Path | None = None) -> CaseOptimizer:
    """A :class:`CaseOptimizer` for ``case`` under ``scenario``'s beams, protocol and prescription (dij from the cache
    when present)."""
    beams = beams_for(case, gantry_deg=scenario.beams.angles(), bixel_mm=scenario.beams.bixel_mm)
    return CaseOptimizer(load_or_compute_dij(case, beams, cache_dir=cache_dir), scenario.protocol, scenario.rx_gy)
