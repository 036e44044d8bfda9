"""The DRL advisor agent: loads the shipped checkpoint and knowledge, publishes the knowledge on
``knowledge.tpp.<site>`` (retained: a planner that subscribes later gets it at once) and serves ``drl.advise``
(the policy's best admissible actions, with probabilities, for the state a dose engine reported).

Options: ``checkpoint=PATH`` and ``knowledge=PATH`` (default: the package assets).
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from m2m.agents.drl import DEFAULT_CHECKPOINT, DEFAULT_KNOWLEDGE
from m2m.agents.drl.env import action_mask, observation_vector
from m2m.agents.drl.knowledge import decode_knowledge
from m2m.agents.messages import ADVISE, Advice, AdvisedAction, AdviseRequest, KnowledgeMessage, knowledge_topic
from m2m.agents.runtime import Agent
from m2m.bus.worker import Handlers, RequestContext
from m2m.physics.dvh import dvh_bins_gy
from m2m.physics.tpp import Direction, Move, TppSet
from m2m.scenarios import Scenario, load_scenario
from m2m.scenarios.cases import file_sha256
from m2m.scenarios.roles import to_structure_name

if TYPE_CHECKING:
    from m2m.agents.drl.advisor import Advisor


class DrlAdvisorAgent(Agent):
    """The trained DQN as an agent on the bus."""

    known_options: ClassVar[frozenset[str]] = frozenset({"checkpoint", "knowledge"})

    async def setup(self) -> None:
        self._scenarios: dict[str, Scenario] = {}
        checkpoint = Path(self.option("checkpoint", str(DEFAULT_CHECKPOINT)))
        knowledge_path = Path(self.option("knowledge", str(DEFAULT_KNOWLEDGE)))
        for path, command in ((checkpoint, "m2m drl train"), (knowledge_path, "m2m drl knowledge")):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: produce it with `{command}` (see the README)")
        # torch: imported here, so that checking a stack config is cheap, and in a thread, so that the seconds it
        # takes do not stall the event loop (its watchdog beats; see m2m.agents.runtime.Watchdog)
        await asyncio.to_thread(importlib.import_module, "m2m.agents.drl.advisor")
        from m2m.agents.drl.advisor import Advisor

        self.advisor: Advisor = await asyncio.to_thread(Advisor.from_checkpoint, checkpoint)
        self.sha256 = file_sha256(checkpoint)
        text = knowledge_path.read_text()
        knowledge = decode_knowledge(text, str(knowledge_path))
        if knowledge.provenance.checkpoint_sha256 != self.sha256:
            self.log.warning("knowledge_from_another_checkpoint", knowledge=knowledge.provenance.checkpoint_sha256[:12])
        scenario = knowledge.provenance.scenario
        site = self._scenario(scenario).site
        await self.bus.publish(
            knowledge_topic(site),
            KnowledgeMessage(site=site, scenario=scenario, checkpoint_sha256=self.sha256, knowledge_json=text),
            retain=True,
        )
        self.log.info("knowledge_published", topic=knowledge_topic(site), checkpoint=self.sha256[:12])

    def _scenario(self, name: str) -> Scenario:
        """Scenario ``name``, parsed once per agent."""
        if name not in self._scenarios:
            self._scenarios[name] = load_scenario(name)
        return self._scenarios[name]

    def handlers(self) -> dict[str, Handlers]:
        return {ADVISE: {AdviseRequest: self.on_advise}}

    def capacity(self) -> int:
        return 4  # one small forward pass per request

    async def on_advise(self, msg: AdviseRequest, ctx: RequestContext) -> Advice:
        """The policy's best actions for the reported state. A scenario with fewer OARs than the policy's roles (TG-119:
        one) shows the policy each missing role as an OAR that receives no dose (cumulative DVH 1 at 0 Gy, 0 above;
        Dmax 0) with default TPPs, and never advises moving it: a structure without dose asks nothing of the plan."""
        sc = self._scenario(msg.scenario)
        absent = {r: f"absent_{r}" for r in self.advisor.controlled_roles if r not in sc.roles}
        roles = {**sc.roles, **absent}
        controlled = [roles[r] for r in self.advisor.controlled_roles]
        oars = (*sc.oar_names, *absent.values())
        tpps = TppSet.from_dict({**TppSet.default(oars).as_dict(), **msg.tpps}, oars)
        bins = dvh_bins_gy(sc.rx_gy)
        n = bins.size
        if msg.dvh_bins_gy.shape[0] < n or not np.allclose(msg.dvh_bins_gy[:n], bins):
            raise ValueError(f"DVH bins must start with the policy's {n} bins from 0 to {bins[-1]:.2f} Gy")
        by_name = {s.name: s for s in msg.structures}
        missing = [s for s in controlled if s not in by_name and s not in absent.values()]
        if missing:
            raise ValueError(f"the advice needs the DVH of {missing}")
        no_dose = np.zeros(n)
        no_dose[0] = 1.0
        obs = observation_vector(
            [np.asarray(by_name[s].dvh_pct[:n], dtype=np.float64) / 100.0 if s in by_name else no_dose
             for s in controlled],
            [by_name[s].dmax_gy if s in by_name else 0.0 for s in controlled], tpps, controlled, sc.rx_gy,
        )
        names = [to_structure_name(r, roles) for r in self.advisor.tpp_roles]
        present = [name.partition("_")[2] not in absent.values() for name in names]
        mask = action_mask(tpps, names) & np.repeat(present, 2)
        advice = self.advisor.advise(obs, max(1, msg.k), labels=roles, mask=mask)
        return Advice(
            actions=[AdvisedAction(move=Move(a.label, Direction(a.direction)), probability=a.probability, q=a.q_value)
                     for a in advice],
            checkpoint_sha256=self.sha256,
        )
