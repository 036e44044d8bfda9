"""A small synthetic DICOM-RT case the tests write themselves: axial CT slices and an RTSTRUCT (needs pydicom).

Geometry: :data:`NZ` × :data:`NY` × :data:`NX` voxels at :data:`DZ` × :data:`DY` × :data:`DX` mm, slice 0's
ImagePositionPatient (DICOM x, y, z) = (:data:`X0`, :data:`Y0`, :data:`Z0`). The CT is air with a water box (the
body) holding a denser block (:data:`BLOCK_HU`). The RTSTRUCT has the ROIs Body (EXTERNAL), PTV (PTV), Bladder and
Rectum (ORGAN), each a box of voxels (:data:`BOXES`, inclusive voxel index ranges) drawn as one rectangle per slice
whose edges run half-way between voxel centres, so the voxels whose centres lie inside are exactly the box
(:func:`expected_masks`).

Options of :func:`write_series` make the faulty inputs a loader must reject: no RTSTRUCT, a missing slice, a second
series mixed in, an ROI without contours, extra ROIs (e.g. a name clashing case-insensitively).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

NZ, NY, NX = 24, 40, 40
DZ, DY, DX = 2.5, 2.0, 2.0
X0, Y0, Z0 = -39.0, -35.0, -28.75
AIR_HU, BODY_HU, BLOCK_HU = -1000, 0, 1000
RESCALE_INTERCEPT = -1024
PATIENT_ID, PATIENT_NAME = "SYN-001", "Synthetic^Prostate"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
RS_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

Box = tuple[int, int, int, int, int, int]
#: ROI name → (z_lo, z_hi, y_lo, y_hi, x_lo, x_hi), inclusive voxel indices. y grows posterior: the bladder lies
#: anterior of the PTV, the rectum posterior.
BOXES: dict[str, Box] = {
    "Body": (0, NZ - 1, 4, 35, 3, 36),
    "PTV": (8, 15, 15, 24, 15, 24),
    "Bladder": (9, 14, 8, 13, 16, 23),
    "Rectum": (6, 17, 26, 31, 17, 22),
}
KINDS = {"Body": "EXTERNAL", "PTV": "PTV", "Bladder": "ORGAN", "Rectum": "ORGAN"}
#: The dense block inside the body (voxel indices as in :data:`BOXES`).
BLOCK: Box = (0, NZ - 1, 18, 22, 5, 8)


@dataclass(frozen=True)
class SyntheticSeries:
    """What :func:`write_series` wrote: the folder, the CT files by slice index (absent slices left out), the
    RTSTRUCT (None when omitted) and the identifiers the files carry."""

    folder: Path
    ct_files: tuple[Path, ...]
    rtstruct: Path | None
    study_uid: str
    frame_uid: str
    series_uid: str
    structure_set_uid: str | None


def box_mask(box: Box, shape: tuple[int, int, int] = (NZ, NY, NX)) -> np.ndarray:
    """Boolean [z, y, x] mask of an inclusive voxel box."""
    z0, z1, y0, y1, x0, x1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def expected_masks() -> dict[str, np.ndarray]:
    """The voxels each ROI of :data:`BOXES` covers on the CT grid."""
    return {name: box_mask(box) for name, box in BOXES.items()}


def expected_hu() -> np.ndarray:
    """The CT's Hounsfield units, [z, y, x]."""
    hu = np.full((NZ, NY, NX), AIR_HU, dtype=np.float32)
    hu[box_mask(BOXES["Body"])] = BODY_HU
    hu[box_mask(BLOCK)] = BLOCK_HU
    return hu


def slice_z(k: int) -> float:
    """DICOM z (mm) of slice ``k``."""
    return Z0 + DZ * k


def write_series(
    folder: Path,
    *,
    rtstruct: bool = True,
    drop_slice: int | None = None,
    second_series: bool = False,
    empty_roi: str | None = None,
    extra_rois: Sequence[tuple[str, str, Box]] = (),
) -> SyntheticSeries:
    """Write the CT slices (``ct_<k>.dcm``) and the RTSTRUCT (``rs.dcm``) into ``folder`` (created).

    ``drop_slice``: leave that slice out (a gap). ``second_series``: the upper half of the slices carries another
    SeriesInstanceUID and FrameOfReferenceUID. ``empty_roi``: that ROI is listed but has no contour.
    ``extra_rois``: more ROIs, ``(name, RTROIInterpretedType, box)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, frame, series = generate_uid(), generate_uid(), generate_uid()
    other_frame, other_series = generate_uid(), generate_uid()
    hu = expected_hu()
    files = []
    for k in range(NZ):
        if k == drop_slice:
            continue
        upper = second_series and k >= NZ // 2
        ds = _ct_slice(k, hu[k], study, other_frame if upper else frame, other_series if upper else series)
        path = folder / f"ct_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    rs_path, rs_uid = None, None
    if rtstruct:
        rois = [(name, KINDS[name], box) for name, box in BOXES.items()] + list(extra_rois)
        rs = _rtstruct(rois, study, frame, empty_roi)
        rs_path, rs_uid = folder / "rs.dcm", str(rs.SOPInstanceUID)
        rs.save_as(rs_path, enforce_file_format=True)
    return SyntheticSeries(
        folder=folder,
        ct_files=tuple(files),
        rtstruct=rs_path,
        study_uid=study,
        frame_uid=frame,
        series_uid=series,
        structure_set_uid=rs_uid,
    )


def file_dataset(sop_class: str, study: str, frame: str) -> Dataset:
    """An empty DICOM file of ``sop_class`` (explicit VR little endian file meta, a new SOP instance UID) in study
    ``study`` and frame of reference ``frame``, for the synthetic patient."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
    ds.StudyInstanceUID = study
    ds.FrameOfReferenceUID = frame
    ds.StudyDate, ds.StudyTime = "20240102", "090000"
    return ds


def _ct_slice(k: int, hu: np.ndarray, study: str, frame: str, series: str) -> Dataset:
    ds = file_dataset(CT_CLASS, study, frame)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [X0, Y0, slice_z(k)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [DY, DX]  # row spacing (y), column spacing (x)
    ds.SliceThickness = DZ
    ds.Rows, ds.Columns = NY, NX
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, RESCALE_INTERCEPT
    ds.PixelData = (hu - RESCALE_INTERCEPT).astype(np.uint16).tobytes()
    return ds


def _rectangle(box: Box, k: int) -> list[float]:
    """The slice-``k`` outline of ``box`` as ContourData: edges half-way between voxel centres."""
    _, _, y_lo, y_hi, x_lo, x_hi = box
    xa, xb = X0 + DX * (x_lo - 0.5), X0 + DX * (x_hi + 0.5)
    ya, yb = Y0 + DY * (y_lo - 0.5), Y0 + DY * (y_hi + 0.5)
    return [v for x, y in ((xa, ya), (xb, ya), (xb, yb), (xa, yb)) for v in (x, y, slice_z(k))]


def _rtstruct(rois: Sequence[tuple[str, str, Box]], study: str, frame: str, empty_roi: str | None) -> Dataset:
    ds = file_dataset(RS_CLASS, study, frame)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "synthetic"
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref])
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    for number, (name, kind, box) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType = number, number, kind
        ds.RTROIObservationsSequence.append(obs)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = [255, 0, 0]
        if name != empty_roi:
            rc.ContourSequence = DicomSequence()
            for k in range(box[0], box[1] + 1):
                c = Dataset()
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = 4
                c.ContourData = _rectangle(box, k)
                rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    return ds


#: A user-written protocol on the synthetic case's structures (PTV hot spot, bladder mean dose, rectum V50Gy).
USER_PROTOCOL = """
name = "synthetic"
description = "a user-written protocol: PTV hot spot, bladder mean dose, rectum V50Gy"

[[criteria]]
structure = "ptv"
metric = "D0.03cc"
unit = "%Rx"
limit = 107.0
zero = 110.0

[[criteria]]
structure = "bladder"
metric = "Dmean"
unit = "Gy"
limit = 30.0
zero = 40.0

[[criteria]]
structure = "rectum"
metric = "V50Gy"
unit = "%"
limit = 20.0
zero = 40.0
"""
