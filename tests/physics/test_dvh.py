from __future__ import annotations

import numpy as np
import pytest

from m2m.physics import dvh

# 0, 0.1, ..., 99.9 Gy: one voxel per 0.1 Gy, so "within one voxel" means within 0.1 Gy.
RAMP = np.arange(1000) * 0.1


def test_ramp_v70_is_thirty_percent_and_d50_is_fifty_gy() -> None:
    assert dvh.v_gy(RAMP, 70.0) == pytest.approx(0.30, abs=1e-3)
    assert dvh.d_percent(RAMP, 50.0) == pytest.approx(50.0, abs=0.1)
    assert dvh.d_percent(RAMP, 95.0) == pytest.approx(5.0, abs=0.1)
    assert dvh.d_percent(RAMP, 2.0) == pytest.approx(98.0, abs=0.1)
    assert dvh.mean_gy(RAMP) == pytest.approx(49.95)
    assert dvh.max_gy(RAMP) == pytest.approx(99.9)


def test_metrics_do_not_depend_on_voxel_order() -> None:
    shuffled = np.random.default_rng(3).permutation(RAMP)
    assert dvh.d_percent(shuffled, 37.0) == dvh.d_percent(RAMP, 37.0)
    assert dvh.v_gy(shuffled, 12.34) == dvh.v_gy(RAMP, 12.34)
    assert dvh.d_cc(shuffled, 0.5, 0.01) == dvh.d_cc(RAMP, 0.5, 0.01)


def test_uniform_dose_gives_a_step_dvh_and_equal_metrics() -> None:
    dose = np.full(500, 60.0, dtype=np.float32)
    bins = np.array([0.0, 30.0, 59.9, 60.0, 60.1, 90.0])
    np.testing.assert_array_equal(dvh.cumulative_dvh(dose, bins), [1, 1, 1, 1, 0, 0])
    for value in (dvh.d_percent(dose, 95), dvh.d_cc(dose, 0.03, 0.027), dvh.mean_gy(dose), dvh.max_gy(dose)):
        assert value == pytest.approx(60.0)


def test_cumulative_dvh_matches_v_gy_and_is_non_increasing() -> None:
    dose = np.random.default_rng(0).gamma(4.0, 10.0, size=3000)
    bins = np.linspace(0, 120, 241)
    curve = dvh.cumulative_dvh(dose, bins)
    assert np.all(np.diff(curve) <= 0)
    assert curve[0] == 1.0
    np.testing.assert_allclose(curve, [dvh.v_gy(dose, b) for b in bins])
    by_structure = dvh.dvh_by_structure({"a": dose, "b": RAMP}, bins)
    np.testing.assert_array_equal(by_structure["a"], curve)


def test_d_cc_counts_whole_voxels_and_at_least_one() -> None:
    # 0.03 cc over 0.027 cc voxels needs 2 voxels: the second-hottest value.
    assert dvh.d_cc(RAMP, 0.03, 0.027) == pytest.approx(99.8)
    # Smaller than a voxel: the maximum.
    assert dvh.d_cc(RAMP, 0.001, 0.027) == pytest.approx(99.9)
    # Exactly 10 voxels of 0.1 cc: the 10th-hottest.
    assert dvh.d_cc(RAMP, 1.0, 0.1) == pytest.approx(99.0)
    assert dvh.volume_cc(RAMP, 0.027) == pytest.approx(27.0)


def test_v_percent_rx_uses_the_prescription() -> None:
    assert dvh.v_percent_rx(RAMP, 100.0, 50.0) == pytest.approx(0.5)
    assert dvh.v_percent_rx(RAMP, 140.0, 50.0) == pytest.approx(0.3)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        dvh.mean_gy(np.array([]))
    with pytest.raises(ValueError, match="percent"):
        dvh.d_percent(RAMP, 101.0)
    with pytest.raises(ValueError):
        dvh.d_cc(RAMP, 0.03, 0.0)


def test_report_bins_begin_with_the_policys_bins_and_reach_150_percent() -> None:
    bins = dvh.report_bins_gy(79.2)
    policy = dvh.dvh_bins_gy(79.2)
    np.testing.assert_allclose(bins[: policy.size], policy, atol=1e-9)
    assert bins[-1] >= dvh.REPORT_SPAN * 79.2 and np.allclose(np.diff(bins), policy[1] - policy[0])
