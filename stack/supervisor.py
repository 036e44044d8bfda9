"""The supervisor: runs a whole agent stack (the broker plus every agent instance, each its own OS process), keeps
it running and answers ``supervisor.control`` (:data:`~m2m.agents.messages.CONTROL`).

* **Stack config** (:mod:`m2m.stack.config`; the packaged default is ``stack/stack.toml``): the bus endpoints,
  where the transcripts go, the restart policy and the agents (role, implementation, instances, options).
* **Its own runtime folder** (:mod:`m2m.stack.registry`): every stack gets a stack id and ``<runtime root>/<id>/``
  with its ``stack.json`` (id, endpoints, this supervisor's pid, run folder) and, when the config gives no
  ``[bus]`` endpoints, its ipc sockets; so stacks never share a bus by accident, and ``m2m status/swap/down``
  find them by id. The supervisor removes the folder when it stops. A stack with explicit endpoints refuses to
  start where another stack is registered or a broker answers.
* **Start**: the broker first (``m2m broker --transcript <transcript_dir>/<UTC stamp>/bus.m2mt``), then every
  agent (``m2m agent ROLE --name ROLE-N --incarnation K``); the stack is up when every agent announced ``ready``
  on ``agents.status.<name>``. With ``[bus]`` CURVE keys (:class:`~m2m.stack.config.CurveSettings`) the broker
  gets ``--curve-secret/--curve-clients``, every agent ``--curve-secret <curve_client_secret> --curve-server
  <the broker's public key>``, and the supervisor's own client uses the same client keys; agents on other
  machines join with keys of their own that are in ``curve_clients``. Each child's stdout/stderr go to
  ``<run folder>/<name>.log``; each child has its own process group, so a Ctrl-C in the supervisor's terminal
  reaches only the supervisor, which stops the children in order (as supervisord does).
* **One-for-one restarts**: a child that exits unasked is started again under the same name with
  ``incarnation + 1`` (the broker too: clients reconnect by themselves). More than ``max_restarts`` restarts of
  one child within ``window_s`` seconds, or an agent that exits with :data:`~m2m.agents.runtime.EXIT_USAGE`
  (a bad implementation or option, which no restart can fix), stop the whole stack: :meth:`Supervisor.run`
  returns 1 and :attr:`Supervisor.failure` names the agent.
* **Control**: :class:`StatusRequest` → :class:`StackStatus`; :class:`SwapRequest` starts the new
  implementation's instances, waits until they are ready, then stops the old ones (SIGTERM: they drain;
  SIGKILL after ``stop_timeout_s``); :class:`DownRequest` (or SIGTERM) drains: the planners finish their
  running sessions (at most ``stop_timeout_s``; then hand them back) while the agents they call still run, then the
  other agents stop, then the broker. SIGINT (Ctrl-C; a command that was interrupted stops the stack it started
  with it) skips the planners' finishing: their sessions are handed back at once.
* **Hung agents**: every agent beats on a watchdog pipe of its own (:class:`m2m.agents.runtime.Watchdog`); one
  silent for :data:`SUSPECT_AFTER_S` shows as not ready, for ``hang_timeout_s`` it is killed and restarted.
* **No orphans**: every child gets SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``; an agent's watchdog
  also exits when re-parented), and ``stack.json`` records the children, so ``m2m status/down`` find and stop
  what a ``kill -9``ed supervisor left (:func:`m2m.stack.registry.stop_orphans`).

Clients talk to it through :mod:`m2m.stack.control`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from m2m.agents.messages import (
    CONTROL,
    AgentInfo,
    AgentState,
    AgentStatus,
    DownRequest,
    DownResult,
    StackStatus,
    StatusRequest,
    SwapRequest,
    SwapResult,
    status_topic,
)
from m2m.agents.runtime import (
    EXIT_USAGE,
    FINISH_SIGNAL,
    WATCHDOG_FD_ENV,
    AgentConfigError,
    check_agent,
    parse_options,
    set_parent_death_signal,
)
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import BrokerUnavailable, RemoteError, RequestTimeout, ServiceUnavailable, WorkerLost
from m2m.bus.worker import RequestContext
from m2m.stack import registry
from m2m.stack.config import StackConfig, StackError

log = structlog.get_logger("m2m.supervisor")

TRANSCRIPT_NAME = "bus.m2mt"
PID_FILE_NAME = "supervisor.pid"
SUPERVISOR_LOG_NAME = "supervisor.log"
BROKER_NAME = "broker"
FAILURE_PREFIX = "stack failed: "
"""How ``m2m up`` reports a failure on stderr; :func:`start_detached` finds the reason in the log by it."""

SUSPECT_AFTER_S = 3.0
REPLIES_NAME = "replies.m2mt"
"""The broker's reply cache file (``m2m broker --replies``): a step redone after a takeover is answered from it
even when the worker that did it and the broker both died meanwhile."""
RETAINED_NAME = "retained.m2mt"
"""The broker's knowledge file in the run folder (``m2m broker --retained``): takeover states and knowledge survive a
broker restart even when their publisher died first."""
"""Watchdog silence (s) after which an agent counts as not ready (it is killed after ``hang_timeout_s``)."""
HANG_CHECK_S = 0.5
"""How often the supervisor looks at its children's watchdog pipes."""
DRAIN_FIRST = frozenset({"planner"})
"""Roles stopped first on a down, finishing their sessions while the agents they call still run."""
HANDOVER_WAIT_S = 10.0
"""After its finishing time, how long a planner gets to hand its sessions back before SIGKILL."""
BROKER_START_TIMEOUT_S = 30.0
BROKER_STOP_TIMEOUT_S = 10.0
DETACH_MARGIN_S = 60.0
"""What :func:`start_detached` waits beyond ``ready_timeout_s``: interpreter start, broker, probes."""

#: The errors that mean "no supervisor answered".
NO_ANSWER = (RequestTimeout, ServiceUnavailable, WorkerLost, BrokerUnavailable)


def new_run_dir(transcript_dir: Path) -> Path:
    """Create ``<transcript_dir>/<UTC stamp>`` (``-2``, ``-3`` … appended when two stacks start in one second)."""
    transcript_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    n = 1
    while True:
        run_dir = transcript_dir / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            run_dir.mkdir()
            return run_dir.resolve()
        except FileExistsError:
            n += 1


# ------------------------------------------------------------------------------------------------ supervisor
@dataclass(eq=False)
class _Child:
    """One supervised process (the broker or an agent instance) across its restarts."""

    name: str
    role: str
    impl: str
    options: Mapping[str, str]
    log_path: Path
    probation: bool = False
    """A swap's new instance until it is ready: if it exits, the swap fails instead of restarting it."""
    incarnation: int = 0
    process: asyncio.subprocess.Process | None = None
    spawning: asyncio.Task[None] | None = None
    started: float = 0.0
    state: AgentState = "starting"
    detail: str = ""
    ready: bool = False
    exit_code: int | None = None
    stopping: bool = False
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=deque)
    watchdog: int | None = None
    """The read end of the child's watchdog pipe (agents only; see :class:`m2m.agents.runtime.Watchdog`)."""
    last_beat: float | None = None
    """When the watchdog pipe last said something (monotonic s); None before the first beat."""
    suspected: bool = False
    """Silent on the watchdog pipe for over :data:`SUSPECT_AFTER_S`: shown not ready until it beats again."""

    def describe(self) -> str:
        """The child's name, exit code, last reported state and log, for error messages."""
        parts = [f"last state {self.state}" + (f": {self.detail}" if self.detail else "")]
        if self.exit_code is not None:
            parts.insert(0, f"exit code {self.exit_code}")
            if not self.detail:  # it died before it could say why (e.g. a bad option): its log may tell
                parts.append(f"last log line {_last_log_line(self.log_path)}")
        return f"{self.name} ({'; '.join(parts)}; log {self.log_path})"


def _last_log_line(path: Path, limit: int = 300) -> str:
    """The last line of a child's log; for a structlog JSON line just its event and error."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(unreadable)"
    if not lines:
        return "(empty)"
    try:
        record = json.loads(lines[-1])
    except ValueError:
        record = None
    if isinstance(record, dict) and "event" in record:
        # A logged exception's last line is its type and message, which is what says why.
        reason = str(record.get("error") or str(record.get("exception", "")).strip().rpartition("\n")[2])
        text = f"{record['event']}: {reason}" if reason else str(record["event"])
    else:
        text = lines[-1]
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Supervisor:
    """Runs one stack until it is told to go down (:meth:`request_down`, SIGTERM/SIGINT, a DownRequest) or a
    child exhausts its restarts. ``on_ready`` is called with the first :class:`StackStatus` once every agent is
    ready; ``run_dir`` (created when ``None``) receives the transcript and the logs; ``runtime`` is the stack's
    registered runtime folder (``start_detached`` makes it before it starts the supervisor; made here when
    ``None``), whose endpoints replace the config's."""

    def __init__(
        self,
        config: StackConfig,
        *,
        run_dir: Path | None = None,
        runtime: registry.StackEntry | None = None,
        on_ready: Callable[[StackStatus], None] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.runtime = runtime
        self.on_ready = on_ready
        self.failure: str | None = None
        self.log = log.bind(endpoint=config.endpoint)
        self._agents: dict[str, _Child] = {}
        self._next_index: dict[str, int] = {}
        self._broker: _Child | None = None
        self._bus: BusClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._down = asyncio.Event()
        self._changed = asyncio.Event()
        self._swap_lock = asyncio.Lock()
        self._stopping = False
        self._drain = True
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    @property
    def transcript(self) -> Path:
        """The broker's transcript in the run folder."""
        if self.run_dir is None:
            raise StackError("the stack has no run folder yet")
        return self.run_dir / TRANSCRIPT_NAME

    # -------------------------------------------------------------------------------------- lifecycle
    async def run(self) -> int:
        """Start the stack, serve until down, stop everything; 0 after a requested down, 1 after a failure."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (embedding)
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._start()
            if self.on_ready is not None:
                self.on_ready(self.status())
            await self._down.wait()
        except (StackError, OSError) as exc:
            self._fail(str(exc))
        finally:
            await self._teardown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        return 1 if self.failure else 0

    def request_down(self) -> None:
        """Stop the stack: agents first (they drain), the broker last."""
        self._down.set()
        self._changed.set()

    def _on_signal(self, sig: int) -> None:
        self.log.info("signal_received", signal=signal.Signals(sig).name)
        if sig == signal.SIGINT:  # Ctrl-C, or a command interrupted itself: its sessions' clients are gone
            self._drain = False
        self.request_down()

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self.log.error("stack_failed", reason=reason)
        self.request_down()

    async def _start(self) -> None:
        own = self.runtime.id if self.runtime else None
        if self.config.endpoint is not None:
            refuse_registered(self.config.endpoint, own)
        if self.runtime is None:
            self.runtime = registry.allocate(self.config.endpoint, self.config.pub_endpoint, config=self.config.source)
        self.config = dataclasses.replace(self.config, endpoint=self.runtime.endpoint,
                                          pub_endpoint=self.runtime.pub_endpoint)
        cfg = self.config
        if self.run_dir is None:
            self.run_dir = new_run_dir(cfg.transcript_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / PID_FILE_NAME).write_text(f"{os.getpid()}\n")
        self.runtime = registry.claim(self.runtime, os.getpid(), run_dir=str(self.run_dir),
                                      config=cfg.source or self.runtime.config)
        self.log = self.log.bind(stack=self.runtime.id, endpoint=cfg.endpoint, run_dir=str(self.run_dir))
        await _refuse_running_bus(cfg.bus_config())
        self._broker = _Child(BROKER_NAME, BROKER_NAME, "", {}, self.run_dir / f"{BROKER_NAME}.log")
        await self._start_child(self._broker)
        self._bus = await BusClient("supervisor", cfg.bus_config()).start()
        await self._wait_for_broker(self._bus)
        self._spawn_task(self._follow_status(self._bus))
        self._spawn_task(self._watch_hangs())
        children = [
            self._new_agent(spec.role, spec.impl, spec.options) for spec in cfg.agents for _ in range(spec.instances)
        ]
        for child in children:
            await self._start_child(child)
        await self._wait_ready(children, cfg.ready_timeout_s)
        await self._bus.serve(
            CONTROL,
            {StatusRequest: self._on_status_request, SwapRequest: self._on_swap, DownRequest: self._on_down},
            capacity=8,  # status and down must be answered while a swap waits for its agents
        )
        self.log.info("stack_ready", agents=list(self._agents), transcript=str(self.transcript),
                      runtime=self.runtime.dir)

    async def _wait_for_broker(self, bus: BusClient) -> None:
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while True:
            if self._down.is_set():
                raise StackError(self.failure or "stopped before the broker was up")
            try:
                await bus.wait_for_broker(0.5)
                return
            except (RequestTimeout, BrokerUnavailable):
                if time.monotonic() > deadline:
                    broker = self._broker
                    where = f" (log {broker.log_path})" if broker else ""
                    raise StackError(
                        f"the broker did not answer at {self.config.endpoint} within "
                        f"{BROKER_START_TIMEOUT_S:.0f} s{where}"
                    ) from None

    async def _teardown(self) -> None:
        """Stop in order: the planners first, which (on a requested down) finish their running sessions within
        ``stop_timeout_s`` (:data:`~m2m.agents.runtime.FINISH_SIGNAL`; then SIGTERM hands the rest back to their
        clients with a typed error) while the dose engines, evaluators and advisors they call still run; then the
        other agents (SIGTERM: they drain); the broker last."""
        self._stopping = True
        self._down.set()
        timeout = self.config.stop_timeout_s
        agents = list(self._agents.values())
        first = [c for c in agents if c.role in DRAIN_FIRST]
        if self.failure is None and self._drain:
            await asyncio.gather(*(self._stop_child(c, timeout, finish=True) for c in first))
        await asyncio.gather(*(self._stop_child(c, timeout) for c in agents))
        if self._bus is not None:
            await self._bus.close()
        if self._broker is not None:
            await self._stop_child(self._broker, BROKER_STOP_TIMEOUT_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.run_dir is not None:
            (self.run_dir / PID_FILE_NAME).unlink(missing_ok=True)
        if self.runtime is not None:
            registry.remove(self.runtime)  # its sockets, and the entry that made it findable
        self.log.info("stack_stopped", failure=self.failure)

    # -------------------------------------------------------------------------------------- children
    def _new_agent(self, role: str, impl: str, options: Mapping[str, str], *, probation: bool = False) -> _Child:
        """Register a new agent instance; names count up per role, so a swapped-in generation gets new ones."""
        index = self._next_index.get(role, 1)
        self._next_index[role] = index + 1
        name = f"{role}-{index}"
        assert self.run_dir is not None
        child = _Child(name, role, impl, dict(options), self.run_dir / f"{name}.log", probation=probation)
        self._agents[name] = child
        return child

    def _argv(self, c: _Child) -> list[str]:
        cfg = self.config
        assert cfg.endpoint is not None and cfg.pub_endpoint is not None, "set from the runtime folder in _start"
        cli = [sys.executable, "-m", "m2m.cli.main"]
        curve = cfg.curve
        if c.role == BROKER_NAME:
            return [*cli, "broker", "--endpoint", cfg.endpoint, "--pub-endpoint", cfg.pub_endpoint,
                    "--transcript", str(self.transcript), "--retained", str(self.transcript.parent / RETAINED_NAME),
                    "--replies", str(self.transcript.parent / REPLIES_NAME),
                    *(curve.broker_args() if curve else [])]
        argv = [*cli, "agent", c.role, "--impl", c.impl, "--name", c.name, "--incarnation", str(c.incarnation),
                "--connect", cfg.endpoint, "--pub-connect", cfg.pub_endpoint, *(curve.agent_args() if curve else [])]
        for key, value in c.options.items():
            argv += ["--option", f"{key}={value}"]
        return argv

    async def _start_child(self, c: _Child) -> None:
        if self._stopping or c.stopping:
            raise StackError(f"not starting {c.name}: the stack is going down")
        # Kept on the child so that a stop waits for a spawn in flight instead of missing its process.
        c.spawning = asyncio.get_running_loop().create_task(self._spawn(c))
        await c.spawning

    async def _spawn(self, c: _Child) -> None:
        self._close_watchdog(c)
        env, write_end = self._env, None
        pass_fds: tuple[int, ...] = ()
        if c.role != BROKER_NAME:  # an agent beats on a pipe of its own (the broker runs no agent runtime)
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            c.watchdog = read_end
            env, pass_fds = {**self._env, WATCHDOG_FD_ENV: str(write_end)}, (write_end,)
        try:
            with open(c.log_path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    *self._argv(c), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    process_group=0,  # a terminal's Ctrl-C must reach only the supervisor, which stops them in order
                    pass_fds=pass_fds, preexec_fn=functools.partial(_child_setup, os.getpid()),  # dies with us
                )
        except BaseException:
            self._close_watchdog(c)
            raise
        finally:
            if write_end is not None:
                os.close(write_end)
        c.process = proc
        c.started = time.monotonic()
        c.state, c.detail, c.ready, c.exit_code = "starting", "", False, None
        c.last_beat, c.suspected = None, False
        if c.watchdog is not None:
            asyncio.get_running_loop().add_reader(c.watchdog, self._on_beat, c, c.watchdog)
        self.log.info("process_started", name=c.name, pid=proc.pid, incarnation=c.incarnation)
        self._record_children()
        self._spawn_task(self._watch(c, proc))
        self._changed.set()

    def _on_beat(self, c: _Child, fd: int) -> None:
        """The child's watchdog pipe is readable: beats (proof of life), or its end (the process is gone)."""
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_watchdog(c)
            return
        c.last_beat = time.monotonic()
        if c.suspected:
            c.suspected = False
            self.log.info("agent_beats_again", name=c.name)
            self._changed.set()

    def _close_watchdog(self, c: _Child) -> None:
        fd, c.watchdog = c.watchdog, None
        if fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _record_children(self) -> None:
        """Write the current children's pids into ``stack.json``, so that ``m2m status/down`` can find and stop them
        should this supervisor die without stopping them."""
        if self.runtime is None:
            return
        running = [(c.name, c.process.pid) for c in [self._broker, *self._agents.values()]
                   if c is not None and c.process is not None and c.process.returncode is None]
        with contextlib.suppress(OSError):
            self.runtime = registry.record_children(self.runtime, running)

    async def _watch_hangs(self) -> None:
        """Kill (SIGKILL to its process group) an agent silent on its watchdog pipe for ``hang_timeout_s`` s; its
        exit then restarts it as any unasked exit does (and counts toward ``max_restarts``). From
        :data:`SUSPECT_AFTER_S` of silence on it shows as not ready."""
        while True:
            await asyncio.sleep(HANG_CHECK_S)
            now = time.monotonic()
            for c in list(self._agents.values()):
                proc = c.process
                if proc is None or proc.returncode is not None or c.stopping or self._stopping:
                    continue
                # Before its first beat a process is importing: it has ready_timeout_s to say something.
                since = c.last_beat if c.last_beat is not None else c.started
                limit = self.config.hang_timeout_s if c.last_beat is not None else self.config.ready_timeout_s
                silent = now - since
                if silent > min(SUSPECT_AFTER_S, limit) and c.last_beat is not None and not c.suspected:
                    c.suspected = True
                    self.log.warning("agent_unresponsive", name=c.name, pid=proc.pid, silent_s=round(silent, 1))
                    self._changed.set()
                if silent > limit:
                    c.ready = False
                    c.state, c.detail = "failed", f"no watchdog beat for {silent:.0f} s: killed"
                    self.log.warning("agent_hung_killing", name=c.name, pid=proc.pid, silent_s=round(silent, 1),
                                     hang_timeout_s=limit)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    c.last_beat = now  # not killed twice while the exit is on its way
                    self._changed.set()

    async def _watch(self, c: _Child, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        c.exit_code = code
        c.ready = False
        self._changed.set()
        self._record_children()
        if c.stopping or self._stopping or self._down.is_set():
            c.state = "stopped"
            self.log.info("process_exited", name=c.name, pid=proc.pid, code=code)
            return
        self.log.warning("process_exited_unasked", name=c.name, pid=proc.pid, code=code, state=c.state,
                         detail=c.detail)
        if c.probation:
            return  # the swap waiting for it reports the failure and keeps the old instances
        if code == EXIT_USAGE:
            self._fail(f"{c.describe()}: a bad role, implementation or option, which a restart cannot fix")
            return
        now = time.monotonic()
        while c.restart_times and now - c.restart_times[0] > self.config.window_s:
            c.restart_times.popleft()
        if len(c.restart_times) >= self.config.max_restarts:
            self._fail(
                f"restart intensity exceeded: {c.describe()} exited again after {len(c.restart_times)} restart(s) "
                f"within {self.config.window_s:g} s (max_restarts {self.config.max_restarts})"
            )
            return
        c.restart_times.append(now)
        c.restarts += 1
        c.incarnation += 1
        self.log.warning("process_restarting", name=c.name, incarnation=c.incarnation, restarts=c.restarts)
        try:
            await self._start_child(c)
        except StackError:
            pass  # the stack went down meanwhile: nothing to restart
        except OSError as exc:
            self._fail(f"cannot restart {c.name}: {exc}")

    async def _stop_child(self, c: _Child, timeout: float, *, finish: bool = False) -> None:
        """SIGTERM (an agent drains), wait at most ``timeout`` s, then SIGKILL; returns once the process is gone.
        With ``finish``: :data:`~m2m.agents.runtime.FINISH_SIGNAL` first (the agent finishes its work in progress)
        and ``timeout`` s for it, then the SIGTERM with :data:`HANDOVER_WAIT_S` s before the SIGKILL."""
        c.stopping = True
        if c.spawning is not None:
            with contextlib.suppress(Exception):
                await c.spawning
        proc = c.process
        if proc is None or proc.returncode is not None:
            return
        steps: list[tuple[Callable[[], None], float]] = [(proc.terminate, timeout)]
        if finish:
            steps = [(functools.partial(proc.send_signal, FINISH_SIGNAL), timeout), (proc.terminate, HANDOVER_WAIT_S)]
        for step, wait_s in steps:
            with contextlib.suppress(ProcessLookupError):
                step()
            try:
                async with asyncio.timeout(wait_s):
                    await proc.wait()
                return
            except TimeoutError:
                self.log.warning("stop_step_timed_out", name=c.name, pid=proc.pid, timeout_s=wait_s)
        self.log.warning("stop_timed_out_killing", name=c.name, pid=proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    async def _wait_ready(self, children: Sequence[_Child], timeout: float) -> None:
        """Until every child in ``children`` reported ready; :class:`StackError` naming the culprit otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if self._down.is_set():
                raise StackError(self.failure or "the stack is going down")
            for c in children:
                if c.probation and c.exit_code is not None:
                    raise StackError(f"{c.describe()} exited before it was ready")
            if all(c.ready for c in children):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = "; ".join(c.describe() for c in children if not c.ready)
                raise StackError(f"not ready within {timeout:g} s: {late}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    async def _follow_status(self, bus: BusClient) -> None:
        """Track every agent's announced state (retained on ``agents.status.<name>``)."""
        sub = bus.subscribe(status_topic(""))
        while True:
            try:
                async for delivery in sub:
                    self._on_agent_status(delivery.message)
                return  # the subscription was closed: the supervisor is going down
            except TimeoutError:  # no snapshot: the broker is restarting; the subscription fetches it again
                await asyncio.sleep(bus.cfg.heartbeat)

    def _on_agent_status(self, msg: object) -> None:
        if not isinstance(msg, AgentStatus):
            return
        c = self._agents.get(msg.name)
        # Only the current process's word counts: a retained value may come from an earlier incarnation.
        if c is None or c.process is None or c.process.pid != msg.pid or c.exit_code is not None:
            return
        c.state, c.detail = msg.state, msg.detail
        if msg.state == "ready" and not c.ready:
            c.ready = True
            self.log.info("agent_ready", name=c.name, pid=msg.pid, incarnation=msg.incarnation)
        self._changed.set()

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # A StackError (a refused swap) goes back to its requester; anything else is a supervisor bug.
        if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, StackError):
            self.log.error("supervisor_task_failed", error=repr(exc))

    # -------------------------------------------------------------------------------------- control
    def status(self) -> StackStatus:
        """Every current agent (pid, announced state, restarts, uptime), the endpoint and the transcript."""
        now = time.monotonic()
        agents = [
            AgentInfo(
                name=c.name, role=c.role, impl=c.impl, pid=c.process.pid if c.process else 0,
                state=("exited" if c.exit_code is not None else "unresponsive" if c.suspected else c.state),
                restarts=c.restarts,
                uptime_s=round(now - c.started, 3) if c.process and c.exit_code is None else 0.0,
            )
            for c in self._agents.values()
        ]
        return StackStatus(endpoint=self.config.endpoint or "", transcript=str(self.transcript), agents=agents,
                           stack_id=self.runtime.id if self.runtime else "",
                           pub_endpoint=self.config.pub_endpoint or "")

    async def _on_status_request(self, msg: StatusRequest, ctx: RequestContext) -> StackStatus:
        return self.status()

    async def _on_down(self, msg: DownRequest, ctx: RequestContext) -> DownResult:
        self.log.info("down_requested", requester=ctx.envelope.sender)
        # The reply leaves before the teardown runs: the worker sends it as soon as this returns.
        self.request_down()
        return DownResult(stopped=list(self._agents))

    async def _on_swap(self, msg: SwapRequest, ctx: RequestContext) -> SwapResult:
        self.log.info("swap_requested", role=msg.role, impl=msg.impl, requester=ctx.envelope.sender)
        # Shielded: a request that runs past its deadline must not leave the swap half done.
        task = self._spawn_task(self._swap(msg))
        try:
            return await asyncio.shield(task)
        except StackError as exc:
            raise RemoteError(str(exc)) from None

    async def _swap(self, msg: SwapRequest) -> SwapResult:
        try:
            return await self._swap_locked(msg)
        except StackError as exc:
            # Logged here too: the requester may have given up waiting (its deadline cancels only the handler).
            self.log.warning("swap_failed", role=msg.role, impl=msg.impl, reason=str(exc))
            raise

    async def _swap_locked(self, msg: SwapRequest) -> SwapResult:
        async with self._swap_lock:
            if self._down.is_set():
                raise StackError("the stack is going down")
            old = [c for c in self._agents.values() if c.role == msg.role]
            if not old:
                roles = sorted({c.role for c in self._agents.values()})
                raise StackError(f"this stack runs no {msg.role!r} agents; its roles: {roles}")
            try:  # refused here, before a process starts: a bad option would only make it exit
                options = parse_options(msg.options)
                check_agent(msg.role, msg.impl, options)
            except AgentConfigError as exc:
                raise StackError(str(exc)) from None
            new = [self._new_agent(msg.role, msg.impl, options, probation=True) for _ in old]
            self.log.info("swap_starting", role=msg.role, impl=msg.impl, new=[c.name for c in new])
            try:
                for c in new:
                    await self._start_child(c)
                await self._wait_ready(new, self.config.ready_timeout_s)
            except BaseException:
                await asyncio.gather(*(self._stop_child(c, self.config.stop_timeout_s) for c in new))
                for c in new:
                    self._agents.pop(c.name, None)
                raise
            for c in new:
                c.probation = False
            await asyncio.gather(*(self._stop_child(c, self.config.stop_timeout_s) for c in old))
            for c in old:
                self._agents.pop(c.name, None)
            result = SwapResult(role=msg.role, impl=msg.impl, started=[c.name for c in new],
                                stopped=[c.name for c in old])
            self.log.info("swap_done", role=msg.role, impl=msg.impl, started=result.started, stopped=result.stopped)
            return result


def _child_setup(supervisor: int) -> None:
    """Run in each child between fork and exec: it gets SIGTERM when the supervisor dies (no orphans); a supervisor
    that died before this ran is noticed at once."""
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != supervisor:
        os._exit(1)


def refuse_registered(endpoint: str, own: str | None = None) -> None:
    """:class:`StackError` when a running stack other than ``own`` is registered at ``endpoint``; what is left of a
    stack there whose supervisor died (:func:`m2m.stack.registry.stale_stacks`) is stopped instead."""
    for stale in registry.stale_stacks():
        if stale.endpoint == endpoint and stale.id != own:
            left = registry.stop_orphans(stale)
            log.warning("stale_stack_replaced", stack=stale.id, endpoint=endpoint, stopped=left)
    for other in registry.running_stacks():
        if other.endpoint == endpoint and other.id != own:
            raise StackError(f"stack {other.id} already runs at {endpoint}: stop it first (m2m down --stack "
                             f"{other.id}), or leave the endpoints out to get a stack of its own")


async def _refuse_running_bus(config: BusConfig) -> None:
    """A second broker on an ipc endpoint would silently take the socket over: refuse to start one."""
    endpoint = config.endpoint
    path = endpoint.removeprefix("ipc://")
    if endpoint.startswith("ipc://") and not path.startswith("@") and not Path(path).exists():
        return  # no socket file (and not an abstract socket): nothing listens there
    async with BusClient(f"m2m-probe-{os.getpid()}", config) as probe:
        try:
            await probe.wait_for_broker(0.5)
        except (RequestTimeout, BrokerUnavailable):
            return
    raise StackError(f"a broker already answers at {endpoint}: stop that stack first (m2m down --connect {endpoint}), "
                     "or leave the endpoints out to get a stack of its own")
