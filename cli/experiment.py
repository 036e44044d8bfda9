"""``m2m experiment paper`` (run or resume the paper's experiment on the agent stack) and ``m2m experiment report``
(rewrite the report of an experiment folder)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("runs/experiment-paper")


def add_commands(sub: Any, bench_sub: Any) -> None:
    from m2m.cli.common import add_bus_arguments
    from m2m.experiment.design import ARMS, PAPER

    e = sub.add_parser("experiment", help="the paper's experiment through the agent stack, and its report")
    esub = e.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    p = esub.add_parser(
        "paper",
        help="every scenario in both LLM modes plus the DRL and rule-based baselines (resumable)",
        description="Runs on the running stack, or brings the default one up (and down at the end). Rerun with the "
        "same --out to continue a killed run.",
    )
    p.add_argument("--llm", choices=("embedded", "openai", "replay"), default="embedded",
                   help="the LLM planner's model client (default: the embedded llama.cpp model)")
    p.add_argument("--llm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="more planner options, e.g. base_url=http://host:8000/v1 model_name=… (see m2m agent)")
    p.add_argument("--scenarios", default=",".join(PAPER), help="comma-separated (default: %(default)s)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated (default: %(default)s)")
    p.add_argument("--cases", type=int, default=None,
                   help="cases per scenario (default: the paper's, 10 prostate-basic, 1 complex, 1 liver)")
    p.add_argument("--inits", type=int, default=None,
                   help="initial TPP settings per case (default: the paper's, 10 for liver, else 1)")
    p.add_argument("--step-cap", type=int, default=None, help="steps per session (default: the scenario's, 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial TPP settings (default 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="experiment folder (default %(default)s)")
    p.add_argument("--config", type=Path, default=None, help="stack config used if no stack runs")
    add_bus_arguments(p)
    p.set_defaults(func=_paper)

    r = esub.add_parser("report", help="rewrite report.md, cases.csv and the plots of an experiment folder")
    r.add_argument("folder", type=Path, nargs="?", default=DEFAULT_OUT)
    r.set_defaults(func=_report)


def _paper(args: argparse.Namespace) -> int:
    from m2m.agents.runtime import AgentConfigError, parse_options
    from m2m.cli.common import bus_config
    from m2m.experiment.design import ExperimentError, make_design

    try:
        design = make_design(
            [s.strip() for s in args.scenarios.split(",") if s.strip()],
            [a.strip() for a in args.arms.split(",") if a.strip()],
            cases=args.cases, inits=args.inits, seed=args.seed, step_cap=args.step_cap,
            llm={"model": args.llm, **parse_options(args.llm_option)},
        )
        config = bus_config(args)
    except (ExperimentError, AgentConfigError, ValueError, OSError) as exc:
        print(f"m2m experiment paper: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_paper_on_bus(args, config, design))


async def _paper_on_bus(args: argparse.Namespace, config: Any, design: Any) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from m2m.bus.errors import BusError
    from m2m.cli.common import ensure_stack
    from m2m.experiment import design as ed
    from m2m.experiment import records as er
    from m2m.experiment import run as ex
    from m2m.experiment.report import write_report
    from m2m.stack.config import StackError
    from m2m.stack.control import shutdown, stack_status, swap

    console = Console(stderr=True)
    try:
        ex.prepare_folder(args.out, design)
        status = await stack_status(config, timeout=2.0)
        previous_planner = next((a.impl for a in status.agents if a.role == "planner"), None) if status else None
        transcript, started = await ensure_stack(args, config)
    except (ed.ExperimentError, StackError) as exc:
        print(f"m2m experiment paper: {exc}", file=sys.stderr)
        return 1
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=False)
    runs = ed.runs_of(design)
    task = bar.add_task("sessions", total=len(runs))

    def step(run: ed.Run, e: Any) -> None:
        bar.update(task, description=f"{run.key}: step {e.step} score {e.score:.2f}/{e.max_score:g}")

    def done(run: ed.Run, rec: er.SessionRecord) -> None:
        bar.advance(task)
        console.print(f"{run.key}: {rec.initial_score:.2f} → {rec.final_score:.2f}/{rec.max_score:g} in "
                      f"{rec.steps} steps ({rec.outcome}, {rec.wall_s:.0f} s)", markup=False, highlight=False)

    hooks = ex.Progress(
        on_step=step, on_session_done=done,
        on_swap=lambda impl: console.print(f"swapping the planner to {impl}", markup=False),
    )
    code = 0
    t0 = time.perf_counter()
    try:
        with bar:
            finished = er.load_records(args.out)
            bar.update(task, completed=sum(r.key in finished for r in runs))
            await ex.run_experiment(config, design, args.out, transcript=transcript, progress=hooks)
    except (BusError, StackError, LookupError, ValueError) as exc:
        print(f"m2m experiment paper: stopped: {exc} (rerun the same command to continue)", file=sys.stderr)
        code = 1
    finally:  # also on Ctrl-C: the stack goes down and the report covers what finished
        if started:
            await shutdown(config, timeout=60.0)
        elif previous_planner is not None:
            await swap(config, "planner", previous_planner, design.llm if previous_planner == "llm" else {})
        wall = er.add_wall(args.out, time.perf_counter() - t0)
        records = list(er.load_records(args.out).values())
        report = write_report(args.out, er.read_design(args.out), records, wall_s=wall)
        print(f"report: {report} ({len(records)} sessions)")
    return code


def _report(args: argparse.Namespace) -> int:
    from m2m.experiment.design import ExperimentError
    from m2m.experiment.records import load_records, read_design, total_wall
    from m2m.experiment.report import write_report

    try:
        design = read_design(args.folder)
        records = list(load_records(args.folder).values())
    except ExperimentError as exc:
        print(f"m2m experiment report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {write_report(args.folder, design, records, wall_s=total_wall(args.folder))}")
    return 0
