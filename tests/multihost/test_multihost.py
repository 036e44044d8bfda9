"""Dose engines on other hosts, as the README has a user set them up: in one network namespace (the main machine)
``m2m up --config stack.toml`` with ``[bus]`` CURVE keys runs the broker, the evaluator and the planners; in each of
two "host" namespaces only ``m2m agent dose-engine --connect ... --curve-secret ... --curve-server ...`` runs; TCP
with CURVE between them (see :mod:`support.netns`). The same sessions (driven with the config's client keys) run
with one host's engine, then with both: every session completes with the same scores, both hosts take work, and an
engine whose key the broker was never given gets none; ``m2m status --config`` and ``m2m plan --config`` on the main
machine reach the stack and plan with the hosts' engines. The throughput of each phase is printed, not asserted
(``pytest tests/multihost -s`` shows the table; ``python -m support.netns bench`` writes it as JSON)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.netns import Lab, NamespacesUnavailable, Setup, measure, table
from support.procs import Procs

COMPLETED = {"maximum score", "step cap", "no admissible action"}
"""The outcomes of a session that ran to its end."""

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def two_hosts(request: pytest.FixtureRequest) -> Iterator[tuple[Lab, Procs]]:
    """The namespaces and the test's processes; the processes are killed, the namespaces deleted and the folder
    removed, pass or fail (the logs printed when the test failed). Skips where namespaces cannot be made."""
    the_lab = Lab(hosts=2)
    try:
        the_lab.create()
    except NamespacesUnavailable as exc:
        pytest.skip(f"network namespaces cannot be made here (needs root and iproute2 with veth and bridge): {exc}")
    d = Path(tempfile.mkdtemp(prefix="m2mmh", dir="/tmp"))
    procs = Procs(d)
    try:
        yield the_lab, procs
    finally:
        procs.close()
        left = the_lab.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(procs.dump_logs())
        shutil.rmtree(d, ignore_errors=True)
        assert not left, f"namespaces left behind: {left}"


def test_dose_engines_on_two_hosts_over_curve(two_hosts: tuple[Lab, Procs]) -> None:
    the_lab, procs = two_hosts
    report: dict[str, Any] = measure(the_lab, procs, Setup(cli=True))
    print("\n" + table(report))
    if out := os.environ.get("M2M_MULTIHOST_REPORT"):
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
    one, two = report["phases"]
    expected = len(report["seeds"]) * report["repeat"]
    for phase in (one, two):
        runs = phase["runs"]
        assert len(runs) == expected and all(r["outcome"] in COMPLETED for r in runs), runs
        solved = sum(phase["engines"].values())
        assert solved == phase["solves"] + phase["warmup_solves"], "each step's plan is solved exactly once"
        assert phase["agents"].get("engine-rogue") is None, "an unauthorised engine got onto the bus"
    # Every run of a case, on either number of hosts, has the same trajectory of scores.
    by_seed: dict[int, list[list[float]]] = {}
    for r in one["runs"] + two["runs"]:
        by_seed.setdefault(r["seed"], []).append(r["scores"])
    assert set(by_seed) == set(report["seeds"])
    for seed, trajectories in by_seed.items():
        assert all(t == pytest.approx(trajectories[0], abs=1e-9) for t in trajectories), (seed, trajectories)
    assert list(one["engines"]) == ["engine-h1"]
    assert two["engines"]["engine-h1"] > 0 and two["engines"]["engine-h2"] > 0, two["engines"]
    # The unauthorised key: no answer for a client, no work for an engine.
    assert one["rogue_probe"] in ("RequestTimeout", "BrokerUnavailable", "TimeoutError"), one["rogue_probe"]
    assert report["rogue"]["solves"] == 0
    # The CLI on the main machine: the stack's status by its config, and a session joined to it.
    status, plan = report["cli"]["status"], report["cli"]["plan"]
    assert status["exit"] == 0 and "evaluator-1" in status["output"] and "planner-1" in status["output"], status
    assert plan["exit"] == 0, plan
    assert "m2m plan: joining the running stack" in plan["output"] and "started stack" not in plan["output"], plan
    assert plan["sessions"] == 1, plan
