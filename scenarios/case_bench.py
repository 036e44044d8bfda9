"""``m2m bench cases``: what planning a case from a file costs, stage by stage, on fresh caches.

For each case-file scenario: reading the file (DICOM parse and contour filling, or the matRad load), resampling to
the dose grid, a read from the case cache, the planning dij (TPP and protocol structures), a cold FMO from the
scenario's first initial TPPs, the median warm-started TPP step (one published step down on each of the first six
TPPs from that plan), and the body dose an RTDOSE export computes (:func:`m2m.physics.dose.dose_cube`); with the
grid sizes, the dij's non-zeros and the process's peak RSS. Every figure comes from one run; nothing is asserted.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from typing import Any

import numpy as np

from m2m.physics.beams import beams_for
from m2m.physics.dij_cache import CACHE_DIR_ENV
from m2m.physics.dose import dose_cube
from m2m.physics.optimizer import optimize
from m2m.physics.tpp import step
from m2m.scenarios import load_scenario
from m2m.scenarios.cases import load_file_case, scenario_bank

#: Warm-started steps timed per case.
WARM_STEPS = 6


def time_case(name: str) -> dict[str, Any]:
    """The stage times (s) and sizes of case-file scenario ``name``, with caches in a fresh temporary folder."""
    before = os.environ.get(CACHE_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="m2m-bench-cases-") as cache:
        os.environ[CACHE_DIR_ENV] = cache
        try:
            return _time_case(name)
        finally:
            if before is None:
                os.environ.pop(CACHE_DIR_ENV, None)
            else:
                os.environ[CACHE_DIR_ENV] = before


def _time_case(name: str) -> dict[str, Any]:
    sc = load_scenario(name)
    loaded = load_file_case(sc)
    t = time.perf_counter()
    load_file_case(sc)
    cached_s = time.perf_counter() - t
    case = loaded.case
    t = time.perf_counter()
    planning = scenario_bank(sc, [0], 1).get(0)
    dij_s = time.perf_counter() - t - cached_s  # the bank reads the case again, from the cache
    tpps = sc.initial_tpp_set(0)
    t = time.perf_counter()
    plan = optimize(planning.dij, tpps, sc.rx_gy)
    cold_s = time.perf_counter() - t
    warm = []
    for tpp in tpps.names()[:WARM_STEPS]:
        t = time.perf_counter()
        optimize(planning.dij, step(tpps, tpp, -1), sc.rx_gy, warm_start=plan.fluence)
        warm.append(time.perf_counter() - t)
    beams = beams_for(case, sc.beams.angles(), sc.beams.bixel_mm)
    t = time.perf_counter()
    dose_cube(case, beams, plan.fluence)
    body_s = time.perf_counter() - t
    return {
        "scenario": name, "file": loaded.path.name, "file_voxels": loaded.file_voxels, "grid": list(case.grid.shape),
        "spacing_mm": list(case.grid.spacing_mm), "read_s": loaded.load_s, "resample_s": loaded.resample_s,
        "cached_read_s": cached_s, "dij_s": dij_s, "dij_nnz": int(planning.dij.matrix.nnz),
        "dij_rows": planning.dij.n_rows, "beamlets": planning.dij.n_beamlets, "beams": beams.n_beams,
        "cold_fmo_s": cold_s, "warm_step_median_s": float(np.median(warm)), "body_dose_s": body_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
