"""Global gamma index: identities, analytic shifts, hot spots, threshold, input checks, and a brute-force check."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from m2m.physics.gamma import gamma_index


def ramp(shift_mm: float = 0.0) -> np.ndarray:
    """(6, 6, 60) grid at 1 mm: 0 → 100 linearly over x ∈ [20, 40] mm (5 %/mm of 100), moved by ``shift_mm`` in x."""
    x = np.arange(60, dtype=np.float64) - shift_mm
    profile = 100.0 * np.clip((x - 20.0) / 20.0, 0.0, 1.0)
    return np.broadcast_to(profile, (6, 6, 60)).copy()


def ramp_mask() -> np.ndarray:
    """The ramp's interior, well inside the linear part of both the reference and the shifted copy."""
    m = np.zeros((6, 6, 60), dtype=bool)
    m[:, :, 25:38] = True
    return m


def analytic_gamma(shift_mm: float, gradient: float, dd: float, dta: float) -> float:
    """γ of a linear profile of slope ``gradient`` (dose/mm) shifted by ``shift_mm``: |s| / √(Δd² + (ΔD/G)²)."""
    return abs(shift_mm) / math.sqrt(dta**2 + (dd / gradient) ** 2)


def test_identical_doses_pass_everywhere_with_zero_gamma() -> None:
    rng = np.random.default_rng(1)
    dose = ndimage.gaussian_filter(rng.uniform(0, 70, (12, 14, 16)), 2.0)
    res = gamma_index(dose, dose.copy(), (2.5, 2.0, 2.0))
    assert res.pass_rate == 100.0
    assert res.n_passed == res.n_evaluated > 0
    assert np.all(res.gamma[res.evaluated] == 0.0)
    assert np.all(np.isnan(res.gamma[~res.evaluated]))


def test_uniform_two_percent_scaling() -> None:
    ref = np.full((8, 8, 8), 50.0)
    ev = 1.02 * ref
    loose = gamma_index(ref, ev, (2.0, 2.0, 2.0), dose_percent=3, dta_mm=3)
    assert loose.pass_rate == 100.0
    # A flat field gives the distance term nothing to find: γ = 2 % / 1 % = 2 at every voxel.
    tight = gamma_index(ref, ev, (2.0, 2.0, 2.0), dose_percent=1, dta_mm=1)
    assert tight.pass_rate == 0.0
    np.testing.assert_allclose(tight.gamma[tight.evaluated], 2.0, rtol=1e-9)
    # γ at 3 % is the dose term alone too: 2/3.
    np.testing.assert_allclose(loose.gamma[loose.evaluated], 2.0 / 3.0, rtol=1e-9)


def test_shifted_steep_gradient_passes_at_3mm_and_fails_at_1mm() -> None:
    ref, ev, mask = ramp(), ramp(2.0), ramp_mask()
    spacing = (1.0, 1.0, 1.0)
    wide = gamma_index(ref, ev, spacing, dose_percent=3, dta_mm=3, norm_dose=100.0, mask=mask)
    narrow = gamma_index(ref, ev, spacing, dose_percent=3, dta_mm=1, norm_dose=100.0, mask=mask)
    assert wide.pass_rate == 100.0
    assert narrow.pass_rate == 0.0
    for res, dta in ((wide, 3.0), (narrow, 1.0)):
        exact = analytic_gamma(2.0, 5.0, 3.0, dta)
        g = res.gamma[mask]
        # The lattice minimum is never below the continuous one and is close to it.
        assert np.all(g >= exact - 1e-9)
        assert np.all(g <= exact + 0.02), (dta, float(g.max()), exact)
    # Without the DTA there is no help: the 10 % dose difference fails even at 3 %.
    dose_only = gamma_index(ref, ev, spacing, dose_percent=3, dta_mm=0.05, norm_dose=100.0, mask=mask,
                            step_mm=0.05, search_radius_mm=0.05)
    assert dose_only.pass_rate == 0.0


def test_five_percent_hot_block_fails_in_its_region_only() -> None:
    ref = np.full((30, 30, 30), 60.0)
    block = np.zeros(ref.shape, dtype=bool)
    block[8:22, 8:22, 8:22] = True
    ev = np.where(block, 1.05 * ref, ref)
    res = gamma_index(ref, ev, (1.0, 1.0, 1.0))  # 3 %/3 mm of the maximum, 60
    failing = res.evaluated & (res.gamma > 1.0)
    assert failing.any()
    assert not np.any(failing & ~block), "a voxel outside the hot block failed"
    # More than the DTA inside the block nothing un-heated is within reach: those voxels all fail, at 5/3.
    deep = ndimage.binary_erosion(block, iterations=4)
    assert np.all(failing[deep])
    np.testing.assert_allclose(res.gamma[deep], 5.0 / 3.0, rtol=1e-9)
    assert res.pass_rate == pytest.approx(100.0 * (1 - failing.sum() / ref.size))
    # Voxels outside the block see their own, equal dose: γ = 0.
    assert np.all(res.gamma[~block] == 0.0)


def test_threshold_excludes_low_dose_voxels() -> None:
    ref = np.full((10, 10, 10), 80.0)
    ref[:, :, :4] = 4.0  # 5 % of the maximum
    ev = ref.copy()
    ev[:, :, :4] = 20.0  # wildly wrong, but only where the dose is below the 10 % threshold
    res = gamma_index(ref, ev, (2.0, 2.0, 2.0))
    assert res.threshold_dose == pytest.approx(8.0)
    assert res.n_evaluated == 10 * 10 * 6
    assert not res.evaluated[:, :, :4].any()
    assert res.pass_rate == 100.0
    everything = gamma_index(ref, ev, (2.0, 2.0, 2.0), threshold_percent=0.0)
    assert everything.n_evaluated == ref.size
    assert everything.pass_rate < 100.0
    # A global criterion from the prescription instead of the maximum moves the threshold with it.
    rx = gamma_index(ref, ev, (2.0, 2.0, 2.0), norm_dose=30.0)
    assert rx.threshold_dose == pytest.approx(3.0)
    assert rx.n_evaluated == ref.size


def test_matches_brute_force_search() -> None:
    """The pruned, vectorised search equals a plain loop over the same offset lattice (anisotropic voxels)."""
    rng = np.random.default_rng(7)
    ref = ndimage.gaussian_filter(rng.uniform(0, 100, (9, 11, 10)), 1.5)
    ev = ndimage.gaussian_filter(ref + rng.normal(0, 4, ref.shape), 0.7)
    spacing = (2.0, 1.5, 1.0)
    dd, dta, radius, step = 2.0, 2.0, 3.0, 0.5
    res = gamma_index(ref, ev, spacing, dose_percent=dd, dta_mm=dta, search_radius_mm=radius, step_mm=step)
    norm = ref.max()
    axes = [np.arange(-math.floor(radius / h), math.floor(radius / h) + 1) * h
            for h in (s / math.ceil(s / step) for s in spacing)]
    offsets = [o for o in itertools.product(*axes) if o[0] ** 2 + o[1] ** 2 + o[2] ** 2 <= radius**2 + 1e-9]
    pts = np.argwhere(ref >= 0.1 * norm)
    expected = np.full(len(pts), np.inf)
    for o in offsets:
        coords = (pts + np.array(o) / np.array(spacing)).T
        value = ndimage.map_coordinates(ev, coords, order=1, mode="constant", cval=np.nan)
        inside = np.all((coords >= -1e-9) & (coords <= np.array(ref.shape)[:, None] - 1 + 1e-9), axis=0)
        g2 = sum(c * c for c in o) / dta**2 + (value - ref[tuple(pts.T)]) ** 2 / (dd / 100 * norm) ** 2
        expected = np.where(inside, np.fmin(expected, g2), expected)
    np.testing.assert_allclose(res.gamma[tuple(pts.T)], np.sqrt(expected), rtol=1e-7, atol=1e-9)
    assert 0.0 < res.pass_rate < 100.0


def test_runs_in_seconds_on_a_clinical_size_grid() -> None:
    z, y, x = np.meshgrid(np.arange(60), np.arange(100), np.arange(100), indexing="ij")
    ref = 70.0 * np.exp(-((((x - 50) / 25.0) ** 2 + ((y - 50) / 25.0) ** 2 + ((z - 30) / 15.0) ** 2) ** 2))
    ev = ndimage.shift(ref, (0.3, 0.5, -0.4), order=1, mode="nearest") * 1.01
    res = gamma_index(ref, ev, (3.0, 3.0, 3.0))
    assert res.n_evaluated > 50_000
    assert res.pass_rate == 100.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"evaluated": np.zeros((4, 4, 5))}, "does not match"),
        ({"reference": np.zeros((4, 4)), "evaluated": np.zeros((4, 4))}, "3-D"),
        ({"dose_percent": 0.0}, "dose_percent"),
        ({"dose_percent": -3.0}, "dose_percent"),
        ({"dta_mm": 0.0}, "dta_mm"),
        ({"dta_mm": float("nan")}, "dta_mm"),
        ({"spacing_mm": (1.0, -1.0, 1.0)}, "spacing_mm"),
        ({"spacing_mm": (1.0, 1.0)}, "spacing_mm"),
        ({"threshold_percent": 100.0}, "threshold_percent"),
        ({"norm_dose": 0.0}, "norm_dose"),
        ({"search_radius_mm": 1.0}, "search_radius_mm"),
        ({"step_mm": 4.0}, "step_mm"),
        ({"mask": np.ones((4, 4, 5), dtype=bool)}, "mask"),
        ({"mask": np.ones((4, 4, 4), dtype=np.int8)}, "mask"),
        ({"evaluated": np.full((4, 4, 4), np.nan)}, "finite"),
        ({"reference": np.zeros((4, 4, 4))}, "norm_dose"),
        ({"threshold_percent": 50.0, "norm_dose": 1e6}, "no voxel"),
    ],
)
def test_bad_input_raises_value_error(kwargs: dict, message: str) -> None:
    args = {"reference": np.full((4, 4, 4), 10.0), "evaluated": np.full((4, 4, 4), 10.0),
            "spacing_mm": (1.0, 1.0, 1.0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        gamma_index(args.pop("reference"), args.pop("evaluated"), args.pop("spacing_mm"), **args)
