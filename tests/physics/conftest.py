"""Fixtures of the physics tests: the synthetic DICOM-RT case (written by :mod:`support.synthetic_dicom`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from support.synthetic_dicom import SyntheticSeries


@pytest.fixture
def write_dicom(tmp_path: Path) -> Callable[..., SyntheticSeries]:
    """Writes a synthetic CT + RTSTRUCT into a fresh folder under ``tmp_path`` on each call; keyword options as
    :func:`support.synthetic_dicom.write_series`. Skips the test where pydicom (extra 'dicom') is absent."""
    pytest.importorskip("pydicom", reason="pydicom not installed (optional extra 'dicom')")
    from support.synthetic_dicom import write_series

    counter = itertools.count()

    def write(**options: Any) -> SyntheticSeries:
        return write_series(tmp_path / f"series_{next(counter)}", **options)

    return write


@pytest.fixture
def dicom_series(write_dicom: Callable[..., SyntheticSeries]) -> SyntheticSeries:
    """The default synthetic series: 24 CT slices and an RTSTRUCT with Body, PTV, Bladder and Rectum."""
    return write_dicom()
