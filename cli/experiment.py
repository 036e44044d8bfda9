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
COMMAND = "experiment paper"


def add_commands(sub: Any, bench_sub: Any) -> None:
    from m2m.cli.common import OWN_STACK, add_bus_arguments
    from m2m.experiment.design import ARMS, PAPER

    e = sub.add_parser("experiment", help="the paper's experiment through the agent stack, and its report")
    esub = e.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    p = esub.add_parser(
        "paper",
        help="every scenario in both LLM modes plus the DRL, rule-based and knowledge baselines (resumable)",
        description="Brings a stack of its own up (and down at the end), or joins the one --stack/--connect names. "
        "Rerun with the same --out to continue a killed run.",
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
    p.add_argument("--config", type=Path, default=None,
                   help="stack config of the stack this command starts (default: the packaged one)")
    add_bus_arguments(p, default=OWN_STACK)
    p.set_defaults(func=_paper)

    r = esub.add_parser("report", help="rewrite report.md, cases.csv and the plots of an experiment folder")
    r.add_argument("folder", type=Path, nargs="?", default=DEFAULT_OUT)
    r.set_defaults(func=_report)


def _paper(args: argparse.Namespace) -> int:
    """Everything is checked before a stack starts (exit 2): the design, the LLM options, the folder, the config."""
    from m2m.agents.runtime import AgentConfigError, check_agent, parse_options
    from m2m.cli.common import UsageError, check_writable_folder, failed, prepare_stack, usage_error
    from m2m.cli.running import EXIT_INTERRUPTED
    from m2m.experiment.design import ARMS, ExperimentError, make_design, runs_of
    from m2m.experiment.run import prepare_folder
    from m2m.scenarios import ScenarioError
    from m2m.stack.config import StackError

    command = "experiment paper"
    try:
        llm = {"model": args.llm, **parse_options(args.llm_option)}
        check_agent("planner", "llm", llm)
        design = make_design(
            [s.strip() for s in args.scenarios.split(",") if s.strip()],
            [a.strip() for a in args.arms.split(",") if a.strip()],
            cases=args.cases, inits=args.inits, seed=args.seed, step_cap=args.step_cap, llm=llm,
        )
        runs_of(design)  # the cohorts hold the cases asked for
        check_writable_folder(args.out, "--out")
        needs = {"dose-engine", "evaluator", "planner"}
        # the DRL advisor advises the DRL planner and publishes the knowledge (the guided LLM, the knowledge arm)
        if any(ARMS[a].mode == "guided" or ARMS[a].impl in ("drl", "knowledge") for a in design.arms):
            needs.add("drl-advisor")
        use = prepare_stack(args, command, needs)
        prepare_folder(args.out, design)  # a folder of another experiment is refused here
    except (ExperimentError, AgentConfigError, UsageError, ScenarioError) as exc:
        return usage_error(command, exc)
    except StackError as exc:  # --stack names no running stack
        return failed(command, exc)
    try:
        return asyncio.run(_paper_on_bus(args, use, design))
    except (KeyboardInterrupt, asyncio.CancelledError):  # a Ctrl-C outside the run, or a second one
        print(f"m2m {command}: interrupted; a stack it started may still be going down (see m2m status); rerun the "
              "same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


async def _paper_on_bus(args: argparse.Namespace, use: Any, design: Any) -> int:
    """The experiment with the live progress view (:mod:`m2m.session.progress`). Ctrl-C stops it cleanly: the
    stack it started goes down (the planner cancels the decision in flight), the report covers the sessions that
    finished, and a rerun of the same command continues (the session cut off is planned again)."""
    from m2m.agents.messages import Step, StepPhase
    from m2m.bus.errors import BusError
    from m2m.cli.running import EXIT_INTERRUPTED, bring_up, quiet_logs, resume_after_interrupt, sigint_cancels
    from m2m.experiment import design as ed
    from m2m.experiment import records as er
    from m2m.experiment import run as ex
    from m2m.experiment.report import write_report
    from m2m.session.client import step_line
    from m2m.session.progress import ProgressView, make_console, watch_stack
    from m2m.stack.config import StackError
    from m2m.stack.control import swap, take_down

    quiet_logs(args)
    console = make_console()
    runs = ed.runs_of(design)
    done_keys = set(er.load_records(args.out)) & {r.key for r in runs}
    t0, m0 = time.perf_counter(), time.monotonic()
    code, interrupted = 0, False
    with sigint_cancels() as sigint, ProgressView(console) as view:
        stack = await bring_up(COMMAND, use, view, sigint, "no session was planned")
        if isinstance(stack, int):
            return stack
        config, transcript, started = stack.bus, stack.transcript, stack.started
        # a stack it joined gets its planner back at the end
        previous_planner = None if started else next((a.impl for a in stack.status.agents if a.role == "planner"),
                                                     None)
        if started:
            view.line(f"stack {stack.stack_id} up in {time.monotonic() - m0:.1f} s")
        view.line(f"{len(done_keys)}/{len(runs)} sessions already in {args.out}")
        swapping: list[asyncio.Task[None]] = []

        def counter(run: ed.Run | None = None) -> str:
            return f"session {len(done_keys) + 1}/{len(runs)}" + (f" {run.key}" if run is not None else "")

        def end_swap_view() -> None:
            for task in swapping:
                task.cancel()
            swapping.clear()

        def on_swap(impl: str) -> None:
            end_swap_view()
            view.line(f"swapping the planner to {impl}")
            swapping.append(asyncio.get_running_loop().create_task(
                watch_stack(config, view, f"swapping the planner to {impl}", changes_only=True)))

        def on_phase(run: ed.Run, p: StepPhase) -> None:
            end_swap_view()
            view.title(counter(run))
            view.phase(p)

        def on_step(run: ed.Run, s: Step) -> None:
            if not view.live:  # a log gets every step; a terminal the session lines only
                view.line(f"{run.key}: {step_line(s)}")

        def on_done(run: ed.Run, rec: er.SessionRecord) -> None:
            done_keys.add(run.key)
            view.title(counter())
            view.line(f"{run.key}: {rec.initial_score:.2f} → {rec.final_score:.2f}/{rec.max_score:g} in "
                      f"{rec.steps} steps ({rec.outcome}, {rec.wall_s:.0f} s)")

        hooks = ex.Progress(on_step=on_step, on_phase=on_phase, on_session_done=on_done, on_swap=on_swap)
        view.title(counter())
        try:
            await ex.run_experiment(config, design, args.out, transcript=transcript, progress=hooks)
        except asyncio.CancelledError:
            if not sigint.count:
                raise
            resume_after_interrupt()
            interrupted = True
        except (BusError, StackError, LookupError, ValueError) as exc:
            print(f"m2m {COMMAND}: stopped: {exc} (rerun the same command to continue)", file=sys.stderr)
            code = 1
        finally:  # the stack goes down and the report covers what finished (after a Ctrl-C too)
            end_swap_view()
            view.title("")
            if started:
                view.activity("taking the stack down")
                await take_down(config, timeout=60.0, drain=not interrupted)
            elif previous_planner is not None and not interrupted:
                view.activity(f"swapping the planner back to {previous_planner}")
                await swap(config, "planner", previous_planner, design.llm if previous_planner == "llm" else {})
            view.activity("writing the report")
            wall = er.add_wall(args.out, time.perf_counter() - t0)
            records = list(er.load_records(args.out).values())
            report = await asyncio.to_thread(write_report, args.out, er.read_design(args.out), records, wall_s=wall)
    print(f"report: {report} ({len(records)} sessions)")
    if interrupted:
        where = ("the stack is down" if started else
                 "the running stack's planner finishes the session in progress on its own")
        print(f"m2m {COMMAND}: interrupted: {len(done_keys)}/{len(runs)} sessions done, {where}; rerun the same "
              "command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
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
