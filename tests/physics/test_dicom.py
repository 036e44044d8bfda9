"""DICOM CT + RTSTRUCT loader on synthetic series written with pydicom (skipped where pydicom is absent): geometry,
rasterisation and roles, the structure map, the DICOM identity kept, and every bad input as a CaseFileError."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom not installed (optional extra 'dicom')")

import support.synthetic_dicom as syn  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from support.synthetic_dicom import SyntheticSeries, file_dataset  # noqa: E402

from m2m.physics.case import CaseFileError, DicomReference  # noqa: E402
from m2m.physics.dicom import load_dicom  # noqa: E402
from m2m.physics.matrad import hu_to_red  # noqa: E402

NZ, ROWS, COLS = 6, 40, 50
X0, Y0, Z0 = -60.0, -40.0, -7.5
DX, DY, DZ = 2.5, 2.0, 3.0
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
RS_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


_STUDY, _FRAME = generate_uid(), generate_uid()


def _file_dataset(sop_class: str) -> Dataset:
    ds = file_dataset(sop_class, _STUDY, _FRAME)
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
    with pytest.raises(CaseFileError, match="nope"):
        load_dicom(series, rx_gy=70.0, target="nope")


# --- The synthetic prostate-like series of support.synthetic_dicom (fixtures in conftest.py) -------------------------

PROSTATE_MAP = {"ptv": " ptv", "bladder": "BLADDER", "rectum": "Rectum"}


def _edit(path: Path, **attributes: object) -> None:
    """Rewrite one DICOM file with some attributes replaced."""
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def test_structure_map_renames_assigns_roles_and_keeps_the_body(dicom_series: SyntheticSeries) -> None:
    case = load_dicom(dicom_series.folder, rx_gy=60.0, structures=PROSTATE_MAP)
    # Map order, then the EXTERNAL ROI as "body"; names matched case-insensitively and ignoring surrounding spaces.
    assert [(s.name, s.role) for s in case.structures] == [
        ("ptv", "target"), ("bladder", "oar"), ("rectum", "oar"), ("body", "body")
    ]
    expected = syn.expected_masks()
    for planner, roi in {"ptv": "PTV", "bladder": "Bladder", "rectum": "Rectum", "body": "Body"}.items():
        np.testing.assert_array_equal(case.structure(planner).mask, expected[roi], err_msg=planner)
    assert case.structure("ptv").n_voxels == 8 * 10 * 10
    assert case.target.name == "ptv" and [s.name for s in case.oars] == ["bladder", "rectum"]


def test_unmapped_load_keeps_every_roi_with_file_names(dicom_series: SyntheticSeries) -> None:
    case = load_dicom(dicom_series.folder, rx_gy=60.0)
    assert {s.name: s.role for s in case.structures} == {
        "Body": "body", "PTV": "target", "Bladder": "oar", "Rectum": "oar"
    }


def test_a_mapped_body_is_not_added_twice(dicom_series: SyntheticSeries) -> None:
    explicit = load_dicom(dicom_series.folder, rx_gy=60.0, structures={"ptv": "PTV", "body": "BODY"})
    assert [(s.name, s.role) for s in explicit.structures] == [("ptv", "target"), ("body", "body")]
    as_oar = load_dicom(dicom_series.folder, rx_gy=60.0, structures={"ptv": "PTV", "skin": "Body"})
    assert [(s.name, s.role) for s in as_oar.structures] == [("ptv", "target"), ("skin", "oar")]


def test_ct_grid_density_and_dicom_identity(dicom_series: SyntheticSeries) -> None:
    case = load_dicom(dicom_series.folder, rx_gy=60.0)
    assert case.grid.shape == (syn.NZ, syn.NY, syn.NX)
    assert case.grid.origin_mm == pytest.approx((syn.slice_z(0), -35.0, -39.0))
    block, body = syn.box_mask(syn.BLOCK), syn.box_mask(syn.BOXES["Body"])
    assert np.all(case.density[block] == hu_to_red(np.array([syn.BLOCK_HU]))[0])
    assert np.all(case.density[body & ~block] == 1.0) and np.all(case.density[~body] == 0.0)
    assert case.reference == DicomReference(
        patient_id=syn.PATIENT_ID,
        patient_name=syn.PATIENT_NAME,
        study_instance_uid=dicom_series.study_uid,
        frame_of_reference_uid=dicom_series.frame_uid,
        ct_series_instance_uid=dicom_series.series_uid,
        structure_set_sop_instance_uid=dicom_series.structure_set_uid,
    )
    # The reference is identity, not planning input.
    assert case.content_hash() == dataclasses.replace(case, reference=None).content_hash()


def test_non_dicom_files_are_skipped_and_a_file_list_loads(dicom_series: SyntheticSeries) -> None:
    (dicom_series.folder / "README").write_text("Exported from the TPS on Tuesday.\n" * 20)
    (dicom_series.folder / "notes.bin").write_bytes(np.random.default_rng(0).bytes(4000))
    case = load_dicom(dicom_series.folder, rx_gy=60.0, structures=PROSTATE_MAP)
    assert case.grid.shape == (syn.NZ, syn.NY, syn.NX)
    listed = load_dicom([*dicom_series.ct_files, dicom_series.rtstruct], rx_gy=60.0, structures=PROSTATE_MAP)
    assert listed.content_hash() == case.content_hash()


def _raises(paths: Path, match: str, structures: dict[str, str] | None = None) -> CaseFileError:
    """The CaseFileError loading ``paths`` raises (its message matching ``match``)."""
    with pytest.raises(CaseFileError, match=match) as info:
        load_dicom(paths, rx_gy=60.0, structures=structures)
    return info.value


def test_no_ct_slices(dicom_series: SyntheticSeries) -> None:
    for f in dicom_series.ct_files:
        f.unlink()
    (dicom_series.folder / "README").write_text("nothing here\n")
    err = _raises(dicom_series.folder, "no CT slices")
    assert err.path == str(dicom_series.folder) and str(err).startswith(f"{dicom_series.folder}: ")


def test_missing_folder(tmp_path: Path) -> None:
    assert _raises(tmp_path / "nope", "no such file").path == str(tmp_path / "nope")


def test_no_rtstruct_when_structures_are_requested(write_dicom: Callable[..., SyntheticSeries]) -> None:
    series = write_dicom(rtstruct=False)
    assert load_dicom(series.folder, rx_gy=60.0).structures == ()  # CT only: fine without a map
    assert _raises(series.folder, "no RTSTRUCT", structures=PROSTATE_MAP).path == str(series.folder)


def test_two_rtstructs(dicom_series: SyntheticSeries) -> None:
    assert dicom_series.rtstruct is not None
    shutil.copy(dicom_series.rtstruct, dicom_series.folder / "rs_copy.dcm")
    err = _raises(dicom_series.folder, "2 RTSTRUCT files", structures=PROSTATE_MAP)
    assert "rs_copy.dcm" in str(err) and err.path == str(dicom_series.folder)


def test_missing_slice_names_its_position(write_dicom: Callable[..., SyntheticSeries]) -> None:
    series = write_dicom(drop_slice=7)
    err = _raises(series.folder, "1 CT slices missing")
    assert f"{syn.slice_z(7):.2f}" in str(err) and err.path == str(series.folder)


def test_non_uniform_spacing_names_the_steps(dicom_series: SyntheticSeries) -> None:
    _edit(dicom_series.ct_files[-1], ImagePositionPatient=[-39.0, -35.0, syn.slice_z(syn.NZ - 1) + 1.0])
    err = _raises(dicom_series.folder, "not uniformly spaced")
    assert "3.5" in str(err) and "2.5" in str(err)


def test_two_slices_at_one_position(dicom_series: SyntheticSeries) -> None:
    _edit(dicom_series.ct_files[3], ImagePositionPatient=[-39.0, -35.0, syn.slice_z(2)])
    err = _raises(dicom_series.folder, "two CT slices at z")
    assert "ct_002.dcm" in str(err) and "ct_003.dcm" in str(err)


def test_mixed_series_lists_them(write_dicom: Callable[..., SyntheticSeries]) -> None:
    series = write_dicom(second_series=True)
    err = _raises(series.folder, "2 SeriesInstanceUIDs")
    assert series.series_uid in str(err) and "(12 slices)" in str(err)
    # The same series UID on every slice but two frames of reference is mixed too.
    for f in series.ct_files:
        _edit(f, SeriesInstanceUID=series.series_uid)
    err = _raises(series.folder, "2 FrameOfReferenceUIDs")
    assert series.frame_uid in str(err)


def test_non_axial_slice_is_named(dicom_series: SyntheticSeries) -> None:
    bad = dicom_series.ct_files[5]
    _edit(bad, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    assert _raises(dicom_series.folder, "only axial").path == str(bad)


def test_in_plane_geometry_must_match(dicom_series: SyntheticSeries) -> None:
    bad = dicom_series.ct_files[4]
    _edit(bad, PixelSpacing=[2.0, 2.5])
    assert _raises(dicom_series.folder, "in-plane geometry").path == str(bad)


def test_corrupt_ct_slice_is_named(dicom_series: SyntheticSeries) -> None:
    bad = dicom_series.ct_files[9]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 1000])  # pixel data cut short
    assert _raises(dicom_series.folder, "corrupt CT slice").path == str(bad)
    bad.write_bytes(data[:400])  # cut inside the header: a CT by its file meta, without its geometry
    assert _raises(dicom_series.folder, "corrupt CT slice").path == str(bad)


def test_missing_structure_lists_the_ones_found(dicom_series: SyntheticSeries) -> None:
    err = _raises(dicom_series.folder, "'Prostate' .*not found", structures={"ptv": "PTV", "prostate": "Prostate"})
    assert err.path == str(dicom_series.rtstruct)
    assert "['Body', 'PTV', 'Bladder', 'Rectum']" in err.detail


def test_a_name_matching_two_rois_is_an_error(write_dicom: Callable[..., SyntheticSeries]) -> None:
    series = write_dicom(extra_rois=[("RECTUM", "ORGAN", syn.BOXES["Rectum"])])
    err = _raises(series.folder, "matches 2", structures=PROSTATE_MAP)
    assert "'Rectum'" in err.detail and "'RECTUM'" in err.detail


def test_an_empty_mapped_structure_is_an_error(write_dicom: Callable[..., SyntheticSeries]) -> None:
    series = write_dicom(empty_roi="Rectum")
    assert _raises(series.folder, "'Rectum'.*covers no voxel", structures=PROSTATE_MAP).path == str(series.rtstruct)
    # A contour off the CT (z beyond the last slice) covers no voxel either.
    off = write_dicom(extra_rois=[("Seed", "ORGAN", (syn.NZ + 3, syn.NZ + 3, 1, 2, 1, 2))])
    with pytest.raises(CaseFileError, match=r"'Seed'.*covers no voxel"):
        load_dicom(off.folder, rx_gy=60.0, structures={"ptv": "PTV", "seed": "seed"})


def test_rtstruct_of_another_frame_of_reference(dicom_series: SyntheticSeries) -> None:
    assert dicom_series.rtstruct is not None
    ds = pydicom.dcmread(dicom_series.rtstruct)
    other = generate_uid()
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = other
    for roi in ds.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = other
    ds.save_as(dicom_series.rtstruct, enforce_file_format=True)
    err = _raises(dicom_series.folder, "frame of reference", structures=PROSTATE_MAP)
    assert err.path == str(dicom_series.rtstruct) and dicom_series.frame_uid in err.detail


def test_malformed_contour_data(dicom_series: SyntheticSeries) -> None:
    assert dicom_series.rtstruct is not None
    ds = pydicom.dcmread(dicom_series.rtstruct)
    ds.ROIContourSequence[1].ContourSequence[0].ContourData = [1.0, 2.0, 3.0, 4.0]
    ds.save_as(dicom_series.rtstruct, enforce_file_format=True)
    assert _raises(dicom_series.folder, "'PTV': ContourData").path == str(dicom_series.rtstruct)


def test_target_and_structures_together_is_a_usage_error(dicom_series: SyntheticSeries) -> None:
    with pytest.raises(ValueError, match="not both"):
        load_dicom(dicom_series.folder, rx_gy=60.0, target="PTV", structures=PROSTATE_MAP)


def test_two_body_outlines_must_be_resolved_by_the_map(write_dicom: Callable[..., SyntheticSeries]) -> None:
    series = write_dicom(extra_rois=[("Skin", "EXTERNAL", syn.BOXES["Body"])])
    err = _raises(series.folder, "2 body outlines", structures={"ptv": "PTV"})
    assert "'Body'" in err.detail and "'Skin'" in err.detail
    case = load_dicom(series.folder, rx_gy=60.0, structures={"ptv": "PTV", "body": "skin"})
    assert [(s.name, s.role) for s in case.structures] == [("ptv", "target"), ("body", "body")]
