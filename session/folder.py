"""A planning session's folder: what a physicist opens after a session.

Files written by :func:`write_session_folder`:

* ``summary.png`` – the session on one page: the DVH (initial dashed, final solid, protocol limits marked), score vs
  step, and who moved what (per decision: each TPP the action changed, coloured by its source
  ``proposal``/``retry``/``drl_advice``/``safe``, and the TPPs of the answers the guard refused), titled with case,
  scenario, mode, planner, outcome and the planner's ownership of its decisions;
* ``dvh.png`` – cumulative DVH of every target and OAR of the case (not only the optimised or scored ones), initial
  plan dashed, final plan solid (dose in Gy), a labelled Rx line and a marker at each protocol criterion
  (:func:`dvh_markers`);
* ``score.png`` – protocol score vs step;
* ``tpps.png`` – every TPP vs step in absolute values, one panel per parameter kind (columns) and role (rows: the
  PTV, the OARs), the valid range from :data:`m2m.physics.tpp.PARAMETERS` in grey, lambdas on a log axis, thresholds
  ``t`` also in Gy on the right axis;
* ``dvh_initial.csv`` / ``dvh_final.csv`` – the initial and the final plan's cumulative DVH of every target and OAR
  (% volume per dose bin, Gy; :func:`m2m.physics.dvh.dvh_csv`), for a spreadsheet or another planning system;
* ``trajectory.csv`` – one row per step: score, failing criteria (ids), and the decision taken FROM that step —
  the planner's own proposal, its second answer after the guard's feedback (``retry``), the action taken (a step or
  the new TPP values), who chose it (``proposal``, ``retry``, ``drl_advice`` or ``safe``), the guard's vetoes and
  the rationales (always on the row of the answer they belong to) — then every TPP value;
* ``trajectory.json`` – the same steps in the session's one step schema (:class:`m2m.agents.messages.Step`: every
  criterion's value, the model's raw answers, timings);
* ``final.json`` – case, scenario, mode, planner, outcome, final score, maximum score, steps taken, every criterion
  of the final plan (value, limit, points, pass), the final plan's dose metrics per structure (Dmax, Dmean, D95 in Gy
  and % Rx), the final TPPs, who chose the decisions (:class:`DecisionTally`: ``decisions``, ``ownership``,
  ``sources``, ``feedback_retries``) and the files.

**Ownership** (:class:`DecisionTally`): the share of a session's decisions (every step a decision was taken from,
a stop included) whose action is the planner's own answer — its first proposal or its second answer after the
guard's feedback (sources ``proposal`` and ``retry``, :attr:`~m2m.agents.messages.Decision.owned`), taken unchanged
or only clamped into range. With the LLM planner it is the LLM's ownership of the session; the DRL advice and the
safe action replacing a refused answer are not its own.

How a criterion is drawn on a DVH (:func:`dvh_markers`): a limit with a volume in % of the structure — ``V<x>Gy``
and ``V<x>%Rx`` in ``%``, ``D<x>%`` — is a triangle at (dose in Gy, volume in %) (``%Rx`` converted with the
prescription), pointing down for an upper limit (the curve must pass below it) and up for a lower limit (above it);
a dose limit without a volume in % — ``Dmax``, ``Dmean``, ``D<x>cc`` (the DVH carries no structure volume), ``V<x>``
in ``cc`` — is a short vertical tick on the dose axis at the limit dose, labelled with its metric. Markers are
filled when the final plan passes the criterion and open when it fails; their colour is the structure's.

Every planner — in process or on the bus — writes the same folder from the same :class:`Step` list and the plans'
:class:`~m2m.agents.messages.StructureDose` lists.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import numpy as np
from numpy.typing import ArrayLike

from m2m.agents.messages import CriterionResult, Decision, Outcome, Proposal, Step, StructureDose
from m2m.physics.dvh import dvh_csv
from m2m.physics.protocol import CriterionId, parse_metric
from m2m.physics.tpp import PARAMETERS, PTV, ROLES, Direction, role_of, split_name

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes

#: Columns of ``trajectory.csv`` before the TPP values.
CSV_COLUMNS = ("step", "score", "max_score", "failing", "proposal", "retry", "action", "source", "vetoes",
               "rationale", "retry_rationale", "decision_s", "plan_s")

#: Height (% volume) of the tick that marks a dose limit without a volume in % on a DVH.
TICK_PCT = 8.0
#: Colour of each action source in ``summary.png``.
SOURCE_COLOURS: Mapping[str, str] = {"proposal": "tab:blue", "retry": "tab:cyan", "drl_advice": "tab:orange",
                                     "safe": "tab:gray"}
#: Every action source, in the order counts are shown.
SOURCES: tuple[str, ...] = tuple(SOURCE_COLOURS)
#: The axis units of the TPP kinds in ``tpps.png`` (what :data:`m2m.physics.tpp.PARAMETERS` says of each).
_TPP_UNITS: Mapping[str, str] = {"t": "fraction of Rx", "lambda": "weight, log scale", "v": "fraction of volume"}
_DPI = 110


@dataclass(frozen=True)
class SessionLabel:
    """What a session was, as the figures' titles and ``final.json`` name it: the case, the scenario, the mode
    (``guided``/``unguided`` on the bus, ``in-process`` for the baseline without an LLM) and the planner(s)."""

    case_id: str
    scenario: str
    mode: str
    planner: str

    @property
    def title(self) -> str:
        return f"{self.case_id} · {self.scenario} · {self.mode} · {self.planner}"


@dataclass(frozen=True)
class DvhMarker:
    """Where a protocol criterion is drawn on a DVH (see the module docstring): at ``dose_gy`` (Gy) and
    ``volume_pct`` (% of the structure; None: a tick on the dose axis), an ``upper`` or lower limit, ``passed`` by
    the final plan; ``text`` is the metric and its limit (``"D10cc ≤ 18 Gy"``)."""

    criterion: CriterionId
    structure: str
    text: str
    dose_gy: float
    volume_pct: float | None
    upper: bool
    passed: bool


@dataclass(frozen=True)
class DecisionTally:
    """Who chose a set of decisions (see **Ownership** in the module docstring): ``decisions`` taken, ``owned``
    (source ``proposal`` or ``retry``), the count of each source (every one of :data:`SOURCES`, zeros included) and
    ``feedback_retries`` (decisions where the planner answered a second time after the guard refused its proposal
    and said why; ``sources["retry"]`` of them were taken)."""

    decisions: int
    owned: int
    sources: Mapping[str, int]
    feedback_retries: int

    @classmethod
    def of(cls, decisions: Iterable[Decision]) -> DecisionTally:
        ds = list(decisions)
        counts = {source: 0 for source in SOURCES}
        for d in ds:
            counts[d.source] = counts.get(d.source, 0) + 1
        return cls(decisions=len(ds), owned=sum(d.owned for d in ds), sources=counts,
                   feedback_retries=sum(d.retry is not None for d in ds))

    @classmethod
    def of_steps(cls, steps: Iterable[Step]) -> DecisionTally:
        """The decisions of ``steps`` (every step a decision was taken from)."""
        return cls.of(s.decision for s in steps if s.decision is not None)

    def __add__(self, other: DecisionTally) -> DecisionTally:
        counts = dict(self.sources)
        for source, n in other.sources.items():
            counts[source] = counts.get(source, 0) + n
        return DecisionTally(self.decisions + other.decisions, self.owned + other.owned, counts,
                             self.feedback_retries + other.feedback_retries)

    @property
    def ownership(self) -> float | None:
        """``owned / decisions`` (0..1; None without a decision)."""
        return self.owned / self.decisions if self.decisions else None

    def percent(self) -> str:
        """``"80 % (8/10)"`` (``"— (0 decisions)"`` without one)."""
        if self.ownership is None:
            return "— (0 decisions)"
        return f"{100 * self.ownership:.0f} % ({self.owned}/{self.decisions})"

    def sources_words(self) -> str:
        """``"proposal 7, retry 1, drl_advice 1, safe 1"`` (the sources that occur)."""
        return ", ".join(f"{k} {n}" for k, n in self.sources.items() if n) or "no decision"

    def to_json(self) -> dict[str, Any]:
        return {"decisions": self.decisions, "ownership": self.ownership, "sources": dict(self.sources),
                "feedback_retries": self.feedback_retries}


def dvh_markers(criteria: Sequence[CriterionResult], rx_gy: float) -> list[DvhMarker]:
    """One marker per criterion, in the criteria's order (doses in Gy: ``%Rx`` limits times ``rx_gy`` / 100)."""
    markers = []
    for c in criteria:
        kind, x = parse_metric(c.metric)
        upper = c.zero > c.limit
        if kind in ("VGy", "V%Rx"):
            assert x is not None
            dose_gy = x if kind == "VGy" else x * rx_gy / 100.0
            volume_pct = c.limit if c.unit == "%" else None
        else:
            dose_gy = c.limit * rx_gy / 100.0 if c.unit == "%Rx" else c.limit
            volume_pct = x if kind == "D%" else None
        markers.append(DvhMarker(
            criterion=c.id, structure=c.structure, text=f"{c.metric} {'≤' if upper else '≥'} {c.limit:g} {c.unit}",
            dose_gy=float(dose_gy), volume_pct=volume_pct, upper=upper, passed=c.passed,
        ))
    return markers


def dose_metrics(structures: Sequence[StructureDose], rx_gy: float) -> dict[str, dict[str, float]]:
    """``final.json``'s dose metrics: per structure, Dmax, Dmean and D95 in Gy and in % of ``rx_gy``."""
    out: dict[str, dict[str, float]] = {}
    for s in structures:
        gy = {"dmax": s.dmax_gy, "dmean": s.dmean_gy, "d95": s.d95_gy}
        out[s.name] = {
            **{f"{k}_gy": round(float(v), 3) for k, v in gy.items()},
            **{f"{k}_pct_rx": round(100.0 * float(v) / rx_gy, 2) for k, v in gy.items()},
        }
    return out


def write_session_folder(
    folder: Path,
    *,
    label: SessionLabel,
    steps: Sequence[Step],
    outcome: Outcome,
    rx_gy: float,
    dvh_bins_gy: np.ndarray,
    initial_structures: Sequence[StructureDose],
    final_structures: Sequence[StructureDose],
    extra_files: Mapping[str, Path] | None = None,
) -> dict[str, Path]:
    """Write the session files into ``folder`` (created) and return them by kind.

    ``initial_structures`` / ``final_structures`` are the first and the final plan's structures: DVHs (% volume on
    ``dvh_bins_gy``, Gy) and summary doses (Gy), every target and OAR of the case. ``rx_gy`` is the prescription
    (Gy). ``steps`` must start with step 0. ``extra_files`` (kind → path, e.g. the transcript) are listed in
    ``final.json``.
    """
    if not steps or steps[0].step != 0:
        raise ValueError("a session record starts with step 0, the initial plan")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": folder / "summary.png",
        "dvh": folder / "dvh.png",
        "score": folder / "score.png",
        "tpps": folder / "tpps.png",
        "dvh_initial_csv": folder / "dvh_initial.csv",
        "dvh_final_csv": folder / "dvh_final.csv",
        "trajectory_csv": folder / "trajectory.csv",
        "trajectory_json": folder / "trajectory.json",
        "final": folder / "final.json",
    }
    bins = np.asarray(dvh_bins_gy, dtype=np.float64)
    initial = {s.name: np.asarray(s.dvh_pct, dtype=np.float64) for s in initial_structures}
    final = {s.name: np.asarray(s.dvh_pct, dtype=np.float64) for s in final_structures}
    last = steps[-1]
    markers = dvh_markers(last.criteria, rx_gy)
    colours = structure_colours([*final, *initial, *(split_name(n)[1] for n in steps[0].tpps)])
    dvh = _Dvh(bins, initial, final, {s.name: s.dmax_gy for s in final_structures}, rx_gy, markers, colours)
    _plot_summary(paths["summary"], label, outcome, steps, dvh)
    _plot_dvh(paths["dvh"], label, dvh)
    _plot_score(paths["score"], label, steps)
    _plot_tpps(paths["tpps"], label, steps, rx_gy, colours)
    _write_trajectory(paths["trajectory_csv"], paths["trajectory_json"], steps)
    paths["dvh_initial_csv"].write_text(dvh_csv(bins, initial))
    paths["dvh_final_csv"].write_text(dvh_csv(bins, final))
    paths["final"].write_text(
        json.dumps(
            {
                "title": label.title,
                "case_id": label.case_id,
                "scenario": label.scenario,
                "mode": label.mode,
                "planner": label.planner,
                "outcome": str(outcome),
                "reached_max": outcome is Outcome.MAXIMUM_SCORE,
                "score": last.score,
                "max_score": last.max_score,
                "steps": last.step,
                "failing": list(last.failing),
                "criteria": [msgspec.to_builtins(c) for c in last.criteria],
                "rx_gy": rx_gy,
                "dose_metrics": dose_metrics(final_structures, rx_gy),
                "tpps": last.tpps,
                **DecisionTally.of_steps(steps).to_json(),
                "files": {k: p.name for k, p in {**paths, **(extra_files or {})}.items()},
            },
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    return paths


def structure_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per structure (first occurrence order), the same in every figure: the PTV red, the others from
    the tab10 cycle without red."""
    palette = [f"C{i}" for i in range(10) if i != 3]
    colours: dict[str, str] = {}
    for name in dict.fromkeys(names):
        colours[name] = "C3" if name == PTV else palette[sum(n != PTV for n in colours) % len(palette)]
    return colours


# ------------------------------------------------------------------------------------------------ figures
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _times(factor: float) -> tuple[Callable[[ArrayLike], ArrayLike], Callable[[ArrayLike], ArrayLike]]:
    """Multiplying by ``factor`` and its inverse: a secondary axis in other units (Gy → % Rx, t → Gy)."""

    def forward(x: ArrayLike) -> ArrayLike:
        return np.asarray(x) * factor

    def inverse(x: ArrayLike) -> ArrayLike:
        return np.asarray(x) / factor

    return forward, inverse


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)


@dataclass(frozen=True)
class _Dvh:
    """What a DVH panel draws: curves (% volume on ``bins`` Gy) by structure, the final plan's Dmax (Gy) by structure
    (in the legend: a structure far from the beams has its curve on the axis), Rx (Gy), markers, colours."""

    bins: np.ndarray
    initial: Mapping[str, np.ndarray]
    final: Mapping[str, np.ndarray]
    final_dmax_gy: Mapping[str, float]
    rx_gy: float
    markers: Sequence[DvhMarker]
    colours: Mapping[str, str]

    def draw(self, ax: Axes, *, fontsize: float = 8) -> None:
        """The DVH on ``ax``, its legend outside on the right."""
        from matplotlib.lines import Line2D

        for name, curve in self.final.items():
            colour = self.colours[name]
            width = 2.2 if name == PTV else 1.5
            if name in self.initial:
                ax.plot(self.bins, self.initial[name], "--", color=colour, lw=width * 0.7, alpha=0.7)
            ax.plot(self.bins, curve, "-", color=colour, lw=width)
        ax.axvline(self.rx_gy, color="black", lw=1.0, ls=":")
        ax.text(self.rx_gy, 55, f"Rx {self.rx_gy:g} Gy", rotation=90, ha="right", va="center", fontsize=fontsize + 1,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1.5})
        span = self.dose_span_gy()
        # Markers of several structures at one place (e.g. both femoral heads' limits) sit side by side.
        at_place: dict[tuple[float, float | None], list[DvhMarker]] = {}
        for m in self.markers:
            at_place.setdefault((round(m.dose_gy, 6), m.volume_pct), []).append(m)
        for m in self.markers:
            together = at_place[(round(m.dose_gy, 6), m.volume_pct)]
            x = m.dose_gy + 0.012 * span * (together.index(m) - (len(together) - 1) / 2)
            colour = self.colours.get(m.structure, "black")
            face = colour if m.passed else "white"
            if m.volume_pct is not None:
                ax.plot(x, m.volume_pct, "v" if m.upper else "^", ms=9, mfc=face, mec=colour, mew=1.8,
                        zorder=5, clip_on=False)
            else:
                ax.plot([x, x], [0.0, TICK_PCT], "-", color=colour, lw=2.5, zorder=5, solid_capstyle="butt",
                        clip_on=False)
                ax.plot(x, TICK_PCT, "D", ms=6, mfc=face, mec=colour, mew=1.6, zorder=6)
                ax.text(x, TICK_PCT + 2, f"{m.structure} {m.text}", rotation=90, ha="center", va="bottom",
                        fontsize=fontsize - 1, color=colour,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.6, "pad": 0.5})
        ax.set_xlim(0, span)
        top = ax.secondary_xaxis("top", functions=_times(100.0 / self.rx_gy))
        top.set_xlabel("dose (% Rx)", fontsize=fontsize + 1)
        ax.set_ylim(0, 101)
        ax.set_xlabel("dose (Gy)")
        ax.set_ylabel("volume (% of structure)")
        ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=self.colours[n], lw=2.2 if n == PTV else 1.5,
                          label=f"{n} (Dmax {self.final_dmax_gy[n]:.1f} Gy)") for n in self.final]
        handles += [
            Line2D([], [], color="grey", ls="--", label="initial plan"),
            Line2D([], [], color="grey", ls="-", label="final plan"),
            Line2D([], [], color="black", ls=":", label=f"Rx {self.rx_gy:g} Gy"),
        ]
        if any(m.volume_pct is not None for m in self.markers):
            handles.append(Line2D([], [], ls="none", marker="v", ms=8, mfc="grey", mec="grey",
                                  label="limit at (dose, volume): ▼ ≤, ▲ ≥"))
        if any(m.volume_pct is None for m in self.markers):
            handles.append(Line2D([], [], color="grey", lw=2.5, marker="D", ms=5, mfc="grey", markevery=[1],
                                  label="dose limit (Dmax, Dmean, Dcc)"))
        if self.markers:
            handles.append(Line2D([], [], ls="none", marker="o", ms=7, mfc="white", mec="grey", mew=1.6,
                                  label="open marker: final plan fails"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=fontsize, borderaxespad=0.0)

    def dose_span_gy(self) -> float:
        """The dose axis' end (Gy): past the hottest dose any curve reaches and every marker, within the bins."""
        reached = [float(self.bins[np.flatnonzero(c > 0)[-1]]) for c in (*self.final.values(), *self.initial.values())
                   if np.any(c > 0)]
        top = max([self.rx_gy, *reached, *(m.dose_gy for m in self.markers)])
        return float(min(self.bins[-1], 1.06 * top))


def _plot_dvh(path: Path, label: SessionLabel, dvh: _Dvh) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 6), layout="constrained")
    dvh.draw(ax)
    ax.set_title(f"{label.title}\nDVH: initial plan dashed, final plan solid", fontsize=11)
    _save(fig, path)


def _draw_score(ax: Axes, steps: Sequence[Step]) -> None:
    ax.plot([s.step for s in steps], [s.score for s in steps], "o-", color="black", ms=4)
    ax.axhline(steps[0].max_score, color="green", ls=":", label=f"maximum ({steps[0].max_score:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("protocol score (points)")
    ax.set_ylim(0, steps[0].max_score + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _integer_steps(ax, steps)


def _integer_steps(ax: Axes, steps: Sequence[Step], *, decisions: bool = False) -> None:
    """Integer step ticks; with ``decisions``, room for a decision taken from the last step (a stop, drawn at its
    step + ½)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, max(steps[-1].step + (decisions and steps[-1].decision is not None), 1) + 0.5)


def _plot_score(path: Path, label: SessionLabel, steps: Sequence[Step]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    _draw_score(ax, steps)
    ax.set_title(f"{label.title}\nscore vs step", fontsize=10)
    _save(fig, path)


def _plot_tpps(path: Path, label: SessionLabel, steps: Sequence[Step], rx_gy: float,
               colours: Mapping[str, str]) -> None:
    from matplotlib.lines import Line2D

    plt = _pyplot()
    x = [s.step for s in steps]
    names = list(steps[0].tpps)
    fig, axes = plt.subplots(len(ROLES), len(PARAMETERS), figsize=(13, 7), sharex=True, squeeze=False,
                             layout="constrained")
    structures: dict[str, None] = {}
    for row, role in enumerate(ROLES):
        for col, (param, spec) in enumerate(PARAMETERS.items()):
            ax = axes[row][col]
            mine = [n for n in names if split_name(n)[0] == param and role_of(split_name(n)[1]) == role]
            valid = spec.of(role).valid
            values = [[s.tpps[n] for s in steps] for n in mine]
            for n, v in zip(mine, values, strict=True):
                structure = split_name(n)[1]
                structures[structure] = None
                ax.plot(x, v, "o-", ms=3.5, lw=1.5, color=colours[structure])
            ax.axhline(valid.high, color="grey", ls="--", lw=1)
            bracket = "[" if valid.low_inclusive else "("
            ax.set_title(f"{param} · {'PTV' if role == 'ptv' else 'OARs'}   valid {bracket}{valid.low:.3g}, "
                         f"{valid.high:.3g}]", fontsize=9)
            if spec.log_scale:
                ax.set_yscale("log")
                seen = [float(v) for vs in values for v in vs] or [spec.of(role).default]
                ax.set_ylim(min(seen) / 3, max(seen) * 3)
                _plain_log_labels(ax, min(seen) / 3, max(seen) * 3)
            else:
                ax.axhline(valid.low, color="grey", ls="--", lw=1)
                pad = 0.05 * (valid.high - valid.low)
                ax.set_ylim(valid.low - pad, valid.high + pad)
            if param == "t":
                ax.secondary_yaxis("right", functions=_times(rx_gy)).set_ylabel(
                    "Gy", fontsize=8)
            ax.set_ylabel(f"{param} ({_TPP_UNITS[param]})" if param in _TPP_UNITS else param, fontsize=8)
            ax.grid(alpha=0.3, which="both")
            if row == len(ROLES) - 1:
                ax.set_xlabel("step")
            _integer_steps(ax, steps)
    handles = [Line2D([], [], color=colours[s], marker="o", ms=4, label=s) for s in structures]
    handles.append(Line2D([], [], color="grey", ls="--", label="valid range"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(f"{label.title}\nTPPs vs step (absolute values)", fontsize=11)
    _save(fig, path)


def _plain_log_labels(ax: Axes, low: float, high: float) -> None:
    """Plain numbers on a log axis from ``low`` to ``high`` (0.5, 1, 2 rather than 5×10⁻¹): the decades, and 2× and
    5× each decade when the axis spans at most two decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if np.log10(high / low) <= 2:
        def minor(v: float, _: object) -> str:
            mantissa = v / 10 ** np.floor(np.log10(v))
            return f"{v:g}" if np.isclose(mantissa, 2) or np.isclose(mantissa, 5) else ""

        ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def proposal_tpps(p: Proposal) -> list[str]:
    """The rows of ``summary.png``'s "who moved what" an answer names: its step's TPP, the TPPs of its value
    changes, or ``stop``."""
    if p.action == "stop":
        return ["stop"]
    if p.move is not None:
        return [p.move.tpp]
    return [c.tpp for c in p.changes] or ["stop"]


def _draw_moves(ax: Axes, steps: Sequence[Step]) -> None:
    """Who moved what: per decision (at step + ½, between the plans it joins) each TPP the action changed, coloured
    by its source, ▲ raise / ▼ lower / ■ stop; a red × on the TPPs of each answer the guard refused (a little left
    of the action taken, so both show when they are on one TPP; the refused feedback retry further left); a grey
    band where the answer was invalid."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [*steps[0].tpps, "stop"]
    y = {name: i for i, name in enumerate(rows)}
    invalid = False
    for s in steps:
        d = s.decision
        if d is None:
            continue
        at = s.step + 0.5
        colour = SOURCE_COLOURS.get(d.source, "black")
        if d.proposal is None:
            invalid = True
            ax.axvspan(at - 0.4, at + 0.4, color="grey", alpha=0.2, lw=0)
        if d.stopped:
            ax.plot(at, y["stop"], "s", ms=9, color=colour, zorder=4)
        for move in d.moves():
            if move.tpp in y:
                ax.plot(at, y[move.tpp], "^" if move.direction is Direction.RAISE else "v", ms=10, color=colour,
                        zorder=4)
        refused = []
        if d.proposal is not None and d.vetoes and d.source != "proposal":
            refused.append((at - 0.25, d.proposal))
        if d.retry is not None and d.source != "retry":
            refused.append((at - 0.4, d.retry))
        for x, answer in refused:
            for tpp in proposal_tpps(answer):
                if tpp in y:
                    ax.plot(x, y[tpp], "x", ms=10, mew=2.5, color="red", zorder=5)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("step (a move sits between the plans it joins)")
    _integer_steps(ax, steps, decisions=True)
    ax.grid(alpha=0.3)
    handles: list[Artist] = [Line2D([], [], ls="none", marker="^", ms=8, color="black", label="raise"),
               Line2D([], [], ls="none", marker="v", ms=8, color="black", label="lower"),
               Line2D([], [], ls="none", marker="s", ms=7, color="black", label="stop")]
    handles += [Patch(color=c, label=f"source: {k}") for k, c in SOURCE_COLOURS.items()]
    handles.append(Line2D([], [], ls="none", marker="x", ms=8, mew=2.5, color="red", label="refused answer"))
    if invalid:
        handles.append(Patch(color="grey", alpha=0.2, label="invalid answer"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)


def _plot_summary(path: Path, label: SessionLabel, outcome: Outcome, steps: Sequence[Step], dvh: _Dvh) -> None:
    plt = _pyplot()
    fig = plt.figure(figsize=(16, 9), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(1.45, 1.0), height_ratios=(1.0, 1.35))
    ax_dvh = fig.add_subplot(grid[:, 0])
    ax_score = fig.add_subplot(grid[0, 1])
    ax_moves = fig.add_subplot(grid[1, 1], sharex=ax_score)
    dvh.draw(ax_dvh)
    ax_dvh.set_title("DVH: initial plan dashed, final plan solid; protocol limits marked", fontsize=10)
    _draw_score(ax_score, steps)
    failing = ", ".join(steps[-1].failing) or "none"
    ax_score.set_title(f"score vs step (failing at the end: {failing})", fontsize=10)
    ax_score.set_xlabel("")
    _draw_moves(ax_moves, steps)
    ax_moves.set_title("who moved what", fontsize=10)
    first, last = steps[0], steps[-1]
    tally = DecisionTally.of_steps(steps)
    fig.suptitle(
        f"{label.case_id} · scenario {label.scenario} · mode {label.mode} · planner {label.planner}\n"
        f"outcome: {outcome} · score {first.score:.2f} → {last.score:.2f} of {last.max_score:g} in {last.step} steps"
        f" · {'LLM ownership' if 'llm' in label.planner else 'own decisions'} {tally.percent()}",
        fontsize=13,
    )
    _save(fig, path)


# ------------------------------------------------------------------------------------------------ trajectory
class DecisionWords(NamedTuple):
    """A decision as people read it: the cells of ``trajectory.csv``, the progress line and the summary table."""

    proposal: str
    retry: str
    action: str
    source: str
    vetoes: tuple[str, ...]
    rationale: str
    retry_rationale: str
    decision_s: str


def decision_words(d: Decision) -> DecisionWords:
    """The words of decision ``d``: each rationale is its own answer's (without a valid answer, the error); ``retry``
    is the second answer after the guard's feedback ("" without one)."""
    return DecisionWords(
        proposal="invalid answer" if d.proposal is None else d.proposal.words(),
        retry=d.retry.words() if d.retry is not None else "",
        action=d.action_words(),
        source=d.source,
        vetoes=tuple(v.reason for v in d.vetoes),
        rationale=d.proposal.rationale if d.proposal is not None else d.error,
        retry_rationale=d.retry.rationale if d.retry is not None else "",
        decision_s=f"{d.decision_s:.2f}",
    )


def trajectory_row(s: Step) -> list[str]:
    """The ``trajectory.csv`` cells of one step before its TPP values (see :data:`CSV_COLUMNS`)."""
    if s.decision is None:
        decision = [""] * 8
    else:
        w = decision_words(s.decision)
        decision = [w.proposal, w.retry, w.action, w.source, ";".join(w.vetoes), w.rationale, w.retry_rationale,
                    w.decision_s]
    return [str(s.step), f"{s.score:.4f}", f"{s.max_score:g}", ";".join(s.failing), *decision, f"{s.plan_s:.2f}"]


def _write_trajectory(csv_path: Path, json_path: Path, steps: Sequence[Step]) -> None:
    tpp_names = list(steps[0].tpps)
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_COLUMNS, *tpp_names])
        for s in steps:
            writer.writerow(trajectory_row(s) + [f"{s.tpps[n]:.6g}" for n in tpp_names])
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(list(steps)), indent=2) + b"\n")
