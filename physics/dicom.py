"""Load an axial CT series and its RTSTRUCT (DICOM) as a :class:`~m2m.physics.case.Case`.

Needs the optional dependency ``pydicom`` (``pip install 'm2m-planner[dicom]'``).

DICOM patient coordinates (head-first supine) match this project's: x towards the patient's left, y posterior,
z superior, in mm. ``origin_mm`` is the ImagePositionPatient of the most inferior slice, (z, y, x). Only axial
series (ImageOrientationPatient = [1, 0, 0, 0, 1, 0]) with uniform slice spacing are accepted.

Density: HU (stored value · RescaleSlope + RescaleIntercept) → relative electron density with
:func:`m2m.physics.matrad.hu_to_red`.

Structures: every ROI with at least one CLOSED_PLANAR contour on a CT slice. Each contour fills the voxels whose
centres lie inside the polygon; contours of one ROI on one slice combine by the even-odd rule (an inner contour is a
hole). Role: RTROIInterpretedType EXTERNAL → "body"; the target (``target`` argument, else the single ROI of type
PTV, else the single ROI whose name starts with "PTV") → "target"; all others → "oar".
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from matplotlib.path import Path as Polygon

from m2m.physics.case import Case, Grid, Role, Structure
from m2m.physics.matrad import hu_to_red

log = structlog.get_logger()

_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def load_dicom(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    rx_gy: float,
    target: str | None = None,
    case_id: str | None = None,
) -> Case:
    """Read the CT slices and the RTSTRUCT found in ``paths`` (a directory, or a list of files).

    ``rx_gy``: prescription (Gy) to the target; RTSTRUCT carries none. ``target``: ROI name of the target.
    """
    import pydicom

    files = _files(paths)
    cts, structs = [], []
    for f in files:
        ds = pydicom.dcmread(f, force=True)
        modality = str(getattr(ds, "Modality", ""))
        if modality == "CT":
            cts.append(ds)
        elif modality == "RTSTRUCT":
            structs.append(ds)
    if not cts:
        raise ValueError(f"no CT slices among {len(files)} files")
    if len(structs) > 1:
        raise ValueError(f"{len(structs)} RTSTRUCT files found; pass the one to use with the CT files")

    grid, hu = _ct_volume(cts)
    density = hu_to_red(hu)
    structures = _structures(structs[0], grid, target) if structs else ()
    name = case_id or str(getattr(cts[0], "PatientID", "") or "dicom")
    log.info("dicom_loaded", case=name, shape=grid.shape, structures=[s.name for s in structures])
    return Case(case_id=name, site="dicom", grid=grid, density=density, structures=structures, rx_gy=float(rx_gy))


def _files(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        return sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [Path(p) for p in paths]


def _ct_volume(cts: list[Any]) -> tuple[Grid, np.ndarray]:
    """Grid and HU volume ([z, y, x], float32) of axial CT slices sorted inferior to superior."""
    for ds in cts:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), _AXIAL, atol=1e-4):
            raise ValueError(f"only axial head-first CT is supported; orientation {list(ds.ImageOrientationPatient)}")
    cts = sorted(cts, key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in cts])
    if len(cts) > 1:
        dz = np.diff(z)
        if dz.min() <= 0 or not np.allclose(dz, dz[0], atol=1e-2):
            raise ValueError(f"slice positions are not uniformly spaced: steps {np.unique(np.round(dz, 3))} mm")
        slice_mm = float(dz.mean())
    else:
        slice_mm = float(getattr(cts[0], "SliceThickness", 1.0))
    row_mm, col_mm = (float(v) for v in cts[0].PixelSpacing)
    x0, y0 = float(cts[0].ImagePositionPatient[0]), float(cts[0].ImagePositionPatient[1])
    hu = np.stack(
        [ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1.0))
         + float(getattr(ds, "RescaleIntercept", 0.0)) for ds in cts]
    )
    nz, ny, nx = hu.shape
    grid = Grid(shape=(nz, ny, nx), spacing_mm=(slice_mm, row_mm, col_mm), origin_mm=(float(z[0]), y0, x0))
    return grid, hu


def _structures(rs: Any, grid: Grid, target: str | None) -> tuple[Structure, ...]:
    names = {int(r.ROINumber): str(r.ROIName) for r in getattr(rs, "StructureSetROISequence", [])}
    kinds = {
        int(o.ReferencedROINumber): str(getattr(o, "RTROIInterpretedType", "")).upper()
        for o in getattr(rs, "RTROIObservationsSequence", [])
    }
    masks: dict[str, np.ndarray] = {}
    for roi in getattr(rs, "ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        mask = np.zeros(grid.shape, dtype=bool)
        for contour in getattr(roi, "ContourSequence", []):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            _fill(mask, np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3), grid)
        if mask.any():
            masks[names.get(number, f"roi_{number}")] = mask
    by_kind = {names.get(n, ""): k for n, k in kinds.items()}
    if target is None:
        ptvs = [n for n in masks if by_kind.get(n) == "PTV"] or [n for n in masks if n.upper().startswith("PTV")]
        target = ptvs[0] if len(ptvs) == 1 else None
    elif target not in masks:
        raise KeyError(f"target ROI {target!r} not found; ROIs with contours: {sorted(masks)}")
    out = []
    for name, mask in masks.items():
        role: Role = "target" if name == target else "body" if by_kind.get(name) == "EXTERNAL" else "oar"
        out.append(Structure(name=name, role=role, mask=mask))
    return tuple(out)


def _fill(mask: np.ndarray, points: np.ndarray, grid: Grid) -> None:
    """XOR the voxels whose centres lie inside one planar contour (points (n, 3) as DICOM x, y, z in mm)."""
    (z0, y0, x0), (dz, dy, dx) = grid.origin_mm, grid.spacing_mm
    k = (points[0, 2] - z0) / dz
    iz = round(k)
    if abs(k - iz) > 0.25 or not 0 <= iz < grid.shape[0]:
        return  # not on a CT slice of this series
    cols = (points[:, 0] - x0) / dx
    rows = (points[:, 1] - y0) / dy
    r_lo, r_hi = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())), grid.shape[1] - 1)
    c_lo, c_hi = max(int(np.floor(cols.min())), 0), min(int(np.ceil(cols.max())), grid.shape[2] - 1)
    if r_lo > r_hi or c_lo > c_hi:
        return
    rr, cc = np.mgrid[r_lo : r_hi + 1, c_lo : c_hi + 1]
    inside = Polygon(np.column_stack([cols, rows])).contains_points(np.column_stack([cc.ravel(), rr.ravel()]))
    mask[iz, r_lo : r_hi + 1, c_lo : c_hi + 1] ^= inside.reshape(rr.shape)
