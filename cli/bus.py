"""``m2m broker``, ``m2m transcript show``, ``m2m keys`` and ``m2m bench bus``. Heavy imports stay lazy."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from m2m.bus.serve import add_bench_args, add_broker_args, run_broker


def run_transcript_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from m2m.bus.errors import BusError
    from m2m.bus.transcript import filter_records, read_transcript

    console = Console(width=None if sys.stdout.isatty() else 250)  # pipes and files get whole rows
    try:
        contents = read_transcript(args.file)
    except (OSError, BusError) as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    table = Table(title=f"{args.file}: {len(contents.records)} records", show_lines=False)
    for col in ("#", "t (s)", "dir", "kind", "route", "session", "sender", "schema", "id", "corr", "body"):
        table.add_column(col, overflow="fold")
    t0 = contents.records[0].t if contents.records else 0.0
    for rec, env in filter_records(contents.records, session=args.session, agent=args.agent, schema=args.type):
        body = ""
        if env is not None:
            body = _body(rec, env)
        if len(body) > args.width:
            body = body[: args.width - 1] + "…"
        table.add_row(
            str(rec.n), f"{rec.t - t0:.6f}", rec.direction, rec.kind, rec.route, rec.session,
            env.sender if env else "?", f"{env.schema} v{env.version}" if env else "?",
            env.id[:8] if env else "?", env.corr[:8] if env else "", body,
        )
    console.print(table)
    if contents.skipped:  # each was logged once, with its place and reason, as it was read
        console.print(f"[yellow]{len(contents.skipped)} unreadable record(s) skipped[/]")
    if contents.torn_at is not None:
        console.print(f"[yellow]torn or corrupt record at byte {contents.torn_at} of {contents.torn_file}; "
                      "everything before it shown[/]")
    return 0


def _body(rec: Any, env: Any) -> str:
    """The typed message when its class is importable here, else the raw msgpack fields (arrays as specs)."""
    import msgspec

    from m2m.bus.errors import BusError, UnknownSchema

    try:
        return repr(rec.decode())
    except UnknownSchema:
        pass
    except BusError as exc:
        return f"<{type(exc).__name__}: {exc}>"
    try:
        fields = msgspec.msgpack.decode(rec.payload)
    except Exception:  # hostile bytes: whatever msgspec raises, the row says so and the table goes on
        return f"<{len(rec.payload)} undecodable bytes>"
    arrays = ", ".join(f"array#{i} {a.dtype}{list(a.shape)}" for i, a in enumerate(env.arrays))
    return f"{env.schema}{fields!r}" + (f" [{arrays}]" if arrays else "")


def run_keys(args: argparse.Namespace) -> int:
    from rich.console import Console

    from m2m.bus.security import generate_keys

    pub, sec = generate_keys(args.name, args.dir)
    Console().print(f"public key: {pub}\nsecret key: {sec} (keep private; mode 600)")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from m2m.bus.bench import main as bench_main

    return bench_main(args)


def add_commands(sub: Any, bench_sub: Any) -> None:
    p = sub.add_parser("broker", help="run the message broker (request/reply by service, events, knowledge)")
    add_broker_args(p)
    p.set_defaults(func=run_broker)

    t = sub.add_parser("transcript", help="read bus transcripts")
    tsub = t.add_subparsers(dest="transcript_command", required=True, metavar="ACTION")
    show = tsub.add_parser("show", help="print a transcript as a table")
    show.add_argument("file")
    show.add_argument("--session", default=None)
    show.add_argument("--agent", default=None, help="sender name")
    show.add_argument("--type", default=None, help="schema name (prefix)")
    show.add_argument("--width", type=int, default=80, help="truncate message bodies to this many characters")
    show.set_defaults(func=run_transcript_show)

    k = sub.add_parser("keys", help="generate a CURVE key pair NAME.key / NAME.key_secret")
    k.add_argument("name")
    k.add_argument("--dir", default=".", help="output folder (%(default)s)")
    k.set_defaults(func=run_keys)

    b = bench_sub.add_parser("bus", help="bus round trip vs raw zmq, event throughput, late join, array codec")
    add_bench_args(b)
    b.set_defaults(func=run_bench)


