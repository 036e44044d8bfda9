from __future__ import annotations

from pathlib import Path

import pytest

from m2m.physics import dvh
from m2m.physics.beams import beams_for
from m2m.physics.dij_cache import load_or_compute_dij
from m2m.physics.phantoms import make_case
from m2m.physics.protocol import Criterion, CriterionScore, Protocol, ScoreReport, load_protocol
from m2m.physics.tpp import TppSet
from m2m.scenarios.calibrate import CalibrationReport, CaseCalibration, search_max, targeted_steps
from m2m.scenarios.cases import CaseOptimizer

OARS = ("bladder", "rectum")


def test_search_reaches_a_maximum_the_defaults_miss(tmp_path: Path) -> None:
    case = make_case("prostate", 1001)
    dij = load_or_compute_dij(case, beams_for(case), cache_dir=tmp_path)
    probe = CaseOptimizer(dij, load_protocol("prostate-basic"), case.rx_gy)
    default_v70 = 100.0 * dvh.v_gy(probe.evaluate(TppSet.default(OARS)).plan.dose["rectum"], 70.0)
    # A limit well below what default TPPs give, which sparing the rectum harder can meet.
    protocol = Protocol(
        "tight-rectum",
        (
            Criterion("ptv", "D0.03cc", "%Rx", limit=107.0, zero=110.0),
            Criterion("rectum", "V70Gy", "%", limit=0.5 * default_v70, zero=0.5 * default_v70 + 5.0),
        ),
    )
    planner = CaseOptimizer(dij, protocol, case.rx_gy)
    start = planner.evaluate(TppSet.default(OARS))
    assert start.report.total < 2.0
    result = search_max(planner, start, max_evaluations=120)
    assert result.reached_max and result.best.report.failing == ()
    assert 0 < result.evaluations <= 120
    assert result.best.tpps.get("t_rectum") < 1.0 or result.best.tpps.get("lambda_rectum") > 1.0


def test_search_costs_nothing_when_the_start_is_already_at_the_maximum(tmp_path: Path) -> None:
    case = make_case("prostate", 1000)
    dij = load_or_compute_dij(case, beams_for(case), cache_dir=tmp_path)
    probe = CaseOptimizer(dij, load_protocol("prostate-basic"), case.rx_gy)
    v70 = 100.0 * dvh.v_gy(probe.evaluate(TppSet.default(OARS)).plan.dose["rectum"], 70.0)
    lenient = Protocol("lenient", (Criterion("rectum", "V70Gy", "%", limit=v70 + 10.0, zero=v70 + 15.0),))
    planner = CaseOptimizer(dij, lenient, case.rx_gy)
    start = planner.evaluate(TppSet.default(OARS))
    assert start.report.total == pytest.approx(1.0)
    result = search_max(planner, start)
    assert result.reached_max and result.evaluations == 0 and result.best is start


def _case(seed: int, default: float, random: float, reached: bool) -> CaseCalibration:
    return CaseCalibration(seed, default, random, 9.0 if reached else random, reached, 3, {}, (), {}, 0.1, 0.1)


def test_report_summarises_mean_sd_and_counts() -> None:
    report = CalibrationReport("prostate-basic", 9.0, (_case(0, 9.0, 6.0, True), _case(1, 7.0, 8.0, False)))
    assert report.default_mean_sd == pytest.approx((8.0, 2**0.5))
    assert report.random_mean_sd == pytest.approx((7.0, 2**0.5))
    assert report.n_reached_max == 1 and report.n_default_at_max == 1
    assert report.summary() == (
        "2 cases: default TPPs 8.00±1.41, random TPPs 7.00±1.41 of 9; defaults at max on 1; "
        "search reached max on 1/2"
    )


def test_cli_registers_calibrate_and_bench_physics() -> None:
    from m2m.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["calibrate", "--scenario", "liver", "--cases", "3"])
    assert (args.scenario, args.cases, args.cohort) == (["liver"], 3, "validation") and callable(args.func)
    args = parser.parse_args(["bench", "physics", "--skip-complex"])
    assert args.skip_complex and callable(args.func)


def test_parallel_calibration_gives_the_serial_report(tmp_path: Path) -> None:
    import dataclasses

    from m2m.scenarios.calibrate import calibrate

    def scores(report: CalibrationReport) -> list[dict[str, object]]:  # timings differ between runs
        return [{k: v for k, v in dataclasses.asdict(c).items() if not k.endswith("_seconds")} for c in report.cases]

    seeds = [1001, 1000]
    serial = calibrate("liver", seeds, cache_dir=tmp_path, max_evaluations=4)
    parallel = calibrate("liver", seeds, cache_dir=tmp_path, max_evaluations=4, workers=2)
    assert [c.seed for c in parallel.cases] == seeds
    assert scores(parallel) == scores(serial)


def test_targeted_steps_tighten_the_worst_failing_structure_first_and_may_trade() -> None:
    protocol = Protocol(
        "two",
        (
            Criterion("ptv", "D0.03cc", "%Rx", limit=107.0, zero=110.0),
            Criterion("rectum", "V70Gy", "%", limit=25.0, zero=30.0),
            Criterion("rectum", "V65Gy", "%", limit=35.0, zero=40.0),
        ),
    )
    items = (
        CriterionScore(protocol.criteria[0], 108.5, 0.5, False),
        CriterionScore(protocol.criteria[1], 29.0, 0.2, False),
        CriterionScore(protocol.criteria[2], 30.0, 1.0, True),
    )
    report = ScoreReport("two", items, 1.7, 3.0)
    assert targeted_steps(report) == [
        ("lambda_rectum", 1), ("t_rectum", -1), ("v_rectum", 1),  # 0.2 points: the worst
        ("t_ptv", -1), ("v_ptv", 1), ("lambda_ptv", 1),
    ]
    bladder = Criterion("bladder", "V70Gy", "%", limit=35.0, zero=40.0)
    traded = ScoreReport("three", (*items, CriterionScore(bladder, 10.0, 1.0, True)), 2.7, 4.0)
    assert targeted_steps(traded) == targeted_steps(report)  # the trade is off by default
    assert targeted_steps(traded, trade=True) == [  # then loosen the structure that passes everything
        ("lambda_rectum", 1), ("t_rectum", -1), ("v_rectum", 1), ("t_ptv", -1), ("v_ptv", 1), ("lambda_ptv", 1),
        ("lambda_bladder", -1), ("t_bladder", 1), ("v_bladder", -1),
    ]
    coverage = Criterion("ptv", "D95%", "%Rx", limit=100.0, zero=95.0)  # a lower limit: the PTV needs more dose
    low = ScoreReport("cov", (CriterionScore(coverage, 97.0, 0.4, False),), 0.4, 1.0)
    assert targeted_steps(low) == [("t_ptv", 1), ("v_ptv", -1), ("lambda_ptv", -1)]
    assert targeted_steps(ScoreReport("two", items[2:], 1.0, 1.0), trade=True) == []


def test_cli_calibration_saves_each_case_and_resumes_from_the_file(tmp_path: Path) -> None:
    import json

    from m2m.cli.main import main

    out = tmp_path / "cal.json"
    args = ["calibrate", "--scenario", "liver", "--cases", "2", "--max-evaluations", "2", "--cache-dir",
            str(tmp_path), "--json", str(out)]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert [c["seed"] for c in first["cases"]] == [1000, 1001] and first["max_evaluations"] == 2
    # A file holding both cases: the rerun recalibrates nothing, so planted values survive unchanged.
    first["cases"][0]["default_score"] = -1.0
    out.write_text(json.dumps(first))
    assert main(args) == 0
    assert json.loads(out.read_text())["cases"][0]["default_score"] == -1.0
    with pytest.raises(SystemExit, match="budget 2"):
        main([*args[:6], "3", *args[7:]])


def test_the_search_starts_from_the_initial_plan_asked_for(tmp_path: Path) -> None:
    from m2m.scenarios.calibrate import calibrate_case

    # With no search budget the best plan is the start itself, so each start shows in the searched score.
    runs = {s: calibrate_case("liver", 1000, cache_dir=tmp_path, max_evaluations=0, start=s)
            for s in ("better", "default", "random")}
    default, random = runs["default"].default_score, runs["default"].random_score
    assert default != random
    assert runs["default"].searched_score == default and runs["random"].searched_score == random
    assert runs["better"].searched_score == max(default, random)
    with pytest.raises(ValueError, match="start"):
        calibrate_case("liver", 1000, cache_dir=tmp_path, max_evaluations=0, start="worse")


def test_cli_calibrates_given_seeds_from_a_given_start_and_keeps_files_apart(tmp_path: Path) -> None:
    import json

    from m2m.cli import physics as commands
    from m2m.cli.main import main
    from m2m.scenarios.calibrate import SEARCH_STARTS

    assert commands._SEARCH_STARTS == SEARCH_STARTS
    out = tmp_path / "cal.json"
    args = ["calibrate", "--scenario", "liver", "--seeds", "1003", "--max-evaluations", "0", "--start", "default",
            "--cache-dir", str(tmp_path), "--json", str(out)]
    assert main(args) == 0
    saved = json.loads(out.read_text())
    assert saved["start"] == "default" and [c["seed"] for c in saved["cases"]] == [1003]
    assert saved["cases"][0]["searched_score"] == saved["cases"][0]["default_score"]
    # A file of default-start searches does not resume a run from another start.
    with pytest.raises(SystemExit, match="start default"):
        main([*args[:-5], "random", *args[-4:]])


def test_cli_summary_over_scenarios_writes_json_markdown_and_the_readme_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from m2m.cli.main import main
    from m2m.cli.physics import README_MARKERS

    out, readme = tmp_path / "calibration", tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_MARKERS[0]}\nold table\n{README_MARKERS[1]}\n\nafter\n")
    base = ["calibrate", "--cases", "2", "--max-evaluations", "2", "--cache-dir", str(tmp_path)]
    assert main([*base, "--scenario", "liver", "prostate-basic"]) == 2  # several scenarios need --summary
    assert "--summary" in capsys.readouterr().err
    assert main([*base, "--scenario", "liver", "prostate-basic", "--summary", str(out), "--readme", str(readme)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["liver", "prostate-basic"]
    for name, entry in summary.items():
        cases = json.loads((out / f"{name}.json").read_text())["cases"]
        assert entry["n"] == len(cases) == 2 and entry["seeds"] == [1000, 1001]
        initial = [c["initial_score"] for c in cases]
        assert entry["initial_mean"] == pytest.approx(sum(initial) / 2, abs=1e-3)
        assert entry["max_score"] == {"liver": 4.0, "prostate-basic": 9.0}[name]
        assert (entry["paper_initial_mean"], entry["paper_initial_sd"]) == {"liver": (2.5, 0.4),
                                                                           "prostate-basic": (5.8, 1.7)}[name]
        assert entry["reached_max"] == sum(c["reached_max"] for c in cases) / 2
        assert entry["median_plans"] == pytest.approx(sum(c["search_evaluations"] for c in cases) / 2)
        for label, share in entry["fail_share"].items():  # every criterion, each share from the cases' own lists
            assert share == sum(label in c["initial_failing"] for c in cases) / 2
        assert len(entry["fail_share"]) == {"liver": 4, "prostate-basic": 9}[name]
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title") and text.endswith("after\n")
    assert "| liver (max 4) | 2 |" in text and "| prostate-basic (max 9) | 2 |" in text and "| 2.5 ± 0.4 |" in text
    table = text.split(README_MARKERS[0] + "\n")[1].split(README_MARKERS[1])[0]
    assert (out / "summary.md").read_text().endswith(table)  # the same table in both
    # a README without the markers is refused, the summary is still written
    readme.write_text("no markers\n")
    assert main([*base, "--scenario", "liver", "--summary", str(out), "--readme", str(readme)]) == 1
    assert "needs one" in capsys.readouterr().err and readme.read_text() == "no markers\n"
