"""Fixtures for the bus tests. Every process a test starts is SIGKILLed and reaped in teardown, pass or fail."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # for busapp (message types) and bushelpers

from bushelpers import Procs  # noqa: E402


@pytest.fixture
def procs(request: pytest.FixtureRequest) -> Iterator[Procs]:
    d = Path(tempfile.mkdtemp(prefix="m2mbus", dir="/tmp"))  # ipc paths must stay short
    ps = Procs(d)
    try:
        yield ps
    finally:
        for p in ps.procs:
            if p.poll() is None:
                p.kill()
        for p in ps.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(ps.dump_logs())
        shutil.rmtree(d, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
