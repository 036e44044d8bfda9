"""``m2m chaos``: the bus chaos suite (:mod:`m2m.experiment.chaos`) on a stack of its own; exit 1 when a step was
lost, changed or duplicated."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def add_commands(sub: Any, bench_sub: Any) -> None:
    c = sub.add_parser(
        "chaos", help="plan cases undisturbed, then again under kills, forgeries and fuzz; count lost steps",
        description="Starts a stack of its own; kills agents and the broker (kill -9), forges replies and requests "
        "and fuzzes the broker while the same cases are planned again. Exit 0 when no step was lost, changed or "
        "duplicated, 1 otherwise.",
    )
    c.add_argument("--long", action="store_true", help="the long form (24 sessions, 40 kills, 100k fuzz frames)")
    c.add_argument("--sessions", type=int, default=None, help="sessions in each pass (default: the form's)")
    c.add_argument("--kills", type=int, default=None, help="kill -9s during the chaos pass (default: the form's)")
    c.add_argument("--seed", type=int, default=None, help="the attacks' random seed (default: the form's)")
    c.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    c.add_argument("--folder", type=Path, default=None, help="keep the stack's transcript and logs here")
    c.set_defaults(func=_chaos)


def _chaos(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from m2m.experiment.chaos import LONG, SHORT, run_chaos

    cfg = LONG if args.long else SHORT
    changes = {k: v for k, v in (("sessions", args.sessions), ("kills", args.kills), ("rng_seed", args.seed))
               if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    console = Console(stderr=True)
    with console.status("chaos") as status:
        report = asyncio.run(run_chaos(cfg, args.folder, progress=lambda line: status.update(line)))
    table = Table(title=f"m2m chaos ({'long' if args.long else 'short'} form)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in (
        ("sessions per pass", cfg.sessions),
        ("reference steps", report.reference_steps),
        ("attacks", ", ".join(f"{k} {v}" for k, v in sorted(report.attacks.items()))),
        ("killed (kill -9)", ", ".join(f"{k} {v}" for k, v in sorted(report.killed.items())) or "none"),
        ("reference / chaos wall", f"{report.reference_wall_s:.0f} s / {report.chaos_wall_s:.0f} s"),
        ("lost steps", report.lost_steps),
        ("changed steps (forgery got through)", report.changed_steps),
        ("duplicated solves / events", f"{report.duplicated_solves} / {report.duplicated_events}"),
    ):
        table.add_row(name, str(value))
    Console().print(table)
    for line in report.failed_sessions:
        print(f"failed session: {line}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0 if report.ok else 1
