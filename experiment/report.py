"""The report of an experiment folder (``m2m experiment report DIR``, also written at the end of every run).

Files: ``report.md`` (the paper's table with ours beside it, every arm's statistics with the LLM's ownership of its
decisions, the paired test, the guided LLM against the knowledge baseline, the goals and whether each was met, the
hierarchy analysis), ``summary.json`` (every arm's figures, for scripts: :func:`summary_json`), ``cases.csv`` (one
row per session), ``score_vs_step.png`` (mean ± sd per arm; a finished session keeps its final score),
``final_tpps.png`` (final TPPs of every arm against the DRL knowledge's 5–95 % range and median),
``initial_quality.png`` (final score and steps against the initial score) and ``hierarchy.csv``.

**LLM ownership** (:attr:`m2m.experiment.analysis.ArmStats.ownership`): the share of an arm's decisions whose action
is the LLM's own answer (its proposal, or its second answer after the guard's feedback), not the DRL advice or the
safe action that replaced a refused one. The arms without an LLM show their planner's own-proposal share in the
same column, labelled ``no LLM``, and ``null`` in ``summary.json``.

**Guided vs knowledge**: the ``knowledge`` arm sets every TPP to the DRL knowledge's median and then follows the
rules, without an LLM. Per scenario the report says whether the guided LLM does better than it — more sessions at the
maximum, or as many in fewer steps (mean) — or adds nothing over the knowledge it is given.

The statistics are :mod:`m2m.experiment.analysis`, the figures :mod:`m2m.experiment.plots`.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2m.experiment.analysis import (
    ArmStats,
    arm_stats,
    final_criteria,
    hierarchy,
    knowledge_priority,
    paired_steps,
    rank_agreement,
)
from m2m.experiment.design import ARMS, PAPER, WALL_GOAL_S, Design, Goals
from m2m.experiment.plots import plot_final_tpps, plot_initial_quality, plot_scores
from m2m.experiment.records import SessionRecord, ordered
from m2m.session.folder import DecisionTally

LLM_ARMS = ("guided", "unguided")
#: The baseline the guided LLM is compared with: the knowledge alone, without an LLM.
KNOWLEDGE_ARM = "knowledge"
SUMMARY_FILE = "summary.json"
SIGNIFICANCE = 0.05


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
        plot_scores(folder / "score_vs_step.png", design, groups)
        plot_final_tpps(folder / "final_tpps.png", design, groups)
        plot_initial_quality(folder / "initial_quality.png", design, groups)
    lines = _report_lines(design, records, groups, stats, wall_s)
    hier_rows = _write_hierarchy(folder / "hierarchy.csv", design, groups)
    lines += hier_rows
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    summary = summary_json(design, records, stats, wall_s, groups)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return path


def _ownership_cell(st: ArmStats) -> str:
    """The LLM's ownership (``80 % (8/10)``), or for an arm without an LLM its planner's own-proposal share,
    labelled so (``no LLM: own 100 % (9/9)``)."""
    return st.tally.percent() if st.llm else f"no LLM: own {st.tally.percent()}"


def _retries_cell(tally: DecisionTally) -> str:
    taken = tally.sources.get("retry", 0)
    return f"{tally.feedback_retries} ({taken} taken)" if tally.feedback_retries else "0"


def compare_with_knowledge(guided: ArmStats, knowledge: ArmStats) -> tuple[bool, str]:
    """Whether the guided LLM does better than the knowledge arm (more sessions at the maximum, or as many in fewer
    steps on average) and the verdict in words."""
    if guided.at_max > knowledge.at_max:
        return True, "the guided LLM reaches the maximum more often than the knowledge alone"
    if guided.at_max < knowledge.at_max:
        return False, ("the guided LLM adds nothing over the knowledge arm: the knowledge alone reaches the maximum "
                       "more often")
    if guided.steps[0] < knowledge.steps[0]:
        return True, "the guided LLM reaches the maximum as often as the knowledge alone, in fewer steps"
    if guided.steps[0] > knowledge.steps[0]:
        return False, ("the guided LLM adds nothing over the knowledge arm: as often at the maximum, in more "
                       "steps")
    return False, "the guided LLM adds nothing over the knowledge arm: as often at the maximum, in as many steps"


def _knowledge_lines(design: Design, stats: Mapping[tuple[str, str], ArmStats],
                     expected: Mapping[str, int]) -> list[str]:
    lines = ["", "## Guided LLM vs the knowledge alone", "",
             "The knowledge arm sets every TPP to the DRL knowledge's median at its first step, then follows the "
             "rules, without an LLM: where the guided LLM does no better, the LLM adds nothing over the knowledge it "
             "is given.", ""]
    compared = False
    for s in design.scenarios:
        g, k = stats.get((s, "guided")), stats.get((s, KNOWLEDGE_ARM))
        if g is None or k is None:
            continue
        compared = True
        _, verdict = compare_with_knowledge(g, k)
        incomplete = [f"{a} {st.n} of {expected[s]}" for a, st in (("guided", g), (KNOWLEDGE_ARM, k))
                      if st.n < expected[s]]
        lines.append(
            f"- {s}: at the maximum guided {100 * g.at_max:.0f} % vs knowledge {100 * k.at_max:.0f} %; steps "
            f"guided {_pm(g.steps, 1)} (median {g.steps_median:g}) vs knowledge {_pm(k.steps, 1)} (median "
            f"{k.steps_median:g}): {verdict}."
            + (f" Incomplete arms ({', '.join(incomplete)} sessions)." if incomplete else "")
        )
    if not compared:
        lines.append("- not compared: the design lacks the guided or the knowledge arm")
    return lines


def _number(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def summary_json(
    design: Design,
    records: Sequence[SessionRecord],
    stats: Mapping[tuple[str, str], ArmStats],
    wall_s: float | None,
    groups: Mapping[tuple[str, str], list[SessionRecord]],
) -> dict[str, Any]:
    """``summary.json``: ``wall_min`` (the runs' wall time over all resumed runs, ``wall.json``; without it the
    sessions' sum), ``sessions_wall_min``, and per scenario and arm: ``n``, ``initial_mean``, ``final_mean``,
    ``final_sd``, ``at_max`` (0..1), ``steps_mean``, ``steps_sd``, ``steps_median``, ``s_per_decision`` (mean
    decision time of the decisions that changed TPPs), ``ownership`` (the LLM's, 0..1; null for an arm without an
    LLM), ``own_share`` (the planner's own-proposal share, any arm), ``decisions`` (all, a stop included),
    ``sources`` (decisions per action source), ``feedback_retries``, ``criteria`` (per criterion id: the final
    plans' mean value ``final_mean`` and passing share ``passed``); and ``guided_vs_knowledge`` per scenario where
    both arms ran."""
    sessions_s = float(sum(r.wall_s for r in records))
    scenarios: dict[str, dict[str, Any]] = {}
    for s in design.scenarios:
        arms: dict[str, Any] = {}
        for a in design.arms:
            st = stats.get((s, a))
            if st is None:
                continue
            arms[a] = {
                "n": st.n,
                "impl": ARMS[a].impl,
                "mode": ARMS[a].mode,
                "llm": st.llm,
                "initial_mean": _number(st.initial[0]),
                "final_mean": _number(st.final[0]),
                "final_sd": _number(st.final[1]),
                "final_median": _number(st.final_median),
                "at_max": _number(st.at_max),
                "steps_mean": _number(st.steps[0]),
                "steps_sd": _number(st.steps[1]),
                "steps_median": _number(st.steps_median),
                "s_per_decision": _number(st.decision_s),
                "ownership": _number(st.ownership),
                "own_share": _number(st.tally.ownership),
                "decisions": st.tally.decisions,
                "sources": dict(st.tally.sources),
                "feedback_retries": st.tally.feedback_retries,
                "vetoed": st.vetoed,
                "wall_s": _number(st.wall_s, 3),
                "criteria": {cid: {"final_mean": _number(o.mean), "passed": _number(o.passed)}
                             for cid, o in final_criteria(groups[(s, a)]).items()},
            }
        if arms:
            scenarios[s] = arms
    versus: dict[str, Any] = {}
    for s in design.scenarios:
        g, k = stats.get((s, "guided")), stats.get((s, KNOWLEDGE_ARM))
        if g is not None and k is not None:
            adds, verdict = compare_with_knowledge(g, k)
            versus[s] = {"llm_adds": adds, "at_max_diff": _number(g.at_max - k.at_max),
                         "steps_mean_diff": _number(g.steps[0] - k.steps[0]), "verdict": verdict}
    return {
        "wall_min": _number((wall_s if wall_s is not None else sessions_s) / 60.0, 3),
        "sessions_wall_min": _number(sessions_s / 60.0, 3),
        "sessions": len(records),
        "scenarios": scenarios,
        "guided_vs_knowledge": versus,
    }


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
    ]
    if any(s in PAPER for s in design.scenarios):
        lines += [
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
        if s not in PAPER:
            continue  # no published numbers: its arms are in the next table
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
        "LLM ownership: the share of the decisions whose action is the LLM's own answer (its proposal, or its "
        "second answer after the guard's feedback), not the DRL advice or the safe action replacing a refused "
        "one; an arm without an LLM shows its planner's own share, labelled `no LLM`. Feedback retries: decisions "
        "where the guard refused the answer and the LLM answered again (how many of those second answers were "
        "taken).",
        "",
        "| scenario | arm | n | initial | final | median final | at max | steps | median steps | steps when max "
        "reached | s/decision | proposals vetoed by the guard | LLM ownership | feedback retries "
        "| session wall (s, sum) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
                f"{st.decision_s:.1f} | {st.vetoed}/{st.decisions} | {_ownership_cell(st)} | "
                f"{_retries_cell(st.tally)} | {st.wall_s:.0f} |"
            )
    lines += _criteria_lines(design, groups)
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
    lines += _knowledge_lines(design, stats, expected)
    lines += ["", "## Goals", ""]
    for s in design.scenarios:
        st = stats.get((s, "guided"))
        if s not in PAPER:
            lines.append(f"- {s}: not a scenario of the paper; no goals set.")
            continue
        goals = PAPER[s].goals
        if st is None:
            lines.append(f"- {s}: guided arm not run.")
            continue
        if st.n < expected[s]:
            lines.append(f"- {s}: guided arm incomplete ({st.n} of {expected[s]} sessions): at the maximum on "
                         f"{100 * st.at_max:.0f} %, mean steps {st.steps[0]:.1f}; goals not judged.")
            continue
        lines.append(f"- {s}: guided {'; '.join(_goal_words(st, goals))}.")
        k = stats.get((s, "knowledge"))
        if k is not None:
            lines.append(f"- {s}: guided at the maximum at least as often as the knowledge arm "
                         f"({100 * st.at_max:.0f} % vs {100 * k.at_max:.0f} %): "
                         f"{_met(st.at_max >= k.at_max)}.")
    for s, t in tests.items():
        met = t.p_value is not None and t.p_value < SIGNIFICANCE and t.diff_mean < 0
        verdict = _met(met) if t.n == expected[s] else f"not judged: {t.n} of {expected[s]} pairs"
        lines.append(f"- {s}: guided needs significantly fewer steps than unguided (p < {SIGNIFICANCE}): {verdict}.")
    sessions_s = sum(r.wall_s for r in records)
    if not design.is_paper_size:
        verdict = "not measured: the goal is for the paper-size design"
    elif len(records) < total:
        verdict = f"not measured: {len(records)} of its {total} sessions finished"
    else:
        verdict = _met(max(sessions_s, wall_s or 0.0) <= WALL_GOAL_S)
    runs = "" if wall_s is None else (f"; the runs that ended normally took {wall_s / 60:.1f} min in all "
                                      "(stack start, swaps and stop included; a run killed by SIGKILL records none)")
    lines.append(f"- Wall time: the {len(records)} sessions took {sessions_s / 60:.1f} min{runs} (goal ≤ "
                 f"{WALL_GOAL_S / 60:.0f} min for "
                 f"the default experiment: {verdict}).")
    return lines


def _criteria_lines(design: Design, groups: Mapping[tuple[str, str], list[SessionRecord]]) -> list[str]:
    """Per scenario, each protocol criterion of the final plans: mean value (share passing) per arm."""
    lines = ["", "## The final plans, criterion by criterion", "",
             "Mean value of each criterion over an arm's final plans (share of them passing it)."]
    for s in design.scenarios:
        arms = [a for a in design.arms if (s, a) in groups]
        outcomes = {a: final_criteria(groups[(s, a)]) for a in arms}
        ids = list(dict.fromkeys(cid for a in arms for cid in outcomes[a]))
        if not ids:
            continue
        lines += ["", f"| {s}: criterion | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for cid in ids:
            label = next(outcomes[a][cid].label for a in arms if cid in outcomes[a])
            cells = [f"{o.mean:.2f} {o.unit} ({100 * o.passed:.0f} %)" if (o := outcomes[a].get(cid)) else "—"
                     for a in arms]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _goal_words(st: ArmStats, goals: Goals) -> list[str]:
    """Each goal of ``goals`` (:class:`~m2m.experiment.design.Goals`) with the guided arm's number and verdict."""
    words = []
    if goals.final_mean is None:
        words.append(f"at the maximum on {100 * st.at_max:.0f} % of {st.n} sessions "
                      f"({_met(st.at_max == 1.0)}: goal 100 %)")
    else:
        words.append(f"final {st.final[0]:.2f}±{st.final[1]:.2f} ({_met(st.final[0] >= goals.final_mean)}: goal "
                     f"≥ {goals.final_mean:g})")
    mean, sd = st.steps
    sd_goal = f" with sd ≤ {goals.steps_sd:g}" if goals.steps_sd is not None else ""
    ok = mean <= goals.steps_mean and (goals.steps_sd is None or sd <= goals.steps_sd)
    words.append(f"steps {mean:.1f}±{sd:.1f} ({_met(ok)}: goal mean ≤ {goals.steps_mean:g}{sd_goal})")
    if goals.ownership is not None:
        own = st.ownership
        words.append(f"LLM ownership {'—' if own is None else f'{100 * own:.0f} %'} "
                     f"({_met(own is not None and own >= goals.ownership)}: goal ≥ {100 * goals.ownership:.0f} %)")
    return words


def _write_cases_csv(path: Path, records: Sequence[SessionRecord]) -> None:
    columns = ["scenario", "arm", "impl", "mode", "case_id", "case_seed", "init", "initial_score", "final_score",
               "max_score", "steps", "reached_max", "outcome", "vetoed_decisions", "invalid_answers",
               "mean_decision_s", "decisions", "own_decisions", "feedback_retries", "wall_s", "session_id"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in records:
            d = r.decisions
            tally = DecisionTally.of(r.all_decisions)
            w.writerow([
                r.scenario, r.arm, r.impl, r.mode, r.case_id, r.case_seed, r.init, f"{r.initial_score:.4f}",
                f"{r.final_score:.4f}", f"{r.max_score:g}", r.steps, int(r.reached_max), r.outcome,
                sum(bool(x.vetoes) for x in d), sum(not x.valid for x in d),
                f"{np.mean([x.decision_s for x in d]) if d else 0.0:.2f}",
                tally.decisions, tally.owned, tally.feedback_retries,
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


