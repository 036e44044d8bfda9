"""``m2m plan --case-file``: a DICOM case the test writes itself, a user-written protocol, planned on the bus like any
other case; the session folder gains the final dose as RTDOSE on the CT's frame and every DVH as CSV. Bad input is
refused in one line, before any stack starts."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from support.procs import run_m2m
from support.stacks import stack_toml

from m2m.scenarios import load_scenario
from m2m.scenarios.cases import load_file_case

pydicom = pytest.importorskip("pydicom", reason="pydicom not installed (optional extra 'dicom')")
from support.synthetic_dicom import USER_PROTOCOL as PROTOCOL  # noqa: E402
from support.synthetic_dicom import write_series  # noqa: E402

ROLES = "ptv=PTV,bladder=bladder,rectum=RECTUM"  # names in the file: PTV, Bladder, Rectum (matched ignoring case)


def _no_stack(tmp: Path) -> list[str]:
    return ["--connect", f"ipc://{tmp}/none", "--pub-connect", f"ipc://{tmp}/pub"]


@pytest.mark.slow
def test_a_dicom_case_file_is_planned_on_the_bus_and_exported_as_rtdose_and_csv() -> None:
    d = Path(tempfile.mkdtemp(prefix="m2mcf", dir="/tmp"))
    try:
        series = write_series(d / "patient")
        (d / "protocol.toml").write_text(PROTOCOL)
        config = d / "stack.toml"
        config.write_text(stack_toml(d, planner="drl", endpoints=True))
        done = run_m2m("plan", "--case-file", str(series.folder), "--protocol", str(d / "protocol.toml"),
                       "--roles", ROLES, "--rx-gy", "60", "--dose-grid-mm", "4", "--beams", "5", "--step-cap", "2",
                       "--config", str(config), "--out", str(d / "runs"),
                       "--connect", f"ipc://{d}/bus", "--pub-connect", f"ipc://{d}/pub")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "rtdose.dcm: final dose" in done.stdout
        folder = Path(done.stdout.strip().splitlines()[-1].removeprefix("session folder: "))
        final = json.loads((folder / "final.json").read_text())
        assert final["files"]["rtdose"] == "rtdose.dcm" and final["max_score"] == 3.0
        scenario = load_scenario(final["scenario"])  # registered under a name of its own
        assert scenario.case is not None and dict(scenario.case.structures)["rectum"] == "RECTUM"

        # RTDOSE: the CT's study and frame of reference, the 4 mm dose grid, the plan's own dose in its structures.
        ds = pydicom.dcmread(folder / "rtdose.dcm")
        assert (ds.Modality, ds.DoseUnits, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (
            "RTDOSE", "GY", series.study_uid, series.frame_uid)
        case = load_file_case(scenario).case
        dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
        assert dose.shape == case.grid.shape and [float(v) for v in ds.PixelSpacing] == [4.0, 4.0]
        z, y, x = case.grid.origin_mm
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([x, y, z])
        for name, metrics in final["dose_metrics"].items():
            in_structure = dose[case.structure(name).mask]
            assert in_structure.max() == pytest.approx(metrics["dmax_gy"], abs=1e-3), name
            assert in_structure.mean() == pytest.approx(metrics["dmean_gy"], abs=1e-3), name

        # DVH CSV: dose column, one column per structure, the final plan's curve (100 % at 0 Gy).
        rows = list(csv.reader((folder / "dvh_final.csv").open()))
        assert rows[0] == ["dose_gy", "ptv", "bladder", "rectum"]
        assert [float(v) for v in rows[1][1:]] == [100.0, 100.0, 100.0]
        assert (folder / "dvh_initial.csv").is_file()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_bad_case_files_are_refused_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    series = write_series(tmp_path / "patient")
    no_rs = write_series(tmp_path / "no_rs", rtstruct=False)
    (tmp_path / "protocol.toml").write_text(PROTOCOL)
    bad_protocol = tmp_path / "bad_protocol.toml"
    bad_protocol.write_text(PROTOCOL.replace('metric = "Dmean"', 'metric = "Dmedian"'))
    no_cst = tmp_path / "no_cst.mat"
    no_cst.write_bytes(b"MATLAB 5.0 MAT-file, not really")
    protocol = ["--protocol", str(tmp_path / "protocol.toml")]
    cases = [
        (["--case-file", str(series.folder), *protocol, "--roles", "ptv=PTV,bladder=Bladder,rectum=Prostate",
          "--rx-gy", "60"],
         "structure 'Prostate' (for 'rectum') not found; found ['Body', 'PTV', 'Bladder', 'Rectum']"),
        (["--case-file", str(series.folder), *protocol, "--roles", "ptv=PTV,bladder=Bladder", "--rx-gy", "60"],
         'protocol synthetic scores ["rectum"], which the [case.structures] map does not have'),
        (["--case-file", str(no_rs.folder), *protocol, "--roles", ROLES, "--rx-gy", "60"], "no RTSTRUCT"),
        (["--case-file", str(series.folder), "--protocol", str(bad_protocol), "--roles", ROLES, "--rx-gy", "60"],
         f"{bad_protocol}: criteria[1]: unknown metric 'Dmedian'"),
        (["--case-file", str(series.folder), *protocol, "--roles", ROLES], "--rx-gy is needed for a DICOM case"),
        (["--case-file", str(series.folder), *protocol, "--roles", "ptv"], "--roles: 'ptv' is not planner_name="),
        (["--case-file", str(no_cst), *protocol, "--roles", "ptv=PTV,rectum=Rectum"], str(no_cst)),
        (["--protocol", "prostate-basic"], "--protocol needs --case-file"),
    ]
    for args, message in cases:
        done = run_m2m("plan", *args, *_no_stack(tmp_path), timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (message, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
