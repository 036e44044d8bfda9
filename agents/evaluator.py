"""The evaluator agent (``plan.evaluate``): dose metrics → points per protocol criterion, total and maximum.

The scoring itself is :func:`m2m.physics.protocol.score_values`; this agent only serves it. Each agent loads a
protocol once per name.
"""

from __future__ import annotations

from m2m.agents.messages import EVALUATE, CriterionResult, EvaluateRequest, Evaluation
from m2m.agents.runtime import Agent
from m2m.bus.errors import BadRequest
from m2m.bus.worker import Handlers, RequestContext
from m2m.physics.protocol import Protocol, ProtocolError, ScoreReport, load_protocol, score_values
from m2m.scenarios import ScenarioError, load_scenario


def evaluation_message(report: ScoreReport) -> Evaluation:
    """A :class:`ScoreReport` as the bus message (its criteria are what a :class:`Step` records)."""
    return Evaluation(
        protocol=report.protocol,
        criteria=[
            CriterionResult(
                id=i.criterion.id, label=i.criterion.label, structure=i.criterion.structure,
                metric=i.criterion.metric, unit=i.criterion.unit, value=i.value, limit=i.criterion.limit,
                zero=i.criterion.zero, points=i.points, passed=i.passed,
            )
            for i in report.items
        ],
        total=report.total,
        max_score=report.max_score,
        failing=[i.criterion.id for i in report.items if not i.passed],
    )


class Evaluator(Agent):
    """Scores plans against the packaged protocols and those of user scenarios."""

    async def setup(self) -> None:
        self._protocols: dict[str, Protocol] = {}

    def _protocol(self, name: str, scenario: str | None) -> Protocol:
        """Protocol ``name``: a packaged one, loaded once per agent; with ``scenario``, that scenario's (loaded on each
        request: a user scenario registered again may name an edited protocol file)."""
        if scenario is not None:
            protocol = load_scenario(scenario).protocol
            if protocol.name != name:
                raise ValueError(f"scenario {scenario} scores with protocol {protocol.name!r}, not {name!r}")
            return protocol
        if name not in self._protocols:
            self._protocols[name] = load_protocol(name)
        return self._protocols[name]

    def handlers(self) -> dict[str, Handlers]:
        return {EVALUATE: {EvaluateRequest: self.on_evaluate}}

    def capacity(self) -> int:
        return 8  # scoring is microseconds of arithmetic: no reason to queue

    async def on_evaluate(self, msg: EvaluateRequest, ctx: RequestContext) -> Evaluation:
        # A protocol, scenario or metric set that cannot be scored is the requester's problem: a typed,
        # non-retryable answer and a warning (no traceback: those are for bugs); the evaluator keeps serving.
        try:
            report = score_values(self._protocol(msg.protocol, msg.scenario), msg.metrics)
        except (ScenarioError, ProtocolError, FileNotFoundError, KeyError, ValueError) as exc:
            self.log.warning("bad_evaluate_request", protocol=msg.protocol, scenario=msg.scenario, error=str(exc))
            raise BadRequest(f"{type(exc).__name__}: {exc}") from None
        return evaluation_message(report)
