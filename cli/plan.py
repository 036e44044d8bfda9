"""``m2m plan`` (one planning session: on the bus, or an in-process baseline) and ``m2m replay`` (re-drive a recorded
session against the live agents)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from m2m.cli.common import (
    OWN_STACK,
    UsageError,
    add_bus_arguments,
    check_writable_folder,
    ensure_stack,
    failed,
    prepare_stack,
    usage_error,
)
from m2m.cli.running import EXIT_INTERRUPTED

if TYPE_CHECKING:
    from m2m.agents.messages import SessionResult
    from m2m.bus.client import BusConfig
    from m2m.cli.common import StackUse
    from m2m.scenarios import Scenario
    from m2m.session.progress import ProgressView

PLANNERS = ("drl", "greedy")


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Add ``plan`` and ``replay``."""
    p = sub.add_parser(
        "plan",
        help="plan one case autonomously: on the bus with the LLM planner (default), or in-process (--planner)",
    )
    p.add_argument("--scenario", default="prostate-basic",
                   help="a packaged scenario (prostate-basic, prostate-complex, liver, tg119, alderson), a registered "
                        "one, or a scenario TOML file of your own (registered under its name)")
    f = p.add_argument_group("a case from a file, without writing a scenario (see the README)")
    f.add_argument("--case-file", type=Path, default=None,
                   help="a DICOM folder (CT series + RTSTRUCT) or .zip of one, or a matRad .mat file")
    f.add_argument("--protocol", default=None,
                   help="with --case-file: a packaged protocol's name (e.g. prostate-basic) or a protocol TOML file")
    f.add_argument("--roles", default=None,
                   help="with --case-file: planner structure = structure in the file, comma-separated, the target "
                        "as ptv, e.g. ptv=PTV,bladder=Bladder,rectum=Rectum (names matched ignoring case)")
    f.add_argument("--rx-gy", type=float, default=None,
                   help="with --case-file: prescription (Gy); needed for DICOM (matRad: the file's target objective)")
    f.add_argument("--beams", type=int, default=None,
                   help="with --case-file: that many equispaced coplanar beams (default: the dose engine's 7)")
    f.add_argument("--dose-grid-mm", type=float, default=None,
                   help="with --case-file: resample to this isotropic dose grid (mm; default 3 for DICOM, the file's "
                        "grid for matRad)")
    p.add_argument("--case", type=int, default=0, help="index into the cohort (0 = its first seed)")
    p.add_argument("--cohort", default="test", help="train, validation, test, knowledge or paper (default test)")
    p.add_argument("--mode", choices=("guided", "unguided"), default="guided",
                   help="bus session: guided (the LLM sees the DRL knowledge; default) or unguided")
    p.add_argument("--with-advice", action="store_true", help="guided: also show the LLM the DRL's per-step advice")
    p.add_argument("--step-cap", type=int, default=None, help="maximum steps (default: the scenario's, 20)")
    p.add_argument("--config", type=Path, default=None,
                   help="stack config of the stack this command starts (default: the packaged one)")
    p.add_argument("--keep-up", action="store_true",
                   help="leave the stack this command started running (m2m down --stack ID stops it)")
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
    add_bus_arguments(p, default=OWN_STACK)
    p.set_defaults(func=_plan)

    r = sub.add_parser("replay", help="re-drive a recorded session against the live agents and compare scores")
    r.add_argument("file", type=Path, help="a session transcript (transcript.m2mt) or a whole bus transcript")
    r.add_argument("--session", default=None, help="session id (needed when the file holds several)")
    r.add_argument("--speed", type=float, default=0.0, help="seconds to wait before each step (demos)")
    r.add_argument("--step", action="store_true", help="wait for Enter before each step")
    r.add_argument("--config", type=Path, default=None,
                   help="stack config of the stack this command starts (default: the packaged one)")
    add_bus_arguments(r, default=OWN_STACK)
    r.set_defaults(func=_replay)

    from m2m.cli.demo_bench import add_bench

    add_bench(bench_sub)


def _check_plan(args: argparse.Namespace) -> tuple[Scenario, int]:
    """The scenario and the case's seed; :class:`UsageError` for anything wrong with the command line. A scenario
    file, or a case file given with ``--case-file``, is registered first and ``args.scenario`` set to its name."""
    from m2m.physics.case import CaseFileError
    from m2m.scenarios import ScenarioError, load_scenario, register_scenario

    # Commands that reuse this check without the case-file options (m2m bench demo) simply have none of them.
    case_file = getattr(args, "case_file", None)
    file_options = [o for o in ("protocol", "roles", "rx_gy", "beams", "dose_grid_mm")
                    if getattr(args, o, None) is not None]
    if case_file is None and file_options:
        raise UsageError(f"--{file_options[0].replace('_', '-')} needs --case-file")
    try:
        if case_file is not None:
            sc = _register_case_file(args)
            args.scenario = sc.name
        elif args.scenario.endswith(".toml") or Path(args.scenario).is_file():
            sc = register_scenario(args.scenario)
            args.scenario = sc.name
        else:
            sc = load_scenario(args.scenario)
    except (ScenarioError, CaseFileError) as exc:
        raise UsageError(f"--{'case-file' if case_file is not None else 'scenario'}: {exc}") from None
    try:
        seeds = sc.cohorts.get(args.cohort).seeds
    except KeyError as exc:
        raise UsageError(f"--cohort: {exc.args[0]}") from None
    if not 0 <= args.case < len(seeds):
        raise UsageError(f"--case {args.case} is outside cohort {args.cohort!r} of {args.scenario} ({len(seeds)} "
                         f"cases, 0 to {len(seeds) - 1})")
    if args.step_cap is not None and args.step_cap < 0:
        raise UsageError(f"--step-cap must be >= 0, got {args.step_cap}")
    if args.with_advice and args.mode != "guided":
        raise UsageError("--with-advice needs --mode guided (the unguided planner sees no advice)")
    check_writable_folder(args.out, "--out")
    if args.planner is not None:
        given = [f"--{name.replace('_', '-')}" for name in ("stack", "connect", "config", "keep_up")
                 if getattr(args, name)]
        if given:
            raise UsageError(f"--planner {args.planner} plans in this process, without a stack: "
                             f"{', '.join(given)} do not apply")
        if args.checkpoint is not None and not args.checkpoint.is_file():
            raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    return sc, int(seeds[args.case])


def _register_case_file(args: argparse.Namespace) -> Scenario:
    """Register the scenario ``--case-file`` and its options describe (see the README's "Plan your own case"): the
    case is loaded once here, so a bad file is refused before any stack starts, and its OARs are ranked into roles
    by their PTV-proximal volume (:mod:`m2m.scenarios.roles`), as the packaged scenarios are."""
    import hashlib
    import json
    import re

    from m2m.physics.tpp import PTV
    from m2m.scenarios import ScenarioError, parse_scenario, register_table, role_map
    from m2m.scenarios.cases import load_file_case
    from m2m.scenarios.roles import rank_oars

    path = args.case_file.expanduser().resolve()
    if args.protocol is None or args.roles is None:
        raise UsageError("--case-file needs --protocol and --roles (e.g. --roles ptv=PTV,bladder=Bladder)")
    roles: dict[str, str] = {}
    for item in args.roles.split(","):
        name, eq, in_file = (part.strip() for part in item.partition("="))
        if not eq or not name or not in_file:
            raise UsageError(f"--roles: {item!r} is not planner_name=name_in_file")
        roles[name] = in_file
    if PTV not in roles:
        raise UsageError(f"--roles: map the target as {PTV}=<its name in the file>")
    if len(roles) < 2:
        raise UsageError(f"--roles: name at least one OAR besides {PTV} (the planner sets TPPs on the PTV and OARs)")
    fmt = "matrad" if path.suffix.lower() == ".mat" else "dicom"
    if fmt == "dicom" and args.rx_gy is None:
        raise UsageError("--rx-gy is needed for a DICOM case (an RTSTRUCT carries no prescription)")
    rx_gy = args.rx_gy
    if rx_gy is None:
        from m2m.physics.matrad import load_matrad

        rx_gy = load_matrad(path).rx_gy
    grid = args.dose_grid_mm if args.dose_grid_mm is not None else (3.0 if fmt == "dicom" else None)
    protocol = args.protocol
    if protocol.endswith(".toml"):
        protocol = str(Path(protocol).expanduser().resolve())
    oars = [n for n in roles if n != PTV]
    table: dict[str, object] = {
        "name": "", "description": f"{path.name}, planned with m2m plan --case-file", "site": "other",
        "rx_gy": float(rx_gy), "protocol": protocol, "beams": {"bixel_mm": 5.0}, "tpp": {"structures": [PTV, *oars]},
        "roles": {f"oar{i + 1}": n for i, n in enumerate(oars)},
        "case": {"format": fmt, "path": str(path), "structures": roles},
    }
    if args.beams is not None:
        if not 1 <= args.beams <= 360:
            raise UsageError(f"--beams must be 1 to 360, got {args.beams}")
        table["beams"] = {"every_deg": 360.0 / args.beams, "bixel_mm": 5.0}
    if grid is not None:
        table["case"]["dose_grid_mm"] = [grid, grid, grid]  # type: ignore[index]
    try:
        provisional = parse_scenario({**table, "name": "case-file"}, "--case-file")
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None
    loaded = load_file_case(provisional)
    case = loaded.case
    resampled = (f", resampled to {case.grid.spacing_mm} mm in {loaded.resample_s:.1f} s ({loaded.file_voxels:,} → "
                 f"{case.grid.n_voxels:,} voxels)" if loaded.resample_s else "")
    print(f"case {path.name}: read in {loaded.load_s:.1f} s{resampled}; structures "
          f"{', '.join(f'{s.name} {s.n_voxels * case.grid.voxel_volume_cc:.1f} cc' for s in case.structures)}")
    table["roles"] = {k: v for k, v in role_map(rank_oars(oars, [case], provisional.protocol)).items() if k != PTV}
    digest = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9_.-]+", "_", path.stem.lower()).strip("._-") or "case"
    table["name"] = f"{stem}-{digest}"
    return register_table(table, Path.cwd(), "--case-file")


def _plan(args: argparse.Namespace) -> int:
    from m2m.stack.config import StackError

    try:
        sc, seed = _check_plan(args)
        if args.planner is not None:
            return _plan_in_process(args)
        needs = {"dose-engine", "evaluator", "planner"} | ({"drl-advisor"} if args.mode == "guided" else set())
        use = prepare_stack(args, "plan", needs)
    except UsageError as exc:
        return usage_error("plan", exc)
    except StackError as exc:  # --stack names no running stack
        return failed("plan", exc)
    try:
        return asyncio.run(_plan_on_bus(args, use, sc.step_cap, seed))
    except (KeyboardInterrupt, asyncio.CancelledError):  # a Ctrl-C outside the session, or a second one
        print("m2m plan: interrupted; a stack it started may still be going down (see m2m status)", file=sys.stderr)
        return EXIT_INTERRUPTED


async def _plan_on_bus(args: argparse.Namespace, use: StackUse, default_cap: int, seed: int) -> int:
    """The session on the bus with the live progress view; Ctrl-C keeps the steps done so far (see
    :func:`_interrupted`)."""
    from m2m.agents.messages import SessionRequest, Step, StepPhase, new_session_id
    from m2m.bus.errors import BusError
    from m2m.cli.running import bring_up, quiet_logs, resume_after_interrupt, sigint_cancels
    from m2m.session.client import (
        print_summary,
        run_session_request,
        session_folder_name,
        step_line,
        warm_up_folder_writing,
        write_bus_session_folder,
    )
    from m2m.session.progress import ProgressView, make_console
    from m2m.stack.control import take_down

    quiet_logs(args)
    console = make_console()
    req = SessionRequest(
        session_id=new_session_id(), scenario=args.scenario, case_seed=seed, mode=args.mode,
        step_cap=default_cap if args.step_cap is None else args.step_cap, with_advice=args.with_advice,
    )
    t0 = time.monotonic()
    at = [0]  # the step in progress (for the message after a Ctrl-C)
    with sigint_cancels() as sigint, ProgressView(console) as view:
        stack = await bring_up("plan", use, view, sigint, "no session was started", keep_up=args.keep_up)
        if isinstance(stack, int):
            return stack
        config, transcript, started = stack.bus, stack.transcript, stack.started
        if started:
            view.line(f"stack {stack.stack_id} up in {time.monotonic() - t0:.1f} s")
        view.line(f"session {req.session_id}: {args.scenario} case {args.case} (seed {seed}), mode {args.mode}")

        def on_step(s: Step, outcome: str | None) -> None:
            at[0] = s.step + 1
            view.line(step_line(s, outcome))

        def on_phase(p: StepPhase) -> None:
            at[0] = p.step
            view.phase(p)

        asyncio.get_running_loop().run_in_executor(None, warm_up_folder_writing)  # for a quick folder after Ctrl-C
        session_t0 = time.monotonic()
        try:
            result = await run_session_request(config, req, on_step, on_phase)
        except asyncio.CancelledError:
            if not sigint.count:
                raise
            resume_after_interrupt()
            return await _interrupted(args, view, req.session_id, at[0], config, transcript,
                                      started and not args.keep_up, time.monotonic() - session_t0)
        except (BusError, LookupError, ValueError) as exc:
            failure: Exception | None = exc
        else:
            failure = None
        if started and not args.keep_up:
            view.activity("taking the stack down")
            await take_down(config, timeout=60.0)  # this stack only, and its processes are gone when it returns
        if failure is not None:
            return failed("plan", f"session failed: {failure}")
        view.activity("writing the session folder")
        folder = _new_folder(args.out, session_folder_name(args.scenario, result.header.case_id, args.mode))
        await asyncio.to_thread(write_bus_session_folder, folder, result, transcript)
        exported = await _export_rtdose(view, folder, args.scenario, result)
    print_summary(console, result)
    if exported:
        print(exported)
    print(f"session folder: {folder}")
    return 0


async def _export_rtdose(view: ProgressView, folder: Path, scenario: str, result: SessionResult) -> str:
    """For a case-file scenario, the final dose as ``rtdose.dcm`` in the session folder; a line saying so ('' for
    phantom scenarios). A failure to export is reported, not raised: the session and its folder stand."""
    from m2m.physics.case import CaseFileError
    from m2m.scenarios import load_scenario
    from m2m.session.export import export_rtdose

    sc = load_scenario(scenario)
    if sc.case is None or result.final_fluence is None:
        return ""
    view.activity("computing the final dose on the CT grid for rtdose.dcm")
    try:
        done = await asyncio.to_thread(export_rtdose, folder, sc, result.final_fluence)
    except (CaseFileError, ImportError, OSError, ValueError) as exc:
        return f"rtdose.dcm not written: {exc}"
    return (f"rtdose.dcm: final dose, max {done.dmax_gy:.1f} Gy, on the CT's frame "
            f"(case {done.load_s:.1f} s, dose {done.dose_s:.1f} s)")


async def _interrupted(args: argparse.Namespace, view: ProgressView, session_id: str, step: int, config: BusConfig,
                       transcript: Path | None, stop_stack: bool, wall_s: float) -> int:
    """After Ctrl-C: the steps done so far (the session's retained state) go to the session folder, outcome
    ``interrupted``; a stack this command started goes down (its planner cancels the decision in flight)."""
    from m2m.cli.running import EXIT_INTERRUPTED
    from m2m.session.client import (
        SESSION_TRANSCRIPT,
        copy_session_transcript,
        interrupted_result,
        session_folder_name,
        write_bus_session_folder,
    )
    from m2m.stack.control import take_down

    view.activity("interrupted: keeping the steps done so far" + ("; taking the stack down" if stop_stack else ""))
    result = await interrupted_result(config, session_id, wall_s)
    where = "the stack is down" if stop_stack else "the running stack's planner finishes the session on its own"
    folder = None
    if result is not None:
        folder = _new_folder(args.out, session_folder_name(args.scenario, result.header.case_id, args.mode))
    # The plots are drawn while the stack goes down; the transcript is copied once its broker wrote the last record.
    await asyncio.gather(
        take_down(config, timeout=60.0, drain=False) if stop_stack else asyncio.sleep(0),
        asyncio.to_thread(write_bus_session_folder, folder, result, transcript, copy_transcript=False)
        if folder is not None and result is not None else asyncio.sleep(0),
    )
    if folder is None or result is None:
        print(f"m2m plan: interrupted at step {step} before a step was recorded: no session folder; {where}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if transcript is not None and transcript.is_file():
        await asyncio.to_thread(copy_session_transcript, transcript, session_id, folder / SESSION_TRANSCRIPT)
    kept = len(result.steps)
    print(f"session folder: {folder}")
    print(f"m2m plan: interrupted at step {step}: {kept} step{'s' * (kept != 1)} kept in {folder}; {where}",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def _new_folder(parent: Path, name: str) -> Path:
    """``parent/name``, made now (``-2``, ``-3`` … appended when another session took the name in the same second)."""
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


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
    from m2m.stack.config import StackError

    try:
        sessions = recorded_sessions(args.file)
    except (OSError, BusError, ValueError) as exc:
        return usage_error("replay", exc)
    if args.session is not None:
        sessions = {k: v for k, v in sessions.items() if k == args.session}
    if len(sessions) != 1:
        return usage_error("replay", f"{len(sessions)} sessions in {args.file} ({', '.join(sessions) or 'none'}): "
                                     "choose one with --session")
    recorded = next(iter(sessions.values()))
    # the DRL advisor gives advice (the DRL planner) and publishes the knowledge (guided, the knowledge baseline)
    advised = recorded.header.mode == "guided" or any(p.split(":")[0] in ("drl", "knowledge")
                                                      for p in recorded.planners)
    try:
        use = prepare_stack(args, "replay", {"dose-engine", "evaluator"} | ({"drl-advisor"} if advised else set()))
    except UsageError as exc:
        return usage_error("replay", exc)
    except StackError as exc:
        return failed("replay", exc)
    return asyncio.run(_replay_on_bus(args, use, recorded))


async def _replay_on_bus(args: argparse.Namespace, use: StackUse, recorded: SessionResult) -> int:
    from rich.table import Table

    from m2m.cli.running import quiet_logs
    from m2m.session.client import replay, step_line
    from m2m.session.progress import make_console
    from m2m.stack.config import StackError
    from m2m.stack.control import take_down

    quiet_logs(args)
    console = make_console()
    try:
        stack = await ensure_stack(use)
    except StackError as exc:
        print(f"m2m replay: {exc}", file=sys.stderr)
        return 1
    config, started = stack.bus, stack.started

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
            await take_down(config, timeout=60.0)
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
