"""Load an axial CT series and its RTSTRUCT (DICOM) as a :class:`~m2m.physics.case.Case`.

Needs the optional dependency ``pydicom`` (``pip install 'm2m-planner[dicom]'``).

DICOM patient coordinates (head-first supine) match this project's: x towards the patient's left, y posterior,
z superior, in mm. ``origin_mm`` is the ImagePositionPatient of the most inferior slice, (z, y, x). Only one axial
series (one SeriesInstanceUID and FrameOfReferenceUID, ImageOrientationPatient = [1, 0, 0, 0, 1, 0], the same
in-plane geometry on every slice) with uniform slice spacing and no missing slice is accepted. Files that are not
DICOM at all (a README) are skipped; DICOM objects other than CT and RTSTRUCT (RTPLAN, RTDOSE, …) are ignored.

Density: HU (stored value · RescaleSlope + RescaleIntercept) → relative electron density with
:func:`m2m.physics.matrad.hu_to_red`.

Structures: each contour fills the voxels whose centres lie inside the polygon (CLOSED_PLANAR contours on a CT slice;
others are ignored); contours of one ROI on one slice combine by the even-odd rule (an inner contour is a hole).
Without a structure map, every ROI with at least one voxel is kept under its ROI name; role: RTROIInterpretedType
EXTERNAL → "body"; the target (``target`` argument, else the single ROI of type PTV, else the single ROI whose name
starts with "PTV") → "target"; all others → "oar". With a structure map ``{planner_name: ROI name}`` only the mapped
ROIs are kept, renamed (:func:`m2m.physics.case.map_structures`; the EXTERNAL ROI is the body outline), and each must
cover at least one voxel.

Bad input raises :class:`~m2m.physics.case.CaseFileError` naming the file, or the folder for a fault of the series.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from matplotlib.path import Path as Polygon

from m2m.physics.case import BODY, Case, CaseFileError, DicomReference, Grid, Role, Structure, map_structures
from m2m.physics.matrad import hu_to_red

log = structlog.get_logger()

_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_MODALITY_OF_CLASS = {CT_IMAGE_STORAGE: "CT", RT_STRUCTURE_SET_STORAGE: "RTSTRUCT"}
#: Tolerances (mm): slice positions on the uniform lattice, and in-plane geometry equal between slices.
_Z_TOL_MM = 1e-2
_XY_TOL_MM = 1e-3
_CT_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "PixelData")

Paths = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]


@dataclass(frozen=True)
class _File:
    """A DICOM object read from ``path``."""

    path: Path
    ds: Any


def load_dicom(
    paths: Paths,
    rx_gy: float,
    target: str | None = None,
    case_id: str | None = None,
    *,
    structures: Mapping[str, str] | None = None,
) -> Case:
    """Read the CT slices and the RTSTRUCT found in ``paths`` (a directory, or a list of files).

    ``rx_gy``: prescription (Gy) to the target; RTSTRUCT carries none. ``target``: ROI name of the target (without a
    structure map). ``structures``: ``{planner_name: ROI name}``, e.g. ``{"ptv": "PTV", "rectum": "Rectum"}``; see the
    module docstring. ``case_id`` defaults to the PatientID. The case's :attr:`~m2m.physics.case.Case.reference`
    keeps the patient, study, frame of reference, CT series and structure set UIDs.
    """
    if target is not None and structures is not None:
        raise ValueError("pass target or structures, not both: the structure map's 'ptv' is the target")
    where, files = _files(paths)
    cts, rtstructs = _read(files)
    if not cts:
        raise CaseFileError(where, f"no CT slices among {len(files)} files")
    if len(rtstructs) > 1:
        names = [f.path.name for f in rtstructs]
        raise CaseFileError(where, f"{len(rtstructs)} RTSTRUCT files {names}: pass the one to use with the CT files")
    if not rtstructs and (structures is not None or target is not None):
        raise CaseFileError(where, "no RTSTRUCT file, but structures were requested")

    for f in cts:
        _check_required(f)
    series_uid, frame_uid = (_one_value(cts, attr, where) for attr in ("SeriesInstanceUID", "FrameOfReferenceUID"))
    grid, hu = _ct_volume(cts, where)
    rs = rtstructs[0] if rtstructs else None
    kept: tuple[Structure, ...] = ()
    if rs is not None:
        _check_frame(rs, frame_uid)
        rois = _rois(rs)
        kept = _all_structures(rs, rois, grid, target) if structures is None else _mapped(rs, rois, grid, structures)
    first = cts[0].ds
    reference = DicomReference(
        patient_id=_text(first, "PatientID"),
        patient_name=_text(first, "PatientName"),
        study_instance_uid=_text(first, "StudyInstanceUID"),
        frame_of_reference_uid=frame_uid,
        ct_series_instance_uid=series_uid,
        structure_set_sop_instance_uid=_text(rs.ds, "SOPInstanceUID") if rs is not None else None,
    )
    name = case_id or reference.patient_id or "dicom"
    log.info("dicom_loaded", case=name, shape=grid.shape, structures=[s.name for s in kept])
    return Case(
        case_id=name,
        site="dicom",
        grid=grid,
        density=hu_to_red(hu),
        structures=kept,
        rx_gy=float(rx_gy),
        reference=reference,
    )


def _text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _files(paths: Paths) -> tuple[str, list[Path]]:
    """The files to read, and what messages about the whole series name: the folder (for a list of files, their
    common folder) or the single file."""
    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        if p.is_dir():
            return str(p), sorted(f for f in p.iterdir() if f.is_file())
        if not p.is_file():
            raise CaseFileError(p, "no such file or folder")
        return str(p), [p]
    files = [Path(p) for p in paths]
    if not files:
        raise CaseFileError("(no files)", "an empty list of DICOM files")
    for f in files:
        if not f.is_file():
            raise CaseFileError(f, "no such file")
    where = str(files[0]) if len(files) == 1 else os.path.commonpath([str(f.absolute().parent) for f in files])
    return where, files


def _read(files: list[Path]) -> tuple[list[_File], list[_File]]:
    """The CT slices and the RTSTRUCTs among ``files``; files that are not DICOM are skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    cts, rtstructs = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except InvalidDicomError:
            ds = _read_headerless(f)  # DICOM without the preamble and 'DICM' prefix, or not DICOM at all
        except Exception as e:  # pydicom raises many types on a damaged file that does start as DICOM
            raise CaseFileError(f, f"unreadable DICOM file: {e}") from e
        modality = _modality(ds) if ds is not None else ""
        if modality == "CT":
            cts.append(_File(f, ds))
        elif modality == "RTSTRUCT":
            rtstructs.append(_File(f, ds))
        else:
            log.debug("dicom_file_ignored", path=str(f), modality=modality or None)
    return cts, rtstructs


def _read_headerless(f: Path) -> Any:
    """``f`` read without the DICOM file header, or None when what it holds is not a DICOM object."""
    import pydicom

    try:
        ds = pydicom.dcmread(f, force=True)
        return ds if _modality(ds) else None
    except Exception:  # a README read as DICOM fails in arbitrary ways: it is simply not DICOM
        return None


def _modality(ds: Any) -> str:
    """Modality, else the one implied by the SOP class (a file cut before its Modality is still a CT slice)."""
    modality = _text(ds, "Modality").upper()
    if modality:
        return modality
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta is not None else "")
    return _MODALITY_OF_CLASS.get(sop_class, "")


def _one_value(cts: list[_File], keyword: str, where: str) -> str:
    """The single value of ``keyword`` over the CT slices ("" if none carries it); several values are an error."""
    counts = Counter(_text(f.ds, keyword) for f in cts)
    if len(counts) > 1:
        found = ", ".join(f"{uid or '(none)'} ({n} slices)" for uid, n in counts.most_common())
        raise CaseFileError(where, f"CT slices of {len(counts)} {keyword}s: {found}; pass the files of one series")
    return next(iter(counts))


def _ct_volume(cts: list[_File], where: str) -> tuple[Grid, np.ndarray]:
    """Grid and HU volume ([z, y, x], float32) of axial CT slices sorted inferior to superior."""
    for f in cts:
        _check_slice(f, cts[0])
    cts = sorted(cts, key=lambda f: float(f.ds.ImagePositionPatient[2]))
    z = np.array([float(f.ds.ImagePositionPatient[2]) for f in cts])
    slice_mm = _slice_spacing(cts, z, where)
    first = cts[0].ds
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    x0, y0 = float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1])
    hu = np.stack([_hu(f) for f in cts])
    nz, ny, nx = hu.shape
    grid = Grid(shape=(nz, ny, nx), spacing_mm=(slice_mm, row_mm, col_mm), origin_mm=(float(z[0]), y0, x0))
    return grid, hu


def _check_required(f: _File) -> None:
    """A CT slice carries the attributes the volume needs."""
    missing = [k for k in _CT_REQUIRED if k not in f.ds]
    if missing:
        raise CaseFileError(f.path, f"corrupt CT slice: it lacks {missing}")


def _check_slice(f: _File, ref: _File) -> None:
    """One CT slice is axial and has the in-plane geometry of ``ref``."""
    ds = f.ds
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        plane = np.array([*ds.ImagePositionPatient[:2], *ds.PixelSpacing, ds.Rows, ds.Columns], dtype=float)
        ref_plane = np.array([*ref.ds.ImagePositionPatient[:2], *ref.ds.PixelSpacing, ref.ds.Rows, ref.ds.Columns])
        float(ds.ImagePositionPatient[2])
    except (TypeError, ValueError, IndexError) as e:
        raise CaseFileError(f.path, f"corrupt CT slice: malformed geometry ({e})") from e
    if orientation.shape != (6,) or not np.allclose(orientation, _AXIAL, atol=1e-4):
        raise CaseFileError(f.path, f"only axial head-first CT is supported; orientation {orientation.tolist()}")
    if plane.shape != (6,) or not np.allclose(plane, ref_plane.astype(float), atol=_XY_TOL_MM):
        raise CaseFileError(
            f.path, f"in-plane geometry (x, y, row/column spacing, rows, columns) {plane.tolist()} differs from "
            f"{ref.path.name}'s {ref_plane.tolist()}"
        )


def _slice_spacing(cts: list[_File], z: np.ndarray, where: str) -> float:
    """The uniform slice step (mm) of sorted positions ``z``; a duplicate, missing or off-lattice slice is an error."""
    if len(z) == 1:
        return float(cts[0].ds.get("SliceThickness", 1.0) or 1.0)
    dz = np.diff(z)
    if dz.min() <= _Z_TOL_MM:
        k = int(np.argmin(dz))
        raise CaseFileError(
            where, f"two CT slices at z = {z[k]:.2f} mm: {cts[k].path.name}, {cts[k + 1].path.name}"
        )
    step = float(dz.min())
    multiples = np.rint(dz / step)
    if np.any(np.abs(dz - multiples * step) > _Z_TOL_MM):
        raise CaseFileError(where, f"slice positions are not uniformly spaced: steps {np.unique(np.round(dz, 3))} mm")
    if np.any(multiples > 1):
        missing = [z[i] + j * step for i in np.flatnonzero(multiples > 1) for j in range(1, int(multiples[i]))]
        shown = ", ".join(f"{m:.2f}" for m in missing[:20]) + (", …" if len(missing) > 20 else "")
        raise CaseFileError(where, f"{len(missing)} CT slices missing (step {step:.3g} mm) at z = {shown} mm")
    return float(dz.mean())


def _hu(f: _File) -> np.ndarray:
    """The slice's Hounsfield units ([y, x], float32)."""
    ds = f.ds
    try:
        stored = ds.pixel_array
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    except Exception as e:  # pydicom's pixel handlers raise many types on damaged or undecodable data
        raise CaseFileError(f.path, f"corrupt CT slice: cannot read its pixels ({e})") from e
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise CaseFileError(f.path, f"pixel array {stored.shape}: only single-frame CT slices are supported")
    return stored.astype(np.float32) * slope + intercept


def _check_frame(rs: _File, frame_uid: str) -> None:
    """The RTSTRUCT must refer to the CT's frame of reference when both name one."""
    refs = {_text(r, "FrameOfReferenceUID") for r in rs.ds.get("ReferencedFrameOfReferenceSequence", [])}
    refs |= {_text(r, "ReferencedFrameOfReferenceUID") for r in rs.ds.get("StructureSetROISequence", [])}
    refs.discard("")
    if frame_uid and refs and frame_uid not in refs:
        raise CaseFileError(rs.path, f"RTSTRUCT refers to frame of reference {sorted(refs)}; the CT is in {frame_uid}")


@dataclass(frozen=True)
class _Roi:
    """One ROI of an RTSTRUCT: its closed planar contours, points (n, 3) as DICOM x, y, z in mm."""

    number: int
    name: str
    kind: str
    contours: tuple[np.ndarray, ...]


def _rois(rs: _File) -> list[_Roi]:
    """The ROIs of ``rs`` in StructureSetROISequence order (ROIs only in ROIContourSequence follow)."""
    ds = rs.ds
    try:
        names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", [])}
        kinds = {
            int(o.ReferencedROINumber): _text(o, "RTROIInterpretedType").upper()
            for o in ds.get("RTROIObservationsSequence", [])
        }
        contours = {int(c.ReferencedROINumber): c.get("ContourSequence", []) for c in ds.get("ROIContourSequence", [])}
    except (AttributeError, TypeError, ValueError) as e:
        raise CaseFileError(rs.path, f"malformed RTSTRUCT ROI sequences: {e}") from e
    numbers = list(names) + [n for n in contours if n not in names]
    rois = []
    for n in numbers:
        name = names.get(n) or f"roi_{n}"
        polygons = tuple(
            _points(rs, name, c)
            for c in contours.get(n, [])
            if _text(c, "ContourGeometricType").upper() in ("", "CLOSED_PLANAR")
        )
        rois.append(_Roi(number=n, name=name, kind=kinds.get(n, ""), contours=polygons))
    return rois


def _points(rs: _File, name: str, contour: Any) -> np.ndarray:
    try:
        points = np.asarray(contour.ContourData, dtype=np.float64)
    except (AttributeError, TypeError, ValueError) as e:
        raise CaseFileError(rs.path, f"ROI {name!r}: unreadable ContourData ({e})") from e
    if points.ndim != 1 or points.size < 9 or points.size % 3 or not np.all(np.isfinite(points)):
        raise CaseFileError(rs.path, f"ROI {name!r}: ContourData of {points.size} values is not a polygon's x, y, z")
    return points.reshape(-1, 3)


def _mask(roi: _Roi, grid: Grid) -> np.ndarray:
    mask = np.zeros(grid.shape, dtype=bool)
    for points in roi.contours:
        _fill(mask, points, grid)
    return mask


def _all_structures(rs: _File, rois: list[_Roi], grid: Grid, target: str | None) -> tuple[Structure, ...]:
    """Every ROI with a voxel, under its own name (no structure map)."""
    masks: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for roi in rois:
        mask = _mask(roi, grid)
        if mask.any():
            masks[roi.name], kinds[roi.name] = mask, roi.kind
    if target is None:
        ptvs = [n for n in masks if kinds[n] == "PTV"] or [n for n in masks if n.upper().startswith("PTV")]
        target = ptvs[0] if len(ptvs) == 1 else None
    elif target not in masks:
        raise CaseFileError(rs.path, f"target ROI {target!r} not found; ROIs with contours: {sorted(masks)}")
    out = []
    for name, mask in masks.items():
        role: Role = "target" if name == target else "body" if kinds[name] == "EXTERNAL" else "oar"
        out.append(Structure(name=name, role=role, mask=mask))
    return tuple(out)


def _mapped(rs: _File, rois: list[_Roi], grid: Grid, structures: Mapping[str, str]) -> tuple[Structure, ...]:
    """The ROIs of a structure map, renamed; see :func:`m2m.physics.case.map_structures`."""
    picked = map_structures(rs.path, [r.name for r in rois], structures, [r.kind == "EXTERNAL" for r in rois])
    out = []
    for k, name, role in picked:
        roi = rois[k]
        mask = _mask(roi, grid)
        if not mask.any():
            if name == BODY and BODY not in structures:
                log.warning("dicom_body_empty", path=str(rs.path), roi=roi.name)
                continue
            raise CaseFileError(
                rs.path, f"ROI {roi.name!r} (for {name!r}) covers no voxel of the CT ({len(roi.contours)} contours)"
            )
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
