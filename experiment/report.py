"""The report of an experiment folder (``m2m experiment report DIR``, also written at the end of every run).

Files: ``report.md`` (the paper's table with ours beside it, every arm's statistics, the paired test, the goals and
whether each was met, the hierarchy analysis), ``cases.csv`` (one row per session), ``score_vs_step.png`` (mean ± sd
per arm; a finished session keeps its final score), ``final_tpps.png`` (final TPPs of the LLM arms against the
DRL knowledge's 5–95 % range and median), ``initial_quality.png`` (final score and steps against the initial
score) and ``hierarchy.csv``.

Statistics: mean ± sd (population sd, as the paper's ± reads), median, share at the maximum score; guided vs
unguided steps are compared per initial setting (paired) with the two-sided Wilcoxon signed-rank test (exact for
small samples; pairs with equal steps are dropped, as Wilcoxon's test does).
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m2m.experiment.design import ARMS, PAPER, Design
from m2m.experiment.records import KNOWLEDGE_FILE, SessionRecord, ordered
from m2m.physics.tpp import PARAMETERS, split_name

if TYPE_CHECKING:
    from m2m.agents.drl.knowledge import TppKnowledge

LLM_ARMS = ("guided", "unguided")
SIGNIFICANCE = 0.05
WALL_GOAL_S = 3600.0


@dataclass(frozen=True)
class ArmStats:
    """One arm on one scenario: ``n`` sessions; scores in protocol points, steps as counted to the last plan."""

    n: int
    initial: tuple[float, float]
    final: tuple[float, float]
    final_median: float
    at_max: float
    steps: tuple[float, float]
    steps_median: float
    steps_to_max: tuple[float, float] | None
    decision_s: float
    wall_s: float
    vetoed: int
    decisions: int


def _mean_sd(x: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=np.float64)
    return float(a.mean()), float(a.std())


def arm_stats(records: Sequence[SessionRecord]) -> ArmStats:
    decisions = [d for r in records for d in r.decisions]
    reached = [r.steps for r in records if r.reached_max]
    return ArmStats(
        n=len(records),
        initial=_mean_sd([r.initial_score for r in records]),
        final=_mean_sd([r.final_score for r in records]),
        final_median=float(np.median([r.final_score for r in records])),
        at_max=float(np.mean([r.reached_max for r in records])),
        steps=_mean_sd([r.steps for r in records]),
        steps_median=float(np.median([r.steps for r in records])),
        steps_to_max=_mean_sd(reached) if reached else None,
        decision_s=float(np.mean([d.decision_s for d in decisions])) if decisions else 0.0,
        wall_s=float(sum(r.wall_s for r in records)),
        vetoed=sum(bool(d.vetoes) for d in decisions),
        decisions=len(decisions),
    )


@dataclass(frozen=True)
class PairedTest:
    """Guided vs unguided steps on the same initial settings: ``n`` pairs, ``diff`` = mean (guided − unguided)."""

    n: int
    n_nonzero: int
    diff_mean: float
    statistic: float | None
    p_value: float | None


def paired_steps(records: Sequence[SessionRecord]) -> PairedTest:
    from scipy.stats import wilcoxon

    by_arm: dict[str, dict[tuple[int, int], int]] = defaultdict(dict)
    for r in records:
        by_arm[r.arm][(r.case_seed, r.init)] = r.steps
    common = sorted(set(by_arm["guided"]) & set(by_arm["unguided"]))
    g = np.array([by_arm["guided"][k] for k in common], dtype=np.float64)
    u = np.array([by_arm["unguided"][k] for k in common], dtype=np.float64)
    d = g - u
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        return PairedTest(len(common), 0, float(d.mean()) if d.size else math.nan, None, None)
    res = wilcoxon(g, u, zero_method="wilcox", alternative="two-sided")
    return PairedTest(len(common), nonzero, float(d.mean()), float(res.statistic), float(res.pvalue))


# ------------------------------------------------------------------------------------------------ hierarchy
@dataclass(frozen=True)
class MoveCount:
    tpp: str
    raise_n: int
    lower_n: int
    first_n: int
    mean_stage: float
    mean_first_stage: float


def hierarchy(records: Sequence[SessionRecord], *, proposals: bool = False) -> list[MoveCount]:
    """How the sessions moved each TPP: counts per direction, how often it was the session's first move, the mean
    stage of its moves (0 = first decision, 1 = last) and of its first move per session. Ordered like the DRL
    knowledge's ``priority``: by the mean stage of the first move (earliest first; TPPs never moved last).
    ``proposals``: count the planner's own proposals instead of the actions taken after the guard."""
    raises: Counter[str] = Counter()
    lowers: Counter[str] = Counter()
    firsts: Counter[str] = Counter()
    stages: dict[str, list[float]] = defaultdict(list)
    first_stages: dict[str, list[float]] = defaultdict(list)
    for r in records:
        chosen = [d.proposal.move if d.proposal is not None else None for d in r.decisions] if proposals else [
            d.action for d in r.decisions]
        moves = [(m.tpp, int(m.direction)) for m in chosen if m is not None]
        seen: set[str] = set()
        for i, (tpp, direction) in enumerate(moves):
            stage = i / (len(moves) - 1) if len(moves) > 1 else 0.0
            (raises if direction > 0 else lowers)[tpp] += 1
            stages[tpp].append(stage)
            if tpp not in seen:
                first_stages[tpp].append(stage)
                seen.add(tpp)
        if moves:
            firsts[moves[0][0]] += 1
    out = [
        MoveCount(tpp, raises[tpp], lowers[tpp], firsts[tpp], float(np.mean(stages[tpp])),
                  float(np.mean(first_stages[tpp])))
        for tpp in stages
    ]
    return sorted(out, key=lambda m: (m.mean_first_stage, -(m.raise_n + m.lower_n), m.tpp))


def rank_agreement(ours: Sequence[str], reference: Sequence[str]) -> tuple[int, float | None]:
    """Kendall's tau between two priority orders over the TPPs both contain (``None`` under 2 common TPPs)."""
    from scipy.stats import kendalltau

    common = [t for t in reference if t in ours]
    if len(common) < 2:
        return len(common), None
    tau = kendalltau([ours.index(t) for t in common], list(range(len(common)))).statistic
    return len(common), float(tau)


def experiment_knowledge(folder: Path, scenario: str) -> TppKnowledge:
    """The DRL knowledge the experiment ran with (the folder's ``knowledge.json``, saved from the stack when it
    started; the shipped knowledge for a folder without one), labelled in ``scenario``'s structure names."""
    from m2m.agents.drl import DEFAULT_KNOWLEDGE
    from m2m.agents.drl.knowledge import load_knowledge, relabel_knowledge
    from m2m.scenarios import load_scenario

    saved = folder / KNOWLEDGE_FILE
    return relabel_knowledge(load_knowledge(saved if saved.is_file() else DEFAULT_KNOWLEDGE),
                             load_scenario(scenario).roles)


def knowledge_priority(folder: Path, scenario: str) -> list[str]:
    """The experiment's knowledge's priority order in ``scenario``'s TPP names."""
    from m2m.scenarios.roles import to_structure_name

    knowledge = experiment_knowledge(folder, scenario)
    return [to_structure_name(p, knowledge.roles) for p in knowledge.priority]


# ------------------------------------------------------------------------------------------------ writing
def _pm(x: tuple[float, float], digits: int = 2) -> str:
    return f"{x[0]:.{digits}f}±{x[1]:.{digits}f}"


def _final_steps(s: ArmStats | None) -> str:
    if s is None:
        return "—"
    return f"{_pm(s.final)} / {_pm(s.steps, 1)}"


def write_report(
    folder: Path, design: Design, records: Sequence[SessionRecord], *, wall_s: float | None = None
) -> Path:
    """Write every report file into ``folder``; returns ``report.md``."""
    records = ordered(records, design)
    groups: dict[tuple[str, str], list[SessionRecord]] = defaultdict(list)
    for r in records:
        groups[(r.scenario, r.arm)].append(r)
    stats = {k: arm_stats(v) for k, v in groups.items()}
    _write_cases_csv(folder / "cases.csv", records)
    if records:
        _plot_scores(folder / "score_vs_step.png", design, groups)
        _plot_final_tpps(folder / "final_tpps.png", design, groups)
        _plot_initial_quality(folder / "initial_quality.png", design, groups)
    lines = _report_lines(design, records, groups, stats, wall_s)
    hier_rows = _write_hierarchy(folder / "hierarchy.csv", design, groups)
    lines += hier_rows
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _report_lines(
    design: Design,
    records: Sequence[SessionRecord],
    groups: Mapping[tuple[str, str], list[SessionRecord]],
    stats: Mapping[tuple[str, str], ArmStats],
    wall_s: float | None,
) -> list[str]:
    expected = {s: design.cases[s] * design.inits[s] for s in design.scenarios}
    total = sum(expected.values()) * len(design.arms)
    lines = [
        "# Experiment: the paper's table, reproduced through the agent stack",
        "",
        f"Design: scenarios {', '.join(design.scenarios)}; arms {', '.join(design.arms)}; "
        + "; ".join(f"{s} {design.cases[s]} case(s) × {design.inits[s]} initial setting(s)" for s in design.scenarios)
        + f"; seed {design.seed}; step cap {design.step_cap or 'the scenario’s (20)'}."
        + (f" LLM planner: {design.llm_words()}." if any(ARMS[a].impl == "llm" for a in design.arms) else ""),
        f"Sessions finished: {len(records)} of {total}"
        + ("" if design.is_paper_size else " (a reduced design: not the paper's cohort sizes)") + ".",
        "",
        "## The paper's table, ours beside it",
        "",
        "Scores in protocol points, mean±sd; steps are decisions taken until the maximum score or the cap. "
        "Paper = the published numbers.",
        "",
        "| scenario | setup | initial score (ours / paper) | unguided final / steps (ours) | (paper) "
        "| guided final / steps (ours) | (paper) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in design.scenarios:
        p = PAPER[s]
        any_arm = next((stats[(s, a)] for a in design.arms if (s, a) in stats), None)
        initial = _pm(any_arm.initial) if any_arm else "—"
        lines.append(
            f"| {s} | {design.cases[s]} case(s) × {design.inits[s]} init(s); paper: {p.setup} | {initial} / "
            f"{p.initial} | {_final_steps(stats.get((s, 'unguided')))} | {p.unguided} | "
            f"{_final_steps(stats.get((s, 'guided')))} | {p.guided} |"
        )
    lines += [
        "",
        "## Every arm",
        "",
        "| scenario | arm | n | initial | final | median final | at max | steps | median steps | steps when max "
        "reached | s/decision | proposals vetoed by the guard | session wall (s, sum) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in design.scenarios:
        for a in design.arms:
            st = stats.get((s, a))
            if st is None:
                continue
            to_max = _pm(st.steps_to_max, 1) if st.steps_to_max else "—"
            lines.append(
                f"| {s} | {a} | {st.n} | {_pm(st.initial)} | {_pm(st.final)} | {st.final_median:.2f} | "
                f"{100 * st.at_max:.0f} % | {_pm(st.steps, 1)} | {st.steps_median:g} | {to_max} | "
                f"{st.decision_s:.1f} | {st.vetoed}/{st.decisions} | {st.wall_s:.0f} |"
            )
    lines += ["", "## Guided vs unguided steps (paired by initial setting, two-sided Wilcoxon signed-rank)", ""]
    tests = {}
    for s in design.scenarios:
        if not all((s, a) in groups for a in LLM_ARMS):
            continue
        t = paired_steps(groups[(s, "guided")] + groups[(s, "unguided")])
        tests[s] = t
        p = "— (no pair differs)" if t.p_value is None else f"{t.p_value:.3g} (W = {t.statistic:g})"
        lines.append(f"- {s}: {t.n} pairs, {t.n_nonzero} differ, mean guided − unguided = {t.diff_mean:+.1f} steps, "
                     f"p = {p}")
    if not tests:
        lines.append("- not computed: the design lacks the guided or the unguided arm")
    lines += ["", "## Goals", ""]
    for s in design.scenarios:
        st = stats.get((s, "guided"))
        goal = PAPER[s].goal_median_steps
        if st is None:
            lines.append(f"- {s}: guided arm not run.")
            continue
        if st.n < expected[s]:
            lines.append(f"- {s}: guided arm incomplete ({st.n} of {expected[s]} sessions): at the maximum on "
                         f"{100 * st.at_max:.0f} %, median steps {st.steps_median:g}; goals not judged.")
            continue
        lines.append(
            f"- {s}: guided at the maximum on {100 * st.at_max:.0f} % of {st.n} sessions "
            f"({'MET' if st.at_max == 1.0 else 'NOT MET'}: goal 100 %); median steps {st.steps_median:g} "
            f"({'MET' if st.steps_median <= goal else 'NOT MET'}: goal ≤ {goal})."
        )
    for s, t in tests.items():
        met = t.p_value is not None and t.p_value < SIGNIFICANCE and t.diff_mean < 0
        verdict = ("MET" if met else "NOT MET") if t.n == expected[s] else f"not judged: {t.n} of {expected[s]} pairs"
        lines.append(f"- {s}: guided needs significantly fewer steps than unguided (p < {SIGNIFICANCE}): {verdict}.")
    sessions_s = sum(r.wall_s for r in records)
    if not design.is_paper_size:
        verdict = "not measured: the goal is for the paper-size design"
    elif len(records) < total:
        verdict = f"not measured: {len(records)} of its {total} sessions finished"
    else:
        verdict = "MET" if max(sessions_s, wall_s or 0.0) <= WALL_GOAL_S else "NOT MET"
    runs = "" if wall_s is None else (f"; the runs that ended normally took {wall_s / 60:.1f} min in all "
                                      "(stack start, swaps and stop included; a run killed by SIGKILL records none)")
    lines.append(f"- Wall time: the {len(records)} sessions took {sessions_s / 60:.1f} min{runs} (goal ≤ 60 min for "
                 f"the default experiment: {verdict}).")
    return lines


def _write_cases_csv(path: Path, records: Sequence[SessionRecord]) -> None:
    columns = ["scenario", "arm", "impl", "mode", "case_id", "case_seed", "init", "initial_score", "final_score",
               "max_score", "steps", "reached_max", "outcome", "vetoed_decisions", "invalid_answers",
               "mean_decision_s", "wall_s", "session_id"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in records:
            d = r.decisions
            w.writerow([
                r.scenario, r.arm, r.impl, r.mode, r.case_id, r.case_seed, r.init, f"{r.initial_score:.4f}",
                f"{r.final_score:.4f}", f"{r.max_score:g}", r.steps, int(r.reached_max), r.outcome,
                sum(bool(x.vetoes) for x in d), sum(not x.valid for x in d),
                f"{np.mean([x.decision_s for x in d]) if d else 0.0:.2f}",
                f"{r.wall_s:.1f}", r.session_id,
            ])


def _write_hierarchy(path: Path, design: Design, groups: Mapping[tuple[str, str], list[SessionRecord]]) -> list[str]:
    lines = ["", "## Hierarchy of objectives", "",
             "Order = mean stage of a TPP's first move in a session (0 = first decision, 1 = last), earliest first, "
             "as the DRL knowledge orders its `priority`; agreement = Kendall's tau over the TPPs both orders hold "
             "(1 = same order, −1 = reversed).", ""]
    rows: list[list[str]] = []
    with_guided = [s for s in design.scenarios if groups.get((s, "guided"))]
    for s in with_guided:
        guided = groups[(s, "guided")]
        reference = knowledge_priority(path.parent, s)
        for label, proposals in (("actions taken", False), ("LLM proposals", True)):
            moves = hierarchy(guided, proposals=proposals)
            order = [m.tpp for m in moves]
            n, tau = rank_agreement(order, reference)
            shown = ", ".join(f"{m.tpp} (raised {m.raise_n}, lowered {m.lower_n})" for m in moves[:6])
            lines.append(f"- {s}, guided, {label}: {shown or 'no move'}; knowledge priority "
                         f"{', '.join(reference[:6])}; agreement over {n} TPPs: "
                         f"{'—' if tau is None else f'{tau:+.2f}'}")
            rows += [[s, label, m.tpp, str(m.raise_n), str(m.lower_n), str(m.first_n), f"{m.mean_stage:.3f}",
                      f"{m.mean_first_stage:.3f}"] for m in moves]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "counted", "tpp", "raises", "lowers", "first_moves", "mean_stage",
                    "mean_first_stage"])
        w.writerows(rows)
    if not with_guided:
        lines.append("- not computed: no guided session")
    return lines


# ------------------------------------------------------------------------------------------------ plots
def _figure(n: int, height: float = 3.6) -> tuple[Any, Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, height), squeeze=False)
    return plt, fig, axes[0]


def _plot_scores(path: Path, design: Design, groups: Mapping[tuple[str, str], list[SessionRecord]]) -> None:
    plt, fig, axes = _figure(len(design.scenarios))
    for ax, s in zip(axes, design.scenarios, strict=True):
        cap = 0
        for a in design.arms:
            rs = groups.get((s, a), [])
            if not rs:
                continue
            cap = max(cap, max(r.steps for r in rs))
            length = max(r.steps for r in rs) + 1
            # a session that stopped keeps its last score: the curve is what a planner would hand over at step k
            m = np.array([[r.steps_detail[min(k, r.steps)].score for k in range(length)] for r in rs])
            x = np.arange(length)
            ax.plot(x, m.mean(0), label=f"{a} (n={len(rs)})")
            top = rs[0].max_score  # the band is clipped to the score's range
            ax.fill_between(x, np.maximum(m.mean(0) - m.std(0), 0.0), np.minimum(m.mean(0) + m.std(0), top),
                            alpha=0.15)
        rs_any = next((groups[(s, a)] for a in design.arms if groups.get((s, a))), [])
        if rs_any:
            ax.axhline(rs_any[0].max_score, color="k", lw=0.8, ls=":")
        ax.set_title(s)
        ax.set_xlabel("step")
        ax.set_ylabel("score (points), mean ± sd")
        ax.set_xlim(0, max(cap, 1))
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scales_text() -> str:
    """``"t, v: linear; lambda: log10"``: the axis scale of each TPP parameter (:data:`PARAMETERS`)."""
    by_scale = {scale: ", ".join(p.name for p in PARAMETERS.values() if p.log_scale == (scale == "log10"))
                for scale in ("linear", "log10")}
    return "; ".join(f"{names}: {scale}" for scale, names in by_scale.items() if names)


def _plot_final_tpps(path: Path, design: Design, groups: Mapping[tuple[str, str], list[SessionRecord]]) -> None:
    plt, fig, axes = _figure(len(design.scenarios), height=4.2)
    for ax, s in zip(axes, design.scenarios, strict=True):
        knowledge = experiment_knowledge(path.parent, s)
        names = sorted(next(iter(r.initial_tpps for rs in groups.values() for r in rs if r.scenario == s), {}))
        for i, name in enumerate(names):
            log_scale = PARAMETERS[split_name(name)[0]].log_scale
            st = next((k for k in knowledge.tpps if k.label == name and k.count), None)
            if st is not None:
                lo, med, hi = st.quantiles["5"], st.quantiles["50"], st.quantiles["95"]
                ax.plot([i, i], [lo, hi], color="0.7", lw=8, solid_capstyle="butt",
                        label="knowledge 5–95 %" if i == 0 else None)
                ax.plot([i - 0.25, i + 0.25], [med, med], color="k", lw=1.5,
                        label="knowledge median" if i == 0 else None)
            for j, a in enumerate(a for a in design.arms if groups.get((s, a))):
                vals = [r.steps_detail[-1].tpps[name] for r in groups[(s, a)]]
                y = np.log10(vals) if log_scale else np.asarray(vals)
                ax.scatter(np.full(len(y), i - 0.2 + 0.13 * j), y, s=12, color=f"C{list(ARMS).index(a)}",
                           label=a if i == 0 else None)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(f"final value ({_scales_text()})")
        ax.set_title(f"{s}: final TPPs vs knowledge")
        if ax.collections or ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_initial_quality(path: Path, design: Design, groups: Mapping[tuple[str, str], list[SessionRecord]]) -> None:
    plt, fig, axes = _figure(len(design.scenarios))
    for ax, s in zip(axes, design.scenarios, strict=True):
        twin = ax.twinx()
        for a in design.arms:
            rs = groups.get((s, a), [])
            if not rs:
                continue
            c = f"C{list(ARMS).index(a)}"
            x = [r.initial_score for r in rs]
            ax.scatter(x, [r.final_score for r in rs], color=c, marker="o", s=18, label=f"{a}: final score")
            twin.scatter(x, [r.steps for r in rs], color=c, marker="x", s=18, label=f"{a}: steps")
        ax.set_xlabel("initial score (points)")
        ax.set_ylabel("final score (o)")
        twin.set_ylabel("steps (x)")
        ax.set_title(f"{s}: initial plan quality")
        if ax.collections:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
