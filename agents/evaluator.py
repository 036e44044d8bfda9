"""The evaluator agent (``plan.evaluate``): dose metrics → points per protocol criterion, total and maximum.

The scoring itself is :func:`m2m.physics.protocol.score_values`; this agent only serves it. Protocols are
loaded once per name.
"""

from __future__ import annotations

from functools import cache

from m2m.agents.messages import EVALUATE, CriterionResult, EvaluateRequest, Evaluation
from m2m.agents.runtime import Agent
from m2m.bus.worker import Handlers, RequestContext
from m2m.physics.protocol import Protocol, ScoreReport, load_protocol, score_values


@cache
def _protocol(name: str) -> Protocol:
    return load_protocol(name)


def evaluation_message(report: ScoreReport) -> Evaluation:
    """A :class:`ScoreReport` as the bus message."""
    return Evaluation(
        protocol=report.protocol,
        criteria=[
            CriterionResult(
                label=i.criterion.label, structure=i.criterion.structure, metric=i.criterion.metric,
                unit=i.criterion.unit, value=i.value, limit=i.criterion.limit, zero=i.criterion.zero,
                points=i.points, passed=i.passed,
            )
            for i in report.items
        ],
        total=report.total,
        max_score=report.max_score,
        failing=list(report.failing),
    )


class Evaluator(Agent):
    """Scores plans against the packaged protocols."""

    def handlers(self) -> dict[str, Handlers]:
        return {EVALUATE: {EvaluateRequest: self.on_evaluate}}

    def capacity(self) -> int:
        return 8  # scoring is microseconds of arithmetic: no reason to queue

    async def on_evaluate(self, msg: EvaluateRequest, ctx: RequestContext) -> Evaluation:
        report = score_values(_protocol(msg.protocol), msg.metrics)
        return evaluation_message(report)
