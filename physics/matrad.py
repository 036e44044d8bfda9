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
from pathlib import Path

import numpy as np
import scipy.io as sio
import structlog

from m2m.physics.case import Case, Grid, Role, Structure

log = structlog.get_logger()

# HU → relative electron density, piecewise linear and clipped at the ends: air (−1000) to water (0) is the
# air/water mixing line; above 0 the slope drops to the tissue-to-cortical-bone line (1500 HU ≈ 1.8), continued to
# dense bone/metal-free maximum at 3000 HU.
HU_POINTS = (-1000.0, 0.0, 1500.0, 3000.0)
RED_POINTS = (0.0, 1.0, 1.8, 2.5)

_BODY_NAMES = {"body", "external", "skin", "outline"}

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


def load_matrad(path: str | os.PathLike[str], rx_gy: float | None = None) -> Case:
    """Read a matRad ``.mat`` file.

    Structures keep their matRad names; TARGET → role "target", a name like BODY/EXTERNAL → role "body", anything
    else → "oar". ``rx_gy`` (Gy): if None, the reference dose of the first target objective in ``cst`` (e.g. TG-119's
    SquaredDeviation at 50 Gy); a ValueError if there is none.
    """
    path = Path(path)
    mat = sio.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    ct = mat["ct"]
    cst = np.atleast_2d(mat["cst"])
    ny, nx, nz = (int(v) for v in np.atleast_1d(ct.cubeDim))
    res = ct.resolution
    spacing = (float(res.z), float(res.y), float(res.x))
    if all(hasattr(ct, a) for a in ("x", "y", "z")):
        origin = (float(np.atleast_1d(ct.z)[0]), float(np.atleast_1d(ct.y)[0]), float(np.atleast_1d(ct.x)[0]))
    else:
        origin = spacing
    grid = Grid(shape=(nz, ny, nx), spacing_mm=spacing, origin_mm=origin)

    if hasattr(ct, "cube"):
        density = _to_zyx(_first_scenario(ct.cube), (ny, nx, nz)).astype(np.float32)
    elif hasattr(ct, "cubeHU"):
        density = hu_to_red(_to_zyx(_first_scenario(ct.cubeHU), (ny, nx, nz)))
    else:
        raise ValueError(f"{path}: ct has neither 'cube' nor 'cubeHU'")

    structures = []
    target_rx: float | None = None
    for row in cst:
        name = str(row[1])
        kind = str(row[2]).upper()
        role: Role = "target" if kind == "TARGET" else "body" if name.lower() in _BODY_NAMES else "oar"
        idx = np.atleast_1d(_first_scenario(row[3])).astype(np.int64) - 1
        # Column-major linear index over (y, x, z) → (y, x, z) subscripts → C-order flat index over (z, y, x).
        iy, ix, iz = np.unravel_index(idx, (ny, nx, nz), order="F")
        mask = np.zeros((nz, ny, nx), dtype=bool)
        mask[iz, iy, ix] = True
        structures.append(Structure(name=name, role=role, mask=mask))
        if role == "target" and target_rx is None:
            target_rx = _objective_dose(row[5]) if len(row) > 5 else None

    rx = rx_gy if rx_gy is not None else target_rx
    if rx is None:
        raise ValueError(f"{path}: no rx_gy given and no target objective dose in cst")
    log.info("matrad_loaded", path=str(path), shape=grid.shape, structures=[s.name for s in structures], rx_gy=rx)
    return Case(
        case_id=path.stem,
        site="matrad",
        grid=grid,
        density=density,
        structures=tuple(structures),
        rx_gy=float(rx),
    )


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
