"""What several commands share: the bus arguments (``--connect``, CURVE keys, heartbeat) and bringing up a stack
when none runs."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2m.bus.client import BusConfig


def add_bus_arguments(p: argparse.ArgumentParser) -> None:
    """Where the broker is and how to authenticate (CURVE keys are required off-loopback)."""
    from m2m.bus.protocol import DEFAULT_ENDPOINT, DEFAULT_PUB_ENDPOINT

    p.add_argument("--connect", default=DEFAULT_ENDPOINT, metavar="ENDPOINT", help="broker ROUTER (%(default)s)")
    p.add_argument("--pub-connect", default=DEFAULT_PUB_ENDPOINT, metavar="ENDPOINT", help="broker PUB (%(default)s)")
    p.add_argument("--curve-secret", default=None, metavar="FILE", help="this agent's CURVE secret key file")
    p.add_argument("--curve-server", default=None, metavar="FILE", help="the broker's CURVE public key file")
    p.add_argument("--heartbeat", type=float, default=None, help="heartbeat interval in s (must match the broker's)")


def bus_config(args: argparse.Namespace) -> BusConfig:
    from m2m.bus.client import BusConfig
    from m2m.bus.security import ClientKeys

    if (args.curve_secret is None) != (args.curve_server is None):
        raise ValueError("--curve-secret and --curve-server go together")
    curve = ClientKeys.load(args.curve_secret, args.curve_server) if args.curve_secret else None
    config = BusConfig(endpoint=args.connect, pub_endpoint=args.pub_connect, curve=curve)
    if args.heartbeat is not None:
        config.heartbeat = args.heartbeat
    return config


async def ensure_stack(args: argparse.Namespace, config: BusConfig) -> tuple[Path | None, bool]:
    """The running stack's transcript path, and whether this command started the stack."""
    from rich.console import Console

    from m2m.stack.control import stack_status, start_detached

    status = await stack_status(config, timeout=2.0)
    if status is not None:
        return (Path(status.transcript) if status.transcript else None), False
    with Console(stderr=True).status("bringing the stack up (broker, dose engines, evaluator, DRL advisor, planner)"):
        status = await asyncio.to_thread(
            start_detached, args.config, endpoint=config.endpoint, pub_endpoint=config.pub_endpoint
        )
    return (Path(status.transcript) if status.transcript else None), True
