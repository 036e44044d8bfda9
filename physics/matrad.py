"""Load matRad ``.mat`` phantoms/patients (``ct`` + ``cst``) as a :class:`~m2m.physics.case.Case`.

matRad stores cubes as MATLAB arrays of size ``cubeDim = [rows(y), cols(x), slices(z)]`` and structure voxels as
1-based linear indices in column-major (Fortran) order over that shape. Both are converted to this project's
``[z, y, x]`` C-order arrays. ``origin_mm`` is taken from ``ct.z/y/x`` (voxel-centre coordinates) when present,
otherwise the first voxel centre is at ``resolution`` (matRad's default world coordinates).

Density: ``ct.cube`` (matRad's relative electron density cube) is used when present; otherwise ``ct.cubeHU`` is
converted by :func:`hu_to_red`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io as sio
import structlog

from m2m.physics.case import BODY, Case, CaseFileError, Grid, Role, Structure, is_body_name, map_structures

log = structlog.get_logger()

# HU → relative electron density, piecewise linear and clipped at the ends: air (−1000) to water (0) is the
# air/water mixing line; above 0 the slope drops to the tissue-to-cortical-bone line (1500 HU ≈ 1.8), continued to
# dense bone/metal-free maximum at 3000 HU.
HU_POINTS = (-1000.0, 0.0, 1500.0, 3000.0)
RED_POINTS = (0.0, 1.0, 1.8, 2.5)

SHARED_DATA_ENV = "M2M_SHARED_DATA"


def shared_data_dir() -> Path:
    """Directory of the shared reference phantoms: ``$M2M_SHARED_DATA`` or ``<repo root>/../shared/data``."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def hu_to_red(hu: np.ndarray) -> np.ndarray:
    """Relative electron density (water = 1) from Hounsfield units, float32 (see ``HU_POINTS``/``RED_POINTS``)."""
    return np.interp(np.asarray(hu, dtype=np.float64), HU_POINTS, RED_POINTS).astype(np.float32)


def load_matrad(
    path: str | os.PathLike[str], rx_gy: float | None = None, *, structures: Mapping[str, str] | None = None
) -> Case:
    """Read a matRad ``.mat`` file.

    Without ``structures``, every ``cst`` structure is kept under its matRad name: TARGET → role "target", a name like
    BODY/EXTERNAL (:data:`~m2m.physics.case.BODY_NAMES`) → role "body", anything else → "oar". With a structure map
    ``{planner_name: name_in_file}`` only the mapped structures are kept, renamed, plus the body outline (see
    :func:`~m2m.physics.case.map_structures`). ``rx_gy`` (Gy): if None, the reference dose of the target's first
    objective in ``cst`` (e.g. TG-119's SquaredDeviation at 50 Gy). Bad input raises
    :class:`~m2m.physics.case.CaseFileError` naming the file.
    """
    path = Path(path)
    mat = _read_mat(path)
    grid, density = _ct(path, mat)
    rows = [_cst_row(path, k, row, grid.shape) for k, row in enumerate(_cst(path, mat))]
    names = [r.name for r in rows]
    picked: list[tuple[int, str, Role]]
    if structures is None:
        if len(set(names)) != len(names):
            raise CaseFileError(path, f"duplicate structure names in cst: {names}")
        picked = [
            (k, r.name, "target" if r.kind == "TARGET" else "body" if is_body_name(r.name) else "oar")
            for k, r in enumerate(rows)
        ]
    else:
        picked = map_structures(path, names, structures)
    kept: list[Structure] = []
    target_rx: float | None = None
    for k, name, role in picked:
        row = rows[k]
        if structures is not None and row.voxels.size == 0:
            if role == "body" and BODY not in structures:
                log.warning("matrad_body_empty", path=str(path), structure=row.name)
                continue
            raise CaseFileError(path, f"structure {row.name!r} (for {name!r}) has no voxel")
        mask = np.zeros(grid.shape, dtype=bool)
        mask.flat[row.voxels] = True
        kept.append(Structure(name=name, role=role, mask=mask))
        if role == "target" and target_rx is None:
            target_rx = row.rx_gy

    rx = rx_gy if rx_gy is not None else target_rx
    if rx is None:
        raise CaseFileError(path, "no rx_gy given and no target objective dose in cst")
    log.info("matrad_loaded", path=str(path), shape=grid.shape, structures=[s.name for s in kept], rx_gy=rx)
    return Case(
        case_id=path.stem,
        site="matrad",
        grid=grid,
        density=density,
        structures=tuple(kept),
        rx_gy=float(rx),
    )


@dataclass(frozen=True, eq=False)
class _CstRow:
    """One ``cst`` row: name, type (upper case), its voxels (flat C-order indices into the case's [z, y, x] grid) and
    the dose (Gy) of its first objective or None."""

    name: str
    kind: str
    voxels: np.ndarray
    rx_gy: float | None


def _read_mat(path: Path) -> dict[str, Any]:
    if path.suffix.lower() != ".mat":
        raise CaseFileError(path, "not a matRad .mat file")
    try:
        return dict(sio.loadmat(str(path), squeeze_me=True, struct_as_record=False))
    except NotImplementedError:
        raise CaseFileError(path, "MATLAB v7.3 (HDF5) files are not supported: save it with -v7") from None
    except (OSError, ValueError, TypeError, IndexError, EOFError, sio.matlab.MatReadError) as e:
        raise CaseFileError(path, f"cannot read as a MATLAB file: {e}") from e


def _field(path: Path, obj: object, name: str, owner: str) -> Any:
    if not hasattr(obj, name):
        raise CaseFileError(path, f"{owner} has no field {name!r}")
    return getattr(obj, name)


def _ct(path: Path, mat: Mapping[str, Any]) -> tuple[Grid, np.ndarray]:
    """The grid and the relative electron density ([z, y, x], float32) of the file's ``ct``."""
    if "ct" not in mat:
        raise CaseFileError(path, f"no 'ct' variable (has {sorted(k for k in mat if not k.startswith('__'))})")
    ct = mat["ct"]
    try:
        ny, nx, nz = (int(v) for v in np.atleast_1d(_field(path, ct, "cubeDim", "ct")))
        res = _field(path, ct, "resolution", "ct")
        dz, dy, dx = (float(_field(path, res, a, "ct.resolution")) for a in "zyx")
        spacing = (dz, dy, dx)
        if all(hasattr(ct, a) for a in "xyz"):
            origin = (float(np.atleast_1d(ct.z)[0]), float(np.atleast_1d(ct.y)[0]), float(np.atleast_1d(ct.x)[0]))
        else:
            origin = spacing
    except (TypeError, ValueError, IndexError) as e:
        raise CaseFileError(path, f"malformed ct geometry (cubeDim, resolution, x/y/z): {e}") from e
    grid = Grid(shape=(nz, ny, nx), spacing_mm=spacing, origin_mm=origin)
    for name in ("cube", "cubeHU"):
        if hasattr(ct, name):
            cube = np.asarray(_first_scenario(getattr(ct, name)))
            if cube.shape != (ny, nx, nz) or not np.issubdtype(cube.dtype, np.number):
                raise CaseFileError(path, f"ct.{name} is {cube.dtype} {cube.shape}, cubeDim is {(ny, nx, nz)}")
            zyx = _to_zyx(cube, (ny, nx, nz))
            return grid, zyx.astype(np.float32) if name == "cube" else hu_to_red(zyx)
    raise CaseFileError(path, "ct has neither 'cube' nor 'cubeHU'")


def _cst(path: Path, mat: Mapping[str, Any]) -> np.ndarray:
    if "cst" not in mat:
        raise CaseFileError(path, f"no 'cst' variable (has {sorted(k for k in mat if not k.startswith('__'))})")
    # A one-row cell array loads squeezed to 1-D: one row of cells.
    return np.atleast_2d(np.asarray(mat["cst"], dtype=object))


def _cst_row(path: Path, k: int, row: object, shape: tuple[int, int, int]) -> _CstRow:
    """Row ``k`` of ``cst``: ``{index, name, type, voxel indices (1-based, column-major over (y, x, z)), …,
    objectives}``."""
    cells = np.atleast_1d(np.asarray(row, dtype=object))
    if cells.size < 4:
        raise CaseFileError(path, f"cst row {k + 1} has {cells.size} columns; needs index, name, type, voxels")
    name, kind = cells[1], cells[2]
    if not isinstance(name, str) or not name.strip() or not isinstance(kind, str):
        raise CaseFileError(path, f"cst row {k + 1}: name {name!r} and type {kind!r} must be text")
    nz, ny, nx = shape
    try:
        values = np.atleast_1d(_first_scenario(cells[3])).astype(np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise CaseFileError(path, f"cst row {k + 1} ({name}): voxel indices are not numbers") from e
    idx = values.astype(np.int64) - 1
    in_range = idx.size == 0 or (idx.min() >= 0 and idx.max() < nz * ny * nx)
    if not (in_range and np.array_equal(idx + 1, values)):
        raise CaseFileError(path, f"cst row {k + 1} ({name}): voxel indices must be integers in 1..{nz * ny * nx}")
    # Column-major linear index over (y, x, z) → (y, x, z) subscripts → C-order flat index over (z, y, x).
    iy, ix, iz = np.unravel_index(idx, (ny, nx, nz), order="F")
    voxels = np.ravel_multi_index((iz, iy, ix), shape)
    rx = _objective_dose(cells[5]) if cells.size > 5 else None
    return _CstRow(name=name, kind=kind.upper(), voxels=voxels, rx_gy=rx)


def _first_scenario(value: object) -> np.ndarray:
    """matRad keeps per-scenario cell arrays; the nominal scenario is the first element."""
    arr = np.asarray(value)
    if arr.dtype == object:
        return np.asarray(arr.flat[0])
    return arr


def _to_zyx(cube: np.ndarray, dims_yxz: tuple[int, int, int]) -> np.ndarray:
    """A MATLAB (y, x, z) cube as a C-contiguous (z, y, x) array."""
    if cube.shape != dims_yxz:
        raise ValueError(f"cube shape {cube.shape} does not match cubeDim {dims_yxz}")
    return np.ascontiguousarray(np.transpose(cube, (2, 0, 1)))


def _objective_dose(objectives: object) -> float | None:
    """Reference dose (Gy) of the first dose objective in a cst objective struct (or list of them)."""
    for obj in np.atleast_1d(np.asarray(objectives, dtype=object)):
        params = getattr(obj, "parameters", None)
        if params is None:
            continue
        first = np.atleast_1d(np.asarray(params, dtype=object))
        if first.size:
            try:
                return float(first[0])
            except (TypeError, ValueError):
                continue
    return None
