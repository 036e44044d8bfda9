"""The trained policy as an advisor: "what would the DRL do here?" for any scenario, through the role mapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2m.agents.drl.dqn import QNetwork, greedy_policy, load_checkpoint
from m2m.agents.drl.env import PlanningEnv, scenario_env
from m2m.scenarios import load_scenario
from m2m.scenarios.roles import to_structure_name

#: Boltzmann temperature (reward units: smoothed-score points) turning Q-values into action probabilities.
DEFAULT_TEMPERATURE = 0.1


@dataclass(frozen=True)
class Advice:
    """One candidate action: ``tpp`` in role terms (e.g. ``"t_oar1"``), ``label`` in the scenario's structure names
    (e.g. ``"t_bladder"``), ``direction`` +1 raise / −1 lower, its Q-value (expected discounted smoothed-score gain)
    and its Boltzmann ``probability``."""

    action: int
    tpp: str
    label: str
    direction: int
    q_value: float
    probability: float


class Advisor:
    """A loaded checkpoint: greedy actions for rollouts and ranked advice for planners."""

    def __init__(self, q_net: QNetwork, meta: Mapping[str, Any]) -> None:
        self.q_net = q_net
        self.meta = dict(meta)
        self.tpp_roles: list[str] = list(meta["tpp_roles"])
        self.controlled_roles: list[str] = list(meta["controlled_roles"])

    @classmethod
    def from_checkpoint(cls, path: Path) -> Advisor:
        q_net, meta = load_checkpoint(path)
        return cls(q_net, meta)

    def q_values(self, observation: np.ndarray) -> np.ndarray:
        """Q-value per action (float64) for one observation."""
        with torch.no_grad():
            q = self.q_net(torch.as_tensor(observation, dtype=torch.float32)[None])[0]
        return q.double().numpy()

    def act(self, observation: np.ndarray, mask: np.ndarray | None = None) -> int:
        """The greedy action, among the actions ``mask`` allows (all when None)."""
        q = self.q_values(observation)
        if mask is not None:
            q = np.where(mask, q, -np.inf)
        return int(np.argmax(q))

    def lookahead_policy(self, env: PlanningEnv, k: int) -> Callable[[np.ndarray], int]:
        """A policy for rollouts in ``env``, over the actions that change a TPP (:meth:`PlanningEnv.action_masks`):
        preview the policy's ``k`` best (``k`` optimisations) and take the one whose plan gains most smoothed score
        (ties: higher Q). ``k = 1`` is the masked greedy policy; the step that follows reuses the preview, so a step
        costs ``k`` optimisations instead of one."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k == 1:
            return greedy_policy(self.q_net, env)  # the rule training validates with

        def act(observation: np.ndarray) -> int:
            mask = env.action_masks()
            q = np.where(mask, self.q_values(observation), -np.inf)
            candidates = [int(a) for a in np.argsort(-q)[: min(k, int(mask.sum()))]]
            return max(candidates, key=lambda a: (env.preview(a).reward, q[a]))

        return act

    def advise(
        self,
        observation: np.ndarray,
        k: int = 3,
        labels: Mapping[str, str] | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        mask: np.ndarray | None = None,
    ) -> list[Advice]:
        """The ``k`` best actions at ``observation``, best first, with softmax(Q/``temperature``) probabilities.

        ``labels`` (``{role: structure}``, e.g. from :meth:`roles_for`) names the TPPs in a scenario's terms;
        ``mask`` (e.g. :meth:`PlanningEnv.action_masks`) excludes actions, which then get probability 0.
        """
        q = self.q_values(observation)
        if mask is not None:
            q = np.where(mask, q, -np.inf)
        z = (q - q.max()) / temperature
        p = np.exp(z) / np.exp(z).sum()
        out = []
        for a in [a for a in np.argsort(-q) if np.isfinite(q[a])][:k]:
            tpp = self.tpp_roles[a // 2]
            label = to_structure_name(tpp, labels) if labels is not None else tpp
            out.append(Advice(int(a), tpp, label, 1 if a % 2 == 0 else -1, float(q[a]), float(p[a])))
        return out

    def roles_for(self, scenario: str) -> dict[str, str]:
        """The role map (``{role: structure}``) packaged scenario ``scenario`` declares (:attr:`Scenario.roles`; it
        loads the scenario: a caller holding the :class:`~m2m.scenarios.Scenario` reads its ``roles``)."""
        return dict(load_scenario(scenario).roles)

    def cohort_env(self, scenario: str, cohort: str, n_cases: int) -> tuple[PlanningEnv, list[int]]:
        """An env on the first ``n_cases`` seeds of ``cohort`` with the scenario's fixed random starts, the policy
        controlling its roles' structures (other OARs keep their initial TPPs); and those seeds."""
        sc = load_scenario(scenario)
        roles = sc.roles
        seeds = list(sc.cohorts.get(cohort).seeds[:n_cases])
        oars = [roles[r] for r in self.controlled_roles if r != "ptv"]
        fmo_iterations = int(self.meta["config"]["fmo_max_iterations"])
        env = scenario_env(sc, seeds, oars, fixed_initial_tpps=True, fmo_max_iterations=fmo_iterations, capacity=4)
        if env.observation_space.shape != (self.meta["n_obs"],):
            raise ValueError(f"{scenario}: observation shape {env.observation_space.shape} != the policy's")
        return env, seeds
