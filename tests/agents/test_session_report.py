"""The session folder holds readable plots and a trajectory that round-trips the step records."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from m2m.agents.session_report import StepRecord, dvh_bins, dvh_curves, write_session_folder


def _steps():
    return [
        StepRecord(0, 6.5, 9.0, {"t_ptv": 1.1, "lambda_rectum": 1.0}, ("rectum V70Gy",)),
        StepRecord(1, 8.0, 9.0, {"t_ptv": 1.1, "lambda_rectum": 1.65}, ("rectum V70Gy",), "raise lambda_rectum"),
        StepRecord(2, 9.0, 9.0, {"t_ptv": 1.0, "lambda_rectum": 1.65}, (), "lower t_ptv"),
    ]


def test_folder_has_plots_and_trajectory(tmp_path):
    rng = np.random.default_rng(0)
    dose = {"ptv": rng.normal(79.2, 1.0, 500), "rectum": rng.uniform(0, 75, 300)}
    bins = dvh_bins(79.2)
    paths = write_session_folder(
        tmp_path / "s", title="prostate-0000", steps=_steps(), dvh_bins_gy=bins, initial_dvh_pct=dvh_curves(dose, bins),
        final_dvh_pct=dvh_curves({k: v * 0.95 for k, v in dose.items()}, bins), rx_gy=79.2,
    )
    for key in ("dvh", "score", "tpps"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(paths["trajectory_csv"].open()))
    assert [r["action"] for r in rows] == ["", "raise lambda_rectum", "lower t_ptv"]
    assert float(rows[1]["lambda_rectum"]) == pytest.approx(1.65)
    final = json.loads(paths["final"].read_text())
    assert final["reached_max"] is True and final["steps"] == 2 and final["tpps"]["t_ptv"] == 1.0
    assert json.loads(paths["trajectory_json"].read_text())[1]["failing"] == ["rectum V70Gy"]


def test_dvh_curves_are_percent_of_volume():
    curves = dvh_curves({"ptv": np.array([10.0, 20.0, 30.0, 40.0])}, np.array([0.0, 15.0, 35.0, 50.0]))
    assert curves["ptv"].tolist() == [100.0, 75.0, 25.0, 0.0]


def test_session_must_start_at_step_zero(tmp_path):
    with pytest.raises(ValueError, match="step 0"):
        write_session_folder(tmp_path, title="x", steps=_steps()[1:], dvh_bins_gy=np.zeros(1), initial_dvh_pct={},
                             final_dvh_pct={}, rx_gy=1.0)
