"""Hooks and fixtures every test folder shares; a folder's own conftest keeps only its own fixtures."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest
import structlog
from support.procs import Procs, running


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each test's call report on its node so fixtures can print process logs when it failed."""
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Tests that run the CLI in-process configure structlog; later tests start from the defaults again."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def procs(request: pytest.FixtureRequest) -> Iterator[Procs]:
    """The test's child processes (see :mod:`support.procs`): every one killed and reaped in teardown, pass or fail,
    and their logs printed when the test failed."""
    with running("m2mp", request) as ps:
        yield ps
