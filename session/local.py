"""One autonomous planning session without a human: initial TPPs → {optimise → score → choose a TPP step} until
the protocol's maximum score or the scenario's step cap.

Two planners exist today: a greedy one-step lookahead that re-optimises the plan for every possible TPP step and
keeps the best (18 optimisations per step for 9 TPPs), and a trained DRL policy (:mod:`m2m.agents.drl`). Both
act through the same gymnasium environment, so scores are comparable; the session folder is written by
:mod:`m2m.session.folder`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import structlog
from rich.console import Console
from rich.table import Table

from m2m.agents.dose_engine import structure_doses
from m2m.agents.drl import DEFAULT_CHECKPOINT
from m2m.agents.drl.env import SCORE_TOLERANCE, PlanningEnv, scenario_env
from m2m.agents.evaluator import evaluation_message
from m2m.agents.messages import Decision, Outcome, Proposal, Step
from m2m.physics.dvh import report_bins_gy
from m2m.physics.tpp import Direction, Move
from m2m.scenarios import load_scenario
from m2m.session.folder import SessionLabel, write_session_folder

log = structlog.get_logger()



def greedy_policy(env: PlanningEnv) -> Callable[[np.ndarray], int]:
    """Preview every action and take the one whose plan gains most smoothed score (lowest index on ties)."""

    def act(_observation: np.ndarray) -> int:
        rewards = [env.preview(a).reward for a in range(int(env.action_space.n))]
        return int(np.argmax(rewards))

    return act


def _drl_env(scenario: str, cohort: str, case_index: int, checkpoint: Path) -> tuple[PlanningEnv, Callable]:
    from m2m.agents.drl.advisor import Advisor

    if not checkpoint.is_file():
        raise FileNotFoundError(f"no DRL checkpoint at {checkpoint}: train one with `m2m drl train --site prostate`")
    advisor = Advisor.from_checkpoint(checkpoint)
    env, _ = advisor.cohort_env(scenario, cohort, case_index + 1)
    # the masked greedy policy `m2m drl evaluate` measures: never a move that cannot change a TPP at its bound
    return env, advisor.lookahead_policy(env, 1)


def _plan_doses(env: PlanningEnv) -> dict[str, np.ndarray]:
    """Dose (Gy per voxel) of the current plan on every target and OAR of the case: the optimised and scored
    structures, then the case's others (from its report dij; never optimised), as the dose engine reports them."""
    return {**env.plan.dose, **env.case.report_doses(env.plan.fluence)}


def _step(env: PlanningEnv, index: int, plan_s: float = 0.0) -> Step:
    """The current plan of ``env`` as step ``index`` of the session record."""
    scored = evaluation_message(env.report)  # as the evaluator agent scores a plan on the bus
    return Step(step=index, score=scored.total, max_score=scored.max_score, tpps=env.tpps.as_dict(),
                failing=scored.failing, criteria=scored.criteria, plan_s=plan_s)


def run_session(
    *,
    scenario: str,
    case_index: int,
    cohort: str = "test",
    planner: str = "greedy",
    checkpoint: Path | None = None,
    out_parent: Path = Path("runs"),
    console: Console | None = None,
) -> Path:
    """Plan case ``case_index`` of ``cohort`` in ``scenario`` from the scenario's initial TPPs for that case.

    Returns the session folder (``out_parent/<scenario>-<case id>-<planner>-<UTC time>``).
    """
    console = console or Console(stderr=True)
    sc = load_scenario(scenario)
    seeds = sc.cohorts.get(cohort).seeds
    if not 0 <= case_index < len(seeds):
        raise ValueError(f"case index {case_index} outside cohort {cohort!r} of {len(seeds)} cases")
    seed = int(seeds[case_index])
    if planner == "drl":
        env, act = _drl_env(scenario, cohort, case_index, checkpoint or DEFAULT_CHECKPOINT)
    elif planner == "greedy":
        env = scenario_env(sc, [seed], sc.oar_names, fixed_initial_tpps=True, capacity=1)
        act = greedy_policy(env)
    else:
        raise ValueError(f"unknown planner {planner!r}; expected 'drl' or 'greedy'")

    with console.status(f"building {sc.site} case (seed {seed}) and its initial plan"):
        obs, info = env.reset(options={"case_seed": seed})
    initial_dose = _plan_doses(env)
    steps = [_step(env, 0)]
    table = Table(title=f"{info['case_id']} · {scenario} · planner {planner}")
    for column in ("step", "score", "action", "failing criteria"):
        table.add_column(column)
    table.add_row("0", f"{steps[0].score:.2f}/{env.max_score:g}", "initial TPPs", ", ".join(steps[0].failing))
    console.print(f"initial plan: {steps[0].score:.2f}/{env.max_score:g}")
    done = steps[0].score >= env.max_score - SCORE_TOLERANCE
    while not done:
        with console.status(f"step {len(steps)}: choosing and re-optimising"):
            started = time.perf_counter()
            action = act(obs)
            decision_s = time.perf_counter() - started
            name, direction = env.action_meaning(action)
            move = Move(name, Direction(direction))
            steps[-1] = msgspec.structs.replace(steps[-1], decision=Decision(
                proposal=Proposal(action="change", move=move, rationale=f"{planner} policy"), action=move,
                source="proposal", decision_s=decision_s,
            ))
            started = time.perf_counter()
            obs, _reward, terminated, truncated, info = env.step(action)
        record = _step(env, len(steps), plan_s=time.perf_counter() - started)
        steps.append(record)
        table.add_row(str(record.step), f"{record.score:.2f}", str(move), ", ".join(record.failing))
        console.print(f"step {record.step}: {move!s:<24} score {record.score:.2f}/{env.max_score:g}")
        log.info("plan.step", case=info["case_id"], step=record.step, action=str(move), score=record.score)
        done = terminated or truncated
    console.print(table)

    final = steps[-1]
    outcome = Outcome.MAXIMUM_SCORE if final.score >= env.max_score - SCORE_TOLERANCE else Outcome.STEP_CAP
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = out_parent / f"{scenario}-{info['case_id']}-{planner}-{stamp}"
    bins = report_bins_gy(sc.rx_gy)
    write_session_folder(
        folder,
        label=SessionLabel(case_id=info["case_id"], scenario=scenario, mode="in-process", planner=planner),
        steps=steps,
        outcome=outcome,
        rx_gy=sc.rx_gy,
        dvh_bins_gy=bins,
        initial_structures=structure_doses(initial_dose, bins),
        final_structures=structure_doses(_plan_doses(env), bins),
    )
    console.print(f"final score {final.score:.2f}/{env.max_score:g} after {final.step} steps ({outcome})")
    return folder
