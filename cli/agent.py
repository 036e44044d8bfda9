"""``m2m agent ROLE``: run one agent process (the supervisor starts every agent this way)."""

from __future__ import annotations

import argparse
import sys

from m2m.cli.common import add_bus_arguments, hand_started_bus


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Add ``agent``."""
    from m2m.agents.runtime import IMPLEMENTATIONS

    a = sub.add_parser("agent", help="run one agent process (dose-engine, evaluator, drl-advisor, planner)")
    a.add_argument("role", choices=sorted(IMPLEMENTATIONS))
    a.add_argument("--impl", default=None, help="implementation (default: the role's first; see README)")
    a.add_argument("--name", default=None, help="unique agent name on the bus (default ROLE-PID)")
    a.add_argument("--incarnation", type=int, default=0, help="restart count (set by the supervisor)")
    a.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="implementation option")
    add_bus_arguments(a, default="m2m broker's default endpoints")
    a.set_defaults(func=_agent)


def _agent(args: argparse.Namespace) -> int:
    from m2m.agents.runtime import EXIT_USAGE, AgentConfigError, check_agent, parse_options, run_agent
    from m2m.stack.config import StackError

    try:
        options = parse_options(args.option)
        check_agent(args.role, args.impl, options)  # before it connects: a bad option is no reason to retry
        config = hand_started_bus(args)
    except (AgentConfigError, StackError, ValueError, OSError) as exc:
        print(f"m2m agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_agent(args.role, args.impl, name=args.name, config=config, options=options,
                     incarnation=args.incarnation)
