"""``m2m plan`` (one planning session: on the bus, or an in-process baseline) and ``m2m replay`` (re-drive a recorded
session against the live agents)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from m2m.cli.common import add_bus_arguments, bus_config, ensure_stack

if TYPE_CHECKING:
    from m2m.agents.messages import SessionResult
    from m2m.bus.client import BusConfig

PLANNERS = ("drl", "greedy")


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Add ``plan`` and ``replay``."""
    p = sub.add_parser(
        "plan",
        help="plan one case autonomously: on the bus with the LLM planner (default), or in-process (--planner)",
    )
    p.add_argument("--scenario", default="prostate-basic", help="prostate-basic, prostate-complex or liver")
    p.add_argument("--case", type=int, default=0, help="index into the cohort (0 = its first seed)")
    p.add_argument("--cohort", default="test", help="train, validation, test, knowledge or paper (default test)")
    p.add_argument("--mode", choices=("guided", "unguided"), default="guided",
                   help="bus session: guided (the LLM sees the DRL knowledge; default) or unguided")
    p.add_argument("--with-advice", action="store_true", help="guided: also show the LLM the DRL's per-step advice")
    p.add_argument("--step-cap", type=int, default=None, help="maximum steps (default: the scenario's, 20)")
    p.add_argument("--config", type=Path, default=None, help="stack config used if none runs")
    p.add_argument("--keep-up", action="store_true", help="leave a stack this command started running")
    p.add_argument(
        "--planner",
        choices=PLANNERS,
        default=None,
        help="in-process baseline instead of the bus: greedy (try every TPP step) or drl (a DQN checkpoint)",
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="DRL checkpoint (default: agents/drl/assets/dqn_prostate.pt)"
    )
    p.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of the session folder (runs/)")
    add_bus_arguments(p)
    p.set_defaults(func=_plan)

    r = sub.add_parser("replay", help="re-drive a recorded session against the live agents and compare scores")
    r.add_argument("file", type=Path, help="a session transcript (transcript.m2mt) or a whole bus transcript")
    r.add_argument("--session", default=None, help="session id (needed when the file holds several)")
    r.add_argument("--speed", type=float, default=0.0, help="seconds to wait before each step (demos)")
    r.add_argument("--step", action="store_true", help="wait for Enter before each step")
    r.add_argument("--config", type=Path, default=None, help="stack config to bring up if none runs")
    add_bus_arguments(r)
    r.set_defaults(func=_replay)


def _plan(args: argparse.Namespace) -> int:
    if args.planner is not None:
        return _plan_in_process(args)
    from m2m.scenarios import ScenarioError, load_scenario

    try:
        sc = load_scenario(args.scenario)
        seeds = sc.cohorts.get(args.cohort).seeds
        if not 0 <= args.case < len(seeds):
            raise ValueError(f"case index {args.case} outside cohort {args.cohort!r} of {len(seeds)} cases")
        config = bus_config(args)
    except (ScenarioError, KeyError, ValueError, OSError) as exc:
        print(f"m2m plan: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_plan_on_bus(args, config, sc.step_cap, int(seeds[args.case])))


async def _plan_on_bus(args: argparse.Namespace, config: BusConfig, default_cap: int, seed: int) -> int:
    from rich.console import Console

    from m2m.agents.messages import SessionRequest, new_session_id
    from m2m.bus.errors import BusError
    from m2m.session.client import (
        print_summary,
        run_session_request,
        session_folder_name,
        step_line,
        write_bus_session_folder,
    )
    from m2m.stack.config import StackError
    from m2m.stack.control import shutdown

    console = Console(stderr=True)
    try:
        transcript, started = await ensure_stack(args, config)
    except StackError as exc:
        print(f"m2m plan: the stack did not come up: {exc}", file=sys.stderr)
        return 1
    req = SessionRequest(
        session_id=new_session_id(), scenario=args.scenario, case_seed=seed, mode=args.mode,
        step_cap=default_cap if args.step_cap is None else args.step_cap, with_advice=args.with_advice,
    )
    console.print(f"session {req.session_id}: {args.scenario} case {args.case} (seed {seed}), mode {args.mode}")
    try:
        result = await run_session_request(
            config, req, lambda s, outcome: console.print(step_line(s, outcome), markup=False, highlight=False)
        )
    except (BusError, LookupError, ValueError) as exc:
        print(f"m2m plan: session failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if started and not args.keep_up:
            await shutdown(config, timeout=60.0)
    print_summary(console, result)
    folder = args.out / session_folder_name(args.scenario, result.header.case_id, args.mode)
    write_bus_session_folder(folder, result, transcript)
    print(f"session folder: {folder}")
    return 0


def _plan_in_process(args: argparse.Namespace) -> int:
    from m2m.session.local import run_session

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


def _replay(args: argparse.Namespace) -> int:
    from m2m.bus.errors import BusError
    from m2m.session.client import recorded_sessions

    try:
        sessions = recorded_sessions(args.file)
        config = bus_config(args)
    except (OSError, BusError, ValueError) as exc:
        print(f"m2m replay: {exc}", file=sys.stderr)
        return 1
    if args.session is not None:
        sessions = {k: v for k, v in sessions.items() if k == args.session}
    if len(sessions) != 1:
        print(f"m2m replay: {len(sessions)} sessions in {args.file} ({', '.join(sessions) or 'none'}): "
              "choose one with --session", file=sys.stderr)
        return 1
    return asyncio.run(_replay_on_bus(args, config, next(iter(sessions.values()))))


async def _replay_on_bus(args: argparse.Namespace, config: BusConfig, recorded: SessionResult) -> int:
    from rich.console import Console
    from rich.table import Table

    from m2m.session.client import replay, step_line
    from m2m.stack.config import StackError
    from m2m.stack.control import shutdown

    console = Console(stderr=True)
    try:
        _, started = await ensure_stack(args, config)
    except StackError as exc:
        print(f"m2m replay: the stack did not come up: {exc}", file=sys.stderr)
        return 1

    async def pause(step: int) -> None:
        if args.step:
            await asyncio.to_thread(input, f"step {step}: press Enter to replay the decision ")
        elif args.speed > 0:
            await asyncio.sleep(args.speed)

    try:
        steps = await replay(
            config, recorded, pause=pause,
            on_step=lambda s, outcome: console.print(step_line(s, outcome), markup=False, highlight=False),
        )
    finally:
        if started:
            await shutdown(config, timeout=60.0)
    table = Table(title=f"replay of session {recorded.header.session_id} ({len(recorded.steps)} recorded steps)")
    for col in ("step", "recorded score", "replayed score", "match"):
        table.add_column(col)
    for s in steps:
        table.add_row(str(s.step), f"{s.recorded:.6f}", f"{s.replayed:.6f}", "yes" if s.matches else "NO")
    console.print(table)
    ok = len(steps) == len(recorded.steps) and all(s.matches for s in steps)
    print(f"replay {'matches' if ok else 'DIFFERS from'} the recording: {sum(s.matches for s in steps)}/"
          f"{len(recorded.steps)} steps with the recorded score")
    return 0 if ok else 1
