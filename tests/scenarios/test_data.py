"""``m2m data``: a case file fetched with pip from a distribution on an index, member extracted, sha256 checked. The
index here is a local folder (pip's ``--find-links`` through its environment variables): the same pip call as
against PyPI, no network."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from m2m.physics.case import CaseFileError
from m2m.scenarios import read_scenario_data, register_table
from m2m.scenarios.data import _extract, fetch_case_file

PAYLOAD = b"a phantom, byte for byte\n" * 100


def _wheel(folder: Path) -> None:
    dist = "m2mfake-1.0.dist-info"
    files = {
        "m2mfake/data/phantom.mat": PAYLOAD,
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: m2mfake\nVersion: 1.0\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/RECORD": b"",
    }
    with zipfile.ZipFile(folder / "m2mfake-1.0-py3-none-any.whl", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def _sdist(folder: Path) -> None:
    with tarfile.open(folder / "m2mfake-2.0.tar.gz", "w:gz") as t:
        for name, data in {"m2mfake-2.0/PKG-INFO": b"Metadata-Version: 2.1\nName: m2mfake\nVersion: 2.0\n",
                           "m2mfake-2.0/examples/phantom.mat": PAYLOAD}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "index"
    folder.mkdir()
    _wheel(folder)
    _sdist(folder)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("M2M_DATA_DIR", str(tmp_path / "data"))
    return folder


def test_an_sdist_member_is_extracted(index: Path, tmp_path: Path) -> None:
    # pip download of an sdist builds its metadata (build requirements from the index), which a local index without
    # setuptools cannot: the extraction from the downloaded .tar.gz is checked on its own.
    out = tmp_path / "member"
    _extract(index / "m2mfake-2.0.tar.gz", "m2mfake-2.0/examples/phantom.mat", out)
    assert out.read_bytes() == PAYLOAD
    with pytest.raises(CaseFileError, match=r"has no member m2mfake-2\.0/nothing"):
        _extract(index / "m2mfake-2.0.tar.gz", "m2mfake-2.0/nothing", out)


def _scenario(tmp_path: Path, name: str, fetch: dict[str, str], sha256: str) -> object:
    data = read_scenario_data("tg119")
    data["case"] = {**data["case"], "path": "phantom.mat", "sha256": sha256, "fetch": fetch}
    return register_table({**data, "name": name}, tmp_path)


def test_a_wheel_member_is_fetched_checked_and_then_found(index: Path, tmp_path: Path) -> None:
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    sc = _scenario(tmp_path, "fetch-wheel", {"requirement": "m2mfake==1.0", "kind": "wheel",
                                             "member": "m2mfake/data/phantom.mat"}, digest)
    got = fetch_case_file(sc)  # type: ignore[arg-type]
    assert got.downloaded and got.path == tmp_path / "data" / "phantom.mat" and got.path.read_bytes() == PAYLOAD
    assert not fetch_case_file(sc).downloaded  # present with the right hash: nothing downloaded  # type: ignore[arg-type]


def test_a_member_with_the_wrong_hash_is_refused_and_not_kept(index: Path, tmp_path: Path) -> None:
    sc = _scenario(tmp_path, "fetch-bad-hash", {"requirement": "m2mfake==1.0", "kind": "wheel",
                                                "member": "m2mfake/data/phantom.mat"}, "0" * 64)
    wrong = r"m2mfake-1\.0-py3-none-any\.whl:m2mfake/data/phantom\.mat: sha256 .* differs"
    with pytest.raises(CaseFileError, match=wrong):
        fetch_case_file(sc)  # type: ignore[arg-type]
    assert not (tmp_path / "data" / "phantom.mat").exists()
    missing = _scenario(tmp_path, "fetch-missing", {"requirement": "m2mfake==1.0", "kind": "wheel",
                                                    "member": "m2mfake/nothing.mat"}, "0" * 64)
    with pytest.raises(CaseFileError, match=r"has no member m2mfake/nothing\.mat"):
        fetch_case_file(missing)  # type: ignore[arg-type]
    absent = _scenario(tmp_path, "fetch-absent", {"requirement": "m2mfake==9.9", "kind": "wheel",
                                                  "member": "x"}, "0" * 64)
    with pytest.raises(CaseFileError, match=r"^m2mfake==9\.9: pip download failed"):
        fetch_case_file(absent)  # type: ignore[arg-type]
