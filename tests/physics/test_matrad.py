"""matRad loader on the shared TG-119 and box phantoms (skipped where the data files are absent) and on tiny files
written here: the structure map and every bad file as a CaseFileError."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from m2m.physics.case import CaseFileError
from m2m.physics.matrad import hu_to_red, load_matrad, shared_data_dir

DATA = shared_data_dir()


def _require(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found: put the shared phantoms there or set M2M_SHARED_DATA")
    return path


def test_hu_to_red_curve() -> None:
    red = hu_to_red(np.array([-1024.0, -1000.0, -500.0, 0.0, 750.0, 1500.0, 4000.0]))
    np.testing.assert_allclose(red, [0.0, 0.0, 0.5, 1.0, 1.4, 1.8, 2.5], atol=1e-6)
    assert red.dtype == np.float32


def test_tg119_voxel_counts_grid_and_roles() -> None:
    case = load_matrad(_require("TG119.mat"))
    assert case.grid.shape == (129, 167, 167)
    assert case.grid.spacing_mm == (2.5, 3.0, 3.0)
    assert case.grid.origin_mm == (-160.0, -250.0, -250.0)
    counts = {s.name: (s.role, s.n_voxels) for s in case.structures}
    assert counts == {"Core": ("oar", 1320), "OuterTarget": ("target", 7458), "BODY": ("body", 601736)}
    # rx from the target's SquaredDeviation objective (TG-119: 50 Gy).
    assert case.rx_gy == pytest.approx(50.0)
    body = case.structure("BODY").mask
    assert case.density[body].mean() == pytest.approx(1.0, abs=0.05)
    # Outside BODY: air anterior (−y) of it, and a treatment couch posterior (+y), which fixes the y axis sense.
    by = np.nonzero(body)[1]
    assert case.density[:, : by.min(), :].max() < 0.3
    behind = case.density[:, by.max() + 1 :, :]
    assert (behind > 0.5).sum() > 40_000
    beside = ~body
    beside[:, by.max() + 1 :, :] = False
    assert (case.density[beside] > 0.5).sum() < 0.02 * body.sum()


def test_tg119_c_shape_wraps_the_core() -> None:
    case = load_matrad(_require("TG119.mat"))
    core, target = case.structure("Core").mask, case.structure("OuterTarget").mask
    assert not np.any(core & target)
    zc = int(np.rint(np.nonzero(core)[0].mean()))
    cy, cx = (float(v.mean()) for v in np.nonzero(core[zc]))
    ty, tx = np.nonzero(target[zc])
    # In the axial slice through the core the target covers a wide arc around it but leaves an opening: a C.
    sectors = np.unique(((np.degrees(np.arctan2(ty - cy, tx - cx)) + 360.0) % 360.0 // 15).astype(int))
    assert 14 <= sectors.size <= 22  # of 24 15° sectors: ≈ 210-330° of arc
    # The core sits inside the target's bounding box in-plane, and the target's z extent covers the core's.
    assert ty.min() < cy < ty.max() and tx.min() < cx < tx.max()


def test_boxphantom_geometry_and_hu_conversion_matches_cube() -> None:
    path = _require("BOXPHANTOM.mat")
    case = load_matrad(path, rx_gy=60.0)
    assert case.rx_gy == 60.0
    assert case.grid.shape == (160, 160, 160)
    target = case.target.mask
    assert target.sum() == 21**3
    # A 21³ cube: its bounding box is exactly 21 voxels on every axis.
    assert [int(np.ptp(i)) + 1 for i in np.nonzero(target)] == [21, 21, 21]
    ct = sio.loadmat(str(path), squeeze_me=True, struct_as_record=False)["ct"]
    np.testing.assert_allclose(hu_to_red(ct.cubeHU), ct.cube, atol=1e-6)
    body = case.structure("BODY").mask
    assert np.all(case.density[body] == 1.0) and np.all(case.density[~body] == 0.0)


def test_hu_only_file_is_converted_and_index_order_is_column_major(tmp_path: Path) -> None:
    # A 2 × 3 × 4 (y, x, z) MATLAB cube with one structure voxel at (y=1, x=2, z=3), 0-based.
    ny, nx, nz = 2, 3, 4
    hu = np.full((ny, nx, nz), -1000.0)
    hu[1, 2, 3] = 0.0
    linear = 1 + 1 + ny * (2 + nx * 3)  # 1-based column-major index of (1, 2, 3)
    ct = {"cubeHU": hu, "resolution": {"x": 2.0, "y": 3.0, "z": 5.0}, "cubeDim": np.array([ny, nx, nz])}
    cst = np.empty((1, 6), dtype=object)
    cst[0, :] = [1, "PTV", "TARGET", np.array([linear]), {}, {}]
    path = tmp_path / "tiny.mat"
    sio.savemat(str(path), {"ct": ct, "cst": cst})
    case = load_matrad(path, rx_gy=2.0)
    assert case.grid.shape == (4, 2, 3)
    assert case.grid.spacing_mm == (5.0, 3.0, 2.0)
    assert np.argwhere(case.target.mask).tolist() == [[3, 1, 2]]
    assert case.density[3, 1, 2] == pytest.approx(1.0)
    assert case.density.sum() == pytest.approx(1.0)


def test_missing_rx_is_an_error(tmp_path: Path) -> None:
    ct = {"cube": np.ones((2, 2, 2)), "resolution": {"x": 1.0, "y": 1.0, "z": 1.0}, "cubeDim": np.array([2, 2, 2])}
    cst = np.empty((1, 6), dtype=object)
    cst[0, :] = [1, "PTV", "TARGET", np.array([1]), {}, {}]
    path = tmp_path / "norx.mat"
    sio.savemat(str(path), {"ct": ct, "cst": cst})
    with pytest.raises(ValueError, match="rx_gy"):
        load_matrad(path)


# --- Structure map and bad files -------------------------------------------------------------------------------------


def _tiny_mat(path: Path, cst_rows: list[list[object]] | None, with_ct: bool = True) -> Path:
    """A 2 × 3 × 4 (y, x, z) water cube with the given cst rows (``None``: no cst variable)."""
    content: dict[str, object] = {}
    if with_ct:
        content["ct"] = {"cube": np.ones((2, 3, 4)), "resolution": {"x": 1.0, "y": 1.0, "z": 1.0},
                         "cubeDim": np.array([2, 3, 4])}
    if cst_rows is not None:
        cst = np.empty((len(cst_rows), len(cst_rows[0])), dtype=object)
        for k, row in enumerate(cst_rows):
            cst[k, :] = row
        content["cst"] = cst
    sio.savemat(str(path), content)
    return path


TINY_ROWS: list[list[object]] = [
    [0, "PTV", "TARGET", np.array([1, 2]), {}, {}],
    [1, "Rectum", "OAR", np.array([3]), {}, {}],
    [2, "Body", "OAR", np.arange(1, 25), {}, {}],
]


def test_structure_map_on_a_tiny_file(tmp_path: Path) -> None:
    path = _tiny_mat(tmp_path / "tiny.mat", TINY_ROWS)
    case = load_matrad(path, rx_gy=2.0, structures={"rectum": " RECTUM", "ptv": "ptv"})
    assert [(s.name, s.role, s.n_voxels) for s in case.structures] == [
        ("rectum", "oar", 1), ("ptv", "target", 2), ("body", "body", 24)
    ]
    # Without a map every row is kept under its own name (and "Body" is recognised by name).
    assert [(s.name, s.role) for s in load_matrad(path, rx_gy=2.0).structures] == [
        ("PTV", "target"), ("Rectum", "oar"), ("Body", "body")
    ]


@pytest.mark.parametrize(
    ("rows", "structures", "match"),
    [
        (TINY_ROWS, {"ptv": "PTV", "bladder": "Bladder"}, r"'Bladder' .*not found; found \['PTV', 'Rectum', 'Body'\]"),
        ([*TINY_ROWS, [3, "rectum", "OAR", np.array([4]), {}, {}]], {"ptv": "PTV", "rectum": "Rectum"}, "matches 2"),
        ([*TINY_ROWS[:2], [2, "Bladder", "OAR", np.zeros(0), {}, {}]], {"ptv": "PTV", "b": "Bladder"}, "no voxel"),
        ([[0, "PTV", "TARGET", np.array([25]), {}, {}]], None, r"integers in 1\.\.24"),
        ([[0, "PTV", "TARGET", np.array([1.5]), {}, {}]], None, r"integers in 1\.\.24"),
        ([[0, 7.0, "TARGET", np.array([1]), {}, {}]], None, "must be text"),
        ([[0, "PTV", "TARGET"]], None, "3 columns"),
        ([*TINY_ROWS, [3, "PTV", "OAR", np.array([4]), {}, {}]], None, "duplicate structure names"),
    ],
    ids=["missing", "ambiguous", "empty", "index-range", "index-fraction", "name-not-text", "short-row", "dup"],
)
def test_bad_cst_is_a_case_file_error(
    tmp_path: Path, rows: list[list[object]], structures: dict[str, str] | None, match: str
) -> None:
    path = _tiny_mat(tmp_path / "bad.mat", rows)
    with pytest.raises(CaseFileError, match=match) as info:
        load_matrad(path, rx_gy=2.0, structures=structures)
    assert info.value.path == str(path) and str(info.value).startswith(f"{path}: ")


def test_missing_cst_or_ct_or_not_a_mat_file(tmp_path: Path) -> None:
    no_cst = _tiny_mat(tmp_path / "nocst.mat", None)
    with pytest.raises(CaseFileError, match="no 'cst' variable") as info:
        load_matrad(no_cst, rx_gy=2.0)
    assert info.value.path == str(no_cst)
    no_ct = _tiny_mat(tmp_path / "noct.mat", TINY_ROWS, with_ct=False)
    with pytest.raises(CaseFileError, match="no 'ct' variable"):
        load_matrad(no_ct, rx_gy=2.0)
    text = tmp_path / "notes.txt"
    text.write_text("not a matRad file\n")
    with pytest.raises(CaseFileError, match=r"not a matRad \.mat file"):
        load_matrad(text, rx_gy=2.0)
    fake = tmp_path / "fake.mat"
    fake.write_text("MATLAB 5.0 MAT-file? no, a README\n" * 10)
    with pytest.raises(CaseFileError, match="cannot read as a MATLAB file") as info:
        load_matrad(fake, rx_gy=2.0)
    assert info.value.path == str(fake)
    with pytest.raises(CaseFileError, match="cannot read"):
        load_matrad(tmp_path / "absent.mat", rx_gy=2.0)


def test_malformed_ct_is_a_case_file_error(tmp_path: Path) -> None:
    path = tmp_path / "badct.mat"
    ct = {"cube": np.ones((2, 3, 5)), "resolution": {"x": 1.0, "y": 1.0, "z": 1.0}, "cubeDim": np.array([2, 3, 4])}
    sio.savemat(str(path), {"ct": ct, "cst": np.array([[0, "PTV", "TARGET", np.array([1]), {}, {}]], dtype=object)})
    with pytest.raises(CaseFileError, match=r"ct.cube .*cubeDim"):
        load_matrad(path, rx_gy=2.0)
    sio.savemat(str(path), {"ct": {"cube": np.ones((2, 3, 4))}, "cst": np.zeros(1)})
    with pytest.raises(CaseFileError, match="no field 'cubeDim'"):
        load_matrad(path, rx_gy=2.0)


def test_tg119_structure_map() -> None:
    path = _require("TG119.mat")
    case = load_matrad(path, structures={"ptv": "outertarget", "core": "CORE"})
    counts = {s.name: (s.role, s.n_voxels) for s in case.structures}
    assert counts == {"ptv": ("target", 7458), "core": ("oar", 1320), "body": ("body", 601736)}
    assert case.rx_gy == pytest.approx(50.0)  # from the mapped target's objective
    with pytest.raises(CaseFileError, match=r"'Rectum' .*not found; found \['Core', 'OuterTarget', 'BODY'\]"):
        load_matrad(path, structures={"ptv": "OuterTarget", "rectum": "Rectum"})


def test_case_file_error_message_and_pickle(tmp_path: Path) -> None:
    err = CaseFileError(tmp_path / "x.mat", "no 'cst' variable")
    assert isinstance(err, ValueError) and (err.path, err.detail) == (str(tmp_path / "x.mat"), "no 'cst' variable")
    assert str(err) == f"{tmp_path / 'x.mat'}: no 'cst' variable"
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.detail, str(back)) == (err.path, err.detail, str(err))
