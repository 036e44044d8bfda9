"""A planning case: a CT-like voxel grid, named structures and a prescription.

Arrays are indexed ``[z, y, x]`` (C order); ``spacing_mm`` and ``origin_mm`` follow the same axis order.
``origin_mm`` is the position of the centre of voxel ``[0, 0, 0]``. Beams rotate in the axial (y, x)
plane about the z axis (patient superior-inferior).

Loading a case from a file (:mod:`m2m.physics.dicom`, :mod:`m2m.physics.matrad`): every failure on bad input is a
:class:`CaseFileError` naming the file or folder. A structure map ``{planner_name: name_in_file}`` selects and renames
the file's structures (:func:`map_structures`): the planner name :data:`~m2m.physics.tpp.PTV` is the target, the others
OARs, and the file's body outline, if any and not mapped, is kept as :data:`BODY`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from m2m.physics.tpp import PTV

Role = Literal["target", "oar", "body"]

#: The planner name of the body outline kept by a structure map.
BODY = "body"
#: File structure names (compared stripped and case-folded) that mark the body outline.
BODY_NAMES = frozenset({"body", "external", "skin", "outline"})


class CaseFileError(ValueError):
    """A case file (or folder) that cannot be loaded: ``path`` names it, ``detail`` says what is wrong."""

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(self.path, detail)

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


@dataclass(frozen=True)
class DicomReference:
    """Who and where a DICOM case comes from, so exported objects (RT Dose) attach to the same patient and CT.

    UIDs are strings as in the files; an empty string is an attribute the CT did not carry.
    ``structure_set_sop_instance_uid`` is None when no RTSTRUCT was loaded.
    """

    patient_id: str
    patient_name: str
    study_instance_uid: str
    frame_of_reference_uid: str
    ct_series_instance_uid: str
    structure_set_sop_instance_uid: str | None = None


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular voxel grid. ``shape`` is (nz, ny, nx); spacings and origin are in mm, (z, y, x)."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cm³."""
        dz, dy, dx = self.spacing_mm
        return dz * dy * dx / 1000.0

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def coordinates_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along z, y and x (1-D arrays, mm)."""
        return tuple(  # type: ignore[return-value]
            o + s * np.arange(n, dtype=np.float64)
            for o, s, n in zip(self.origin_mm, self.spacing_mm, self.shape, strict=True)
        )


@dataclass(frozen=True, eq=False)
class Structure:
    """A named region of interest; ``mask`` is a boolean array of the grid's shape."""

    name: str
    role: Role
    mask: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True, eq=False)
class Case:
    """One patient (real or phantom).

    ``density`` is the relative electron density (water = 1.0) per voxel, float32, grid-shaped.
    ``rx_gy`` is the prescription dose in Gy to the target. ``reference`` is the DICOM identity of a case loaded
    from DICOM (None otherwise); it is not planning input, so :meth:`content_hash` ignores it.
    """

    case_id: str
    site: str
    grid: Grid
    density: np.ndarray
    structures: tuple[Structure, ...]
    rx_gy: float
    seed: int | None = None
    reference: DicomReference | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.structures]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate structure names in case {self.case_id}: {names}")
        if self.density.shape != self.grid.shape:
            raise ValueError(f"density shape {self.density.shape} != grid shape {self.grid.shape}")
        for s in self.structures:
            if s.mask.shape != self.grid.shape or s.mask.dtype != np.bool_:
                raise ValueError(f"structure {s.name}: mask must be bool with the grid's shape")

    def structure(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(f"case {self.case_id} has no structure {name!r}; it has {self.structure_names}")

    @property
    def structure_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.structures)

    @property
    def target(self) -> Structure:
        """The single target structure (the PTV)."""
        targets = [s for s in self.structures if s.role == "target"]
        if len(targets) != 1:
            raise ValueError(f"case {self.case_id} has {len(targets)} targets; exactly one is supported")
        return targets[0]

    @property
    def oars(self) -> tuple[Structure, ...]:
        return tuple(s for s in self.structures if s.role == "oar")

    def content_hash(self) -> str:
        """sha256 over the geometry, densities, masks and prescription: equal hash ⇔ same planning input."""
        h = hashlib.sha256()
        h.update(repr((self.grid.shape, self.grid.spacing_mm, self.grid.origin_mm, self.rx_gy)).encode())
        h.update(np.ascontiguousarray(self.density, dtype=np.float32).tobytes())
        for s in self.structures:
            h.update(f"{s.name}:{s.role}".encode())
            h.update(np.packbits(s.mask).tobytes())
        return h.hexdigest()


def is_body_name(name: str) -> bool:
    """``name`` (as in a file) names a body outline (:data:`BODY_NAMES`)."""
    return name.strip().casefold() in BODY_NAMES


def map_structures(
    path: str | os.PathLike[str],
    found: Sequence[str],
    structures: Mapping[str, str],
    external: Sequence[bool] = (),
) -> list[tuple[int, str, Role]]:
    """Resolve a structure map against a file's structure names ``found`` (file order).

    Returns ``(index into found, planner name, role)`` for each mapped structure in map order, then the body outline
    as :data:`BODY` (role "body") when it is present and not mapped. File names match stripped and case-insensitively.
    Roles: :data:`~m2m.physics.tpp.PTV` → "target", :data:`BODY` → "body", any other planner name → "oar". The body
    outline is the structure flagged in ``external`` (DICOM's EXTERNAL type), else the one named like
    :data:`BODY_NAMES`. A name missing from the file, a name matching two structures, or two body candidates
    raise :class:`CaseFileError` (naming ``path``).
    """
    keys = [n.strip().casefold() for n in found]
    picked: list[tuple[int, str, Role]] = []
    for planner, in_file in structures.items():
        hits = [i for i, k in enumerate(keys) if k == in_file.strip().casefold()]
        if not hits:
            raise CaseFileError(path, f"structure {in_file!r} (for {planner!r}) not found; found {list(found)}")
        if len(hits) > 1:
            raise CaseFileError(
                path, f"structure {in_file!r} (for {planner!r}) matches {len(hits)}: {[found[i] for i in hits]}"
            )
        role: Role = "target" if planner == PTV else "body" if planner == BODY else "oar"
        picked.append((hits[0], planner, role))
    if BODY in structures:
        return picked
    flagged = [i for i in range(len(found)) if i < len(external) and external[i]]
    candidates = flagged or [i for i, k in enumerate(keys) if k in BODY_NAMES]
    if any(i == j for i in candidates for j, _, _ in picked):
        return picked  # the body outline is mapped under another planner name
    if len(candidates) > 1:
        raise CaseFileError(
            path, f"{len(candidates)} body outlines {[found[i] for i in candidates]}: map the one to use as {BODY!r}"
        )
    return picked + [(i, BODY, "body") for i in candidates]
