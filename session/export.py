"""Export a finished session's final plan to the tools physicists use.

* ``dvh_initial.csv`` / ``dvh_final.csv`` (every case; written by :func:`m2m.session.folder.write_session_folder`):
  the cumulative DVH of every target and OAR (:func:`m2m.physics.dvh.dvh_csv`).
* ``rtdose.dcm`` (case-file scenarios, :func:`export_rtdose`): the final plan's dose as DICOM RT Dose on the planning
  grid (the CT's grid, or the dose grid the scenario resampled it to, in the CT's frame of reference), referencing the
  CT's study and frame of reference (:func:`m2m.physics.rtdose.write_rtdose`). Inside the structures the plan was
  optimised, scored or reported on, the dose is the plan's own (its dij rows, as in the session's DVHs); elsewhere in
  the body it is computed from the same fluence with the same beam model (:func:`m2m.physics.dose.dose_cube`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from m2m.physics.beams import beams_for
from m2m.physics.dose import dose_cube
from m2m.physics.rtdose import write_rtdose
from m2m.scenarios import Scenario
from m2m.scenarios.cases import load_file_case, phantom_bank

log = structlog.get_logger()

RTDOSE_FILE = "rtdose.dcm"


@dataclass(frozen=True)
class RtdoseExport:
    """The written file, the dose maximum (Gy) and the wall times (s) of loading the case and computing the dose."""

    path: Path
    dmax_gy: float
    load_s: float
    dose_s: float


def export_rtdose(folder: Path, scenario: Scenario, fluence: np.ndarray) -> RtdoseExport:
    """Write ``folder/rtdose.dcm``: the dose of beamlet weights ``fluence`` (the final plan's) on the case of
    case-file ``scenario`` (see the module docstring)."""
    started = time.perf_counter()
    loaded = load_file_case(scenario)
    case = loaded.case
    planning = phantom_bank(scenario, [0], 1, make=lambda _seed: case).get(0)  # the dose engine's dijs (cached)
    load_s = time.perf_counter() - started
    beams = beams_for(case, scenario.beams.angles(), scenario.beams.bixel_mm)
    fluence = np.asarray(fluence, dtype=np.float64)
    cube = dose_cube(case, beams, fluence)
    flat = cube.reshape(-1)
    for dij in (planning.dij, planning.report_dij):
        if dij is not None:
            flat[dij.voxel_index] = dij.dose(fluence)
    dose_s = time.perf_counter() - started - load_s
    path = write_rtdose(folder / RTDOSE_FILE, cube, case.grid, case.reference,
                        description=f"m2m final plan, scenario {scenario.name}")
    final = folder / "final.json"
    if final.is_file():  # list the file beside the others the session folder holds
        record = json.loads(final.read_text())
        record.setdefault("files", {})["rtdose"] = path.name
        final.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log.info("rtdose_exported", path=str(path), load_s=round(load_s, 2), dose_s=round(dose_s, 2))
    return RtdoseExport(path, float(cube.max()), load_s, dose_s)
