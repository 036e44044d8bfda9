"""The experiment's design: arms, the paper's published numbers, scenarios × cases × initial settings, and the runs.

An arm is a planner implementation (``m2m swap planner IMPL``) and the session mode it is asked for. Initial TPPs
are random from the published training ranges, a pure function of (scenario's ``initial_seed``, ``--seed``, case
seed, setting index), and shared by the arms of a run, so the arms are paired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m2m.agents.llm.situation import Mode
from m2m.physics.tpp import random_tpps
from m2m.scenarios import ScenarioError, load_scenario


@dataclass(frozen=True)
class Arm:
    """A planner implementation (``m2m swap planner IMPL``) and the session mode it is asked for."""

    name: str
    impl: str
    mode: Mode


ARMS: dict[str, Arm] = {
    "guided": Arm("guided", "llm", "guided"),
    "unguided": Arm("unguided", "llm", "unguided"),
    "drl": Arm("drl", "drl", "unguided"),
    "rules": Arm("rules", "rules", "unguided"),
    "knowledge": Arm("knowledge", "knowledge", "unguided"),
}


@dataclass(frozen=True)
class Goals:
    """What the guided arm must reach on a scenario (issue 20's targets for the embedded 1.5B model on 2 cores):
    a mean final score of at least ``final_mean`` (None: every session at the maximum), mean steps at most
    ``steps_mean`` (and their sd at most ``steps_sd`` when set), LLM ownership at least ``ownership`` when set."""

    steps_mean: float
    steps_sd: float | None = None
    final_mean: float | None = None
    ownership: float | None = None


@dataclass(frozen=True)
class PaperRow:
    """The published numbers of one scenario (as printed in the paper's table), its cohort layout and the goals
    of the guided arm."""

    setup: str
    cases: int
    inits: int
    initial: str
    unguided: str
    guided: str
    goals: Goals


PAPER: dict[str, PaperRow] = {
    "prostate-basic": PaperRow("7 beams, PTV + bladder + rectum, 10 cases, max 9", 10, 1, "5.8±1.7",
                               "7.9±1.0 / 18.2±4.4", "9.0±0.0 / 3.5±4.4", Goals(3.5, steps_sd=2.5, ownership=0.8)),
    "prostate-complex": PaperRow("180 beams, + 2 femoral heads, 1 case, max 15", 1, 1, "10", "15 / 12", "15 / 5",
                                 Goals(5.0)),
    "liver": PaperRow("7 beams, PTV + 2 OARs, 1 case × 10 initial TPP settings, max 4", 1, 10, "2.5±0.4",
                      "3.1±0.2 / 20.0±0.0", "3.7±0.35 / 12.8±8.3", Goals(8.0, final_mean=3.8, ownership=0.8)),
}
#: The whole default experiment's wall-time goal (s).
WALL_GOAL_S = 45 * 60.0


class ExperimentError(ValueError):
    """A bad design (unknown scenario or arm, sizes) or an output folder made with another design."""


@dataclass(frozen=True)
class Run:
    """One session of the design: ``arm`` plans case ``case_seed`` of ``scenario`` from initial setting ``init``."""

    scenario: str
    arm: str
    case_seed: int
    init: int
    initial_tpps: Mapping[str, float]

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.arm}/{self.case_seed}/{self.init}"

    @property
    def file_stem(self) -> str:
        return self.key.replace("/", "-")


@dataclass(frozen=True)
class Design:
    """What the experiment plans: scenarios × cases × initial settings × arms, with one step cap and seed."""

    scenarios: tuple[str, ...]
    arms: tuple[str, ...]
    cases: Mapping[str, int]
    inits: Mapping[str, int]
    seed: int = 0
    step_cap: int | None = None
    llm: Mapping[str, str] = field(default_factory=lambda: {"model": "embedded"})

    def to_json(self) -> dict[str, Any]:
        return {"scenarios": list(self.scenarios), "arms": list(self.arms), "cases": dict(self.cases),
                "inits": dict(self.inits), "seed": self.seed, "step_cap": self.step_cap, "llm": dict(self.llm)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Design:
        return cls(scenarios=tuple(d["scenarios"]), arms=tuple(d["arms"]), cases=dict(d["cases"]),
                   inits=dict(d["inits"]), seed=int(d["seed"]), step_cap=d["step_cap"], llm=dict(d["llm"]))

    def llm_words(self) -> str:
        """The LLM planner's client in words (the options that say which model)."""
        return ", ".join(f"{k}={v}" for k, v in self.llm.items() if k in ("model", "model_name", "base_url"))

    @property
    def is_paper_size(self) -> bool:
        """Every scenario of the paper at its published cohort size."""
        return set(self.scenarios) == set(PAPER) and all(
            self.cases[s] == PAPER[s].cases and self.inits[s] == PAPER[s].inits for s in self.scenarios
        )


def make_design(
    scenarios: Sequence[str] = tuple(PAPER),
    arms: Sequence[str] = tuple(ARMS),
    *,
    cases: int | None = None,
    inits: int | None = None,
    seed: int = 0,
    step_cap: int | None = None,
    llm: Mapping[str, str] | None = None,
) -> Design:
    """The paper's design for ``scenarios`` (``cases``/``inits`` override its cohort sizes for every scenario);
    ``llm``: the LLM planner's options (default the embedded model)."""
    unknown = [s for s in scenarios if s not in PAPER and not _loads(s)] + [a for a in arms if a not in ARMS]
    if unknown:
        raise ExperimentError(f"unknown scenario or arm {unknown}: scenarios {sorted(PAPER)} (the paper's) or any "
                              f"other packaged or registered one, arms {sorted(ARMS)}")
    if not scenarios or not arms:
        raise ExperimentError("the experiment needs at least one scenario and one arm")
    for name, value in (("cases", cases), ("inits", inits)):
        if value is not None and value < 1:
            raise ExperimentError(f"--{name} must be >= 1, got {value}")
    if step_cap is not None and step_cap < 0:
        raise ExperimentError(f"step cap must be >= 0, got {step_cap}")
    return Design(
        scenarios=tuple(dict.fromkeys(scenarios)),
        arms=tuple(dict.fromkeys(arms)),
        cases={s: cases or (PAPER[s].cases if s in PAPER else len(load_scenario(s).cohorts.paper)) for s in scenarios},
        inits={s: inits or (PAPER[s].inits if s in PAPER else 1) for s in scenarios},
        seed=seed,
        step_cap=step_cap,
        llm=dict(llm) if llm is not None else {"model": "embedded"},
    )


def _loads(scenario: str) -> bool:
    """Whether ``scenario`` names a packaged or registered scenario (one the paper has no numbers for: its default
    cohort is its whole paper cohort, one initial setting each)."""
    try:
        load_scenario(scenario)
    except ScenarioError:
        return False
    return True


def initial_tpps(scenario: str, seed: int, case_seed: int, init: int) -> dict[str, float]:
    """Random initial TPPs from the scenario's initial ranges (:attr:`Scenario.initial_ranges`), a pure function of
    its arguments."""
    sc = load_scenario(scenario)
    rng = np.random.default_rng([sc.initial_seed, seed, case_seed, init])
    return random_tpps(rng, sc.oar_names, sc.initial_ranges).as_dict()


def runs_of(design: Design) -> list[Run]:
    """Every session of ``design``, grouped by planner implementation (one swap per implementation), then by
    scenario and case, the arms of one initial setting next to each other."""
    runs: list[Run] = []
    impls = list(dict.fromkeys(ARMS[a].impl for a in design.arms))
    for impl in impls:
        for scenario in design.scenarios:
            cohort = load_scenario(scenario).cohorts.get("paper").seeds
            if design.cases[scenario] > len(cohort):
                raise ExperimentError(f"{scenario}: {design.cases[scenario]} cases asked, the paper cohort has "
                                      f"{len(cohort)}")
            for case_seed in cohort[: design.cases[scenario]]:
                for init in range(design.inits[scenario]):
                    tpps = initial_tpps(scenario, design.seed, int(case_seed), init)
                    runs.extend(Run(scenario, arm, int(case_seed), init, tpps)
                                for arm in design.arms if ARMS[arm].impl == impl)
    return runs
