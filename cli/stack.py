"""``m2m up``, ``m2m status``, ``m2m swap`` and ``m2m down``: run an agent stack and talk to its supervisor.

``up`` runs the supervisor in the foreground (or, with ``--detach``, in the background); every stack gets an id and
a runtime folder (:mod:`m2m.stack.registry`), and, without endpoints, sockets of its own there. The others are bus
clients of ``supervisor.control`` and find the stack by ``--stack ID`` or ``--connect ENDPOINT``, else take the
only running one (``status`` without either shows every running stack). Exit codes (:mod:`m2m.cli.common`): 2 for
a bad or ambiguous command line or config, refused before anything starts or is asked; 1 when no stack answers or
the stack fails. Heavy imports stay lazy.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2m.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    UsageError,
    add_bus_arguments,
    bus_config,
    check_writable_folder,
    named_bus,
    registered_bus,
    with_keys,
)

if TYPE_CHECKING:
    from rich.console import Console

    from m2m.agents.messages import StackStatus
    from m2m.bus.client import BusConfig


def _consoles() -> tuple[Console, Console]:
    import sys

    from rich.console import Console

    # Pipes and log files get whole rows; a failure line stays one line (start_detached finds it by its prefix).
    return Console(width=None if sys.stdout.isatty() else 200), Console(stderr=True, soft_wrap=True)


def print_stack(console: Console, status: StackStatus) -> None:
    """The agents table, the stack's id, its endpoints, the transcript and the run folder."""
    from rich.table import Table

    table = Table(title=f"m2m stack {status.stack_id}".rstrip())
    for column in ("agent", "role", "impl", "pid", "state", "restarts", "uptime (s)"):
        table.add_column(column, justify="right" if column in {"pid", "restarts", "uptime (s)"} else "left")
    for a in status.agents:
        style = "green" if a.state == "ready" else "yellow"
        table.add_row(a.name, a.role, a.impl, str(a.pid), f"[{style}]{a.state}[/]", str(a.restarts),
                      f"{a.uptime_s:.1f}")
    console.print(table)
    lines = [("stack", status.stack_id), ("endpoint", status.endpoint), ("pub", status.pub_endpoint),
             ("transcript", status.transcript), ("logs", str(Path(status.transcript).parent))]
    for label, value in lines:
        if value:
            console.print(f"{label + ':':<11} {value}", markup=False, highlight=False)


def _error(console: Console, text: str) -> None:
    console.print(text, style="red", markup=False, highlight=False)


def config_bus(args: argparse.Namespace) -> BusConfig | None:
    """The bus of the stack ``--config FILE`` describes (None without ``--config``): its ``[bus]`` endpoints, or, for
    a config without endpoints, the one running stack started from that file. :class:`UsageError` for a config that
    cannot be read or goes with ``--stack``/``--connect``; a ``StackError`` when no (or more than one) stack runs
    from a config without endpoints."""
    from m2m.stack import registry
    from m2m.stack.config import StackConfigError, StackError, load_stack_config

    path = getattr(args, "config", None)
    if path is None:
        return None
    if args.stack is not None or args.connect is not None:
        raise UsageError("--config names the stack by its file: give no --stack or --connect with it")
    try:
        config = load_stack_config(path)
    except StackConfigError as exc:
        raise UsageError(str(exc)) from None
    if config.endpoint is not None and config.pub_endpoint is not None:
        return with_keys(args, config.endpoint, config.pub_endpoint, config)
    wanted = Path(path).resolve()
    matches = [e for e in registry.running_stacks() if e.config and Path(e.config).resolve() == wanted]
    if len(matches) != 1:
        raise StackError(f"{len(matches) or 'no'} running stacks were started from {path} (it gives no [bus] "
                         "endpoints): name one with --stack ID")
    return with_keys(args, matches[0].endpoint, matches[0].pub_endpoint, config)


def _bus(args: argparse.Namespace, err: Console) -> BusConfig | int:
    """The bus of the stack the command line names (``--config`` too) or the only running one; else the exit code,
    reported."""
    from m2m.stack.config import StackError

    try:
        return config_bus(args) or bus_config(args)
    except UsageError as exc:  # arguments that do not go together, several stacks and none named, CURVE keys
        _error(err, f"m2m {args.command}: error: {exc}")
        return EXIT_USAGE
    except StackError as exc:  # no stack runs, or none with that id
        _error(err, f"m2m {args.command}: {exc}")
        return EXIT_FAILED


def _up(args: argparse.Namespace) -> int:
    from m2m.stack import registry
    from m2m.stack.config import StackConfigError, StackError, load_stack_config
    from m2m.stack.control import start_detached
    from m2m.stack.supervisor import FAILURE_PREFIX, Supervisor, refuse_registered

    out, err = _consoles()
    runtime = None
    try:
        if (args.endpoint is None) != (args.pub_endpoint is None):
            raise UsageError("--endpoint and --pub-endpoint go together (without both, the stack gets sockets of "
                             "its own)")
        config = load_stack_config(args.config).override(
            endpoint=args.endpoint, pub_endpoint=args.pub_endpoint, transcript_dir=args.transcript_dir
        )
        if args.runtime_dir is not None:  # the child of --detach: its runtime folder is made and registered
            runtime = registry.read_entry(args.runtime_dir)
            if runtime is None:
                raise StackError(f"no stack registered in {args.runtime_dir}")
        else:
            check_writable_folder(args.run_dir or config.transcript_dir, "the transcript folder")
            if config.endpoint is not None:
                refuse_registered(config.endpoint)
    except (UsageError, StackConfigError) as exc:
        _error(err, f"m2m up: error: {exc}")
        return EXIT_USAGE
    except StackError as exc:
        _error(err, f"m2m up: {exc}")
        return EXIT_FAILED
    if args.detach:
        try:
            status = start_detached(args.config, endpoint=args.endpoint, pub_endpoint=args.pub_endpoint,
                                    transcript_dir=args.transcript_dir)
        except StackError as exc:
            _error(err, f"m2m up: {exc}")
            return EXIT_FAILED
        print_stack(out, status)
        out.print(f"the stack runs in the background; stop it with [bold]m2m down --stack {status.stack_id}[/]")
        return 0

    def ready(status: StackStatus) -> None:
        print_stack(out, status)
        out.print(f"the stack is up; stop it with Ctrl-C or [bold]m2m down --stack {status.stack_id}[/]")

    supervisor = Supervisor(config, run_dir=args.run_dir, runtime=runtime, on_ready=ready)
    code = asyncio.run(supervisor.run())
    if supervisor.failure:
        _error(err, f"{FAILURE_PREFIX}{supervisor.failure}")
    return code


def _status(args: argparse.Namespace) -> int:
    from m2m.stack import registry
    from m2m.stack.config import StackError
    from m2m.stack.control import stack_status

    out, err = _consoles()
    try:
        named = config_bus(args) or named_bus(args)
    except UsageError as exc:
        _error(err, f"m2m status: error: {exc}")
        return EXIT_USAGE
    except StackError as exc:
        _error(err, f"m2m status: {exc}")
        return EXIT_FAILED
    if named is not None:
        status = asyncio.run(stack_status(named, timeout=args.timeout))
        if status is None:
            _error(err, f"no stack answers at {named.endpoint} (start one with m2m up)")
            return EXIT_FAILED
        print_stack(out, status)
        return 0
    stacks = registry.running_stacks()
    stale = registry.stale_stacks()
    for entry in stale:
        left = ", ".join(f"{name} (pid {pid})" for name, pid in registry.live_children(entry))
        _error(err, f"stack {entry.id}: its supervisor (pid {entry.pid}) is gone but {left} still run: stop them "
                    "with m2m down")
    if not stacks:
        _error(err, "no stack runs (start one with m2m up)")
        return EXIT_FAILED

    async def ask_all() -> list[StackStatus | None]:
        # each with the keys of the config it was started from (a CURVE stack answers no one else)
        return await asyncio.gather(*(stack_status(registered_bus(e), timeout=args.timeout) for e in stacks))

    for entry, status in zip(stacks, asyncio.run(ask_all()), strict=True):
        if status is None:
            out.print(f"stack {entry.id}: supervisor pid {entry.pid} is starting or does not answer at "
                      f"{entry.endpoint} (run folder {entry.run_dir or '-'})", markup=False, highlight=False)
        else:
            print_stack(out, status)
    if len(stacks) > 1:
        out.print(f"{len(stacks)} stacks run; address one with --stack ID", markup=False, highlight=False)
    return 0


def _swap(args: argparse.Namespace) -> int:
    from m2m.agents.runtime import AgentConfigError, check_agent, parse_options
    from m2m.stack.config import StackError
    from m2m.stack.control import swap

    out, err = _consoles()
    try:  # what can be checked here is refused before the supervisor is asked
        check_agent(args.role, args.impl, parse_options(args.option))
    except AgentConfigError as exc:
        _error(err, f"m2m swap: error: {exc}")
        return EXIT_USAGE
    config = _bus(args, err)
    if isinstance(config, int):
        return config
    try:
        result = asyncio.run(swap(config, args.role, args.impl, args.option, timeout=args.timeout))
    except StackError as exc:
        _error(err, f"m2m swap: {exc}")
        return EXIT_FAILED
    out.print(f"{result.role} now runs {result.impl}: started {', '.join(result.started)}; "
              f"stopped {', '.join(result.stopped)}", markup=False, highlight=False)
    return 0


def _down(args: argparse.Namespace) -> int:
    from m2m.stack import registry
    from m2m.stack.control import shutdown

    out, err = _consoles()
    unnamed = args.stack is None and args.connect is None and args.config is None
    stale = registry.stale_stacks() if unnamed else []
    for entry in stale:  # what a killed supervisor left: its process groups are killed, its folder removed
        stopped = registry.stop_orphans(entry)
        out.print(f"stack {entry.id} (its supervisor pid {entry.pid} was gone): stopped "
                  f"{', '.join(stopped) or 'nothing'}", markup=False, highlight=False)
    if args.all:
        if not unnamed:
            _error(err, "m2m down: error: --all stops every running stack: give no --stack, --connect or --config "
                        "with it")
            return EXIT_USAGE
        targets = [registered_bus(e) for e in registry.running_stacks()]
        if not targets:
            if stale:
                return 0
            _error(err, "no stack runs")
            return EXIT_FAILED
    elif stale and not registry.running_stacks():
        return 0
    else:
        config = _bus(args, err)
        if isinstance(config, int):
            return config
        targets = [config]
    code = 0
    for target in targets:
        result = asyncio.run(shutdown(target, timeout=args.timeout))
        if result is None:
            _error(err, f"no stack answers at {target.endpoint}")
            code = EXIT_FAILED
            continue
        out.print(f"stack at {target.endpoint} down; stopped {', '.join(result.stopped) or 'no agents'}",
                  markup=False, highlight=False)
    return code


CONFIG_HELP = ("the stack config the stack was started with: its [bus] endpoints and CURVE client keys (or, "
               "without endpoints, the one stack running from that file)")


def add_commands(sub: Any, bench_sub: Any) -> None:
    """Add ``up``, ``status``, ``swap`` and ``down``."""
    up = sub.add_parser("up", help="start an agent stack (broker + agents) under a supervisor")
    up.add_argument("--config", type=Path, default=None, metavar="FILE",
                    help="stack config TOML (default: the packaged stack/stack.toml)")
    up.add_argument("--detach", action="store_true", help="run the supervisor in the background; return once ready")
    up.add_argument("--endpoint", default=None,
                    help="override [bus] endpoint (default: a socket in the stack's own runtime folder)")
    up.add_argument("--pub-endpoint", default=None, help="override [bus] pub_endpoint (goes with --endpoint)")
    up.add_argument("--transcript-dir", type=Path, default=None, help="override [bus] transcript_dir")
    up.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)  # set by --detach for its child
    up.add_argument("--runtime-dir", type=Path, default=None, help=argparse.SUPPRESS)  # ditto: its registered folder
    up.set_defaults(func=_up)

    st = sub.add_parser("status", help="the running stacks' agents, endpoints and transcripts")
    add_bus_arguments(st)
    st.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the supervisor (%(default)s)")
    st.set_defaults(func=_status)

    sw = sub.add_parser("swap", help="replace every instance of a role by another implementation (no downtime)")
    sw.add_argument("role")
    sw.add_argument("--impl", required=True, help="the new implementation")
    sw.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="implementation option")
    sw.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the swap (%(default)s)")
    add_bus_arguments(sw)
    sw.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    sw.set_defaults(func=_swap)

    dn = sub.add_parser("down", help="stop a running stack (agents drain, the broker stops last)")
    add_bus_arguments(dn)
    dn.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    dn.add_argument("--all", action="store_true", help="stop every running stack")
    dn.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the stop (%(default)s)")
    dn.set_defaults(func=_down)
