"""The chaos suite's short form: a real stack under kills, forged replies and requests and fuzz loses, changes
and duplicates no step (the long form is ``m2m chaos --long``)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from m2m.experiment.chaos import SHORT, ChaosReport, run_chaos


@pytest.mark.chaos
@pytest.mark.slow
def test_chaos_short_form_loses_changes_and_duplicates_no_step(tmp_path) -> None:
    report: ChaosReport = asyncio.run(run_chaos(SHORT, tmp_path / "chaos", progress=print))
    print(report.as_dict())
    assert report.reference_steps >= SHORT.sessions  # the reference planned something
    assert sum(report.killed.values()) >= 2, report.as_dict()  # the chaos happened
    assert report.attacks["forge-reply"] + report.attacks["forge-request"] >= 1, report.as_dict()
    assert report.lost_steps == 0, report.as_dict()
    assert report.changed_steps == 0, report.as_dict()
    assert report.duplicated_solves == 0, report.as_dict()
    assert report.duplicated_events == 0, report.as_dict()


def test_duplicate_counting_sees_a_solve_that_ran_twice(tmp_path) -> None:
    """The duplicate counter is not blind: two different replies for one key count as one duplicate."""
    from m2m.agents.messages import DOSE_PLAN, Evaluation
    from m2m.bus.messages import Envelope, encode, new_id
    from m2m.bus.transcript import TranscriptWriter
    from m2m.experiment.chaos import count_duplicates

    path = tmp_path / "bus.m2mt"
    w = TranscriptWriter(path)
    for _ in range(2):
        env = Envelope(id=new_id(), schema="", version=0, kind="reply", route=DOSE_PLAN, idem="s1:1:dose",
                       session="s1")
        frames = [bytes(f) for f in encode(Evaluation(protocol="p", criteria=[], total=1, max_score=9,
                                                      failing=[]), env)]
        w.append(t=0.0, direction="in", kind="reply", route=DOSE_PLAN, peer="aa", session="s1", frames=frames)
    w.close()
    assert count_duplicates(path, {"s1"}) == (1, 0)
    assert count_duplicates(path, {"other"}) == (0, 0)
    assert dataclasses.replace(SHORT, kills=1).kills == 1
