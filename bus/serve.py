"""The broker as a process: its command-line arguments and ``main_broker`` (``python -m m2m.bus.broker``).

``m2m broker`` (``m2m.cli.bus``) reuses the same arguments; this module keeps the bus runnable on its own.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m2m.bus import protocol as P
from m2m.bus.protocol import DEFAULT_ENDPOINT, DEFAULT_PUB_ENDPOINT

if TYPE_CHECKING:
    import zmq


def add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="request/reply ROUTER endpoint (%(default)s)")
    p.add_argument("--pub-endpoint", default=DEFAULT_PUB_ENDPOINT, help="event PUB endpoint (%(default)s)")
    p.add_argument("--transcript", default=None, metavar="FILE", help="append every routed message to FILE")
    p.add_argument("--retained", default=None, metavar="FILE",
                   help="keep the knowledge (retained) values in FILE across broker restarts")
    p.add_argument("--replies", default=None, metavar="FILE",
                   help="keep the reply cache in FILE across broker restarts")
    p.add_argument("--curve-secret", default=None, metavar="FILE", help="broker secret key (m2m keys broker)")
    p.add_argument("--curve-clients", default=None, metavar="DIR", help="folder of authorised client *.key files")
    p.add_argument(
        "--heartbeat", type=float, default=P.DEFAULT_HEARTBEAT_S, help="heartbeat interval in seconds (%(default)s)"
    )
    p.add_argument(
        "--liveness", type=int, default=P.DEFAULT_LIVENESS, help="missed heartbeats before a peer is dead (%(default)s)"
    )
    p.add_argument("--max-message-size", type=int, default=P.DEFAULT_MAX_MESSAGE_SIZE, help="bytes (%(default)s)")
    p.add_argument("--hwm", type=int, default=P.DEFAULT_HWM, help="ROUTER high-water mark (%(default)s)")
    p.add_argument("--pub-hwm", type=int, default=P.DEFAULT_PUB_HWM, help="PUB high-water mark (%(default)s)")
    limits = p.add_argument_group("bounds (default: m2m.bus.broker.BrokerConfig's, listed in the README)")
    for field in _BOUNDS:
        limits.add_argument("--" + field.name.replace("_", "-"), type=field.type, default=None, help=field.help)


@dataclass(frozen=True)
class _Bound:
    name: str
    type: type
    help: str


_BOUNDS = (
    _Bound("max_frames", int, "most frames in one message"),
    _Bound("default_deadline", float, "deadline of a request that names none, s"),
    _Bound("max_deadline", float, "longest any request is kept, s"),
    _Bound("max_pending_per_client", int, "requests one client may have pending"),
    _Bound("max_retained_topics", int, "knowledge topics kept"),
    _Bound("max_retained_bytes", int, "knowledge bytes kept"),
    _Bound("snapshot_max_bytes", int, "bytes of values in one snapshot"),
    _Bound("transcript_max_bytes", int, "transcript segment size before it rotates, bytes"),
    _Bound("transcript_keep", int, "closed transcript segments kept (0: all)"),
)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``m2m bench bus`` (also ``python -m m2m.bus.bench run``); here, not in the heavy
    :mod:`m2m.bus.bench`, so that building the CLI stays light."""
    parser.add_argument("--n", type=int, default=2000, help="round trips per measurement (%(default)s)")
    parser.add_argument("--events", type=int, default=50_000, help="events for the throughput run (%(default)s)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the numbers to FILE as JSON")


def run_broker(args: argparse.Namespace) -> int:
    """Run the broker until SIGTERM/SIGINT; exit status 2 with one line on stderr when it cannot start (a bind
    that fails, refused insecure endpoints, unreadable keys or transcript)."""
    from pathlib import Path

    import zmq

    from m2m.bus.broker import BrokerConfig, serve_forever
    from m2m.bus.errors import BusError
    from m2m.bus.security import ServerKeys, load_secret

    curve = None
    if args.curve_secret:
        if not args.curve_clients:
            print("--curve-secret needs --curve-clients DIR", file=sys.stderr)
            return 2
        pub, sec = load_secret(args.curve_secret)
        curve = ServerKeys(public=pub, secret=sec, clients_dir=Path(args.curve_clients))
    cfg = BrokerConfig(
        endpoint=args.endpoint, pub_endpoint=args.pub_endpoint, heartbeat=args.heartbeat, liveness=args.liveness,
        max_message_size=args.max_message_size, hwm=args.hwm, pub_hwm=args.pub_hwm, transcript=args.transcript,
        retained=args.retained, replies=args.replies,
        curve=curve, **{b.name: getattr(args, b.name) for b in _BOUNDS if getattr(args, b.name) is not None},
    )
    try:
        return serve_forever(cfg)
    except BusError as exc:
        print(f"m2m broker: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:  # a bind that failed: address in use, no permission, bad address
        endpoint, reason = bind_failure(exc, args.endpoint)
        print(f"m2m broker: cannot bind {endpoint}: {reason}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a transcript that cannot be opened
        print(f"m2m broker: {exc}", file=sys.stderr)
        return 2


_ADDR = re.compile(r"(?s)(.*?)\s*\(addr='(.*)'\)\s*$")


def bind_failure(exc: zmq.ZMQError, default_endpoint: str) -> tuple[str, str]:
    """(endpoint, reason) of a failed bind: pyzmq appends ``(addr='...')`` to the error text; without it the
    endpoint is ``default_endpoint``."""
    text = str(exc.strerror or exc)
    m = _ADDR.match(text)
    if m:
        return m.group(2), m.group(1).rstrip(". ") or text
    return default_endpoint, text


def main_broker(argv: list[str] | None = None) -> int:
    """``python -m m2m.bus.broker``: the broker without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m m2m.bus.broker")
    add_broker_args(parser)
    parser.add_argument("--log-level", default=None)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    return run_broker(args)


def _configure_logging(level: str | None) -> None:
    from m2m.bus.logs import configure_logging

    configure_logging(level)
