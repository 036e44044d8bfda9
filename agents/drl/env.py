"""The planning environment: one episode plans one case by nudging TPPs, as the virtual treatment planners do.

State: the cumulative DVH of each controlled structure (PTV, then the OARs in role order, see
:mod:`m2m.scenarios.roles`) sampled on the policy's dose bins (:func:`m2m.physics.dvh.dvh_bins_gy`), each
structure's maximum dose relative to Rx, and its TPPs in :data:`m2m.physics.tpp.PARAMS` order (:func:`tpp_feature`:
linear ones such as ``t`` and ``v`` as they are, log-scale ones such as ``lambda`` as
``log10(value)/`` :data:`LOG_FEATURE_DECADES`, clipped to [-1, 1]). Dose is relative to the prescription, so the
layout is site-agnostic.

Actions: ``2·k`` for ``k`` controlled TPPs; action ``2i`` raises TPP ``i`` by its published factor and ``2i + 1``
lowers it (:func:`m2m.physics.tpp.step`, clamped to the valid range). OARs outside the controlled set (a scenario
with more OARs than the policy was trained on) keep their initial TPPs.

Each step re-optimises the plan warm-started from the previous fluence and scores it with the scenario protocol.
Reward is the change in :func:`smoothed_score`, which equals the protocol score while every criterion is between
its limit and its zero point and keeps decreasing beyond the zero point, as ``−ln(1 + excess)`` with the excess in
widths ``|zero − limit|``, so moving a badly failing criterion towards its limit is rewarded before it earns points
(random starting TPPs can put the PTV hot spot far past its zero point) while the reward stays bounded in practice.
The episode terminates when the score reaches the protocol maximum and is truncated after ``step_cap`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from m2m.physics.dvh import N_BINS, cumulative_dvh, dvh_bins_gy
from m2m.physics.optimizer import PlanResult, optimize
from m2m.physics.protocol import SCORE_TOLERANCE, Protocol, ScoreReport, score
from m2m.physics.tpp import PARAMETERS, PARAMS, PTV, ROLES, TRAINING_RANGES, DrawRanges, TppSet, random_tpps, step
from m2m.scenarios import Scenario
from m2m.scenarios.cases import CaseBank, PlanningCase, scenario_bank

#: Decades of a log-scale TPP (:attr:`m2m.physics.tpp.ParameterSpec.log_scale`) mapped onto [-1, 1] by
#: :func:`tpp_feature`.
LOG_FEATURE_DECADES = 5.0
MAX_DOSE_CAP = 3.0


def smoothed_points(linear: float) -> float:
    """One criterion's smoothed points from its linear points ``(zero − value)/(zero − limit)``: capped at 1, equal
    to the protocol points down to the zero point, ``−ln(1 − linear)`` beyond it (continuous, slope 1 at 0)."""
    return min(linear, 1.0) if linear >= 0.0 else -math.log1p(-linear)


def smoothed_score(report: ScoreReport) -> float:
    """Sum of :func:`smoothed_points` over criteria: the protocol score without its flat region past zero."""
    return float(
        sum(
            smoothed_points((i.criterion.zero - i.value) / (i.criterion.zero - i.criterion.limit))
            for i in report.items
        )
    )


def action_mask(tpps: TppSet, tpp_names: Sequence[str]) -> np.ndarray:
    """For actions ``2i`` (raise ``tpp_names[i]``) and ``2i + 1`` (lower it): whether the step changes the TPPs
    (False: the TPP sits at the bound it would move towards)."""
    now = tpps.to_vector()
    return np.array([not np.array_equal(step(tpps, name, d).to_vector(), now) for name in tpp_names for d in (1, -1)])


def tpp_feature(param: str, value: float) -> float:
    """The observation feature of one TPP: ``value`` as it is, or for a log-scale parameter
    ``log10(value) / LOG_FEATURE_DECADES`` clipped to [-1, 1]."""
    if PARAMETERS[param].log_scale:
        return float(np.clip(math.log10(value) / LOG_FEATURE_DECADES, -1.0, 1.0))
    return value


def tpp_feature_bounds(param: str) -> tuple[float, float]:
    """Bounds of :func:`tpp_feature` for ``param``: [-1, 1] on a log scale, else the span of its valid ranges over
    the PTV and OAR roles."""
    spec = PARAMETERS[param]
    if spec.log_scale:
        return -1.0, 1.0
    return min(spec.of(r).valid.low for r in ROLES), max(spec.of(r).valid.high for r in ROLES)


def observation_bounds(n_controlled: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds (float32) of the observation for ``n_controlled`` structures."""
    n = n_controlled
    feature_low, feature_high = zip(*(tpp_feature_bounds(p) for p in PARAMS), strict=True)
    low = np.concatenate([np.zeros(n * N_BINS), np.zeros(n), np.tile(feature_low, n)])
    high = np.concatenate([np.ones(n * N_BINS), np.full(n, MAX_DOSE_CAP), np.tile(feature_high, n)])
    return low.astype(np.float32), high.astype(np.float32)


def observation_vector(
    dvh_fraction: Sequence[np.ndarray],
    dmax_gy: Sequence[float],
    tpps: TppSet,
    controlled: Sequence[str],
    rx_gy: float,
) -> np.ndarray:
    """The observation from each controlled structure's cumulative DVH (volume fraction 0..1 on
    :func:`dvh_bins_gy`) and maximum dose (Gy), and the TPPs — the same vector whether the DVHs come from a plan
    in this process or from a dose engine on the bus."""
    dmax: list[float] = []
    tpp_features: list[float] = []
    for s, d in zip(controlled, dmax_gy, strict=True):
        dmax.append(min(float(d) / rx_gy, MAX_DOSE_CAP))
        st = tpps.of(s)
        tpp_features.extend(tpp_feature(p, st.get(p)) for p in PARAMS)
    obs = np.concatenate([np.concatenate([np.asarray(h, dtype=np.float64) for h in dvh_fraction]), dmax,
                          tpp_features]).astype(np.float32)
    low, high = observation_bounds(len(controlled))
    return np.clip(obs, low, high)


@dataclass(frozen=True, eq=False)
class Transition:
    """The outcome of one action from a state, before or after committing to it."""

    observation: np.ndarray
    reward: float
    terminated: bool
    plan: PlanResult
    report: ScoreReport
    tpps: TppSet


class PlanningEnv(gym.Env[np.ndarray, np.int64]):
    """A standard gymnasium environment over the TPP-driven optimizer; see the module docstring.

    ``controlled`` lists the structures whose TPPs the agent moves, PTV first then OARs in role order; every
    structure in ``tpp_structures`` carries TPPs in the optimizer. ``initial_tpps(seed)`` fixes a case's starting
    TPPs (evaluation); without it they are drawn from ``initial_ranges`` (default the published training ranges; a
    scenario's env passes :attr:`Scenario.initial_ranges`) with the env's generator.
    ``fmo_max_iterations`` caps L-BFGS-B iterations per re-optimisation.

    ``reset(options={"case_seed": s, "tpps": TppSet})`` plans a chosen case from chosen TPPs.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 - gymnasium's class attribute

    def __init__(
        self,
        cases: CaseBank,
        protocol: Protocol,
        rx_gy: float,
        tpp_structures: Sequence[str],
        controlled: Sequence[str],
        step_cap: int = 20,
        initial_tpps: Callable[[int], TppSet] | None = None,
        fmo_max_iterations: int = 300,
        initial_ranges: DrawRanges = TRAINING_RANGES,
    ) -> None:
        if next(iter(tpp_structures)) != PTV or next(iter(controlled)) != PTV:
            raise ValueError("tpp_structures and controlled must start with 'ptv'")
        missing = set(controlled) - set(tpp_structures)
        if missing:
            raise ValueError(f"controlled structures {sorted(missing)} carry no TPPs")
        self.cases = cases
        self.protocol = protocol
        self.rx_gy = float(rx_gy)
        self.oar_names = tuple(tpp_structures)[1:]
        self.controlled = tuple(controlled)
        self.step_cap = step_cap
        self.initial_tpps = initial_tpps
        self.initial_ranges = initial_ranges
        self.fmo_max_iterations = fmo_max_iterations
        self.tpp_names = tuple(f"{p}_{s}" for s in self.controlled for p in PARAMS)
        self.action_space: spaces.Discrete = spaces.Discrete(2 * len(self.tpp_names))
        low, high = observation_bounds(len(self.controlled))
        self.observation_space: spaces.Box = spaces.Box(low, high, dtype=np.float32)
        self._bins_gy = dvh_bins_gy(self.rx_gy)
        self._case: PlanningCase | None = None
        self._current: Transition | None = None
        self._previews: dict[int, Transition] = {}
        self._steps = 0

    def action_masks(self) -> np.ndarray:
        """Which actions change the TPPs from the current state (False: the TPP sits at the bound it would move
        towards, so the action is a no-op). A deterministic policy that picks a no-op repeats it to the step cap."""
        return action_mask(self.tpps, self.tpp_names)

    def action_meaning(self, action: int) -> tuple[str, int]:
        """``(tpp name, direction)`` of ``action``: direction +1 raises the TPP, −1 lowers it."""
        return self.tpp_names[action // 2], 1 if action % 2 == 0 else -1

    @property
    def max_score(self) -> float:
        return self.protocol.max_score

    @property
    def tpps(self) -> TppSet:
        """The current TPPs."""
        return self._state().tpps

    @property
    def plan(self) -> PlanResult:
        """The current optimised plan (dose per structure in Gy, fluence)."""
        return self._state().plan

    @property
    def report(self) -> ScoreReport:
        """The current plan's score report."""
        return self._state().report

    @property
    def case(self) -> PlanningCase:
        if self._case is None:
            raise RuntimeError("call reset() first")
        return self._case

    @property
    def steps_taken(self) -> int:
        return self._steps

    def _state(self) -> Transition:
        if self._current is None:
            raise RuntimeError("call reset() first")
        return self._current

    def observe(self, plan: PlanResult, tpps: TppSet) -> np.ndarray:
        """The observation of ``plan`` made with ``tpps``; see the module docstring for the layout."""
        dvhs = [cumulative_dvh(plan.dose[s], self._bins_gy) for s in self.controlled]
        dmax = [float(plan.dose[s].max()) for s in self.controlled]
        return observation_vector(dvhs, dmax, tpps, self.controlled, self.rx_gy)

    def _evaluate(self, tpps: TppSet, warm_start: np.ndarray | None, previous: float | None) -> Transition:
        case = self.case
        plan = optimize(
            case.dij,
            tpps,
            self.rx_gy,
            warm_start=warm_start,
            max_iterations=self.fmo_max_iterations,
            dose_structures=self.protocol.structures,
        )
        report = score(self.protocol, plan, case.dij.voxel_volume_cc, self.rx_gy)
        smooth = smoothed_score(report)
        reward = 0.0 if previous is None else smooth - previous
        terminated = report.total >= self.max_score - SCORE_TOLERANCE
        return Transition(self.observe(plan, tpps), reward, terminated, plan, report, tpps)

    def _info(self, state: Transition) -> dict[str, Any]:
        return {
            "case_id": self.case.case_id,
            "score": state.report.total,
            "smoothed_score": smoothed_score(state.report),
            "max_score": self.max_score,
            "failing": state.report.failing,
            "tpps": state.tpps.as_dict(),
            "steps": self._steps,
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = options or {}
        case_seed = int(options.get("case_seed", self.np_random.choice(self.cases.seeds)))
        self._case = self.cases.get(case_seed)
        if "tpps" in options:
            tpps = options["tpps"]
        elif self.initial_tpps is not None:
            tpps = self.initial_tpps(case_seed)
        else:
            tpps = random_tpps(self.np_random, self.oar_names, self.initial_ranges)
        self._steps = 0
        self._previews = {}
        self._current = self._evaluate(tpps, None, None)
        return self._current.observation, self._info(self._current)

    def preview(self, action: int) -> Transition:
        """What ``action`` would do from the current state, without taking it (the result is reused by
        :meth:`step` for the same action, so a lookahead costs no extra optimisation)."""
        action = int(action)
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action}; expected 0..{self.action_space.n - 1}")
        if action not in self._previews:
            state = self._state()
            name, direction = self.action_meaning(action)
            tpps = step(state.tpps, name, direction)
            self._previews[action] = self._evaluate(tpps, state.plan.fluence, smoothed_score(state.report))
        return self._previews[action]

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict]:
        outcome = self.preview(int(action))
        self._current = outcome
        self._previews = {}
        self._steps += 1
        truncated = not outcome.terminated and self._steps >= self.step_cap
        info = self._info(outcome)
        info["action"] = self.action_meaning(int(action))
        return outcome.observation, outcome.reward, outcome.terminated, truncated, info


def scenario_env(
    scenario: Scenario,
    seeds: Sequence[int],
    controlled_oars: Sequence[str],
    *,
    fixed_initial_tpps: bool = False,
    fmo_max_iterations: int = 300,
    capacity: int = 48,
) -> PlanningEnv:
    """An environment on phantoms ``seeds`` of ``scenario`` controlling the PTV and ``controlled_oars``.

    With ``fixed_initial_tpps`` each case starts from the scenario's own random TPPs for that case
    (:meth:`Scenario.random_tpps`, a pure function of the case seed), so evaluations are reproducible.
    """
    return PlanningEnv(
        scenario_bank(scenario, seeds, capacity),
        scenario.protocol,
        scenario.rx_gy,
        scenario.tpp_structures,
        (PTV, *controlled_oars),
        step_cap=scenario.step_cap,
        initial_tpps=scenario.random_tpps if fixed_initial_tpps else None,
        fmo_max_iterations=fmo_max_iterations,
        initial_ranges=scenario.initial_ranges,
    )
