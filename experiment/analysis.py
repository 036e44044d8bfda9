"""The experiment's statistics: per-arm scores and steps, the paired guided-vs-unguided test, and the hierarchy of
objectives (in which order the sessions moved the TPPs, against the DRL knowledge's priority).

Statistics: mean ± sd (population sd, as the paper's ± reads), median, share at the maximum score; guided vs
unguided steps are compared per initial setting (paired) with the two-sided Wilcoxon signed-rank test (exact for
small samples; pairs with equal steps are dropped, as Wilcoxon's test does).

Ownership (:attr:`ArmStats.ownership`): over every decision of an arm's sessions (a last one that stopped a session
included), the share whose action is the planner's own answer — its proposal or its second answer after the guard's
feedback (sources ``proposal`` and ``retry``, :class:`~m2m.session.folder.DecisionTally`). It is the LLM's
ownership for the LLM arms and None for the others (their own-proposal share is :attr:`ArmStats.tally`'s).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2m.agents.drl import DEFAULT_KNOWLEDGE
from m2m.agents.drl.knowledge import TppKnowledge, load_knowledge, relabel_knowledge
from m2m.agents.messages import Decision, Proposal
from m2m.experiment.records import KNOWLEDGE_FILE, SessionRecord
from m2m.physics.tpp import Direction, Move
from m2m.scenarios import load_scenario
from m2m.scenarios.roles import to_structure_name
from m2m.session.folder import DecisionTally


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
    tally: DecisionTally
    llm: bool

    @property
    def ownership(self) -> float | None:
        """The LLM's ownership of the arm's decisions (0..1; None for an arm without an LLM or without a
        decision)."""
        return self.tally.ownership if self.llm else None


def _mean_sd(x: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=np.float64)
    return float(a.mean()), float(a.std())


@dataclass(frozen=True)
class CriterionOutcome:
    """One protocol criterion over an arm's final plans: its label and unit, the mean final value and the share of
    sessions whose final plan passes it (0..1). Records without criterion values (the first record format) are
    left out (``n``)."""

    label: str
    unit: str
    mean: float
    passed: float
    n: int


def final_criteria(records: Sequence[SessionRecord]) -> dict[str, CriterionOutcome]:
    """Per criterion id, in protocol order: how the final plans of ``records`` measure on it."""
    values: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    labels: dict[str, tuple[str, str]] = {}
    for r in records:
        for c in r.steps_detail[-1].criteria:
            values[c.id].append((c.value, c.passed))
            labels[c.id] = (c.label, c.unit)
    return {
        cid: CriterionOutcome(labels[cid][0], labels[cid][1], float(np.mean([v for v, _ in vs])),
                              float(np.mean([p for _, p in vs])), len(vs))
        for cid, vs in values.items()
    }


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
        tally=DecisionTally.of(d for r in records for d in r.all_decisions),
        llm=any(r.impl == "llm" for r in records),
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


def proposal_moves(p: Proposal | None) -> list[Move]:
    """What an answer proposed, one :class:`Move` per TPP: its step, or the direction of each of its value changes
    (none for a stop or no answer; none for a value that equals the current one, e.g. the unguided 1.5B model
    copying a TPP's value, which the guard refuses as ``no_change``)."""
    if p is None or p.action == "stop":
        return []
    if p.move is not None:
        return [p.move]
    return [Move(c.tpp, Direction(c.direction)) for c in p.changes if c.direction]


def _chosen(d: Decision, proposals: bool) -> list[Move]:
    return proposal_moves(d.proposal) if proposals else d.moves()


def hierarchy(records: Sequence[SessionRecord], *, proposals: bool = False) -> list[MoveCount]:
    """How the sessions moved each TPP: counts per direction, how often it was moved by the session's first
    decision, the mean stage of its moves (0 = first decision, 1 = last; every TPP a decision changed gets that
    decision's stage) and of its first move per session. Ordered like the DRL knowledge's ``priority``: by the mean
    stage of the first move (earliest first; TPPs never moved last). ``proposals``: count the planner's own
    proposals instead of the actions taken after the guard. Decisions that moved nothing do not count as stages."""
    raises: Counter[str] = Counter()
    lowers: Counter[str] = Counter()
    firsts: Counter[str] = Counter()
    stages: dict[str, list[float]] = defaultdict(list)
    first_stages: dict[str, list[float]] = defaultdict(list)
    for r in records:
        decided = [moves for d in r.decisions if (moves := _chosen(d, proposals))]
        seen: set[str] = set()
        for i, moves in enumerate(decided):
            stage = i / (len(decided) - 1) if len(decided) > 1 else 0.0
            for m in moves:
                (raises if int(m.direction) > 0 else lowers)[m.tpp] += 1
                stages[m.tpp].append(stage)
                if m.tpp not in seen:
                    first_stages[m.tpp].append(stage)
                    seen.add(m.tpp)
        if decided:
            firsts.update({m.tpp for m in decided[0]})
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
    saved = folder / KNOWLEDGE_FILE
    return relabel_knowledge(load_knowledge(saved if saved.is_file() else DEFAULT_KNOWLEDGE),
                             load_scenario(scenario).roles)


def knowledge_priority(folder: Path, scenario: str) -> list[str]:
    """The experiment's knowledge's priority order in ``scenario``'s TPP names."""
    knowledge = experiment_knowledge(folder, scenario)
    return [to_structure_name(p, knowledge.roles) for p in knowledge.priority]
