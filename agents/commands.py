"""Subcommands contributed by the agents layer: ``m2m plan`` runs one planning session and writes its folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PLANNERS = ("drl", "greedy")


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Add ``plan``."""
    p = sub.add_parser(
        "plan",
        help="plan one case autonomously (DRL policy or greedy one-step lookahead) and write a session folder",
    )
    p.add_argument("--scenario", default="prostate-basic", help="prostate-basic, prostate-complex or liver")
    p.add_argument("--case", type=int, default=0, help="index into the cohort (0 = its first seed)")
    p.add_argument("--cohort", default="test", help="train, validation, test, knowledge or paper (default test)")
    p.add_argument(
        "--planner",
        choices=PLANNERS,
        default="greedy",
        help="greedy: try every TPP step, keep the best (default); drl: a trained DQN checkpoint",
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="DRL checkpoint (default: agents/drl/assets/dqn_prostate.pt)"
    )
    p.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of the session folder (runs/)")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from m2m.agents.planning import run_session

    try:
        folder = run_session(
            scenario=args.scenario,
            case_index=args.case,
            cohort=args.cohort,
            planner=args.planner,
            checkpoint=args.checkpoint,
            out_parent=args.out,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"m2m plan: {exc}", file=sys.stderr)
        return 1
    print(f"session folder: {folder}")
    return 0
