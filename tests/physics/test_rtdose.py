"""RT Dose export on the synthetic DICOM case: the file read back with pydicom itself and with read_rtdose, its
geometry and identity against the CT slices, the DVH as CSV, and (where dicompyler-core is installed) DVHs computed
by an independent DICOM-RT tool from the exported dose and the RTSTRUCT."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pydicom = pytest.importorskip("pydicom", reason="pydicom not installed (optional extra 'dicom')")

import support.synthetic_dicom as syn  # noqa: E402
from support.synthetic_dicom import SyntheticSeries  # noqa: E402

from m2m.physics import dvh  # noqa: E402
from m2m.physics.case import Case, CaseFileError, Grid  # noqa: E402
from m2m.physics.dicom import load_dicom  # noqa: E402
from m2m.physics.rtdose import read_rtdose, write_rtdose  # noqa: E402

STRUCTURES = {"ptv": "PTV", "bladder": "Bladder", "rectum": "Rectum"}
RX_GY = 60.0


def _case(series: SyntheticSeries) -> Case:
    return load_dicom(series.folder, rx_gy=RX_GY, structures=STRUCTURES)


def _plan_like_dose(grid: Grid) -> np.ndarray:
    """A smooth dose: a plateau of ≈ Rx around the PTV falling off sigmoidally, tilted along x; no symmetry."""
    z, y, x = np.meshgrid(*grid.coordinates_mm(), indexing="ij")
    r = np.sqrt((x - 1.0) ** 2 + (y - 4.0) ** 2 + (0.8 * (z - 3.75)) ** 2)
    return RX_GY / (1.0 + np.exp((r - 14.0) / 4.0)) + 0.02 * (x + 40.0)


def test_round_trip_through_pydicom_matches_the_ct(dicom_series: SyntheticSeries, tmp_path: Path) -> None:
    case = _case(dicom_series)
    dose = _plan_like_dose(case.grid)
    path = write_rtdose(tmp_path / "rd.dcm", dose, case.grid, case.reference, description="test plan")

    rd = pydicom.dcmread(path)
    ct0 = pydicom.dcmread(dicom_series.ct_files[0])
    cts = [pydicom.dcmread(f) for f in dicom_series.ct_files]
    # Dose: exact to the stored integer resolution.
    scaling = float(rd.DoseGridScaling)
    assert scaling == pytest.approx(dose.max() / (2**32 - 1), rel=1e-7)
    stored = rd.pixel_array.astype(np.float64) * scaling
    assert stored.shape == case.grid.shape
    assert np.abs(stored - dose).max() <= scaling / 2 + 1e-12 * dose.max()
    # Geometry against the CT slices: voxel [0, 0, 0]'s centre as DICOM (x, y, z), pixel spacing (row, column),
    # one frame per CT slice at its z relative to the first.
    assert [float(v) for v in rd.ImagePositionPatient] == pytest.approx([float(v) for v in ct0.ImagePositionPatient])
    assert [float(v) for v in rd.PixelSpacing] == pytest.approx([float(v) for v in ct0.PixelSpacing])
    assert [float(v) for v in rd.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    ct_z = sorted(float(ds.ImagePositionPatient[2]) for ds in cts)
    assert [float(v) for v in rd.GridFrameOffsetVector] == pytest.approx([z - ct_z[0] for z in ct_z])
    assert float(rd.SliceThickness) == pytest.approx(syn.DZ)
    assert (rd.NumberOfFrames, rd.Rows, rd.Columns) == (syn.NZ, syn.NY, syn.NX)
    assert rd.FrameIncrementPointer == pydicom.tag.Tag(0x3004, 0x000C)
    # Identity: the CT's patient, study and frame of reference; the RTSTRUCT referenced; a new instance and series.
    assert rd.FrameOfReferenceUID == ct0.FrameOfReferenceUID == dicom_series.frame_uid
    assert rd.StudyInstanceUID == ct0.StudyInstanceUID == dicom_series.study_uid
    assert (rd.PatientID, str(rd.PatientName)) == (syn.PATIENT_ID, syn.PATIENT_NAME)
    assert rd.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == dicom_series.structure_set_uid
    assert rd.SeriesInstanceUID not in {dicom_series.series_uid, ct0.SOPInstanceUID}
    assert rd.SeriesDescription == "test plan"
    # The RT Dose object itself.
    assert rd.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2" == rd.file_meta.MediaStorageSOPClassUID
    assert rd.SOPInstanceUID == rd.file_meta.MediaStorageSOPInstanceUID
    assert rd.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (rd.Modality, rd.DoseUnits, rd.DoseType, rd.DoseSummationType) == ("RTDOSE", "GY", "PHYSICAL", "PLAN")
    assert (rd.BitsAllocated, rd.BitsStored, rd.HighBit, rd.PixelRepresentation) == (32, 32, 31, 0)
    assert (rd.SamplesPerPixel, rd.PhotometricInterpretation) == (1, "MONOCHROME2")

    back, grid = read_rtdose(path)
    assert grid.shape == case.grid.shape
    assert grid.spacing_mm == pytest.approx(case.grid.spacing_mm)
    assert grid.origin_mm == pytest.approx(case.grid.origin_mm)
    np.testing.assert_allclose(back, dose, rtol=0, atol=scaling / 2 + 1e-12 * dose.max())


def test_zero_dose_and_no_reference(tmp_path: Path) -> None:
    grid = Grid(shape=(3, 4, 5), spacing_mm=(3.0, 2.5, 2.0), origin_mm=(-160.0, -250.0, 12.5))
    path = write_rtdose(tmp_path / "zero.dcm", np.zeros(grid.shape), grid, None)
    rd = pydicom.dcmread(path)
    assert float(rd.DoseGridScaling) == 1.0 and not rd.pixel_array.any()
    assert [float(v) for v in rd.ImagePositionPatient] == [12.5, -250.0, -160.0]  # (x, y, z) from (z, y, x)
    assert [float(v) for v in rd.PixelSpacing] == [2.5, 2.0]
    for uid in (rd.StudyInstanceUID, rd.FrameOfReferenceUID, rd.SeriesInstanceUID, rd.SOPInstanceUID):
        assert pydicom.uid.UID(uid).is_valid
    assert "ReferencedStructureSetSequence" not in rd
    dose, back = read_rtdose(path)
    assert not dose.any() and back.origin_mm == grid.origin_mm and back.spacing_mm == grid.spacing_mm


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
    max_gy=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_any_dose_round_trips_to_half_a_scaling_step(
    tmp_path: Path, shape: tuple[int, int, int], max_gy: float, seed: int
) -> None:
    dose = np.random.default_rng(seed).uniform(0.0, max_gy, size=shape)
    grid = Grid(shape=shape, spacing_mm=(2.5, 3.0, 3.0), origin_mm=(-10.0, 5.0, 7.5))
    path = write_rtdose(tmp_path / "any.dcm", dose, grid, None)
    back, back_grid = read_rtdose(path)
    scaling = float(pydicom.dcmread(path).DoseGridScaling)
    assert np.abs(back - dose).max() <= scaling / 2 + 1e-12 * max_gy
    assert back_grid.shape == shape and back_grid.origin_mm == pytest.approx(grid.origin_mm)


def test_bad_dose_and_bad_file(tmp_path: Path, dicom_series: SyntheticSeries) -> None:
    grid = Grid(shape=(2, 2, 2), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        write_rtdose(tmp_path / "x.dcm", np.zeros((2, 2, 3)), grid, None)
    with pytest.raises(ValueError, match="non-negative"):
        write_rtdose(tmp_path / "x.dcm", -np.ones(grid.shape), grid, None)
    with pytest.raises(ValueError, match="finite"):
        write_rtdose(tmp_path / "x.dcm", np.full(grid.shape, np.nan), grid, None)
    with pytest.raises(CaseFileError, match="not an RT Dose") as info:
        read_rtdose(dicom_series.ct_files[0])
    assert info.value.path == str(dicom_series.ct_files[0])


def test_dvh_csv_parses_back(dicom_series: SyntheticSeries) -> None:
    case = _case(dicom_series)
    dose = _plan_like_dose(case.grid)
    bins = dvh.report_bins_gy(case.rx_gy)
    curves = {s.name: 100.0 * dvh.cumulative_dvh(dose[s.mask], bins) for s in case.structures}
    curves["odd, name"] = curves["ptv"]  # a name needing CSV quoting
    text = dvh.dvh_csv(bins, curves)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["dose_gy", "ptv", "bladder", "rectum", "body", "odd, name"]
    assert len(rows) == 1 + bins.size
    assert rows[1][0] == "0.000" and rows[1][1] == "100.0000"
    table = np.array(rows[1:], dtype=float)
    np.testing.assert_allclose(table[:, 0], bins, atol=5e-4)
    for j, curve in enumerate(curves.values(), start=1):
        np.testing.assert_allclose(table[:, j], curve, atol=5e-5)
    assert all(len(r[0].split(".")[1]) == 3 and all(len(v.split(".")[1]) == 4 for v in r[1:]) for r in rows[1:])
    with pytest.raises(ValueError, match="'ptv' has 3 values"):
        dvh.dvh_csv(bins, {"ptv": np.zeros(3)})


@pytest.mark.filterwarnings("ignore:The 'pydicom.pixel_data_handlers' module:DeprecationWarning")
def test_dicompyler_dvh_of_the_exported_dose_agrees(
    dicom_series: SyntheticSeries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An independent DICOM-RT DVH (dicompyler-core) from the exported RT Dose and the RTSTRUCT against ours.

    Tolerances: both tools voxelise alike here (dose-grid voxel centres inside each contour polygon, holes by XOR,
    on the CT grid the dose is written on), so the volumes agree exactly and only dicompyler's 1 cGy histogram
    differs: its mean takes each voxel's dose at its bin centre (|Δ| ≤ 0.005 Gy), and its D95 is the lowest 1 cGy
    bin edge whose cumulative volume is nearest 95 % (no interpolation). With k = ceil(0.95·n), every edge between
    the (k+1)-th and the k-th hottest voxel's dose has the same volume k/n, so dicompyler reports the bottom of that
    gap where we report its top (the k-th hottest voxel's dose): its D95 lies in (d₍ₖ₊₁₎, d₍ₖ₎ + 0.01 Gy].
    """
    import pydicom.dicomio

    # dicompyler-core 0.5.6 imports pydicom.dicomio.read_file, which pydicom 3 removed: alias it before its import.
    monkeypatch.setattr(pydicom.dicomio, "read_file", pydicom.dcmread, raising=False)
    dvhcalc = pytest.importorskip(
        "dicompylercore.dvhcalc", reason="dicompyler-core not installed (pip install dicompyler-core==0.5.6)"
    )
    case = _case(dicom_series)
    dose = _plan_like_dose(case.grid)
    path = write_rtdose(tmp_path / "rd.dcm", dose, case.grid, case.reference)
    roi_numbers = {name: n for n, name in enumerate(syn.BOXES, start=1)}  # the order the RTSTRUCT was written in
    for planner, roi in (("ptv", "PTV"), ("rectum", "Rectum")):
        theirs = dvhcalc.get_dvh(str(dicom_series.rtstruct), str(path), roi_numbers[roi])
        ours = dose[case.structure(planner).mask]
        assert theirs.volume == pytest.approx(ours.size * case.grid.voxel_volume_cc, rel=1e-9)
        assert theirs.mean == pytest.approx(dvh.mean_gy(ours), abs=0.005 + 1e-6), planner
        coldest_first = np.sort(ours)
        k = math.ceil(0.95 * ours.size - 1e-9)
        top, bottom = coldest_first[ours.size - k], coldest_first[ours.size - k - 1]
        assert top == dvh.d_percent(ours, 95.0)
        d95 = float(theirs.dose_constraint(95).value)
        assert bottom < d95 <= top + 0.01 + 1e-9, (planner, bottom, d95, top)
