"""Write (and read back) a dose cube as a DICOM RT Dose, so a plan's dose opens in any TPS or DICOM-RT viewer.

Needs the optional dependency ``pydicom`` (``pip install 'm2m-planner[dicom]'``).

One multi-frame RT Dose object (SOP class 1.2.840.10008.5.1.4.1.1.481.2), explicit VR little endian, physical dose
of the whole plan (DoseUnits GY, DoseType PHYSICAL, DoseSummationType PLAN) on the case grid: one frame per axial
slice, inferior to superior. Geometry in DICOM patient coordinates (x, y, z; the :class:`~m2m.physics.case.Grid`
keeps (z, y, x)):

* ImagePositionPatient = centre of voxel [0, 0, 0] = (origin_x, origin_y, origin_z) mm; ImageOrientationPatient
  [1, 0, 0, 0, 1, 0]; PixelSpacing = [row spacing (y), column spacing (x)] mm; SliceThickness = z spacing mm.
* GridFrameOffsetVector = z of each frame relative to the first, k · dz mm (FrameIncrementPointer → (3004,000C)).

Pixels are 32-bit unsigned integers ``q`` with ``dose_gy = q · DoseGridScaling``; ``DoseGridScaling`` ≈ max dose /
(2³² − 1) (rounded up to a DS value of at most 16 characters), 1 for an all-zero dose. The stored dose is therefore
exact to half a scaling step (≈ 1e-8 relative to the maximum).

Identity: the patient, StudyInstanceUID and FrameOfReferenceUID are those of the CT (``reference``, see
:attr:`m2m.physics.case.Case.reference`), and the RTSTRUCT is referenced when known; a case without a DICOM origin
(matRad, phantoms) gets new study and frame UIDs. The SOP instance and the series are always new. No RT Plan is
referenced: m2m writes none (the RT Dose module asks for one when DoseSummationType is PLAN; viewers do without).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import numpy as np
import structlog

from m2m.physics.case import CaseFileError, DicomReference, Grid

log = structlog.get_logger()

RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: (3004,000C) GridFrameOffsetVector: what FrameIncrementPointer points at.
GRID_FRAME_OFFSET_VECTOR_TAG = 0x3004000C
_UINT32_MAX = 2**32 - 1
_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_rtdose(
    path: str | os.PathLike[str],
    dose_gy: np.ndarray,
    grid: Grid,
    reference: DicomReference | None,
    *,
    description: str = "m2m plan",
) -> Path:
    """Write ``dose_gy`` (Gy per voxel, [z, y, x] on ``grid``) as a DICOM RT Dose file at ``path``; returns the path.

    ``reference``: the CT's identity (None: new study and frame of reference UIDs). ``description`` becomes the
    SeriesDescription. A dose of the wrong shape, negative or non-finite raises ValueError.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.tag import Tag
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.shape != grid.shape:
        raise ValueError(f"dose shape {dose.shape} != grid shape {grid.shape}")
    if not np.all(np.isfinite(dose)) or dose.min(initial=0.0) < 0:
        raise ValueError("dose must be finite and non-negative")
    scaling = _grid_scaling(float(dose.max(initial=0.0)))
    pixels = np.rint(dose / float(scaling)).astype("<u4")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(RT_DOSE_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    # SOP common, patient, study, series, frame of reference, equipment.
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "RTDOSE"
    ds.PatientID = reference.patient_id if reference else ""
    ds.PatientName = reference.patient_name if reference else ""
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyInstanceUID = (reference.study_instance_uid if reference else "") or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID = "", "", ""
    ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.FrameOfReferenceUID = (reference.frame_of_reference_uid if reference else "") or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "m2m"
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceNumber = 1

    # Image plane and multi-frame geometry.
    (z0, y0, x0), (dz, dy, dx) = grid.origin_mm, grid.spacing_mm
    nz, ny, nx = grid.shape
    ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z0)]
    ds.ImageOrientationPatient = [_ds(v) for v in _AXIAL]
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.SliceThickness = _ds(dz)
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = Tag(GRID_FRAME_OFFSET_VECTOR_TAG)
    ds.GridFrameOffsetVector = [_ds(k * dz) for k in range(nz)]

    # Image pixel and RT Dose.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.DoseGridScaling = scaling
    if reference is not None and reference.structure_set_sop_instance_uid:
        rs = Dataset()
        rs.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
        rs.ReferencedSOPInstanceUID = reference.structure_set_sop_instance_uid
        ds.ReferencedStructureSetSequence = Sequence([rs])
    ds.PixelData = pixels.tobytes()

    out = Path(path)
    ds.save_as(out, enforce_file_format=True)
    log.info("rtdose_written", path=str(out), shape=grid.shape, max_gy=float(dose.max(initial=0.0)), scaling=scaling)
    return out


def read_rtdose(path: str | os.PathLike[str]) -> tuple[np.ndarray, Grid]:
    """The dose (Gy, float64, [z, y, x], inferior to superior) and grid of an axial RT Dose file.

    Reads relative (first offset 0) and absolute GridFrameOffsetVectors and frames stored superior to inferior; a
    file that is not an axial RT Dose with uniform frame spacing raises :class:`~m2m.physics.case.CaseFileError`.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        if str(ds.get("Modality", "")).upper() != "RTDOSE":
            raise CaseFileError(path, f"not an RT Dose (Modality {ds.get('Modality')!r})")
        frames = ds.pixel_array.astype(np.float64) * float(ds.get("DoseGridScaling", 1.0))
        position = [float(v) for v in ds.ImagePositionPatient]
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        offsets = [float(v) for v in np.atleast_1d(ds.get("GridFrameOffsetVector", [0.0]))]
    except CaseFileError:
        raise
    except Exception as e:  # pydicom raises many types on damaged files or missing attributes
        raise CaseFileError(path, f"unreadable RT Dose: {e}") from e
    if not np.allclose(orientation, _AXIAL, atol=1e-4):
        raise CaseFileError(path, f"only axial RT Dose is supported; orientation {orientation}")
    frames = frames.reshape(n_frames, *frames.shape[-2:])
    z = _frame_z(path, position[2], offsets, n_frames)
    order = np.argsort(z)
    z = z[order]
    dz = np.diff(z)
    if n_frames > 1 and (dz.min() <= 0 or not np.allclose(dz, dz[0], atol=1e-2)):
        raise CaseFileError(path, f"frames are not uniformly spaced: steps {np.unique(np.round(dz, 3))} mm")
    slice_mm = float(dz.mean()) if n_frames > 1 else float(ds.get("SliceThickness", 1.0) or 1.0)
    grid = Grid(
        shape=(n_frames, frames.shape[1], frames.shape[2]),
        spacing_mm=(slice_mm, row_mm, col_mm),
        origin_mm=(float(z[0]), position[1], position[0]),
    )
    return np.ascontiguousarray(frames[order]), grid


def _frame_z(path: str | os.PathLike[str], z0: float, offsets: list[float], n_frames: int) -> np.ndarray:
    """z (mm) of each frame: offsets relative to ImagePositionPatient when the first is 0, else absolute."""
    if len(offsets) != n_frames:
        raise CaseFileError(path, f"GridFrameOffsetVector has {len(offsets)} values for {n_frames} frames")
    rel = np.asarray(offsets)
    return rel + z0 if rel[0] == 0.0 else rel


def _grid_scaling(max_gy: float) -> str:
    """DoseGridScaling as a DS string: max / (2³² − 1) rounded up to 9 significant digits (1 for zero dose)."""
    if max_gy <= 0:
        return "1"
    exact = max_gy / _UINT32_MAX
    # Nudge up before rounding to 9 digits so the written value is never below the exact one (no pixel overflows).
    return f"{exact * (1 + 1e-8):.8e}"


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS)."""
    return f"{value:.10g}"
