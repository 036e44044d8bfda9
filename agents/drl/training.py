"""A training run end to end: environments on the scenario's cohorts, :func:`dqn.train`, and the shipped artifacts
(checkpoint, JSON summary, training-curve PNG)."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from m2m.agents.drl import ASSETS
from m2m.agents.drl.dqn import DqnConfig, TrainingLog, checkpoint_meta, save_checkpoint, train
from m2m.agents.drl.env import PlanningEnv, scenario_env
from m2m.scenarios import Scenario, load_scenario

log = structlog.get_logger()

CHECKPOINT_NAME = "dqn_prostate.pt"
SUMMARY_NAME = "training_summary.json"
CURVE_NAME = "training_curve.png"
#: Agent roles the shipped policy controls besides the PTV (the 9-TPP prostate setting).
CONTROLLED_OAR_ROLES = ("oar1", "oar2")


def controlled_oars(roles: Mapping[str, str], oar_roles: tuple[str, ...] = CONTROLLED_OAR_ROLES) -> list[str]:
    """Structure names of the controlled OAR roles under a scenario's role map."""
    return [roles[r] for r in oar_roles]


def train_env(cfg: DqnConfig) -> PlanningEnv:
    """The training env: random starts on the first ``cfg.train_cases`` training seeds (a module-level function,
    so ``functools.partial(train_env, cfg)`` can build one in each actor process)."""
    scenario = load_scenario(cfg.scenario)
    train_seeds = list(scenario.cohorts.train.seeds[: cfg.train_cases])
    return scenario_env(scenario, train_seeds, controlled_oars(scenario.roles),
                        fmo_max_iterations=cfg.fmo_max_iterations)


def validation_env(cfg: DqnConfig, scenario: Scenario, roles: Mapping[str, str]) -> tuple[PlanningEnv, list[int]]:
    """The validation env (the scenario's fixed starts on the first ``cfg.validation_cases`` validation seeds)
    and those seeds."""
    val_seeds = list(scenario.cohorts.validation.seeds[: cfg.validation_cases])
    env = scenario_env(
        scenario, val_seeds, controlled_oars(roles), fixed_initial_tpps=True,
        fmo_max_iterations=cfg.fmo_max_iterations, capacity=len(val_seeds),
    )
    return env, val_seeds


def plot_curve(tlog: TrainingLog, path: Path, max_score: float) -> None:
    """Training episodes' final scores (with a running mean) and validation results against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for kind, colour in (("demo", "tab:orange"), ("rollout", "tab:blue")):
        eps = [e for e in tlog.episodes if e["kind"] == kind]
        ax1.scatter([e["env_steps"] for e in eps], [e["final_score"] for e in eps], s=6, alpha=0.4, color=colour,
                    label=f"{kind} episodes")
    finals = np.array([e["final_score"] for e in tlog.episodes])
    if finals.size:
        window = min(20, finals.size)
        running = np.convolve(finals, np.ones(window) / window, mode="valid")
        ax1.plot([e["env_steps"] for e in tlog.episodes][window - 1 :], running, color="k", label=f"mean of {window}")
    ax1.axhline(max_score, color="grey", lw=0.8, ls="--")
    ax1.set_ylabel("final score (training)")
    ax1.legend(loc="lower right", fontsize=8)
    steps = [v["env_steps"] for v in tlog.validations]
    ax2.plot(steps, [v["final_mean"] for v in tlog.validations], "o-", label="mean final score")
    ax2.axhline(max_score, color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("validation final score")
    ax2.set_xlabel("env steps (optimisations, demonstration previews included)")
    twin = ax2.twinx()
    twin.plot(steps, [v["pct_at_max"] for v in tlog.validations], "s--", color="tab:green", label="% at max")
    twin.set_ylabel("% at max score")
    twin.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_training(cfg: DqnConfig, out_dir: Path = ASSETS) -> dict[str, Any]:
    """Train, write ``dqn_prostate.pt``, ``training_summary.json`` and ``training_curve.png`` to ``out_dir``; return
    the summary."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    scenario = load_scenario(cfg.scenario)
    roles = dict(scenario.roles)
    val_env, val_seeds = validation_env(cfg, scenario, roles)
    log.info("drl_train_start", scenario=cfg.scenario, seed=cfg.seed, roles=roles, minutes=cfg.wall_minutes)
    with Progress(TextColumn("[bold]drl train"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("", total=60.0 * cfg.wall_minutes)

        def on_progress(tlog: TrainingLog, message: str) -> None:
            progress.update(task, completed=tlog.wall_seconds, description=f"{tlog.env_steps} env steps · {message}")

        q_net, tlog = train(cfg, partial(train_env, cfg), val_env, val_seeds, on_progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = checkpoint_meta(cfg, val_env, roles, tlog)
    meta["scenario"] = cfg.scenario
    sha = save_checkpoint(out_dir / CHECKPOINT_NAME, q_net, meta)
    plot_curve(tlog, out_dir / CURVE_NAME, scenario.protocol.max_score)
    rollouts = [e for e in tlog.episodes if e["kind"] == "rollout"]
    summary = {
        "command": (f"m2m drl train --site {scenario.site} --seed {cfg.seed} --minutes {cfg.wall_minutes:g} "
                    f"--workers {cfg.workers}"),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "config": asdict(cfg),
        "roles": roles,
        "checkpoint": {"file": CHECKPOINT_NAME, "sha256": sha,
                       "bytes": (out_dir / CHECKPOINT_NAME).stat().st_size},
        "wall_seconds": round(tlog.wall_seconds, 1),
        "env_steps": tlog.env_steps,
        "env_seconds": round(tlog.env_seconds, 1),
        "env_steps_per_second": round(tlog.env_steps / max(tlog.env_seconds, 1e-9), 2),  # per actor
        "env_steps_per_wall_second": round(tlog.env_steps / max(tlog.wall_seconds, 1e-9), 2),  # all actors
        "gradient_updates": tlog.gradient_updates,
        "demo_episodes": tlog.demo_episodes,
        "rollout_episodes": tlog.rollout_episodes,
        "rollout_last50_final_mean": (float(np.mean([e["final_score"] for e in rollouts[-50:]]))
                                      if rollouts else None),
        "validations": tlog.validations,
        "best_validation": meta["best_validation"],
    }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("drl_train_done", checkpoint=str(out_dir / CHECKPOINT_NAME), sha256=sha[:12],
             wall_s=summary["wall_seconds"], env_steps=tlog.env_steps, steps_per_s=summary["env_steps_per_second"])
    return summary


