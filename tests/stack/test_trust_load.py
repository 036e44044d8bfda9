"""Liveness that load cannot fool (issue 19): one stack with 4 planners runs 8 concurrent sessions while two
processes spin on the CPU (bounded: they stop by themselves, and are killed in teardown). Every session completes,
no step event is published twice, and the broker declares no live worker dead (no ``worker_gone`` for a missed
heartbeat in its log).

Real processes: a detached supervisor, its broker and agents on ipc sockets in a short temp folder.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from support.procs import reap, stop_stack

from m2m.agents.messages import SessionRequest, SessionResult, StepEvent, new_session_id
from m2m.bus.client import BusConfig
from m2m.bus.transcript import read_transcript
from m2m.scenarios import load_scenario
from m2m.session.client import run_session_request
from m2m.stack.control import shutdown, start_detached
from m2m.stack.supervisor import PID_FILE_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SESSIONS = 8
PLANNERS = 4
STEP_CAP = 5
BURNERS = 2
BURN_S = 120.0
"""How long each CPU burner spins before it stops by itself (s)."""

AGENTS = f"""
[[agent]]
role = "dose-engine"
instances = 2

[[agent]]
role = "evaluator"
instances = 2

[[agent]]
role = "planner"
impl = "rules"
instances = {PLANNERS}
"""


def _burner() -> subprocess.Popen[bytes]:
    code = f"import time\nend = time.monotonic() + {BURN_S}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def test_eight_sessions_on_four_planners_under_cpu_load(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Path(tempfile.mkdtemp(prefix="m2mld", dir="/tmp"))  # ipc paths must stay short
    monkeypatch.setenv("M2M_CACHE_DIR", str(d / "cache"))
    monkeypatch.setenv("M2M_RUNTIME_DIR", str(d / "rt"))
    config = d / "stack.toml"
    config.write_text(f'[bus]\ntranscript_dir = "{d}/runs"\n\n[restart]\nready_timeout_s = 120\n{AGENTS}')
    burners: list[subprocess.Popen[bytes]] = []
    supervisor: int | None = None
    bus: BusConfig | None = None
    try:
        status = start_detached(config)
        run_dir = Path(status.transcript).parent
        supervisor = int((run_dir / PID_FILE_NAME).read_text())
        bus = BusConfig(endpoint=status.endpoint, pub_endpoint=status.pub_endpoint)
        seeds = load_scenario("prostate-basic").cohorts.get("test").seeds
        requests = [SessionRequest(session_id=new_session_id(), scenario="prostate-basic",
                                   case_seed=int(seeds[i % len(seeds)]), mode="unguided", step_cap=STEP_CAP)
                    for i in range(SESSIONS)]
        burners = [_burner() for _ in range(BURNERS)]

        async def run_all() -> list[SessionResult | BaseException]:
            assert bus is not None
            return await asyncio.gather(*(run_session_request(bus, r, lambda s, o: None) for r in requests),
                                        return_exceptions=True)

        results = asyncio.run(run_all())
        failures = [r for r in results if not isinstance(r, SessionResult)]
        assert not failures, failures
        assert sorted(r.header.session_id for r in results if isinstance(r, SessionResult)) == sorted(
            r.session_id for r in requests)
        assert asyncio.run(shutdown(bus, timeout=120)) is not None
        assert reap(supervisor, 60) == 0

        steps: Counter[tuple[str, int]] = Counter()
        for rec in read_transcript(status.transcript).records:
            if rec.kind != "event" or not rec.route.startswith("session."):
                continue
            msg = rec.decode()
            if isinstance(msg, StepEvent):
                steps[(msg.header.session_id, msg.record.step)] += 1
        duplicates = {k: n for k, n in steps.items() if n > 1}
        assert not duplicates, duplicates
        for r in results:
            assert isinstance(r, SessionResult)
            assert {s for (sid, s) in steps if sid == r.header.session_id} == {s.step for s in r.steps}

        declared_dead = []
        for line in (run_dir / "broker.log").read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "worker_gone" and record.get("reason") == "heartbeat":
                declared_dead.append(record)
        assert not declared_dead, declared_dead
    finally:
        for p in burners:
            p.kill()
            p.wait()
        if bus is not None:
            stop_stack(bus, supervisor)
        shutil.rmtree(d, ignore_errors=True)
