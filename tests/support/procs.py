"""The tests' one process harness: brokers, bus helper processes and agents started as real child processes on
ipc:// endpoints in a short temp folder, every one of them (and whatever it started) killed and reaped by its
owner, pass or fail; and :func:`wait_until`, the one way a test waits for a condition.

Tests import it as ``from support.procs import ...`` (pyproject's ``[tool.pytest.ini_options] pythonpath`` puts
tests/ on the path); helper scripts in this package run as ``python -m support.<name>`` with ``PYTHONPATH`` set
by :meth:`Procs.spawn`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from m2m.agents.messages import AgentStatus
    from m2m.bus.client import BusConfig

TESTS = Path(__file__).resolve().parent.parent
"""The folder that holds the ``support`` package (put on a child's ``PYTHONPATH``)."""

HB = 0.2
"""Heartbeat of every test process (s) unless its :class:`Procs` says otherwise."""


# ------------------------------------------------------------------------------------------------ waiting
def _timed_out(what: str, timeout: float) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting until {what}")


def wait_until(pred: Callable[[], object], what: str, *, timeout: float = 30.0, step: float = 0.05) -> None:
    """Poll ``pred`` until it returns something truthy; after ``timeout`` s fail with an AssertionError that names
    ``what`` was awaited. Blocks the calling thread (and an event loop running in it): in a coroutine, await
    :func:`wait_until_async`, which is the same wait with the same message."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise _timed_out(what, timeout)
        time.sleep(step)


async def wait_until_async(pred: Callable[[], object | Awaitable[object]], what: str, *, timeout: float = 30.0,
                           step: float = 0.05) -> None:
    """:func:`wait_until` for coroutines: the event loop keeps running between polls; ``pred`` may be async."""
    end = time.monotonic() + timeout
    while True:
        ok = pred()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if time.monotonic() > end:
            raise _timed_out(what, timeout)
        await asyncio.sleep(step)


# ------------------------------------------------------------------------------------------------ processes
def children_of(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    out: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def gone(pid: int) -> bool:
    """No such process, or only its zombie left."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def reap(pid: int, timeout: float) -> int | None:
    """Wait for our child ``pid`` to exit; its exit code, -1 when someone else reaped it, None on timeout."""
    end = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return -1
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            return None
        time.sleep(0.05)


def run_m2m(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """One ``m2m`` command line run to its end in a subprocess, output captured as text."""
    return subprocess.run([sys.executable, "-m", "m2m.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live (not zombie) processes that contain ``text``: what a test checks is gone."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            zombie = ") Z " in (proc / "stat").read_text()
        except OSError:
            continue
        if text in cmdline and not zombie:
            found.append(cmdline)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant, by id (children first collected, so none escapes as an orphan)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children_of(p))
    for p in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


class WatchedCommand:
    """``python -m m2m.cli.main ARGS`` as a child whose stderr lines a thread collects (:attr:`lines`), so a test
    can wait for a line (:meth:`wait_for`), signal the command and check what it printed; :meth:`close` kills it
    (and whatever it started) when it still runs."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "m2m.cli.main", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, match: Callable[[str], object], what: str, *, timeout: float) -> None:
        """Wait until a stderr line satisfies ``match``; fails (with the last lines) when the command exits first."""
        wait_until(lambda: any(match(line) for line in list(self.lines)) or self.proc.poll() is not None, what,
                   timeout=timeout)
        assert self.proc.poll() is None, self.tail()

    def wait(self, timeout: float) -> int:
        """The exit status, once every stderr line was read."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stdout(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout is not None else ""

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=10)


def stop_stack(bus: BusConfig, supervisor_pid: int | None) -> None:
    """Take down a stack that ``start_detached`` started (its supervisor is our child): a DownRequest on the bus,
    then SIGTERM, then SIGKILL of the supervisor and of every process it started; the supervisor is reaped."""
    from m2m.stack.control import shutdown

    if supervisor_pid is None or reap(supervisor_pid, 0) is not None:
        return
    with contextlib.suppress(Exception):
        asyncio.run(shutdown(bus, timeout=30.0))
    if reap(supervisor_pid, 30) is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(supervisor_pid, signal.SIGTERM)  # an orderly down without the bus
    if reap(supervisor_pid, 30) is None:
        kill_tree(supervisor_pid)
        reap(supervisor_pid, 10)


Proc = subprocess.Popen[bytes]


@dataclass
class Procs:
    """The child processes of one test (or of one module's shared stack) and their logs, all in ``dir``.

    Each process is known by the name it was started with (the last one started under that name); its output
    goes to ``dir/<name>.log`` (``<name>-1.log``, ... for later ones of the same name).
    """

    dir: Path
    heartbeat: float = HB
    procs: list[Proc] = field(default_factory=list)
    named: dict[str, Proc] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.dir}/bus"

    @property
    def pub(self) -> str:
        return f"ipc://{self.dir}/pub"

    @property
    def transcript(self) -> Path:
        return self.dir / "bus.m2mt"

    def config(self) -> BusConfig:
        from m2m.bus.client import BusConfig

        return BusConfig(endpoint=self.endpoint, pub_endpoint=self.pub, heartbeat=self.heartbeat)

    def __getitem__(self, name: str) -> Proc:
        return self.named[name]

    def log(self, name: str) -> Path:
        """The log of the first process started as ``name``."""
        return self.dir / f"{name}.log"

    # -------------------------------------------------------------------------------------------- starting
    def spawn(self, *args: str, name: str) -> Proc:
        """``python ARGS`` as ``name``, with tests/ on its ``PYTHONPATH`` (for ``-m support.<helper>``)."""
        log, n = self.log(name), 0
        while log in self.logs:
            n += 1
            log = self.dir / f"{name}-{n}.log"
        pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "M2M_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
        with open(log, "wb") as f:
            p = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        self.named[name] = p
        self.logs.append(log)
        return p

    def m2m(self, *args: str, name: str) -> Proc:
        """The ``m2m`` command line."""
        return self.spawn("-m", "m2m.cli.main", *args, name=name)

    def broker(self, *extra: str, endpoint: str | None = None, pub: str | None = None, name: str = "broker",
               ready: bool = True) -> Proc:
        """``python -m m2m.bus.broker`` on this folder's endpoints (or the given ones) at this heartbeat. With
        ``ready`` it returns once the broker has bound its sockets (its log says ``broker_up``): a client's first
        snapshot or request then does not race the broker's start. In a coroutine pass ``ready=False`` (the wait
        would block the event loop)."""
        p = self.spawn("-m", "m2m.bus.broker", "--endpoint", endpoint or self.endpoint, "--pub-endpoint",
                       pub or self.pub, "--heartbeat", str(self.heartbeat), *extra, name=name)
        if ready:
            log = self.logs[-1]

            def up() -> bool:
                if p.poll() is not None:
                    raise AssertionError(f"{log.stem} exited with {p.returncode}:\n{self.dump_logs()}")
                return "broker_up" in log.read_text(errors="replace")

            wait_until(up, f"{log.stem} is up (broker_up in its log)", timeout=30, step=0.02)
        return p

    def busapp(self, role: str, *args: str, name: str) -> Proc:
        """``python -m support.busapp ROLE ARGS``: a bus test's worker, publisher or transcript writer."""
        return self.spawn("-m", "support.busapp", role, *args, name=name)

    def worker(self, service: str = "echo", *extra: str, name: str = "worker") -> Proc:
        return self.busapp("worker", "--endpoint", self.endpoint, "--pub", self.pub, "--service", service,
                           "--heartbeat", str(self.heartbeat), "--name", name, *extra, name=name)

    def agent(self, role: str, name: str, *options: str, impl: str | None = None) -> Proc:
        """``m2m agent ROLE`` on this bus, ``options`` as ``key=value`` strings."""
        args = ["agent", role, "--name", name, "--connect", self.endpoint, "--pub-connect", self.pub,
                "--heartbeat", str(self.heartbeat)]
        if impl:
            args += ["--impl", impl]
        for o in options:
            args += ["--option", o]
        return self.m2m(*args, name=name)

    # -------------------------------------------------------------------------------------------- waiting
    def wait_ready(self, *names: str, timeout: float = 120.0) -> dict[str, AgentStatus]:
        """Block until every named agent reports ``ready`` on the bus (fails at once if one exits first)."""
        return asyncio.run(self._wait_ready(set(names), timeout))

    async def _wait_ready(self, names: set[str], timeout: float) -> dict[str, AgentStatus]:
        from m2m.agents.messages import AgentStatus
        from m2m.bus.client import BusClient

        seen: dict[str, AgentStatus] = {}
        exited: list[str] = []
        async with BusClient("test-watcher", self.config()) as bus:
            sub = bus.subscribe("agents.status.")

            async def all_ready() -> bool:
                exited.extend(f"{n} exited with {self.named[n].returncode}" for n in sorted(names)
                              if self.named[n].poll() is not None)
                if exited:
                    return True  # fail at once, below
                with contextlib.suppress(TimeoutError):
                    msg = (await sub.get(timeout=0.5)).message
                    # the pid check skips a status retained from an earlier process of the same name
                    if isinstance(msg, AgentStatus) and msg.name in names and msg.pid == self.named[msg.name].pid:
                        seen[msg.name] = msg
                return names <= {n for n, s in seen.items() if s.state == "ready"}

            try:
                await wait_until_async(all_ready, f"{', '.join(sorted(names))} report ready", timeout=timeout,
                                       step=0)
            except AssertionError as exc:
                ready = {n for n, s in seen.items() if s.state == "ready"}
                raise AssertionError(f"{exc}; not ready: {sorted(names - ready)}\n{self.dump_logs()}") from None
        if exited:
            raise AssertionError(f"{'; '.join(exited)}:\n{self.dump_logs()}")
        return seen

    # -------------------------------------------------------------------------------------------- stopping
    def _proc(self, p: str | Proc) -> Proc:
        return self.named[p] if isinstance(p, str) else p

    def terminate(self, p: str | Proc) -> None:
        """SIGTERM (an orderly drain); the caller waits for the exit it expects."""
        self._proc(p).send_signal(signal.SIGTERM)

    def kill(self, p: str | Proc) -> None:
        """SIGKILL and reap."""
        proc = self._proc(p)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)

    def close(self) -> None:
        """SIGKILL every process still running, with whatever it started, and reap them all."""
        for p in self.procs:
            if p.poll() is None:
                kill_tree(p.pid)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)

    def dump_logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}" for log in self.logs)


@contextlib.contextmanager
def running(prefix: str, request: pytest.FixtureRequest, heartbeat: float = HB) -> Iterator[Procs]:
    """A :class:`Procs` in a fresh temp folder under /tmp (ipc paths must stay short). On exit, pass or fail, every
    process is killed and reaped and the folder removed; the logs are printed first when the test failed (pytest
    shows that output with the failure). ``request`` is the owning fixture's (function or module scope)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    ps = Procs(d, heartbeat=heartbeat)
    failed_before = request.session.testsfailed
    try:
        yield ps
    finally:
        ps.close()
        rep = getattr(request.node, "rep_call", None)  # set by the root conftest's pytest_runtest_makereport
        if (rep.failed if rep is not None else request.session.testsfailed > failed_before):
            print(ps.dump_logs())
        shutil.rmtree(d, ignore_errors=True)
