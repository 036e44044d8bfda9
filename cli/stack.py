"""``m2m up``, ``m2m status``, ``m2m swap`` and ``m2m down``: run an agent stack and talk to its supervisor.

``up`` runs the supervisor in the foreground (or, with ``--detach``, in the background); the others are bus
clients of ``supervisor.control`` and exit with 1 when no stack answers. Heavy imports stay lazy.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2m.cli.common import add_bus_arguments, bus_config

if TYPE_CHECKING:
    from rich.console import Console

    from m2m.agents.messages import StackStatus
    from m2m.bus.client import BusConfig

EXIT_NO_STACK = 1
EXIT_CONFIG = 2


def _consoles() -> tuple[Console, Console]:
    import sys

    from rich.console import Console

    # Pipes and log files get whole rows; a failure line stays one line (start_detached finds it by its prefix).
    return Console(width=None if sys.stdout.isatty() else 200), Console(stderr=True, soft_wrap=True)


def print_stack(console: Console, status: StackStatus) -> None:
    """The agents table, the endpoint, the transcript and the run folder."""
    from rich.table import Table

    table = Table(title="m2m stack")
    for column in ("agent", "role", "impl", "pid", "state", "restarts", "uptime (s)"):
        table.add_column(column, justify="right" if column in {"pid", "restarts", "uptime (s)"} else "left")
    for a in status.agents:
        style = "green" if a.state == "ready" else "yellow"
        table.add_row(a.name, a.role, a.impl, str(a.pid), f"[{style}]{a.state}[/]", str(a.restarts),
                      f"{a.uptime_s:.1f}")
    console.print(table)
    console.print(f"endpoint:   {status.endpoint}", markup=False, highlight=False)
    console.print(f"transcript: {status.transcript}", markup=False, highlight=False)
    console.print(f"logs:       {Path(status.transcript).parent}", markup=False, highlight=False)


def _error(console: Console, text: str) -> None:
    console.print(text, style="red", markup=False, highlight=False)


def _bus(args: argparse.Namespace, err: Console) -> BusConfig | None:
    try:
        return bus_config(args)
    except (ValueError, OSError) as exc:  # CURVE options that do not go together or cannot be read
        _error(err, f"m2m {args.command}: {exc}")
        return None


def _up(args: argparse.Namespace) -> int:
    from m2m.stack.config import StackConfigError, StackError, load_stack_config
    from m2m.stack.control import start_detached
    from m2m.stack.supervisor import FAILURE_PREFIX, Supervisor

    out, err = _consoles()
    try:
        config = load_stack_config(args.config).override(
            endpoint=args.endpoint, pub_endpoint=args.pub_endpoint, transcript_dir=args.transcript_dir
        )
    except StackConfigError as exc:
        _error(err, f"m2m up: {exc}")
        return EXIT_CONFIG
    if args.detach:
        try:
            status = start_detached(args.config, endpoint=args.endpoint, pub_endpoint=args.pub_endpoint,
                                    transcript_dir=args.transcript_dir)
        except StackError as exc:
            _error(err, f"m2m up: {exc}")
            return EXIT_NO_STACK
        print_stack(out, status)
        out.print("the stack runs in the background; stop it with [bold]m2m down[/]")
        return 0

    def ready(status: StackStatus) -> None:
        print_stack(out, status)
        out.print("the stack is up; stop it with Ctrl-C or [bold]m2m down[/]")

    supervisor = Supervisor(config, run_dir=args.run_dir, on_ready=ready)
    code = asyncio.run(supervisor.run())
    if supervisor.failure:
        _error(err, f"{FAILURE_PREFIX}{supervisor.failure}")
    return code


def _status(args: argparse.Namespace) -> int:
    from m2m.stack.control import stack_status

    out, err = _consoles()
    config = _bus(args, err)
    if config is None:
        return EXIT_CONFIG
    status = asyncio.run(stack_status(config, timeout=args.timeout))
    if status is None:
        _error(err, f"no stack answers at {config.endpoint} (start one with m2m up)")
        return EXIT_NO_STACK
    print_stack(out, status)
    return 0


def _swap(args: argparse.Namespace) -> int:
    from m2m.stack.config import StackError
    from m2m.stack.control import swap

    out, err = _consoles()
    config = _bus(args, err)
    if config is None:
        return EXIT_CONFIG
    try:
        result = asyncio.run(swap(config, args.role, args.impl, args.option, timeout=args.timeout))
    except StackError as exc:
        _error(err, f"m2m swap: {exc}")
        return EXIT_NO_STACK
    out.print(f"{result.role} now runs {result.impl}: started {', '.join(result.started)}; "
              f"stopped {', '.join(result.stopped)}", markup=False, highlight=False)
    return 0


def _down(args: argparse.Namespace) -> int:
    from m2m.stack.control import shutdown

    out, err = _consoles()
    config = _bus(args, err)
    if config is None:
        return EXIT_CONFIG
    result = asyncio.run(shutdown(config, timeout=args.timeout))
    if result is None:
        _error(err, f"no stack answers at {config.endpoint}")
        return EXIT_NO_STACK
    out.print(f"stack down; stopped {', '.join(result.stopped) or 'no agents'}", markup=False, highlight=False)
    return 0


def add_commands(sub: Any, bench_sub: Any) -> None:
    """Add ``up``, ``status``, ``swap`` and ``down``."""
    up = sub.add_parser("up", help="start the agent stack (broker + agents) under a supervisor")
    up.add_argument("--config", type=Path, default=None, metavar="FILE",
                    help="stack config TOML (default: the packaged stack/stack.toml)")
    up.add_argument("--detach", action="store_true", help="run the supervisor in the background; return once ready")
    up.add_argument("--endpoint", default=None, help="override [bus] endpoint")
    up.add_argument("--pub-endpoint", default=None, help="override [bus] pub_endpoint")
    up.add_argument("--transcript-dir", type=Path, default=None, help="override [bus] transcript_dir")
    up.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)  # set by --detach for its child
    up.set_defaults(func=_up)

    st = sub.add_parser("status", help="the running stack's agents, endpoint and transcript")
    add_bus_arguments(st)
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the supervisor (%(default)s)")
    st.set_defaults(func=_status)

    sw = sub.add_parser("swap", help="replace every instance of a role by another implementation (no downtime)")
    sw.add_argument("role")
    sw.add_argument("--impl", required=True, help="the new implementation")
    sw.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="implementation option")
    sw.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the swap (%(default)s)")
    add_bus_arguments(sw)
    sw.set_defaults(func=_swap)

    dn = sub.add_parser("down", help="stop the running stack (agents drain, the broker stops last)")
    add_bus_arguments(dn)
    dn.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the stop (%(default)s)")
    dn.set_defaults(func=_down)
