"""The clients of a running stack: :func:`stack_status`, :func:`swap`, :func:`shutdown` (``m2m status/swap/down``),
:func:`bus_roles` (what runs on its bus, agents from other machines included) and :func:`start_detached` (``m2m up
--detach``, and the commands that bring a stack up when none runs).

They speak to the supervisor's ``supervisor.control`` service (:mod:`m2m.stack.supervisor`). Which stack: a
:class:`~m2m.bus.client.BusConfig` (its endpoints); :mod:`m2m.stack.registry` finds a running stack's by id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from m2m.agents.messages import (
    CONTROL,
    AgentStatus,
    DownRequest,
    DownResult,
    StackStatus,
    StatusRequest,
    SwapRequest,
    SwapResult,
    status_topic,
)
from m2m.agents.runtime import AgentConfigError, check_agent, parse_options
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import BusError, RemoteError
from m2m.stack import registry
from m2m.stack.config import StackConfig, StackError, load_stack_config
from m2m.stack.supervisor import (
    BROKER_STOP_TIMEOUT_S,
    DETACH_MARGIN_S,
    FAILURE_PREFIX,
    NO_ANSWER,
    SUPERVISOR_LOG_NAME,
    new_run_dir,
    refuse_registered,
)

log = structlog.get_logger("m2m.stack")


def _client(purpose: str, config: BusConfig) -> BusClient:
    return BusClient(f"m2m-{purpose}-{os.getpid()}", config)


async def stack_status(config: BusConfig, timeout: float = 5.0) -> StackStatus | None:
    """The running stack's status, or ``None`` when no stack answers within ``timeout`` seconds."""
    async with _client("status", config) as bus:
        try:
            status: StackStatus = await bus.request(CONTROL, StatusRequest(), timeout=timeout, expect=StackStatus)
        except NO_ANSWER:
            return None
    return status


async def bus_roles(config: BusConfig, timeout: float = 5.0) -> set[str]:
    """The roles of every agent that announces itself ready on the bus (its retained ``agents.status.*``), the
    supervisor's own and those that joined it from other machines (``m2m agent ROLE --connect ...``), which
    :func:`stack_status` does not list. Empty when the bus does not answer within ``timeout`` seconds."""
    async with _client("roles", config) as bus:
        try:
            statuses = await asyncio.wait_for(bus.retained(status_topic("")), timeout)
        except (TimeoutError, BusError):
            return set()
    return {m.role for m in statuses.values() if isinstance(m, AgentStatus) and m.state == "ready"}


async def shutdown(config: BusConfig, timeout: float = 60.0) -> DownResult | None:
    """Take the stack down. Returns its :class:`DownResult` once the supervisor has stopped answering (its
    agents are stopped; the broker goes a moment later) or ``timeout`` seconds passed; ``None`` when no stack
    answered. :func:`take_down` also waits for the exit of a stack this process started."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with _client("down", config) as bus:
        try:
            result: DownResult = await bus.request(CONTROL, DownRequest(), timeout=min(timeout, 10.0),
                                                   expect=DownResult)
        except NO_ANSWER:
            return None
        while (remaining := deadline - loop.time()) > 0:
            try:
                await bus.request(CONTROL, StatusRequest(), timeout=min(1.0, remaining), expect=StackStatus)
            except NO_ANSWER:
                break
            await asyncio.sleep(0.2)
    return result


async def take_down(config: BusConfig, timeout: float = 60.0, *, drain: bool = True) -> DownResult | None:
    """:func:`shutdown`, then, for a stack this process started (:func:`start_detached`), wait until its
    supervisor has exited (SIGTERM, then SIGKILL, when it does not): its broker and agents are gone and its runtime
    folder removed when this returns, so no process of it outlives the command that started it. Without ``drain``
    (an interrupted command, whose sessions nobody waits for) a stack this process started is stopped with SIGINT:
    its planners hand their sessions back at once instead of finishing them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    proc = _DETACHED.get(config.endpoint)
    if not drain and proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        result = DownResult(stopped=[])
    else:
        result = await shutdown(config, timeout)
    proc = _DETACHED.pop(config.endpoint, None)
    if proc is not None:
        await asyncio.to_thread(_reap, proc, max(deadline - loop.time(), 0.0) + BROKER_STOP_TIMEOUT_S)
    return result


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a detached supervisor to exit; SIGTERM (an orderly down), then SIGKILL, when it does not."""
    for step in (proc.terminate, proc.kill):
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            step()
    proc.wait()


async def swap(
    config: BusConfig,
    role: str,
    impl: str,
    options: Mapping[str, str] | Sequence[str] = (),
    *,
    timeout: float = 900.0,
) -> SwapResult:
    """Replace every ``role`` instance of the running stack by ``impl`` with ``options`` (a mapping or
    ``key=value`` strings). Raises :class:`StackError` when the role, implementation or options are refused (here,
    before the supervisor is asked: :func:`m2m.agents.runtime.check_agent`), no stack answers or the swap fails
    (the old instances then keep running)."""
    items = [f"{k}={v}" for k, v in options.items()] if isinstance(options, Mapping) else list(options)
    try:
        check_agent(role, impl, parse_options(items))
    except AgentConfigError as exc:
        raise StackError(f"swap of {role} to {impl} refused: {exc}") from None
    if await stack_status(config, timeout=min(timeout, 5.0)) is None:
        raise StackError(f"no stack answers at {config.endpoint}")
    async with _client("swap", config) as bus:
        try:
            result: SwapResult = await bus.request(
                CONTROL, SwapRequest(role=role, impl=impl, options=items), timeout=timeout, expect=SwapResult
            )
        except RemoteError as exc:
            raise StackError(f"swap of {role} to {impl} failed: {exc}") from None
        except NO_ANSWER as exc:
            raise StackError(f"swap of {role} to {impl} did not finish within {timeout:g} s ({exc}); "
                             f"see m2m status") from None
    return result


_DETACHED: dict[str, subprocess.Popen[bytes]] = {}
"""Detached supervisors started by this process, by endpoint: kept so that Python neither warns about nor reaps
them, and so that :func:`shutdown` waits for their exit."""


def start_detached(
    config_path: Path | None = None,
    *,
    endpoint: str | None = None,
    pub_endpoint: str | None = None,
    transcript_dir: Path | None = None,
) -> StackStatus:
    """Start a stack in the background (``m2m up --detach``): a supervisor process in its own session, its log
    in ``<run folder>/supervisor.log`` and its pid in ``supervisor.pid``. Without endpoints (neither given here
    nor in the config) the stack gets its own: the sockets of a new runtime folder (:mod:`m2m.stack.registry`),
    registered before the supervisor starts, so that it is found by its id at once. Blocks until the stack
    answers and returns its status (``stack_id``, ``endpoint`` and ``pub_endpoint`` say where it is); raises
    :class:`StackError` with the reason when the stack does not come up (a supervisor that is still starting is
    then stopped) or another stack is registered at the given endpoint,
    :class:`~m2m.stack.config.StackConfigError` (a subclass) for a bad config. Call it from synchronous code
    (``asyncio.to_thread`` from a coroutine): it runs its own event loop."""
    config = load_stack_config(config_path).override(
        endpoint=endpoint, pub_endpoint=pub_endpoint, transcript_dir=transcript_dir
    )
    if config.endpoint is not None:
        refuse_registered(config.endpoint)
    entry = registry.allocate(config.endpoint, config.pub_endpoint, config=config.source)
    config = dataclasses.replace(config, endpoint=entry.endpoint, pub_endpoint=entry.pub_endpoint)
    proc: subprocess.Popen[bytes] | None = None
    try:
        run_dir = new_run_dir(config.transcript_dir)
        argv = [sys.executable, "-m", "m2m.cli.main", "up", "--run-dir", str(run_dir), "--runtime-dir", entry.dir]
        if config_path is not None:
            argv += ["--config", str(Path(config_path).resolve())]
        log_path = run_dir / SUPERVISOR_LOG_NAME
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        entry = registry.claim(entry, proc.pid, run_dir=str(run_dir))
        log.info("supervisor_detached", pid=proc.pid, stack=entry.id, run_dir=str(run_dir))
        status = asyncio.run(_await_detached(proc, config, run_dir, log_path))
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.terminate()  # an orderly down of whatever already started
            try:
                proc.wait(timeout=config.stop_timeout_s + BROKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        registry.remove(entry)  # the supervisor removes it as it stops; not when it never ran
        raise
    _DETACHED[entry.endpoint] = proc
    return status


async def _await_detached(
    proc: subprocess.Popen[bytes], config: StackConfig, run_dir: Path, log_path: Path
) -> StackStatus:
    timeout = config.ready_timeout_s + DETACH_MARGIN_S
    deadline = time.monotonic() + timeout
    async with _client("up", config.bus_config()) as bus:
        while True:
            code = proc.poll()
            if code is not None:
                raise StackError(f"the supervisor exited with code {code}: {_failure_in(log_path)} (log {log_path})")
            if time.monotonic() > deadline:
                raise StackError(f"the stack did not come up within {timeout:g} s (log {log_path})")
            try:
                status: StackStatus = await bus.request(CONTROL, StatusRequest(), timeout=1.0, expect=StackStatus)
            except NO_ANSWER:
                continue
            if Path(status.transcript).parent == run_dir:
                return status
            await asyncio.sleep(0.2)  # another stack on this endpoint answered; ours will refuse to start


def _failure_in(log_path: Path) -> str:
    """The reason ``m2m up`` printed for its failure, or the log's last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        return f"(no log: {exc})"
    for line in reversed(lines):
        if line.startswith(FAILURE_PREFIX):
            return line.removeprefix(FAILURE_PREFIX)
    return lines[-1][:500] if lines else "(empty log)"
