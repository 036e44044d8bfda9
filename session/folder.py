"""A planning session's folder: what a physicist opens after a session.

Files written by :func:`write_session_folder`:

* ``dvh.png`` – cumulative DVH of every scored structure, initial plan dashed, final plan solid (dose in Gy);
* ``score.png`` – protocol score vs step;
* ``tpps.png`` – every TPP vs step (relative to its initial value, log scale);
* ``trajectory.csv`` – one row per step: score, failing criteria (ids), and the decision taken FROM that step —
  the planner's own proposal, the action taken, who chose it (``proposal``, ``drl_advice`` or ``safe``), the guard's
  vetoes and the proposal's rationale (always on the row of the proposal it belongs to) — then every TPP value;
* ``trajectory.json`` – the same steps in the session's one step schema (:class:`m2m.agents.messages.Step`: every
  criterion's value, the model's raw answers, timings);
* ``final.json`` – outcome, final score, maximum score, steps taken, every criterion of the final plan (value,
  limit, points, pass), the final TPPs and the files.

Every planner — in process or on the bus — writes the same folder from the same :class:`Step` list.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec
import numpy as np

from m2m.agents.messages import Outcome, Step
from m2m.physics.dvh import cumulative_dvh

#: Columns of ``trajectory.csv`` before the TPP values.
CSV_COLUMNS = ("step", "score", "max_score", "failing", "proposal", "action", "source", "vetoes", "rationale",
               "decision_s", "plan_s")


def write_session_folder(
    folder: Path,
    *,
    title: str,
    steps: Sequence[Step],
    outcome: Outcome,
    dvh_bins_gy: np.ndarray,
    initial_dvh_pct: Mapping[str, np.ndarray],
    final_dvh_pct: Mapping[str, np.ndarray],
    rx_gy: float,
    extra_files: Mapping[str, Path] | None = None,
) -> dict[str, Path]:
    """Write the session files into ``folder`` (created) and return them by kind.

    ``initial_dvh_pct`` / ``final_dvh_pct`` map structure names to cumulative DVHs (% volume) on ``dvh_bins_gy``
    (Gy; see :func:`dvh_curves`). ``steps`` must start with step 0. ``extra_files`` (kind → path, e.g. the
    transcript) are listed in ``final.json``.
    """
    if not steps or steps[0].step != 0:
        raise ValueError("a session record starts with step 0, the initial plan")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "dvh": folder / "dvh.png",
        "score": folder / "score.png",
        "tpps": folder / "tpps.png",
        "trajectory_csv": folder / "trajectory.csv",
        "trajectory_json": folder / "trajectory.json",
        "final": folder / "final.json",
    }
    _plot_dvh(paths["dvh"], title, dvh_bins_gy, initial_dvh_pct, final_dvh_pct, rx_gy)
    _plot_score(paths["score"], title, steps)
    _plot_tpps(paths["tpps"], title, steps)
    _write_trajectory(paths["trajectory_csv"], paths["trajectory_json"], steps)
    last = steps[-1]
    paths["final"].write_text(
        json.dumps(
            {
                "title": title,
                "outcome": str(outcome),
                "reached_max": outcome is Outcome.MAXIMUM_SCORE,
                "score": last.score,
                "max_score": last.max_score,
                "steps": last.step,
                "failing": list(last.failing),
                "criteria": [msgspec.to_builtins(c) for c in last.criteria],
                "tpps": last.tpps,
                "files": {k: p.name for k, p in {**paths, **(extra_files or {})}.items()},
            },
            indent=2,
        )
        + "\n"
    )
    return paths


def dvh_curves(dose_by_structure: Mapping[str, np.ndarray], bins_gy: np.ndarray) -> dict[str, np.ndarray]:
    """Cumulative DVH (% volume) per structure from per-voxel doses (Gy; equal voxel volumes in a structure)."""
    return {name: 100 * cumulative_dvh(dose, bins_gy) for name, dose in dose_by_structure.items()}


def _plot_dvh(
    path: Path,
    title: str,
    bins: np.ndarray,
    initial: Mapping[str, np.ndarray],
    final: Mapping[str, np.ndarray],
    rx_gy: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(final):
        colour = f"C{i % 10}"
        if name in initial:
            ax.plot(bins, initial[name], "--", color=colour, alpha=0.6)
        ax.plot(bins, final[name], "-", color=colour, label=name)
    ax.axvline(rx_gy, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_title(f"{title}: DVH, initial (dashed) vs final (solid)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_score(path: Path, title: str, steps: Sequence[Step]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s.step for s in steps], [s.score for s in steps], "o-")
    ax.axhline(steps[0].max_score, color="grey", ls=":", label="maximum")
    ax.set_xlabel("step")
    ax.set_ylabel("protocol score (points)")
    ax.set_title(f"{title}: score vs step")
    ax.set_ylim(0, steps[0].max_score + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tpps(path: Path, title: str, steps: Sequence[Step]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    x = [s.step for s in steps]
    for i, name in enumerate(steps[0].tpps):
        first = steps[0].tpps[name]
        ax.plot(x, [s.tpps[name] / first for s in steps], marker="o", ms=3, color=f"C{i % 10}",
                ls=("-", "--", ":")[i % 3], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("TPP / initial value")
    ax.set_title(f"{title}: TPP trajectories")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectory_row(s: Step) -> list[str]:
    """The ``trajectory.csv`` cells of one step before its TPP values (see :data:`CSV_COLUMNS`)."""
    d = s.decision
    if d is None:
        decision = [""] * 6
    else:
        proposal = "invalid answer" if d.proposal is None else str(d.proposal.move or d.proposal.action)
        decision = [
            proposal, str(d.action) if d.action is not None else "stop", d.source,
            ";".join(v.reason for v in d.vetoes), d.proposal.rationale if d.proposal is not None else d.error,
            f"{d.decision_s:.2f}",
        ]
    return [str(s.step), f"{s.score:.4f}", f"{s.max_score:g}", ";".join(s.failing), *decision, f"{s.plan_s:.2f}"]


def _write_trajectory(csv_path: Path, json_path: Path, steps: Sequence[Step]) -> None:
    tpp_names = list(steps[0].tpps)
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_COLUMNS, *tpp_names])
        for s in steps:
            writer.writerow(trajectory_row(s) + [f"{s.tpps[n]:.6g}" for n in tpp_names])
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(list(steps)), indent=2) + b"\n")
