"""The experiment's figures: ``score_vs_step.png`` (mean ± sd per arm; a finished session keeps its final score),
``final_tpps.png`` (final TPPs of every arm against the DRL knowledge's 5–95 % range and median) and
``initial_quality.png`` (final score and steps against the initial score)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from m2m.experiment.analysis import experiment_knowledge
from m2m.experiment.design import ARMS, Design
from m2m.experiment.records import SessionRecord
from m2m.physics.tpp import PARAMETERS, split_name


def _figure(n: int, height: float = 3.6) -> tuple[Any, Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, height), squeeze=False)
    return plt, fig, axes[0]


def plot_scores(path: Path, design: Design, groups: Mapping[tuple[str, str], list[SessionRecord]]) -> None:
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


def plot_final_tpps(path: Path, design: Design, groups: Mapping[tuple[str, str], list[SessionRecord]]) -> None:
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


def plot_initial_quality(path: Path, design: Design, groups: Mapping[tuple[str, str], list[SessionRecord]]) -> None:
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
