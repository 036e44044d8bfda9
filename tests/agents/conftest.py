from __future__ import annotations

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog():
    """Tests that run the CLI in-process configure structlog; later tests start from the defaults again."""
    yield
    structlog.reset_defaults()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each test's call report on its node so fixtures can print process logs when it failed."""
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
