"""The ``m2m`` console command.

Each layer contributes its own subcommands through a ``commands`` module exposing
``add_commands(subparsers, bench_subparsers)``; handlers import their heavy dependencies lazily
so that ``m2m --help`` stays fast. A handler is stored as ``func`` and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from m2m.bus.logs import configure_logging

COMMAND_MODULES = (
    "m2m.cli.physics",
    "m2m.cli.bus",
    "m2m.cli.drl",
    "m2m.cli.llm",
    "m2m.cli.agent",
    "m2m.cli.plan",
    "m2m.cli.stack",
    "m2m.cli.experiment",
    "m2m.cli.chaos",
)


def _version() -> str:
    try:
        return version("m2m-planner")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2m", description="Autonomous IMRT planning: agents on a ZeroMQ bus."
    )
    parser.add_argument("--version", action="version", version=f"m2m {_version()}")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error (default: info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks that print ratios measured in one run")
    bench_sub = bench.add_subparsers(dest="bench_target", required=True, metavar="TARGET")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not an absent layer
                raise
            continue
        module.add_commands(sub, bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
