"""Liver phantom: the PTV keeps a minimum gap to the stomach (so the protocol maximum is reachable), while a share of
lesions sits just beyond it (so the stomach criteria still decide); structures, body containment and determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from m2m.physics.phantoms import cohort, liver_stomach_gap_mm, make_case

SEEDS = range(1000, 1012)


@pytest.fixture(scope="module")
def cases() -> list:
    return cohort("liver", SEEDS)


def _ptv_stomach_gap_mm(case) -> float:
    """Smallest voxel-centre distance (mm) from a PTV voxel to a stomach voxel."""
    to_stomach = ndimage.distance_transform_edt(~case.structure("stomach").mask, sampling=case.grid.spacing_mm)
    return float(to_stomach[case.target.mask].min())


def _reach_mm(case) -> float:
    """Largest distance (mm) from the PTV's voxel-centre centroid to one of its voxels (≈ its largest semi-axis)."""
    idx = np.nonzero(case.target.mask)
    pts = np.stack([o + s * i for o, s, i in zip(case.grid.origin_mm, case.grid.spacing_mm, idx, strict=True)], 1)
    return float(np.linalg.norm(pts - pts.mean(axis=0), axis=1).max())


def test_gap_rule() -> None:
    assert liver_stomach_gap_mm(5.0) == pytest.approx(10.0)
    assert liver_stomach_gap_mm(13.5) == pytest.approx(10.0)
    assert liver_stomach_gap_mm(30.0) > liver_stomach_gap_mm(20.0) >= 10.0


def test_ptv_keeps_the_minimum_gap_to_the_stomach(cases: list) -> None:
    gaps = [_ptv_stomach_gap_mm(c) for c in cases]
    for case, gap in zip(cases, gaps, strict=True):
        # Never abutting: at least 10 mm, and at least the size-dependent gap (the reach is measured from the
        # voxelised PTV, so it may undershoot the sampled one by up to a voxel diagonal).
        assert gap >= 10.0, (case.case_id, gap)
        assert gap >= liver_stomach_gap_mm(_reach_mm(case)) - 3.0, (case.case_id, gap)


def test_a_share_of_lesions_sits_next_to_the_stomach(cases: list) -> None:
    gaps = np.array([_ptv_stomach_gap_mm(c) for c in cases])
    # The hard cases (lesion within ~30 mm of the stomach) and easy ones (far away) both occur.
    assert (gaps <= 30.0).sum() >= 4
    assert (gaps >= 50.0).sum() >= 2


def test_the_largest_ptvs_are_not_drawn_next_to_the_stomach(cases: list) -> None:
    big = [c for c in cases if c.target.mask.sum() * c.grid.voxel_volume_cc >= 85.0]
    assert big, "seeds 1000-1011 hold a PTV of >= 85 cc (1007, 92 cc)"
    for case in big:
        assert _ptv_stomach_gap_mm(case) >= 40.0, case.case_id


def test_structures_non_empty_and_inside_the_body(cases: list) -> None:
    for case in cases:
        body = case.structure("body").mask
        for s in case.structures:
            assert s.mask.any(), (case.case_id, s.name)
            assert not np.any(s.mask & ~body), (case.case_id, s.name)
        ptv_cc = case.target.mask.sum() * case.grid.voxel_volume_cc
        assert 8.0 <= ptv_cc <= 130.0, (case.case_id, ptv_cc)
        assert not np.any(case.target.mask & case.structure("stomach").mask)
        assert not np.any(case.target.mask & case.structure("liver_normal").mask)


def test_liver_case_is_deterministic_per_seed() -> None:
    a, b = make_case("liver", 1002), make_case("liver", 1002)
    assert a.content_hash() == b.content_hash()
    np.testing.assert_array_equal(a.target.mask, b.target.mask)
    assert a.content_hash() != make_case("liver", 1003).content_hash()


def test_grid_unchanged() -> None:
    case = make_case("liver", 1000)
    assert case.grid.shape == (50, 96, 128)
    assert case.grid.spacing_mm == (4.0, 3.0, 3.0)
