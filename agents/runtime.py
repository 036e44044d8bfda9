"""One base for every agent process: connect to the broker, serve the role's services, announce the agent's
state on ``agents.status.<name>`` (retained, so a supervisor that starts later still sees it), log with the
agent's name and incarnation, and stop gracefully on SIGTERM/SIGINT (drain: finish the requests in progress,
take no new ones; a planner hands its sessions over at once instead, see :meth:`Agent.begin_drain`; with
:data:`FINISH_SIGNAL` it finishes them). Started by a supervisor, it beats on the supervisor's watchdog pipe and
exits when the supervisor dies (:class:`Watchdog`). A signal
during :meth:`Agent.setup` (a model load) stops the agent at once. The process exits promptly even when work it
gave up on still runs in a worker thread (a model's computation, which cannot be interrupted): it does not wait for
that thread.

``m2m agent ROLE [--impl NAME] [--connect ENDPOINT]`` runs one agent (:func:`run_agent`). Exit codes:
:data:`EXIT_OK` after a graceful stop, :data:`EXIT_USAGE` for a bad role, implementation or option,
:data:`EXIT_FATAL` when the agent cannot start or fails while running.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog

from m2m.agents.messages import AgentState, AgentStatus, status_topic
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import BrokerUnavailable, BusError, RequestTimeout
from m2m.bus.worker import Handlers, Worker

EXIT_OK = 0
EXIT_FATAL = 2
EXIT_USAGE = 64

BROKER_WAIT_S = 5.0
DRAIN_TIMEOUT_S = 600.0
"""How long a stopping agent lets its in-progress requests run (a planning session can take minutes)."""
THREAD_PREFIX = "m2m-agent-worker"
"""Name prefix of an agent process's worker threads (its event loop's default executor)."""
THREAD_EXIT_WAIT_S = 0.5
"""How long a stopping agent process waits for its worker threads before it exits without them."""
FINISH_SIGNAL = signal.SIGUSR1
"""Stop gracefully *and finish the work in progress* (``m2m down`` drains the planners with it; SIGTERM instead
hands a planner's sessions over at once, as a swap wants). A SIGTERM after it hands the rest over."""
WATCHDOG_FD_ENV = "M2M_WATCHDOG_FD"
"""Names the write end of the pipe a supervisor gave this agent process (:func:`start_watchdog`)."""
WATCHDOG_BEAT_S = 1.0
"""Seconds between two watchdog beats (one byte each) on that pipe."""
LOOP_STALL_S = 3.0
"""An event loop that has not ticked for this many seconds is stalled: the watchdog stops beating, and the
supervisor kills and restarts the agent after its ``hang_timeout_s`` of silence."""

#: role → implementation name → "module:Class". The first implementation of a role is its default.
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "dose-engine": {"pencil-beam": "m2m.agents.dose_engine:DoseEngine"},
    "evaluator": {"protocol": "m2m.agents.evaluator:Evaluator"},
    "drl-advisor": {"dqn": "m2m.agents.drl_advisor:DrlAdvisorAgent"},
    "planner": {"llm": "m2m.agents.planner:LlmPlannerAgent", "drl": "m2m.agents.planner:DrlPlannerAgent",
                "rules": "m2m.agents.planner:RulesPlannerAgent",
                "knowledge": "m2m.agents.planner:KnowledgePlannerAgent"},
}


class AgentConfigError(ValueError):
    """A bad role, implementation or option (exit code :data:`EXIT_USAGE`); ``option`` names the option at fault
    (``""`` when the role or implementation is)."""

    def __init__(self, problem: str, option: str = "") -> None:
        super().__init__(problem, option)  # both in args: the error pickles whole
        self.problem = problem
        self.option = option

    def __str__(self) -> str:
        return self.problem


def default_impl(role: str) -> str:
    if role not in IMPLEMENTATIONS:
        raise AgentConfigError(f"unknown role {role!r}; expected one of {sorted(IMPLEMENTATIONS)}")
    return next(iter(IMPLEMENTATIONS[role]))


def agent_class(role: str, impl: str | None) -> type[Agent]:
    impls = IMPLEMENTATIONS.get(role)
    if impls is None:
        raise AgentConfigError(f"unknown role {role!r}; expected one of {sorted(IMPLEMENTATIONS)}")
    impl = impl or default_impl(role)
    if impl not in impls:
        raise AgentConfigError(f"role {role!r} has no implementation {impl!r}; expected one of {sorted(impls)}")
    module, _, cls_name = impls[impl].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise AgentConfigError(f"{impls[impl]} is not an Agent")
    return cls


def check_agent(role: str, impl: str | None, options: Mapping[str, str]) -> type[Agent]:
    """The agent class of ``role``/``impl`` once ``options`` passed its :meth:`Agent.check_options`: what a stack
    config, ``m2m swap``, the supervisor and the agent process itself check before anything starts. Raises
    :class:`AgentConfigError` naming the agent, the option and what is allowed."""
    cls = agent_class(role, impl)
    cls.check_options(f"{role}/{impl or default_impl(role)}", options)
    return cls


def parse_options(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["key=value", …]`` → dict; a malformed item raises :class:`AgentConfigError`."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AgentConfigError(f"option {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


@dataclass
class AgentContext:
    """What an agent knows about itself: ``name`` (unique on the bus), ``role``, ``impl``, ``incarnation`` (how
    many times the supervisor restarted it), its ``options`` and its bus connection."""

    name: str
    role: str
    impl: str
    incarnation: int
    options: Mapping[str, str]
    bus: BusClient
    log: Any = field(default=None)


class Agent:
    """Base of the four agents. Subclasses load what they need in :meth:`setup` (before the agent reports
    ready) and return their handlers from :meth:`handlers` (service → one handler per message type)."""

    known_options: ClassVar[frozenset[str]] = frozenset()
    """The option names this implementation takes (``--option key=value``, a stack config's ``options``)."""

    @classmethod
    def check_options(cls, agent: str, options: Mapping[str, str]) -> None:
        """Refuse options this implementation cannot run with, before any process starts: unknown names here;
        subclasses add the checks of their values (a file's existence is not checked: it may appear later, and
        a setup that cannot find it fails and is restarted). ``agent`` (``role/impl``) names it in the error."""
        for name in sorted(options):
            if name not in cls.known_options:
                known = ", ".join(sorted(cls.known_options)) or "none"
                raise AgentConfigError(f"{agent} does not take option {name!r}; it takes: {known}", option=name)

    def __init__(self, ctx: AgentContext) -> None:
        self.check_options(f"{ctx.role}/{ctx.impl}", ctx.options)
        self.ctx = ctx
        self.bus = ctx.bus
        self.log = ctx.log or structlog.get_logger(ctx.role)

    def option(self, key: str, default: str) -> str:
        return self.ctx.options.get(key, default)

    async def setup(self) -> None:
        """Load models, checkpoints, subscribe to topics (runs before the agent serves anything)."""

    def handlers(self) -> dict[str, Handlers]:
        return {}

    def capacity(self) -> int:
        """Requests one instance works on at once (the broker never routes more)."""
        return 1

    def begin_drain(self) -> None:
        """Called on SIGTERM before the workers drain: long handlers may hand their work over (see the planner)."""

    async def report_setup(self, detail: str) -> None:
        """Announce what :meth:`setup` is doing (state ``starting`` with ``detail``, e.g. a model load)."""
        await _announce(self, "starting", [], detail)

    async def close(self) -> None:
        """Release what :meth:`setup` took (after the workers drained)."""


async def _announce(agent: Agent, state: AgentState, services: list[str], detail: str = "") -> None:
    ctx = agent.ctx
    msg = AgentStatus(
        name=ctx.name, role=ctx.role, impl=ctx.impl, pid=os.getpid(), incarnation=ctx.incarnation,
        state=state, services=services, detail=detail,
    )
    try:
        await ctx.bus.publish(status_topic(ctx.name), msg, retain=True)
    except BusError as exc:  # no broker yet (started before it): the client re-asserts the value once one answers
        (ctx.log or structlog.get_logger(ctx.role)).warning("status_not_announced", state=state, error=str(exc)[:200])


async def serve_agent(
    role: str,
    impl: str | None = None,
    *,
    name: str | None = None,
    config: BusConfig | None = None,
    options: Mapping[str, str] | None = None,
    incarnation: int = 0,
    stop: asyncio.Event | None = None,
) -> int:
    """Run one agent until ``stop`` is set (or SIGTERM/SIGINT); return its exit code."""
    impl = impl or default_impl(role)
    cls = check_agent(role, impl, options or {})  # a bad option exits EXIT_USAGE before touching the bus
    name = name or f"{role}-{os.getpid()}"
    log = structlog.get_logger(role).bind(agent=name, role=role, impl=impl, incarnation=incarnation)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    _watchdog = start_watchdog()  # before the setup: a model load in a thread keeps the loop (and the beats) going
    finish = asyncio.Event()  # FINISH_SIGNAL: drain without handing work over
    handed_over = False
    agent: Agent | None = None

    def on_signal(sig: int) -> None:
        nonlocal handed_over
        if sig == FINISH_SIGNAL and not stop.is_set():
            finish.set()
        elif finish.is_set() and agent is not None and not handed_over:
            handed_over = True  # a SIGTERM during a finishing drain: hand the rest over now
            log.info("agent_handing_over")
            agent.begin_drain()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, FINISH_SIGNAL):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread: tests, embedding
            loop.add_signal_handler(sig, on_signal, sig)
    async with BusClient(name, config or BusConfig()) as bus:
        ctx = AgentContext(name, role, impl, incarnation, dict(options or {}), bus, log)
        agent = cls(ctx)
        try:  # so that a setup failure's status reaches the supervisor before the socket closes
            await bus.wait_for_broker(timeout=BROKER_WAIT_S)
        except (RequestTimeout, BrokerUnavailable):
            log.warning("no_broker_yet", endpoint=bus.cfg.endpoint)  # the workers keep trying to register
        await _announce(agent, "starting", [])
        setup = asyncio.ensure_future(agent.setup())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([setup, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not setup.done():  # a signal during setup (a model load): stop without finishing it
            setup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await setup
            await _announce(agent, "stopped", [], "stopped during setup")
            log.info("agent_stopped_during_setup")
            return EXIT_OK
        try:
            setup.result()
        except AgentConfigError as exc:  # an option only setup could judge: no restart can fix it
            log.error("agent_config_error", error=str(exc))
            await _announce(agent, "failed", [], f"{type(exc).__name__}: {exc}")
            return EXIT_USAGE
        except Exception as exc:
            log.exception("agent_setup_failed")
            await _announce(agent, "failed", [], f"{type(exc).__name__}: {exc}")
            return EXIT_FATAL
        workers: list[Worker] = []
        for service, handlers in agent.handlers().items():
            workers.append(await bus.serve(service, handlers, capacity=agent.capacity()))
        services = [w.service for w in workers]
        await _announce(agent, "ready", services)
        log.info("agent_ready", services=services, pid=os.getpid())
        await stop.wait()
        log.info("agent_draining", finish=finish.is_set())
        await _announce(agent, "draining", services)
        if not finish.is_set():
            handed_over = True
            agent.begin_drain()
        drained = await asyncio.gather(*(w.drain(DRAIN_TIMEOUT_S) for w in workers))
        await agent.close()
        await _announce(agent, "stopped", [], "" if all(drained) else "drain timed out")
        log.info("agent_stopped", drained=all(drained))
    return EXIT_OK


class Watchdog:
    """Proof of life for the supervisor and the end of an orphan (see :func:`start_watchdog`).

    A loop task stamps :attr:`last_tick` every :data:`WATCHDOG_BEAT_S` s; a daemon thread (independent of the
    loop, so CPU-bound work in other threads does not silence it) writes one byte to the supervisor's pipe every
    :data:`WATCHDOG_BEAT_S` s while the loop ticked within :data:`LOOP_STALL_S` s. A SIGSTOPped or wedged process
    therefore falls silent. The thread also ends the process (exit :data:`EXIT_FATAL`) when its parent changed (the
    supervisor died and the process was re-parented) or the pipe broke (the supervisor closed it)."""

    def __init__(self, fd: int, parent: int) -> None:
        self.fd = fd
        self.parent = parent
        self.last_tick = time.monotonic()
        self._ticker: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._beat, name="m2m-watchdog", daemon=True)

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        self._thread.start()

    async def _tick(self) -> None:
        while True:
            self.last_tick = time.monotonic()
            await asyncio.sleep(WATCHDOG_BEAT_S / 2)

    def _beat(self) -> None:
        while True:
            if os.getppid() != self.parent:
                _orphan_exit("the supervisor is gone")
            if time.monotonic() - self.last_tick < LOOP_STALL_S:
                try:
                    os.write(self.fd, b".")
                except BlockingIOError:
                    pass  # the supervisor reads late (it is busy): the pipe is full of proof of life already
                except OSError:
                    _orphan_exit("the supervisor closed the watchdog pipe")
            time.sleep(WATCHDOG_BEAT_S)


def _orphan_exit(why: str) -> None:
    structlog.get_logger("agent").warning("agent_orphaned_exiting", reason=why)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_FATAL)


def start_watchdog() -> Watchdog | None:
    """Start the :class:`Watchdog` when a supervisor started this process (``$M2M_WATCHDOG_FD`` names the pipe);
    None otherwise (an agent started by hand). Call it from the running event loop."""
    value = os.environ.pop(WATCHDOG_FD_ENV, None)  # popped: processes this agent starts get no inherited pipe
    if not value:
        return None
    try:
        fd = int(value)
        os.set_blocking(fd, False)
    except (ValueError, OSError) as exc:
        structlog.get_logger("agent").warning("watchdog_pipe_unusable", value=value, error=str(exc))
        return None
    dog = Watchdog(fd, os.getppid())
    dog.start()
    return dog


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``); a supervisor
    runs it in each child between fork and exec. A no-op where prctl is missing (not Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def run_agent(
    role: str,
    impl: str | None = None,
    *,
    name: str | None = None,
    config: BusConfig | None = None,
    options: Mapping[str, str] | None = None,
    incarnation: int = 0,
) -> int:
    """Blocking entry point of ``m2m agent``: the exit code for the process. When a worker thread still computes
    something the agent gave up on (a cancelled model call), the process ends here with :func:`os._exit` rather
    than wait for it."""
    try:
        code = _run_loop(
            serve_agent(role, impl, name=name, config=config, options=options, incarnation=incarnation)
        )
    except AgentConfigError as exc:
        structlog.get_logger(role).error("agent_config_error", error=str(exc))
        code = EXIT_USAGE
    except Exception:
        structlog.get_logger(role).exception("agent_fatal")
        code = EXIT_FATAL
    busy = [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]
    if busy:
        structlog.get_logger(role).info("agent_exit_without_threads", threads=len(busy))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """:func:`asyncio.run`, except that the loop's worker threads are not waited for at the end: the idle ones end
    at once, a busy one (an abandoned model call) keeps running until the process exits (see :func:`run_agent`)."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(thread_name_prefix=THREAD_PREFIX)
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            asyncio.set_event_loop(None)
            loop.close()
            for t in threading.enumerate():
                if t.name.startswith(THREAD_PREFIX):
                    t.join(THREAD_EXIT_WAIT_S)
