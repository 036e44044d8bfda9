"""FMO on the real prostate phantom (dij cached in a temp dir) and on a small analytic 2-D geometry."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import erf

from m2m.physics import dvh
from m2m.physics.beams import beams_for
from m2m.physics.dij import Dij
from m2m.physics.dij_cache import load_or_compute_dij
from m2m.physics.optimizer import PlanResult, optimize
from m2m.physics.phantoms import make_case
from m2m.physics.tpp import TppRangeError, TppSet, step

RX = 79.2
OARS = ("bladder", "rectum")


@pytest.fixture(scope="module")
def prostate_dij(tmp_path_factory: pytest.TempPathFactory) -> Dij:
    case = make_case("prostate", 1001)  # a seed whose rectum sits close to its limits
    return load_or_compute_dij(case, beams_for(case), cache_dir=tmp_path_factory.mktemp("dij"))


def toy_dij(target: str = "ptv") -> Dij:
    """2-D 96×96 grid of 2.5 mm, 5 mm thick: circular PTV with a rectum behind and a bladder in front.

    7 beams of 5 mm bixels; a beamlet's dose is exp(-0.006·depth) times its erf-smoothed aperture (σ 3 mm).
    """
    n, spacing, bixel, sigma = 96, 2.5, 5.0, 3.0
    c = (np.arange(n) - (n - 1) / 2) * spacing
    yy, xx = np.meshgrid(c, c, indexing="ij")
    body = xx**2 + yy**2 <= 110**2
    masks = {
        target: xx**2 + yy**2 <= 25**2,
        "rectum": xx**2 + (yy - 32) ** 2 <= 13**2,
        "bladder": xx**2 + (yy + 38) ** 2 <= 20**2,
    }
    idx = np.flatnonzero(body.ravel())
    px, py = xx.ravel()[idx], yy.ravel()[idx]
    columns, beam_of = [], []
    for b, gantry in enumerate((0, 51, 103, 154, 206, 257, 309)):
        a = np.deg2rad(gantry)
        lateral = px * np.cos(a) + py * np.sin(a)
        depth = px * np.sin(a) - py * np.cos(a) + 110.0
        for centre in np.arange(-30.0, 30.1, bixel):
            lo, hi = (lateral - centre - bixel / 2) / (sigma * np.sqrt(2)), (lateral - centre + bixel / 2) / (
                sigma * np.sqrt(2)
            )
            col = np.exp(-0.006 * depth) * 0.5 * (erf(hi) - erf(lo))
            col[col < 1e-3] = 0.0
            columns.append(col)
            beam_of.append(b)
    matrix = sp.csr_matrix(np.stack(columns, axis=1).astype(np.float32))
    rows = {name: np.searchsorted(idx, np.flatnonzero(m.ravel())) for name, m in masks.items()}
    return Dij.from_csr(matrix, voxel_index=idx, rows=rows, beamlet_beam=np.array(beam_of),
                        voxel_volume_cc=spacing * spacing * 5.0 / 1000.0, grid_shape=(1, n, n))


def _d95(plan: PlanResult) -> float:
    return dvh.d_percent(plan.dose["ptv"], 95.0)


def test_plan_is_normalised_nonnegative_and_reports_every_structure() -> None:
    dij = toy_dij()
    plan = optimize(dij, TppSet.default(OARS), RX)
    assert np.all(plan.fluence >= 0)
    assert _d95(plan) == pytest.approx(RX, rel=1e-5)
    assert set(plan.dose) == set(dij.rows)
    for name, rows in dij.rows.items():
        np.testing.assert_allclose(plan.dose[name], dij.dose(plan.fluence)[rows], rtol=1e-5)
    assert plan.iterations > 0 and plan.evaluations >= plan.iterations


def test_equal_inputs_give_identical_plans() -> None:
    dij = toy_dij()
    tpps = TppSet.default(OARS).with_value("t_rectum", 0.7)
    a, b = optimize(dij, tpps, RX), optimize(dij, tpps, RX)
    np.testing.assert_array_equal(a.fluence, b.fluence)
    c, d = optimize(dij, tpps, RX, warm_start=a.fluence), optimize(dij, tpps, RX, warm_start=a.fluence)
    np.testing.assert_array_equal(c.fluence, d.fluence)


def test_a_differently_named_target_gives_the_same_plan() -> None:
    tpps = TppSet.default(OARS).with_value("t_rectum", 0.7)
    plain = optimize(toy_dij(), tpps, RX)
    renamed = optimize(toy_dij("PTV_79"), tpps, RX, target="PTV_79")
    np.testing.assert_allclose(renamed.fluence, plain.fluence, rtol=1e-6)
    assert "PTV_79" in renamed.dose


def test_bad_inputs_raise() -> None:
    dij = toy_dij()
    with pytest.raises(TppRangeError, match="t_rectum"):
        optimize(dij, TppSet.default(OARS).with_value("t_rectum", 1.5), RX)
    with pytest.raises(ValueError, match="warm_start"):
        optimize(dij, TppSet.default(OARS), RX, warm_start=np.ones(3))
    with pytest.raises(KeyError, match="femoral_head_l"):
        optimize(dij, TppSet.default(("femoral_head_l",)), RX)


def test_lowering_t_rectum_and_raising_lambda_rectum_spare_the_rectum(prostate_dij: Dij) -> None:
    default = optimize(prostate_dij, TppSet.default(OARS), RX)
    low_t = optimize(prostate_dij, TppSet.default(OARS).with_value("t_rectum", 0.6), RX)
    heavy = optimize(prostate_dij, TppSet.default(OARS).with_value("t_rectum", 0.6).with_value("lambda_rectum", 20), RX)
    v70 = [dvh.v_gy(p.dose["rectum"], 70.0) for p in (default, low_t, heavy)]
    assert v70[0] > v70[1] > v70[2]
    assert v70[0] - v70[2] > 0.05  # a clinically visible change, not noise
    for plan in (default, low_t, heavy):
        assert _d95(plan) == pytest.approx(RX, rel=1e-5)


def test_raising_lambda_ptv_lowers_the_hot_spot(prostate_dij: Dij) -> None:
    sparing = TppSet.default(OARS).with_value("t_rectum", 0.5).with_value("lambda_rectum", 10)
    sparing = sparing.with_value("t_bladder", 0.5).with_value("lambda_bladder", 10)
    weak = optimize(prostate_dij, sparing, RX)
    strong = optimize(prostate_dij, sparing.with_value("lambda_ptv", 100.0), RX)
    hot = [dvh.d_cc(p.dose["ptv"], 0.03, prostate_dij.voxel_volume_cc) for p in (weak, strong)]
    assert hot[0] > 1.05 * RX  # the sparing plan pays with a hot spot ...
    assert hot[1] < hot[0] - 0.02 * RX  # ... which a heavier PTV weight pulls down
    assert _d95(strong) == pytest.approx(RX, rel=1e-5)


def test_warm_start_is_as_good_with_fewer_evaluations(prostate_dij: Dij) -> None:
    base = TppSet.default(OARS).with_value("t_rectum", 0.6).with_value("t_bladder", 0.6)
    previous = optimize(prostate_dij, base, RX, rtol=1e-6, max_iterations=2000)
    ratios = []
    for name, direction in (("lambda_rectum", 1), ("t_bladder", -1), ("v_ptv", 1), ("lambda_ptv", 1)):
        tpps = step(base, name, direction)
        cold = optimize(prostate_dij, tpps, RX)
        warm = optimize(prostate_dij, tpps, RX, warm_start=previous.fluence)
        assert warm.evaluations < cold.evaluations
        ratios.append(warm.objective / cold.objective)
    # The coverage term is non-convex: a warm start can settle in a local optimum ~10 % worse than a cold one
    # (seen for lambda_rectum on this case), but on average it is as good.
    assert max(ratios) <= 1.15
    assert float(np.mean(ratios)) <= 1.03
