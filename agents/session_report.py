"""A planning session's folder: what a physicist opens after a session.

Files written by :func:`write_session_folder`:

* ``dvh.png`` – cumulative DVH of every scored structure, initial plan dashed, final plan solid (dose in Gy);
* ``score.png`` – protocol score vs step;
* ``tpps.png`` – every TPP vs step (relative to its initial value, log scale);
* ``trajectory.csv`` / ``trajectory.json`` – per step: score, failing criteria, action, every TPP value;
* ``final.json`` – final TPPs, score, maximum score, steps taken and whether the maximum was reached.

The module takes plain data (DVH curves per structure, step records) so every planner — in process or on the
bus — writes the same folder.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from m2m.physics.dvh import cumulative_dvh

DVH_BINS = 400
DVH_SPAN_OF_RX = 1.2


@dataclass(frozen=True)
class StepRecord:
    """One step of a session. Step 0 is the initial plan (no action). ``score`` is in protocol points."""

    step: int
    score: float
    max_score: float
    tpps: dict[str, float]
    failing: tuple[str, ...] = ()
    action: str = ""
    rationale: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def write_session_folder(
    folder: Path,
    *,
    title: str,
    steps: Sequence[StepRecord],
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
                "score": last.score,
                "max_score": last.max_score,
                "reached_max": last.score >= last.max_score - 1e-9,
                "steps": last.step,
                "failing": list(last.failing),
                "tpps": last.tpps,
                "files": {k: p.name for k, p in {**paths, **(extra_files or {})}.items()},
            },
            indent=2,
        )
        + "\n"
    )
    return paths


def dvh_bins(rx_gy: float) -> np.ndarray:
    """Fine bins (Gy) for session DVH plots: 0 to 120 % of Rx."""
    return np.linspace(0.0, DVH_SPAN_OF_RX * rx_gy, DVH_BINS)


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


def _plot_score(path: Path, title: str, steps: Sequence[StepRecord]) -> None:
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


def _plot_tpps(path: Path, title: str, steps: Sequence[StepRecord]) -> None:
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


def _write_trajectory(csv_path: Path, json_path: Path, steps: Sequence[StepRecord]) -> None:
    tpp_names = list(steps[0].tpps)
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "score", "max_score", "action", "failing", *tpp_names])
        for s in steps:
            writer.writerow(
                [s.step, f"{s.score:.4f}", s.max_score, s.action, ";".join(s.failing)]
                + [f"{s.tpps[n]:.6g}" for n in tpp_names]
            )
    json_path.write_text(json.dumps([asdict(s) for s in steps], indent=2) + "\n")
