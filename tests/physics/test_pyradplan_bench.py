"""``m2m bench physics`` and its optional pyRadPlan comparison.

The first tests need no pyRadPlan (they run in CI); the last ones run only where the ``pyradplan`` extra is
installed (``.venv-pyradplan``, see the README).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from m2m.physics import bench
from m2m.physics.gamma import gamma_index


def test_not_installed_keeps_the_single_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    rows = bench._pyradplan(skip=False, seed=1000)
    assert [(r.what, r.value) for r in rows] == [("pyRadPlan", "not installed")]


def test_skip_flag_and_failure_are_reported_as_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert [(r.what, r.value) for r in bench._pyradplan(skip=True, seed=1000)] == [("pyRadPlan", "skipped")]

    def broken(seed: int | None) -> None:
        raise RuntimeError("pydantic 2.14 breaks calc_dose_influence")

    fake = types.ModuleType("m2m.physics.pyradplan_bench")
    fake.run = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "m2m.physics.pyradplan_bench", fake)
    monkeypatch.setattr("m2m.physics.pyradplan_bench", fake, raising=False)
    rows = bench._pyradplan(skip=False, seed=1000)
    assert rows[0].value == "failed" and "pydantic 2.14" in rows[0].note


def test_rows_show_both_engines_side_by_side() -> None:
    ref = np.full((6, 6, 6), 80.0)
    g = gamma_index(ref, 1.02 * ref, (3.0, 3.0, 3.0), norm_dose=79.2)
    gammas = {"3%/3mm": g, "2%/2mm": g}
    metrics = {"PTV D98": 78.0, "PTV D2": 80.0}
    c = SimpleNamespace(
        version="0.5.0", seed=1000, n_beams=7, bixel_mm=5.0, body_voxels=400_000, ours_dij_s=10.0,
        ours_beamlets=874, ours_dij_nnz=14_600_000, ours_planner_dij_s=0.5, ours_planner_rows=12_000,
        ours_planner_nnz=2_000_000, prp_stf_s=0.5, prp_dij_s=79.5, prp_beamlets=974, matched_beamlets=874,
        prp_dij_nnz=81_600_000, prp_voxels=338_000, dij_ratio=8.0, calibration_ratio=0.87,
        beam_ratio=(0.93, 0.87), gamma=gammas, gamma_ptv=gammas, gamma_open=gammas, gamma_open_ptv=gammas,
        dvh={k: (v, v + 1) for k, v in metrics.items()}, prp_opt_s=90.0, prp_opt_iterations=300, max_iterations=300,
        ours_opt_on_prp_s=2.0, ours_opt_on_prp_evaluations=84, ours_opt_s=1.0, ours_opt_evaluations=141,
        prp_plan_dvh=metrics, ours_on_prp_plan_dvh=metrics,
    )
    rows = {r.what: r for r in bench.pyradplan_rows(c)}
    assert rows["ratio dij time pyRadPlan / ours"].value == "8.0"
    assert rows["gamma 3%/3mm, our optimised fluence"].value == "100.0 %"
    assert rows["gamma 2%/2mm, open fields"].value == "100.0 %"
    assert rows["ratio FMO pyRadPlan / ours (same dij)"].value == "45"
    assert "PTV D2 80.0 | 81.0" in rows["DVH, our fluence: ours | pyRadPlan"].note


needs_pyradplan = pytest.mark.skipif(importlib.util.find_spec("pyRadPlan") is None,
                                     reason="pyRadPlan (extra 'pyradplan') not installed")


@needs_pyradplan
def test_density_survives_the_hu_round_trip() -> None:
    from pyRadPlan.ct import default_hlut

    from m2m.physics.phantoms import make_case
    from m2m.physics.pyradplan_bench import density_to_hu

    case = make_case("prostate", 1000)
    hu = density_to_hu(case.density)
    back = np.interp(hu, default_hlut()[:, 0], default_hlut()[:, 1])
    body = case.density > 0.01
    np.testing.assert_allclose(back[body], case.density[body], atol=1e-4)
    assert np.all(back[~body] <= 0.001 + 1e-9)


@needs_pyradplan
def test_every_bixel_of_ours_has_exactly_one_pyradplan_partner() -> None:
    from pyRadPlan import PhotonPlan, generate_stf

    from m2m.physics.beams import beams_for, bixel_grid
    from m2m.physics.phantoms import make_case
    from m2m.physics.pyradplan_bench import column_map, matched_isocentres, quiet_progress, to_pyradplan

    case = make_case("prostate", 1000)
    beams = beams_for(case)
    ct, cst = to_pyradplan(case)
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {"gantry_angles": list(beams.gantry_deg), "couch_angles": [0.0] * beams.n_beams,
                    "bixel_width": beams.bixel_mm, "iso_center": matched_isocentres(beams)}
    with quiet_progress():
        stf = generate_stf(ct, cst, pln)
    beam_num = np.concatenate([np.full(len(b.rays), i) for i, b in enumerate(stf.beams)])
    ray_num = np.concatenate([np.arange(len(b.rays)) for b in stf.beams])
    cols = column_map(case, beams, stf, beam_num, ray_num)
    n_ours = sum(bixel_grid(case, beams, b).n for b in range(beams.n_beams))
    matched = cols[cols >= 0]
    assert np.array_equal(np.sort(matched), np.arange(n_ours))


def test_bench_physics_reports_the_walk_its_floor_and_the_rows_the_floor_multiplies() -> None:
    rows = {r.what: r for r in bench.run(seed=0, evaluations=3, skip_complex=True, skip_pyradplan=True)}
    walk = rows["warm FMO per TPP evaluation (median of 3 steps)"]
    assert walk.value.endswith(" ms") and "evaluations" in walk.note
    floor = rows["matvec floor of those solves (median)"].note
    # prostate-basic plans read the PTV, bladder and rectum rows, not the femoral heads' the dij also holds
    read, total = (int(v) for v in floor.split("(")[1].split(" rows")[0].split(" of "))
    assert 0 < read < total
    assert float(rows["ratio warm solve / floor (median)"].value) > 0
