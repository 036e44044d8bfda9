"""``m2m bench physics``: dij build, cold and warm-started FMO, and the sparse-matvec floor, in one run.

With pyRadPlan installed (extra ``pyradplan``), the same prostate case also goes through pyRadPlan 0.5.0's photon
SVD pencil beam and optimizer (:mod:`m2m.physics.pyradplan_bench`: dij time and ratio, 3 %/3 mm and 2 %/2 mm gamma
of our dose against pyRadPlan's, optimizer times on the same dij); ``skip_pyradplan`` leaves that out (it takes a
few minutes).

The floor is what the solver's products alone cost: the median time of one ``A @ x`` and one ``Aᵀ @ y`` on the dij
(``A @ x`` on the rows the objective reads; ``y`` the objective's gradient per dose row at the cold plan, whose zero
rows the product skips, as in a solve),
times the number of objective evaluations the solve made. The 180-beam part (complex prostate's beams) does the
same on a walk of warm-started steps, and reports the dij's resident bytes and the process's RSS. Ratios printed
(solve / floor, warm / cold) are measured in the same run, so they survive a busy or slow machine better than
the absolute times.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from m2m.physics.beams import beams_for, every_n_degrees
from m2m.physics.dij import Dij
from m2m.physics.dose import compute_dij
from m2m.physics.optimizer import PlanResult, dose_gradient, optimize, prepare
from m2m.physics.phantoms import make_case
from m2m.physics.tpp import TppSet, step

log = structlog.get_logger()

PROSTATE_OARS = ("bladder", "rectum")
COMPLEX_OARS = ("bladder", "rectum", "femoral_head_l", "femoral_head_r")


@dataclass(frozen=True)
class Row:
    """One line of the benchmark table."""

    what: str
    value: str
    note: str = ""


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (Linux) in MiB: ``VmRSS`` resident now, ``VmHWM`` the peak so far."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _walk(dij: Dij, plan: PlanResult, n: int, rng: np.random.Generator) -> list[PlanResult]:
    """``n`` warm-started plans along a random walk of single TPP steps (each from the previous plan)."""
    plans = []
    tpps, previous = plan.tpps, plan
    names = tpps.names()
    for _ in range(n):
        tpps = step(tpps, names[int(rng.integers(len(names)))], int(rng.choice([-1, 1])))
        previous = optimize(dij, tpps, plan.rx_gy, warm_start=previous.fluence)
        plans.append(previous)
    return plans


def run(
    *, seed: int = 0, evaluations: int = 30, skip_complex: bool = False, skip_pyradplan: bool = False,
    pyradplan_seed: int = 1000, complex_steps: int = 10,
) -> list[Row]:
    """Run the benchmark on prostate phantom ``seed``; returns the table rows.

    The pyRadPlan comparison (when installed and not skipped) uses phantom ``pyradplan_seed`` (``m2m bench
    physics`` passes the first seed of the prostate-basic validation cohort).
    """
    rows: list[Row] = []
    case = make_case("prostate", seed)
    beams = beams_for(case)
    started = time.perf_counter()
    dij = compute_dij(case, beams)
    dij_s = time.perf_counter() - started
    rows.append(Row("dij build, prostate 7 beams", f"{dij_s:.2f} s",
                    f"{dij.n_rows} rows × {dij.n_beamlets} beamlets, {dij.matrix.nnz / 1e6:.2f} M nnz"))

    tpps = TppSet.default(PROSTATE_OARS)
    cold_runs = [optimize(dij, tpps, case.rx_gy) for _ in range(3)]
    cold = cold_runs[0]
    cold_s = statistics.median(p.solve_time_s for p in cold_runs)
    rows.append(Row("cold FMO (open-field start), default TPPs", f"{1e3 * cold_s:.0f} ms",
                    f"{cold.evaluations} evaluations, median of 3"))

    plans = _walk(dij, cold, evaluations, np.random.default_rng(seed))
    rows.extend(_walk_rows(dij, cold, plans, "warm FMO per TPP evaluation", "target ≤ 100 ms, goal ≤ 50 ms"))
    rows.append(Row("ratio warm / cold FMO", f"{statistics.median(p.solve_time_s for p in plans) / cold_s:.3f}"))

    if not skip_complex:
        rows.extend(_complex(seed, complex_steps))
    rows.extend(_pyradplan(skip_pyradplan, pyradplan_seed))
    return rows


def _walk_rows(dij: Dij, cold: PlanResult, plans: list[PlanResult], what: str, target: str) -> list[Row]:
    """Median warm step, its matvec floor (products at the cold plan's gradient) and their ratio."""
    x = cold.fluence.astype(np.float32)
    y = dose_gradient(dij, cold.tpps, cold.rx_gy, cold.fluence)
    active = prepare(dij, cold.tpps.structures).active  # the rows the objective reads (None: all)
    forward = _median_time(lambda: dij.matrix.matvec_rows(x, active), 20)
    backward = _median_time(lambda: dij.matrix.rmatvec(y), 20)
    floors = [p.evaluations * (forward + backward) for p in plans]
    ratios = [p.solve_time_s / f for p, f in zip(plans, floors, strict=True)]
    times = sorted(p.solve_time_s for p in plans)
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    return [
        Row(f"{what} (median of {len(plans)} steps)", f"{1e3 * statistics.median(times):.1f} ms",
            f"{statistics.median(p.evaluations for p in plans):g} evaluations, slowest {1e3 * times[-1]:.0f} ms, "
            f"p90 {1e3 * p90:.0f} ms; {target}"),
        Row("matvec floor of those solves (median)", f"{1e3 * statistics.median(floors):.1f} ms",
            f"A@x {1e3 * forward:.2f} ms ({dij.n_rows if active is None else active.size} of {dij.n_rows} rows) + "
            f"Aᵀ@y {1e3 * backward:.2f} ms ({np.count_nonzero(y)} rows with y ≠ 0) per evaluation, "
            f"{dij.matrix.nnz / 1e6:.2f} M nnz"),
        Row("ratio warm solve / floor (median)", f"{statistics.median(ratios):.2f}", "1.0 = nothing but the products"),
    ]


def _pyradplan(skip: bool, seed: int) -> list[Row]:
    if importlib.util.find_spec("pyRadPlan") is None:
        return [Row("pyRadPlan", "not installed", "optional extra 'pyradplan' adds the comparison (README)")]
    if skip:
        return [Row("pyRadPlan", "skipped", "--skip-pyradplan")]
    try:
        from m2m.physics import pyradplan_bench

        comparison = pyradplan_bench.run(seed)
    except Exception as exc:  # a benchmark reports a broken optional engine instead of losing the table
        log.exception("pyradplan_bench_failed")
        return [Row("pyRadPlan comparison", "failed", f"{type(exc).__name__}: {exc}")]
    return pyradplan_rows(comparison)


def pyradplan_rows(c: Any) -> list[Row]:
    """Table rows of a :class:`m2m.physics.pyradplan_bench.Comparison`."""
    rows = [Row(f"pyRadPlan {c.version}: case", f"prostate seed {c.seed}",
                f"{c.n_beams} beams, {c.bixel_mm:g} mm bixels, 3 mm dose grid, {c.body_voxels} body voxels; "
                "SVD pencil beam (SVDPB) vs ours")]
    rows.append(Row("dij build, body voxels: ours", f"{c.ours_dij_s:.1f} s",
                    f"{c.ours_beamlets} beamlets, {c.ours_dij_nnz / 1e6:.1f} M nnz (planner rows only: "
                    f"{c.ours_planner_dij_s:.2f} s, {c.ours_planner_rows} rows, {c.ours_planner_nnz / 1e6:.1f} M nnz)"))
    rows.append(Row("dij build, body voxels: pyRadPlan", f"{c.prp_stf_s + c.prp_dij_s:.1f} s",
                    f"stf {c.prp_stf_s:.1f} s + dij {c.prp_dij_s:.1f} s; {c.prp_beamlets} beamlets "
                    f"({c.matched_beamlets} = ours), {c.prp_dij_nnz / 1e6:.1f} M nnz, {c.prp_voxels} voxels reached"))
    rows.append(Row("ratio dij time pyRadPlan / ours", f"{c.dij_ratio:.1f}", "same voxels, beams and bixels"))
    rows.append(Row("calibration pyRadPlan / ours", f"{c.calibration_ratio:.3f}",
                    "PTV D95 for our fluence, before both are scaled to D95 = Rx; open field per beam "
                    + " ".join(f"{r:.2f}" for r in c.beam_ratio)))
    for label, body, ptv in (("our optimised fluence", c.gamma, c.gamma_ptv),
                             ("open fields", c.gamma_open, c.gamma_open_ptv)):
        for key, g in body.items():
            rows.append(Row(f"gamma {key}, {label}", f"{g.pass_rate:.1f} %",
                            f"body ≥ {g.threshold_dose:.1f} Gy ({g.n_evaluated} voxels), mean γ {g.mean_gamma():.2f}; "
                            f"PTV {ptv[key].pass_rate:.1f} %; ours vs pyRadPlan, global % of Rx"))
    rows.append(Row("DVH, our fluence: ours | pyRadPlan", "", _pairs(c.dvh)))
    rows.append(Row("FMO: pyRadPlan on its dij", f"{c.prp_opt_s:.1f} s",
                    f"L-BFGS-B, {c.prp_opt_iterations} iterations (cap {c.max_iterations}), "
                    f"{c.prp_opt_s / max(c.prp_opt_iterations, 1):.2f} s/iteration, all {c.prp_voxels} voxels"))
    rows.append(Row("FMO: ours on the same dij", f"{c.ours_opt_on_prp_s:.2f} s",
                    f"default TPPs, {c.ours_opt_on_prp_evaluations} evaluations, PTV/bladder/rectum rows"))
    rows.append(Row("FMO: ours on our dij", f"{c.ours_opt_s:.2f} s", f"{c.ours_opt_evaluations} evaluations"))
    rows.append(Row("ratio FMO pyRadPlan / ours (same dij)", f"{c.prp_opt_s / c.ours_opt_on_prp_s:.0f}",
                    "objectives of the same form, not identical (see pyradplan_bench)"))
    rows.append(Row("DVH, plans on pyRadPlan's dij: pyRadPlan | ours", "",
                    _pairs({k: (c.prp_plan_dvh[k], c.ours_on_prp_plan_dvh[k]) for k in c.prp_plan_dvh})))
    return rows


def _pairs(values: dict[str, tuple[float, float]]) -> str:
    return "; ".join(f"{k} {a:.1f} | {b:.1f}" for k, (a, b) in values.items())


def _complex(seed: int, steps: int) -> list[Row]:
    """Complex prostate's 180 beams on phantom ``seed``: the dij (time, size, resident bytes), a cold plan, one
    large first step (the worst case), and ``steps`` warm-started single steps of a random walk with their floor."""
    rows = []
    case = make_case("prostate", seed)
    beams = beams_for(case, gantry_deg=every_n_degrees(2.0))
    rss_before = _rss_mib()
    started = time.perf_counter()
    dij = compute_dij(case, beams)
    dij_s = time.perf_counter() - started
    rows.append(Row("dij build, prostate 180 beams (every 2°)", f"{dij_s:.1f} s",
                    f"{dij.n_beamlets} beamlets, {dij.matrix.nnz / 1e6:.1f} M nnz, peak RSS while building "
                    f"{_peak_rss_mib():.0f} MiB"))
    rows.append(Row("dij resident, 180 beams", f"{dij.matrix.nbytes / 2**20:.0f} MiB",
                    f"{dij.matrix.nbytes / dij.matrix.nnz:.2f} B per non-zero, packed, no transpose; RSS "
                    f"+{_rss_mib() - rss_before:.0f} MiB over the 7-beam part; target ≤ 300 MiB"))
    tpps = TppSet.default(COMPLEX_OARS)
    cold = optimize(dij, tpps, case.rx_gy)
    rows.append(Row("cold FMO, 180 beams", f"{cold.solve_time_s:.1f} s", f"{cold.evaluations} evaluations"))
    big = optimize(dij, step(tpps, "t_rectum", -1), case.rx_gy, warm_start=cold.fluence)
    rows.append(Row("warm FMO, 180 beams, large first step", f"{big.solve_time_s:.2f} s",
                    f"{big.evaluations} evaluations; t_rectum 1.0 → 0.6 from the default plan (worst case)"))
    plans = _walk(dij, cold, steps, np.random.default_rng(seed))
    rows.extend(_walk_rows(dij, cold, plans, "warm FMO, 180 beams, per TPP step", "target ≤ 3 s"))
    rows.append(Row("RSS after 180-beam dij and FMO", f"{_rss_mib():.0f} MiB",
                    f"+{_rss_mib() - rss_before:.0f} MiB over the 7-beam part"))
    return rows


def main(
    *, seed: int = 0, evaluations: int = 30, skip_complex: bool = False, skip_pyradplan: bool = False,
    pyradplan_seed: int = 1000, complex_steps: int = 10,
) -> int:
    """Print the benchmark table (rich); returns an exit code."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with console.status("benchmarking the physics layer (dij, FMO, matvec floor)…"):
        rows = run(seed=seed, evaluations=evaluations, skip_complex=skip_complex, skip_pyradplan=skip_pyradplan,
                   complex_steps=complex_steps, pyradplan_seed=pyradplan_seed)
    table = Table(title=f"m2m bench physics — prostate phantom seed {seed}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    for row in rows:
        table.add_row(row.what, row.value, row.note)
    console.print(table)
    return 0
