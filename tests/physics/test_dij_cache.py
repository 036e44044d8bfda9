"""dij cache: a hit returns the identical matrix without recomputing; keys follow every input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from m2m.physics import dij_cache
from m2m.physics.beams import BeamSet, beams_for
from m2m.physics.dij import Dij
from m2m.physics.dij_cache import default_cache_dir, dij_key, load_dij, load_or_compute_dij
from m2m.physics.phantoms import make_case


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = dij_cache.compute_dij

    def counting(*args: Any, **kwargs: Any) -> Dij:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dij_cache, "compute_dij", counting)
    return calls


def _assert_same(a: Dij, b: Dij) -> None:
    for field in ("indptr", "indices", "codes", "scale"):
        x, y = getattr(a.matrix, field), getattr(b.matrix, field)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert a.matrix.codes.dtype == np.uint16 and a.matrix.shape == b.matrix.shape
    np.testing.assert_array_equal(a.voxel_index, b.voxel_index)
    np.testing.assert_array_equal(a.beamlet_beam, b.beamlet_beam)
    assert a.rows.keys() == b.rows.keys()
    for name in a.rows:
        np.testing.assert_array_equal(a.rows[name], b.rows[name])
    assert a.voxel_volume_cc == b.voxel_volume_cc
    assert a.grid_shape == b.grid_shape
    assert a.key == b.key


def test_hit_is_identical_and_does_not_recompute(tmp_path: Path, counted: list[int]) -> None:
    case = make_case("prostate", 4)
    beams = beams_for(case, gantry_deg=(0.0, 90.0, 270.0))
    first = load_or_compute_dij(case, beams, cache_dir=tmp_path)
    assert len(counted) == 1
    assert first.key == dij_key(case, beams)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"{first.key}.npz"]  # no temporary file left behind
    second = load_or_compute_dij(case, beams, cache_dir=tmp_path)
    assert len(counted) == 1
    _assert_same(first, second)
    x = np.random.default_rng(0).random(first.n_beamlets).astype(np.float32)
    np.testing.assert_array_equal(first.dose(x), second.dose(x))
    np.testing.assert_array_equal(first.matrix.rmatvec(first.dose(x)), second.matrix.rmatvec(second.dose(x)))


def test_key_changes_with_every_input() -> None:
    case = make_case("prostate", 4)
    beams = beams_for(case, gantry_deg=(0.0, 90.0))
    base = dij_key(case, beams)
    assert dij_key(case, beams, ["ptv", "bladder", "rectum", "femoral_head_l", "femoral_head_r"]) == base
    others = {
        dij_key(make_case("prostate", 5), beams),
        dij_key(case, BeamSet(gantry_deg=(0.0, 92.0), isocentre_mm=beams.isocentre_mm)),
        dij_key(case, BeamSet(gantry_deg=(0.0, 90.0), bixel_mm=4.0, isocentre_mm=beams.isocentre_mm)),
        dij_key(case, BeamSet(gantry_deg=(0.0, 90.0), isocentre_mm=(0.0, 0.0, 1.0))),
        dij_key(case, beams, ["ptv"]),
    }
    assert base not in others and len(others) == 5


def test_engine_version_is_part_of_the_key(tmp_path: Path, counted: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case("prostate", 4)
    beams = beams_for(case, gantry_deg=(0.0,))
    load_or_compute_dij(case, beams, ["ptv"], cache_dir=tmp_path)
    monkeypatch.setattr(dij_cache, "ENGINE_VERSION", "test-bump")
    load_or_compute_dij(case, beams, ["ptv"], cache_dir=tmp_path)
    assert len(counted) == 2
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_damaged_entry_is_recomputed(tmp_path: Path, counted: list[int]) -> None:
    case = make_case("prostate", 4)
    beams = beams_for(case, gantry_deg=(0.0,))
    good = load_or_compute_dij(case, beams, ["ptv"], cache_dir=tmp_path)
    path = tmp_path / f"{good.key}.npz"
    path.write_bytes(b"not a zip file")
    again = load_or_compute_dij(case, beams, ["ptv"], cache_dir=tmp_path)
    assert len(counted) == 2
    _assert_same(good, again)
    _assert_same(good, load_dij(path))


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("M2M_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("M2M_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "m2m" / "dij"
