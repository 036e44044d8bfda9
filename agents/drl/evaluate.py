"""Roll a policy out on a cohort and summarise the episodes as the papers' evaluation table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from m2m.agents.drl.env import SCORE_TOLERANCE, PlanningEnv

Policy = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class EpisodeRecord:
    """One planned case: scores (protocol points), the actions taken and the TPPs before and after.

    ``actions`` are ``(tpp name, direction)`` in the env's structure names; ``steps`` is their count.
    """

    case_id: str
    case_seed: int
    initial_score: float
    final_score: float
    max_score: float
    actions: tuple[tuple[str, int], ...]
    initial_tpps: dict[str, float] = field(default_factory=dict)
    final_tpps: dict[str, float] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.actions)

    @property
    def reached_max(self) -> bool:
        return self.final_score >= self.max_score - SCORE_TOLERANCE


def run_episode(env: PlanningEnv, policy: Policy, case_seed: int) -> EpisodeRecord:
    """Plan case ``case_seed`` with ``policy`` until the maximum score or the step cap (no step from a plan
    that already scores the maximum)."""
    obs, info = env.reset(options={"case_seed": case_seed})
    initial_score, initial_tpps = float(info["score"]), dict(info["tpps"])
    actions: list[tuple[str, int]] = []
    done = initial_score >= env.max_score - SCORE_TOLERANCE
    while not done:
        action = int(policy(obs))
        obs, _reward, terminated, truncated, info = env.step(action)
        actions.append(env.action_meaning(action))
        done = terminated or truncated
    return EpisodeRecord(
        case_id=str(info["case_id"]),
        case_seed=case_seed,
        initial_score=initial_score,
        final_score=float(info["score"]),
        max_score=env.max_score,
        actions=tuple(actions),
        initial_tpps=initial_tpps,
        final_tpps=dict(info["tpps"]),
    )


def run_cohort(
    env: PlanningEnv, policy: Policy, seeds: Iterable[int], on_episode: Callable[[EpisodeRecord], None] | None = None
) -> list[EpisodeRecord]:
    """:func:`run_episode` on each seed in order."""
    records = []
    for seed in seeds:
        record = run_episode(env, policy, int(seed))
        records.append(record)
        if on_episode is not None:
            on_episode(record)
    return records


@dataclass(frozen=True)
class EvaluationSummary:
    """Cohort statistics: scores in protocol points, ``pct_at_max`` in %, steps per episode."""

    n_cases: int
    max_score: float
    initial_mean: float
    initial_sd: float
    final_mean: float
    final_sd: float
    pct_at_max: float
    steps_mean: float
    steps_sd: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def summarise(records: Iterable[EpisodeRecord]) -> EvaluationSummary:
    """Means and (population) standard deviations over ``records``."""
    recs = list(records)
    if not recs:
        raise ValueError("no episodes to summarise")
    initial = np.array([r.initial_score for r in recs])
    final = np.array([r.final_score for r in recs])
    steps = np.array([r.steps for r in recs], dtype=float)
    return EvaluationSummary(
        n_cases=len(recs),
        max_score=recs[0].max_score,
        initial_mean=float(initial.mean()),
        initial_sd=float(initial.std()),
        final_mean=float(final.mean()),
        final_sd=float(final.std()),
        pct_at_max=100.0 * float(np.mean([r.reached_max for r in recs])),
        steps_mean=float(steps.mean()),
        steps_sd=float(steps.std()),
    )


def table(rows: Mapping[str, EvaluationSummary]) -> str:
    """A markdown table, one row per labelled summary."""
    lines = [
        "| cohort | cases | initial score | final score | % at max | steps |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in rows.items():
        lines.append(
            f"| {label} | {s.n_cases} | {s.initial_mean:.2f} ± {s.initial_sd:.2f} of {s.max_score:g} "
            f"| {s.final_mean:.2f} ± {s.final_sd:.2f} | {s.pct_at_max:.0f} % | {s.steps_mean:.1f} ± {s.steps_sd:.1f} |"
        )
    return "\n".join(lines)
