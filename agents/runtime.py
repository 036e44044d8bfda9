"""One base for every agent process: connect to the broker, serve the role's services, announce the agent's
state on ``agents.status.<name>`` (retained, so a supervisor that starts later still sees it), log with the
agent's name and incarnation, and stop gracefully on SIGTERM/SIGINT (drain: finish the requests in progress,
take no new ones).

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog

from m2m.agents.messages import AgentState, AgentStatus, status_topic
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import RequestTimeout
from m2m.bus.worker import Handlers, Worker

EXIT_OK = 0
EXIT_FATAL = 2
EXIT_USAGE = 64

BROKER_WAIT_S = 5.0
DRAIN_TIMEOUT_S = 600.0
"""How long a stopping agent lets its in-progress requests run (a planning session can take minutes)."""

#: role → implementation name → "module:Class". The first implementation of a role is its default.
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "dose-engine": {"pencil-beam": "m2m.agents.dose_engine:DoseEngine"},
    "evaluator": {"protocol": "m2m.agents.evaluator:Evaluator"},
    "drl-advisor": {"dqn": "m2m.agents.drl_advisor:DrlAdvisorAgent"},
    "planner": {"llm": "m2m.agents.planner:LlmPlannerAgent", "drl": "m2m.agents.planner:DrlPlannerAgent",
                "rules": "m2m.agents.planner:RulesPlannerAgent"},
}


class AgentConfigError(ValueError):
    """A bad role, implementation or option (exit code :data:`EXIT_USAGE`)."""


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

    def __init__(self, ctx: AgentContext) -> None:
        unknown = set(ctx.options) - self.known_options
        if unknown:
            raise AgentConfigError(
                f"{ctx.role}/{ctx.impl} does not take option(s) {sorted(unknown)}; known: {sorted(self.known_options)}"
            )
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

    async def close(self) -> None:
        """Release what :meth:`setup` took (after the workers drained)."""


async def _announce(agent: Agent, state: AgentState, services: list[str], detail: str = "") -> None:
    ctx = agent.ctx
    msg = AgentStatus(
        name=ctx.name, role=ctx.role, impl=ctx.impl, pid=os.getpid(), incarnation=ctx.incarnation,
        state=state, services=services, detail=detail,
    )
    await ctx.bus.publish(status_topic(ctx.name), msg, retain=True)


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
    cls = agent_class(role, impl)
    name = name or f"{role}-{os.getpid()}"
    log = structlog.get_logger(role).bind(agent=name, role=role, impl=impl, incarnation=incarnation)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread: tests, embedding
            loop.add_signal_handler(sig, stop.set)
    async with BusClient(name, config or BusConfig()) as bus:
        ctx = AgentContext(name, role, impl, incarnation, dict(options or {}), bus, log)
        agent = cls(ctx)
        try:  # so that a setup failure's status reaches the supervisor before the socket closes
            await bus.wait_for_broker(timeout=BROKER_WAIT_S)
        except RequestTimeout:
            log.warning("no_broker_yet", endpoint=bus.cfg.endpoint)  # the workers keep trying to register
        await _announce(agent, "starting", [])
        try:
            await agent.setup()
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
        log.info("agent_draining")
        await _announce(agent, "draining", services)
        agent.begin_drain()
        drained = await asyncio.gather(*(w.drain(DRAIN_TIMEOUT_S) for w in workers))
        await agent.close()
        await _announce(agent, "stopped", [], "" if all(drained) else "drain timed out")
        log.info("agent_stopped", drained=all(drained))
    return EXIT_OK


def run_agent(
    role: str,
    impl: str | None = None,
    *,
    name: str | None = None,
    config: BusConfig | None = None,
    options: Mapping[str, str] | None = None,
    incarnation: int = 0,
) -> int:
    """Blocking entry point of ``m2m agent``: the exit code for the process."""
    try:
        return asyncio.run(
            serve_agent(role, impl, name=name, config=config, options=options, incarnation=incarnation)
        )
    except AgentConfigError as exc:
        structlog.get_logger(role).error("agent_config_error", error=str(exc))
        return EXIT_USAGE
    except Exception:
        structlog.get_logger(role).exception("agent_fatal")
        return EXIT_FATAL
