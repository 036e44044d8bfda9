"""Subcommands contributed by the agents layer."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Agents' subcommands; the agents issue adds ``up``, ``plan``, ``agent`` and friends here."""
