"""The supervisor on the edges (issue 19): a hung agent is restarted, a ``kill -9``ed supervisor leaves no process
behind and no registration that ``m2m status/down`` cannot handle, ``m2m down`` lets a running session finish.

Real processes: a detached supervisor, a real broker and real agents on ipc sockets in a short temp folder; every
stack is taken down in teardown (and every process it started killed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.procs import children_of, gone, kill_tree, reap, stop_stack, wait_until
from support.stacks import RULES_AGENTS

from m2m.agents.messages import SessionRequest, SessionResult, StackStatus, new_session_id
from m2m.bus.client import BusConfig
from m2m.cli.main import main
from m2m.session.client import run_session_request
from m2m.stack import registry
from m2m.stack.control import shutdown, stack_status, start_detached
from m2m.stack.supervisor import PID_FILE_NAME, refuse_registered

pytestmark = pytest.mark.timeout(180)

AGENTS = RULES_AGENTS


@dataclass
class Stack:
    dir: Path
    bus: BusConfig
    status: StackStatus
    supervisor: int
    extra: set[int] = field(default_factory=set)

    def refresh(self) -> StackStatus:
        status = asyncio.run(stack_status(self.bus, timeout=10.0))
        assert status is not None, "the stack did not answer"
        self.status = status
        return status

    def pid(self, name: str) -> int:
        return next(a.pid for a in self.status.agents if a.name == name)

    def logs(self) -> str:
        run_dir = Path(self.status.transcript).parent
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(run_dir.glob("*.log")))


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A dose engine, an evaluator and a rules planner under a detached supervisor; hang_timeout_s 4."""
    d = Path(tempfile.mkdtemp(prefix="m2mts", dir="/tmp"))  # ipc paths must stay short
    monkeypatch.setenv("M2M_CACHE_DIR", str(d / "cache"))
    monkeypatch.setenv("M2M_RUNTIME_DIR", str(d / "rt"))
    config = d / "stack.toml"
    config.write_text(f'[bus]\ntranscript_dir = "{d}/runs"\n\n[restart]\nmax_restarts = 3\nwindow_s = 60\n'
                      f"ready_timeout_s = 60\nstop_timeout_s = 60\nhang_timeout_s = 4\n{AGENTS}")
    status = start_detached(config)
    bus = BusConfig(endpoint=status.endpoint, pub_endpoint=status.pub_endpoint)
    st = Stack(d, bus, status, int((Path(status.transcript).parent / PID_FILE_NAME).read_text()))
    everything = children_of(st.supervisor)
    try:
        yield st
    finally:
        stop_stack(bus, st.supervisor)
        for pid in everything | st.extra:  # whatever a test left stopped or orphaned
            if not gone(pid):
                kill_tree(pid)
        print(st.logs())
        shutil.rmtree(d, ignore_errors=True)


def _session(bus: BusConfig, step_cap: int = 2) -> SessionResult:
    req = SessionRequest(session_id=new_session_id(), scenario="prostate-basic", case_seed=0, mode="unguided",
                         step_cap=step_cap)
    return asyncio.run(run_session_request(bus, req, lambda step, outcome: None))


def test_a_stopped_evaluator_is_killed_and_restarted(stack: Stack) -> None:
    old = stack.pid("evaluator-1")
    os.kill(old, signal.SIGSTOP)
    stack.extra.add(old)

    def not_ready() -> bool:
        return next(a for a in stack.refresh().agents if a.name == "evaluator-1").state == "unresponsive"

    wait_until(not_ready, what="evaluator-1 shown not ready while it is silent", timeout=30)

    def restarted() -> bool:
        a = next(a for a in stack.refresh().agents if a.name == "evaluator-1")
        return a.restarts == 1 and a.state == "ready" and a.pid != old

    wait_until(restarted, what="evaluator-1 killed and restarted", timeout=60)
    assert gone(old)
    log = (Path(stack.status.transcript).parent / "evaluator-1.log").read_text()
    assert '"incarnation": 1' in log
    supervisor_log = (Path(stack.status.transcript).parent / "supervisor.log").read_text()
    assert "agent_hung_killing" in supervisor_log
    result = _session(stack.bus)
    assert result.outcome is not None and len(result.steps) >= 1


def test_a_killed_supervisor_leaves_no_process_and_status_cleans_up(stack: Stack,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    children = children_of(stack.supervisor)
    assert len(children) == 4  # the broker and three agents
    entry = registry.running_stacks()[0]
    assert {pid for _, pid, _ in entry.children} == children  # recorded for m2m status/down
    os.kill(stack.supervisor, signal.SIGKILL)
    assert reap(stack.supervisor, 10) is not None
    wait_until(lambda: all(gone(p) for p in children), what="every child gone with its supervisor", timeout=20)
    assert main(["status"]) == 1
    assert "no stack runs" in capsys.readouterr().err
    assert not Path(entry.dir).exists()  # the stale registration was removed


def _stale_stack(endpoint: str | None = None) -> tuple[registry.StackEntry, subprocess.Popen[bytes]]:
    """A registration as a ``kill -9``ed supervisor leaves it: its pid dead, a recorded child still running (a
    process of its own group, as the supervisor's children are)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    entry = registry.allocate(endpoint, endpoint and endpoint + "-pub")
    entry = registry.record_children(dataclasses.replace(entry, pid=dead.pid, pid_start=None),
                                     [("dose-engine-1", orphan.pid)])
    return entry, orphan


def test_status_and_down_find_and_stop_what_a_dead_supervisor_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("M2M_RUNTIME_DIR", str(tmp_path / "rt"))
    entry, orphan = _stale_stack()
    try:
        assert registry.running_stacks() == [] and Path(entry.dir).exists()  # not running, but not forgotten
        assert [e.id for e in registry.stale_stacks()] == [entry.id]
        assert main(["status"]) == 1
        err = capsys.readouterr().err
        assert f"stack {entry.id}" in err and f"dose-engine-1 (pid {orphan.pid})" in err and "m2m down" in err
        assert main(["down"]) == 0
        assert "dose-engine-1" in capsys.readouterr().out
        assert orphan.wait(10) == -signal.SIGTERM
        assert registry.stale_stacks() == [] and not Path(entry.dir).exists()
    finally:
        orphan.kill()
        orphan.wait()


def test_a_stack_at_the_endpoint_of_a_dead_one_replaces_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M2M_RUNTIME_DIR", str(tmp_path / "rt"))
    endpoint = f"ipc://{tmp_path}/bus"
    entry, orphan = _stale_stack(endpoint)
    try:
        refuse_registered(endpoint)  # what m2m up / m2m plan check before they start a stack there: no refusal
        assert orphan.wait(10) == -signal.SIGTERM
        assert not Path(entry.dir).exists()
    finally:
        orphan.kill()
        orphan.wait()


def test_down_lets_a_running_session_finish(stack: Stack) -> None:
    results: list[SessionResult | BaseException] = []

    def run() -> None:
        try:
            results.append(_session(stack.bus, step_cap=4))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    planner = stack.pid("planner-1")
    log = Path(stack.status.transcript).parent / "planner-1.log"
    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until(lambda: "session_step" in log.read_text(errors="replace"), what="the session's first step",
                   timeout=120)
        down = asyncio.run(shutdown(stack.bus, timeout=120))
        assert down is not None
    finally:
        thread.join(150)
    [result] = results
    assert isinstance(result, SessionResult), result
    assert result.outcome is not None and len(result.steps) >= 2
    assert reap(stack.supervisor, 30) == 0
    assert gone(planner)
    assert '"finish": true' in log.read_text()
