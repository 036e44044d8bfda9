"""``m2m bench demo``: the main job (``make demo``: one guided planning session on a stack of its own) with the time
of each of its phases.

Phases, in the order they happen (seconds of wall time):

* ``stack_start_s`` — from the command asking for the stack until the stack answers with every agent ready (the
  supervisor, broker and agent processes starting, and every agent's setup, the LLM planner's model load included);
* ``agents_setup_s`` — per agent, its setup as the bus saw it: from its first ``starting`` status to its ``ready``
  status (:class:`~m2m.agents.messages.AgentStatus` events in the stack's bus transcript, stamped by the broker);
  ``model_load_s`` is the planner's (the LLM planner loads its model there; with ``model=replay`` it only reads the
  answers file);
* ``session_s`` — the ``plan.session`` request as the client waited for it; ``planner_session_s`` the planner's own
  wall time of the session; within it each step's ``plan_s`` (the dose engine's optimisation and the evaluator's
  score, :attr:`~m2m.agents.messages.Step.plan_s`) and each decision's ``decision_s`` (the decider, the LLM's
  answer and the guard, :attr:`~m2m.agents.messages.Decision.decision_s`); ``other_s`` is the rest of the session
  (DRL advice, knowledge, the bus);
* ``folder_s`` — writing the session folder (plots, trajectory, ``final.json``), as ``m2m plan`` does;
* ``stack_stop_s`` — taking the stack down until its supervisor has exited;
* ``total_s`` — the whole command.

It joins a stack already running at the config's ``[bus]`` endpoints (then stack start, setup and stop are not
measured: null). ``--json OUT`` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2m.cli.common import UsageError, failed, prepare_stack, usage_error

if TYPE_CHECKING:
    from m2m.agents.messages import SessionResult

COMMAND = "bench demo"


@dataclass
class StepTiming:
    """One step of the session: its plan's time and the time of the decision taken from it (None at the last
    step), with the decision's source."""

    step: int
    plan_s: float
    decision_s: float | None
    source: str | None


@dataclass
class DemoTimings:
    """Every phase of one run of the main job (see the module docstring)."""

    scenario: str
    case: int
    mode: str
    planners: list[str]
    stack_started: bool
    stack_start_s: float | None
    agents_setup_s: dict[str, float]
    agent_roles: dict[str, str]
    model_load_s: float | None
    session_s: float
    planner_session_s: float
    steps: list[StepTiming]
    plans_s: float
    decisions_s: float
    other_s: float
    folder_s: float
    stack_stop_s: float | None
    total_s: float
    outcome: str
    final_score: float
    max_score: float
    n_steps: int
    session_folder: str
    setup_details: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def agent_setups(transcript: Path) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """Per agent name, from a bus transcript's :class:`~m2m.agents.messages.AgentStatus` events: the setup time
    (first ``starting`` to the first ``ready`` after it, s), the last ``starting`` detail (e.g. the model being
    loaded) and its role."""
    from m2m.agents.messages import AgentStatus
    from m2m.bus.errors import BusError
    from m2m.bus.transcript import read_transcript

    started: dict[str, float] = {}
    setup: dict[str, float] = {}
    detail: dict[str, str] = {}
    roles: dict[str, str] = {}
    for rec in read_transcript(transcript).records:
        if rec.kind != "event" or not rec.route.startswith("agents.status."):
            continue
        try:
            msg = rec.decode()
        except BusError:
            continue
        if not isinstance(msg, AgentStatus) or msg.name in setup:
            continue
        roles[msg.name] = msg.role
        if msg.state == "starting":
            started.setdefault(msg.name, rec.t)
            if msg.detail:
                detail[msg.name] = msg.detail
        elif msg.state == "ready" and msg.name in started:
            setup[msg.name] = rec.t - started[msg.name]
    return setup, detail, roles


def step_timings(result: SessionResult) -> list[StepTiming]:
    return [StepTiming(step=s.step, plan_s=s.plan_s,
                       decision_s=s.decision.decision_s if s.decision is not None else None,
                       source=s.decision.source if s.decision is not None else None) for s in result.steps]


def _row(label: str, seconds: float | None, note: str = "") -> str:
    value = "—" if seconds is None else f"{seconds:8.2f} s"
    return f"{label:<50}{value:>10}" + (f"  {note}" if note else "")


def timing_lines(t: DemoTimings) -> list[str]:
    """The phases as people read them (stdout)."""
    lines = [f"phase timings: {t.scenario} case {t.case}, mode {t.mode}, planner {', '.join(t.planners)}",
             _row("  stack start (until every agent is ready)", t.stack_start_s,
                  "" if t.stack_started else "(joined a running stack: not measured)"),
             _row("  model load (the planner's setup)", t.model_load_s)]
    for name, seconds in sorted(t.agents_setup_s.items()):
        role = t.agent_roles.get(name, "")
        shown = f"{name} ({role})" if role and not name.startswith(role) else name
        lines.append(_row(f"    {shown} setup", seconds, t.setup_details.get(name, "")))
    lines.append(_row("  session (the client's wait)", t.session_s, f"planner {t.planner_session_s:.2f} s"))
    for st in t.steps:
        lines.append(_row(f"    step {st.step:>2} plan", st.plan_s))
        if st.decision_s is not None:
            lines.append(_row(f"    step {st.step:>2} decision", st.decision_s, str(st.source)))
    lines += [_row("    plans, all steps", t.plans_s), _row("    decisions, all steps", t.decisions_s),
              _row("    other (advice, knowledge, bus)", t.other_s),
              _row("  session folder", t.folder_s), _row("  stack stop", t.stack_stop_s), _row("  total", t.total_s),
              f"outcome: {t.outcome}, score {t.final_score:.2f}/{t.max_score:g} in {t.n_steps} steps; session "
              f"folder {t.session_folder}"]
    return lines


def add_bench(bench_sub: Any) -> None:
    """Add ``bench demo``."""
    b = bench_sub.add_parser(
        "demo", help="the main job (make demo: one guided session on a stack of its own) timed phase by phase",
        description="Brings a stack up, plans one session as `m2m plan` does (the session folder included), takes "
        "the stack down, and prints the time of each phase: stack start, each agent's setup (the planner's model "
        "load), each plan and decision, the session folder, stack stop, total.",
    )
    b.add_argument("--scenario", default="prostate-basic", help="prostate-basic, prostate-complex or liver")
    b.add_argument("--case", type=int, default=0, help="index into the cohort (0 = its first seed)")
    b.add_argument("--cohort", default="test", help="train, validation, test, knowledge or paper (default test)")
    b.add_argument("--mode", choices=("guided", "unguided"), default="guided", help="session mode (default guided)")
    b.add_argument("--step-cap", type=int, default=None, help="maximum steps (default: the scenario's, 20)")
    b.add_argument("--config", type=Path, default=None,
                   help="stack config of the stack it starts (default: the packaged one, the embedded model); "
                        "a planner with options model=replay replay=FILE times the job without the model")
    b.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of the session folder (runs/)")
    b.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the timings as JSON")
    b.set_defaults(func=_bench_demo, with_advice=False, planner=None, checkpoint=None, keep_up=False, stack=None,
                   connect=None, pub_connect=None, curve_secret=None, curve_server=None, heartbeat=None)


def _bench_demo(args: argparse.Namespace) -> int:
    from m2m.cli.common import check_writable_folder
    from m2m.cli.plan import _check_plan
    from m2m.stack.config import StackError

    try:
        sc, seed = _check_plan(args)
        if args.json is not None:
            check_writable_folder(args.json.parent, "--json")
        needs = {"dose-engine", "evaluator", "planner"} | ({"drl-advisor"} if args.mode == "guided" else set())
        use = prepare_stack(args, COMMAND, needs)
    except UsageError as exc:
        return usage_error(COMMAND, exc)
    except StackError as exc:
        return failed(COMMAND, exc)
    t0 = time.perf_counter()
    try:
        timings = asyncio.run(_run(args, use, sc.step_cap, seed, t0))
    except KeyboardInterrupt:
        print(f"m2m {COMMAND}: interrupted", file=sys.stderr)
        return 130
    if isinstance(timings, int):
        return timings
    for line in timing_lines(timings):
        print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(timings.to_json(), indent=2) + "\n")
        print(f"timings: {args.json}")
    return 0


async def _run(args: argparse.Namespace, use: Any, default_cap: int, seed: int, t0: float) -> DemoTimings | int:
    from m2m.agents.messages import SessionRequest, new_session_id
    from m2m.bus.errors import BusError
    from m2m.cli.common import ensure_stack
    from m2m.cli.plan import _new_folder
    from m2m.cli.running import quiet_logs
    from m2m.session.client import (
        run_session_request,
        session_folder_name,
        step_line,
        summary_line,
        write_bus_session_folder,
    )
    from m2m.stack.config import StackError
    from m2m.stack.control import take_down

    quiet_logs(args)
    try:
        stack = await ensure_stack(use)
    except StackError as exc:
        return failed(COMMAND, exc)
    stack_start_s = time.perf_counter() - t0 if stack.started else None
    req = SessionRequest(
        session_id=new_session_id(), scenario=args.scenario, case_seed=seed, mode=args.mode,
        step_cap=default_cap if args.step_cap is None else args.step_cap,
    )
    stop_s: float | None = None
    try:
        t1 = time.perf_counter()
        result = await run_session_request(stack.bus, req, lambda s, o: print(step_line(s, o), file=sys.stderr))
        session_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        folder = _new_folder(args.out, session_folder_name(args.scenario, result.header.case_id, args.mode))
        await asyncio.to_thread(write_bus_session_folder, folder, result, stack.transcript)
        folder_s = time.perf_counter() - t2
    except (BusError, LookupError, ValueError) as exc:
        return failed(COMMAND, f"session failed: {exc}")
    finally:
        if stack.started:
            t3 = time.perf_counter()
            await take_down(stack.bus, timeout=60.0)
            stop_s = time.perf_counter() - t3
    print(summary_line(result), file=sys.stderr)
    setups: dict[str, float] = {}
    details: dict[str, str] = {}
    roles: dict[str, str] = {}
    if stack.started and stack.transcript is not None and stack.transcript.is_file():
        setups, details, roles = await asyncio.to_thread(agent_setups, stack.transcript)
    planner_setups = [s for name, s in setups.items() if roles.get(name) == "planner"]
    steps = step_timings(result)
    plans_s = sum(s.plan_s for s in steps)
    decisions_s = sum(s.decision_s or 0.0 for s in steps)
    return DemoTimings(
        scenario=args.scenario, case=args.case, mode=args.mode, planners=list(result.planners),
        stack_started=stack.started, stack_start_s=stack_start_s, agents_setup_s=setups, agent_roles=roles,
        model_load_s=max(planner_setups) if planner_setups else None, session_s=session_s,
        planner_session_s=result.wall_s, steps=steps, plans_s=plans_s, decisions_s=decisions_s,
        other_s=max(result.wall_s - plans_s - decisions_s, 0.0), folder_s=folder_s, stack_stop_s=stop_s,
        total_s=time.perf_counter() - t0, outcome=str(result.outcome), final_score=result.final_score,
        max_score=result.max_score, n_steps=result.n_steps, session_folder=str(folder),
        setup_details={k: v for k, v in details.items() if roles.get(k) == "planner"},
    )
