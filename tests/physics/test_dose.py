"""Pencil-beam engine: depth dose, normalisation, penumbra, heterogeneity, geometry and dij layout."""

from __future__ import annotations

import numpy as np
import pytest

from m2m.physics.beams import (
    DEFAULT_GANTRY_DEG,
    BeamSet,
    beam_geometry,
    beams_for,
    bixel_grid,
    every_n_degrees,
    project,
    voxel_centres_mm,
)
from m2m.physics.case import Case, Grid, Structure
from m2m.physics.dose import compute_dij, depth_dose
from m2m.physics.phantoms import make_case

SPACING = 2.0


def water_phantom(slab: tuple[float, float, float] | None = None) -> tuple[Case, np.ndarray, np.ndarray]:
    """Water for y > 0 mm (surface at y = 0, the beam enters from −y at gantry 0), 2 mm voxels, 5 slices.

    ``slab`` = (y_from, y_to, density) replaces a layer. Dose rows: the central slice ("central").
    """
    nz, ny, nx = 5, 170, 160
    grid = Grid((nz, ny, nx), (SPACING,) * 3, (-(nz - 1) / 2 * SPACING, -19.0, -(nx - 1) / 2 * SPACING))
    _, y, x = grid.coordinates_mm()
    rho = np.zeros(grid.shape, dtype=np.float32)
    rho[:, y > 0, :] = 1.0
    if slab is not None:
        rho[:, (y > slab[0]) & (y < slab[1]), :] = slab[2]
    body = rho > 0
    central = np.zeros(grid.shape, dtype=bool)
    central[nz // 2] = body[nz // 2]
    structures = (Structure("body", "body", body), Structure("central", "oar", central))
    return Case("water", "test", grid, rho, structures, rx_gy=1.0), y, x


def open_field_dose(case: Case, iso_depth_mm: float = 0.0) -> np.ndarray:
    """Central-slice dose (y, x) of a 10 × 10 cm open field of unit beamlet weights from gantry 0."""
    beams = BeamSet(gantry_deg=(0.0,), isocentre_mm=(0.0, iso_depth_mm, 0.0), field_mm=(100.0, 100.0))
    dij = compute_dij(case, beams, ["central"])
    assert dij.n_beamlets == 400
    return dij.dose_to_grid(np.ones(dij.n_beamlets))[case.grid.shape[0] // 2]


def central_axis(dose: np.ndarray, x: np.ndarray) -> np.ndarray:
    # Voxel centres sit at x = ±1 mm around the axis.
    i = int(np.argmin(np.abs(x - 1.0)))
    return 0.5 * (dose[:, i] + dose[:, i - 1])


def test_depth_dose_curve_shape() -> None:
    r = np.arange(0.0, 300.0, 0.1)
    dd = depth_dose(r)
    assert r[np.argmax(dd)] == pytest.approx(15.0, abs=0.1)
    assert dd.max() == pytest.approx(1.0, abs=1e-6)
    assert depth_dose(np.array([100.0]))[0] == pytest.approx(0.787, abs=0.002)
    assert 0.2 < dd[0] < 0.35  # surface dose (skin sparing)


def test_open_field_pdd_matches_6mv() -> None:
    case, y, x = water_phantom()
    cax = central_axis(open_field_dose(case), x)
    d_max_depth = float(y[np.argmax(cax)])
    pdd10 = float(np.interp(100.0, y, cax) / cax.max())
    # Measured: d_max 13 mm (2 mm voxels), PDD(10 cm) = 0.668; real 6 MV at SSD 100 cm ≈ 0.67.
    assert 10.0 <= d_max_depth <= 20.0
    assert 0.62 <= pdd10 <= 0.72
    # At SSD = SAD the maximum is DD = 1 times inverse square (1000 / 1015)².
    assert cax.max() == pytest.approx((1000.0 / 1015.0) ** 2, rel=0.01)


def test_normalisation_one_gy_at_isocentre_at_dmax() -> None:
    case, y, x = water_phantom()
    cax = central_axis(open_field_dose(case, iso_depth_mm=15.0), x)
    assert float(np.interp(15.0, y, cax)) == pytest.approx(1.0, abs=0.01)


def test_penumbra_80_20_at_10cm() -> None:
    case, y, x = water_phantom()
    dose = open_field_dose(case)
    iy = int(np.argmin(np.abs(y - 101.0)))  # depth 100 mm lies between the voxel centres at 99 and 101 mm
    profile = 0.5 * (dose[iy] + dose[iy - 1])
    rel = profile / central_axis(dose, x)[iy - 1 : iy + 1].mean()
    right = x > 0
    x80 = float(np.interp(-0.8, -rel[right], x[right]))
    x20 = float(np.interp(-0.2, -rel[right], x[right]))
    # Measured 6.94 mm; the 50 % point sits at the diverged field edge, 50 mm · 1100/1000 = 55 mm.
    assert 4.0 <= x20 - x80 <= 10.0
    assert float(np.interp(-0.5, -rel[right], x[right])) == pytest.approx(55.0, abs=1.0)


def test_lung_slab_raises_dose_beyond_it() -> None:
    water, y, x = water_phantom()
    lung, _, _ = water_phantom(slab=(50.0, 100.0, 0.25))
    ref = central_axis(open_field_dose(water), x)
    het = central_axis(open_field_dose(lung), x)
    ratio = float(np.interp(150.0, y, het) / np.interp(150.0, y, ref))
    # 37.5 mm less water-equivalent depth: measured ratio 1.119 at 15 cm depth.
    assert 1.08 <= ratio <= 1.16
    # Above the slab nothing changes.
    assert float(np.interp(40.0, y, het) / np.interp(40.0, y, ref)) == pytest.approx(1.0, abs=1e-3)


def test_beam_geometry_conventions() -> None:
    beams = BeamSet(gantry_deg=(0.0, 90.0), isocentre_mm=(10.0, 20.0, 30.0))
    g0, g90 = beam_geometry(beams, 0), beam_geometry(beams, 1)
    assert g0.source_mm == pytest.approx((10.0, 20.0 - 1000.0, 30.0))  # anterior source
    assert g90.source_mm == pytest.approx((10.0, 20.0, 30.0 + 1000.0))  # patient's left
    pts = np.array([[10.0, 20.0, 30.0], [10.0, 20.0 + 100.0, 30.0 + 11.0], [15.0, 20.0, 30.0]])
    t, u, z = project(g0, 1000.0, pts)
    np.testing.assert_allclose(t, [1000.0, 1100.0, 1000.0])
    np.testing.assert_allclose(u, [0.0, 10.0, 0.0])  # divergence scales 11 mm at 1100 mm to 10 mm at the isocentre
    np.testing.assert_allclose(z, [0.0, 0.0, 5.0])
    assert every_n_degrees(2.0)[:3] == (0.0, 2.0, 4.0) and len(every_n_degrees(2.0)) == 180


def test_bixel_grid_covers_ptv_projection_with_margin() -> None:
    case = make_case("prostate", 2)
    beams = beams_for(case)
    assert beams.gantry_deg == DEFAULT_GANTRY_DEG
    ptv_pts = voxel_centres_mm(case, np.flatnonzero(case.target.mask))
    np.testing.assert_allclose(beams.isocentre_mm, ptv_pts.mean(axis=0), atol=1e-9)
    for b in range(beams.n_beams):
        grid = bixel_grid(case, beams, b)
        _, u, z = project(beam_geometry(beams, b), beams.sad_mm, ptv_pts)
        active = set(zip(grid.iu.tolist(), grid.iz.tolist(), strict=True))
        cells = set(zip(np.floor(u / 5.0).astype(int).tolist(), np.floor(z / 5.0).astype(int).tolist(), strict=True))
        assert cells <= active
        # The one-bixel margin: every neighbour of a covered cell is active too.
        assert {(i + di, j + dj) for i, j in cells for di in (-1, 0, 1) for dj in (-1, 0, 1)} == active


def test_prostate_dij_layout_and_target_dose() -> None:
    case = make_case("prostate", 2)
    beams = beams_for(case)
    dij = compute_dij(case, beams)
    assert set(dij.rows) == {"ptv", "bladder", "rectum", "femoral_head_l", "femoral_head_r"}
    union = np.zeros(case.grid.shape, dtype=bool)
    for name, rows in dij.rows.items():
        np.testing.assert_array_equal(dij.voxel_index[rows], np.flatnonzero(case.structure(name).mask))
        union |= case.structure(name).mask
    assert dij.n_rows == union.sum()
    assert dij.matrix.codes.dtype == np.uint16 and dij.matrix.nbytes < 7 * dij.matrix.nnz  # packed: ≈ 6 B/entry
    sizes = [bixel_grid(case, beams, b).n for b in range(beams.n_beams)]
    assert np.bincount(dij.beamlet_beam).tolist() == sizes
    assert dij.voxel_volume_cc == pytest.approx(0.027)
    assert 0.8e6 <= dij.matrix.nnz <= 5e6
    # Every beam reaches the whole PTV, and the cut-off leaves no tiny entries.
    ptv = dij.matrix.select_rows(dij.rows["ptv"]).to_csr()
    for b in range(beams.n_beams):
        per_beam = np.asarray(ptv[:, dij.beamlet_beam == b].sum(axis=1)).ravel()
        assert per_beam.min() > 0.3
    assert dij.matrix.to_csr().data.min() >= 5e-4 * 0.3
    # Unit weights on every beamlet: each beam adds ≈ 0.5-0.8 Gy at mid-pelvis depth to the PTV centre.
    dose = dij.dose(np.ones(dij.n_beamlets, dtype=np.float32))[dij.rows["ptv"]]
    assert 3.0 < float(np.median(dose)) < 6.0
    # Femoral heads are hit only by the lateral beams, far less than the PTV.
    fh = dij.dose(np.ones(dij.n_beamlets, dtype=np.float32))[dij.rows["femoral_head_l"]]
    assert fh.mean() < 0.5 * dose.mean()


def test_explicit_structures_restrict_rows() -> None:
    case = make_case("prostate", 2)
    dij = compute_dij(case, beams_for(case, gantry_deg=(0.0,)), ["ptv", "body"])
    assert set(dij.rows) == {"ptv", "body"}
    assert dij.n_rows == case.structure("body").n_voxels
    with pytest.raises(KeyError):
        compute_dij(case, beams_for(case, gantry_deg=(0.0,)), ["nope"])


def _cylinder(bone_x_mm: tuple[float, float] | None = None) -> Case:
    """Water cylinder (axis z) centred on the origin, 2 mm voxels whose centres sit at even mm: the voxels with centres
    within 100 mm are water, so the surface is at 101 mm. Optional bone slab (density 1.8) over the voxel centres
    strictly inside an x range. Dose rows: the 3 × 3 × 3 voxels around the centre ("centre")."""
    n, nz = 111, 9
    grid = Grid((nz, n, n), (SPACING,) * 3, (-(nz - 1), -(n - 1), -(n - 1)))
    _, y, x = grid.coordinates_mm()
    disc = (y[:, None] ** 2 + x[None, :] ** 2) <= 100.0**2
    rho = np.zeros(grid.shape, dtype=np.float32)
    rho[:, disc] = 1.0
    if bone_x_mm is not None:
        rho[:, :, (x > bone_x_mm[0]) & (x < bone_x_mm[1])] *= 1.8
    centre = np.zeros(grid.shape, dtype=bool)
    c = (nz // 2, n // 2, n // 2)
    centre[c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 2] = True
    return Case("cyl", "test", grid, rho, (Structure("body", "body", rho > 0), Structure("centre", "oar", centre)), 1.0)


def _centre_dose(case: Case, gantry: float) -> float:
    beams = BeamSet(gantry_deg=(gantry,), isocentre_mm=(0.0, 0.0, 0.0), field_mm=(60.0, 60.0))
    dij = compute_dij(case, beams, ["centre"])
    dose = dij.dose(np.ones(dij.n_beamlets, dtype=np.float32))
    flat = np.ravel_multi_index(tuple(s // 2 for s in case.grid.shape), case.grid.shape)
    return float(dose[np.searchsorted(dij.voxel_index, flat)])


@pytest.mark.parametrize("gantry", [0.0, 37.0, 90.0, 145.0, 211.0, 300.0])
def test_isocentre_dose_in_a_cylinder_is_independent_of_gantry(gantry: float) -> None:
    # Ray tracing at any angle must find ≈ 101 mm of water to the centre: DD(101 mm) at (SAD / t)² = 1. The voxel
    # staircase of the circle moves the surface by up to 1 mm (0.3 %); measured ratios 1.0006-1.0025.
    expected = float(depth_dose(np.array([101.0]))[0])
    assert _centre_dose(_cylinder(), gantry) == pytest.approx(expected, rel=0.006)


def test_gantry_90_enters_from_the_patients_left() -> None:
    case = _cylinder(bone_x_mm=(40.0, 60.0))  # voxels at x = 42-58 mm: 18 mm of bone (1.8) on the left (+x)
    left, right, anterior = _centre_dose(case, 90.0), _centre_dose(case, 270.0), _centre_dose(case, 0.0)
    # 0.8 · 18 mm = 14.4 mm of extra water-equivalent depth for the beam from the left only: expected 0.9586,
    # measured 0.9570 (the cut-off drops slightly different tail fractions at the two depths).
    expected = float(depth_dose(np.array([115.4]))[0] / depth_dose(np.array([101.0]))[0])
    assert left / right == pytest.approx(expected, abs=0.004)
    assert right == pytest.approx(anterior, rel=0.01)
