"""Hooks and fixtures every test folder shares; a folder's own conftest keeps only its own fixtures."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session", autouse=True)
def _user_scenario_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Scenarios the tests register (``m2m plan --case-file``, :func:`m2m.scenarios.register_table`) go to a folder of
    this test run, never to the user's ``~/.local/share/m2m/scenarios``; agent processes the tests start inherit it."""
    before = os.environ.get("M2M_SCENARIO_DIR")
    os.environ["M2M_SCENARIO_DIR"] = str(tmp_path_factory.mktemp("user-scenarios"))
    yield
    if before is None:
        os.environ.pop("M2M_SCENARIO_DIR", None)
    else:
        os.environ["M2M_SCENARIO_DIR"] = before


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
