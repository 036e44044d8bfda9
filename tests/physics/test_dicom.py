"""DICOM CT + RTSTRUCT loader on a synthetic series written with pydicom (skipped where pydicom is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom not installed (optional extra 'dicom')")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from m2m.physics.dicom import load_dicom  # noqa: E402

NZ, ROWS, COLS = 6, 40, 50
X0, Y0, Z0 = -60.0, -40.0, -7.5
DX, DY, DZ = 2.5, 2.0, 3.0
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
RS_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def _file_dataset(sop_class: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "synthetic-01"
    return ds


def _ct_slice(k: int, stored: np.ndarray) -> Dataset:
    ds = _file_dataset(CT_CLASS)
    ds.Modality = "CT"
    ds.ImagePositionPatient = [X0, Y0, Z0 + DZ * k]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [DY, DX]  # row spacing (y), column spacing (x)
    ds.SliceThickness = DZ
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return ds


def _square(half_x: float, half_y: float, z: float) -> list[float]:
    pts = [(-half_x, -half_y), (half_x, -half_y), (half_x, half_y), (-half_x, half_y)]
    return [v for x, y in pts for v in (x, y, z)]


def _rtstruct(rois: list[tuple[int, str, str, list[list[float]]]]) -> Dataset:
    ds = _file_dataset(RS_CLASS)
    ds.Modality = "RTSTRUCT"
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    ds.RTROIObservationsSequence = Sequence()
    for number, name, kind, contours in rois:
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        ds.StructureSetROISequence.append(roi)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType = number, number, kind
        ds.RTROIObservationsSequence.append(obs)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = Sequence()
        for data in contours:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(data) // 3
            c.ContourData = data
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    return ds


@pytest.fixture
def series(tmp_path: Path) -> Path:
    zs = [Z0 + DZ * k for k in range(NZ)]
    for k in (3, 0, 5, 1, 4, 2):  # written out of order: the loader sorts by position
        stored = np.full((ROWS, COLS), 1024, dtype=np.uint16)  # 0 HU
        if k == 2:
            stored[5, 7] = 1024 + 1500  # bone at x = X0 + 7·DX, y = Y0 + 5·DY, z = Z0 + 2·DZ
        _ct_slice(k, stored).save_as(tmp_path / f"ct_{k}.dcm", enforce_file_format=True)
    rois = [
        (1, "External", "EXTERNAL", [_square(41.0, 31.0, z) for z in zs]),
        (2, "PTV_70", "PTV", [_square(11.0, 9.0, z) for z in zs[1:4]]),
        (3, "Ring", "ORGAN", [_square(21.0, 21.0, zs[4]), _square(11.0, 11.0, zs[4]), _square(5.0, 5.0, 99.0)]),
    ]
    _rtstruct(rois).save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    return tmp_path


def test_ct_grid_density_and_orientation(series: Path) -> None:
    case = load_dicom(series, rx_gy=70.0)
    assert case.case_id == "synthetic-01" and case.rx_gy == 70.0
    assert case.grid.shape == (NZ, ROWS, COLS)
    assert case.grid.spacing_mm == pytest.approx((DZ, DY, DX))
    assert case.grid.origin_mm == pytest.approx((Z0, Y0, X0))
    assert case.density[2, 5, 7] == pytest.approx(1.8)  # 1500 HU
    assert np.count_nonzero(case.density != 1.0) == 1


def test_rtstruct_rasterisation_roles_and_holes(series: Path) -> None:
    case = load_dicom(series, rx_gy=70.0)
    roles = {s.name: (s.role, s.n_voxels) for s in case.structures}
    # Voxel centres strictly inside each square: x at X0 + 2.5 i, y at Y0 + 2 j.
    assert roles["PTV_70"] == ("target", 9 * 9 * 3)
    assert roles["Ring"] == ("oar", 17 * 21 - 9 * 11)  # outer square minus the hole; the off-slice contour is ignored
    assert roles["External"] == ("body", 33 * 31 * NZ)
    ptv = case.structure("PTV_70").mask
    assert ptv[1:4].any(axis=(1, 2)).all() and not ptv[[0, 4, 5]].any()
    assert not case.structure("Ring").mask[4, ROWS // 2, 24]  # centre of the hole: x = 0, y = 0


def test_explicit_target_and_unknown_target(series: Path) -> None:
    case = load_dicom(series, rx_gy=70.0, target="Ring", case_id="x")
    assert case.target.name == "Ring" and case.structure("PTV_70").role == "oar"
    with pytest.raises(KeyError, match="nope"):
        load_dicom(series, rx_gy=70.0, target="nope")
