"""A poisoned retained message breaks no follower (issue 19, finding 3): before, one retained value whose array
dtype numpy cannot parse (``","`` raises ``SyntaxError``) killed the planner's knowledge follower and the supervisor's
status follower after any restart — guided sessions then failed with "is a drl-advisor running?", a restarted agent
showed "starting" forever and ``m2m transcript show`` crashed on the file.

Real processes: a detached supervisor with a dose engine, an evaluator, the DRL advisor and the knowledge planner;
the poison is published by a raw DEALER as a hostile peer would.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from support.procs import children_of, gone, kill_tree, stop_stack, wait_until
from support.stacks import stack_toml

from m2m.agents.messages import DosePlanRequest, SessionRequest, knowledge_topic, new_session_id, status_topic
from m2m.bus import protocol as P
from m2m.bus.client import BusConfig
from m2m.bus.messages import ArraySpec, Envelope, decode_envelope, encode, new_id
from m2m.cli.main import main
from m2m.session.client import run_session_request
from m2m.stack.control import stack_status, start_detached
from m2m.stack.supervisor import PID_FILE_NAME

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

def poisoned(topic: str) -> list[bytes]:
    """A PUBLISH with RETAIN of a message whose one array frame declares the dtype ``","``."""
    env = Envelope(id=new_id(), schema="", version=0, sender="hostile", kind="event", route=topic, ts=time.time())
    frames = [bytes(f) for f in encode(DosePlanRequest(scenario="x", case_seed=0, tpps={},
                                                       warm_start=np.zeros(1)), env)]
    env = decode_envelope(frames[0])
    env.arrays = [ArraySpec(",", (1,))]
    frames[0] = msgspec.msgpack.encode(env)
    return [P.CLIENT, P.PUBLISH, topic.encode(), bytes([P.RETAIN]), *frames]


def test_poisoned_retained_values_break_no_follower(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    d = Path(tempfile.mkdtemp(prefix="m2mpz", dir="/tmp"))
    monkeypatch.setenv("M2M_RUNTIME_DIR", str(d / "rt"))
    config = d / "stack.toml"
    config.write_text(stack_toml(d, planner="knowledge", ready_timeout_s=120))  # with the DRL advisor
    status = start_detached(config)
    bus = BusConfig(endpoint=status.endpoint, pub_endpoint=status.pub_endpoint)
    supervisor = int((Path(status.transcript).parent / PID_FILE_NAME).read_text())
    everything = children_of(supervisor)
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.linger = 5000  # linger 0 could drop the poison before it left (CI once killed the planner before it landed)
        s.connect(bus.endpoint)
        topics = (status_topic("zz-poison"), knowledge_topic("zz-poison"))
        for topic in topics:
            s.send_multipart(poisoned(topic))
        transcript = Path(status.transcript)
        wait_until(lambda: all(t.encode() in transcript.read_bytes() for t in topics),
                   "the broker has both poisoned values", timeout=30)
        s.close()

        # a restarted planner reads the knowledge snapshot (poison included); the supervisor sees the poisoned status
        # value live and the restarted planner's announcements after it
        planner = next(a for a in status.agents if a.role == "planner")
        killed_at = time.time()
        os.kill(planner.pid, signal.SIGKILL)

        def planner_back() -> bool:
            now = asyncio.run(stack_status(bus, timeout=5.0))
            assert now is not None
            a = next(a for a in now.agents if a.role == "planner")
            return a.pid != planner.pid and a.state == "ready"

        wait_until(planner_back, "the restarted planner is shown ready", timeout=120)
        req = SessionRequest(session_id=new_session_id(), scenario="prostate-basic", case_seed=0, mode="guided",
                             step_cap=3)
        result = asyncio.run(run_session_request(bus, req, lambda step, outcome: None))
        assert len(result.steps) >= 1  # the knowledge planner found the knowledge
        planner_log = next((Path(status.transcript).parent).glob("planner-1.log")).read_text()
        bad = [json.loads(line) for line in planner_log.splitlines() if '"bad_delivery"' in line]
        # logged once per process, at warning: the restarted planner met the poison in the snapshot; the killed one
        # may have met it live
        by_process = collections.Counter(b["bus_incarnation"] for b in bad)
        assert max(by_process.values()) == 1, bad
        after_kill = [b for b in bad if datetime.fromisoformat(b["timestamp"]).timestamp() > killed_at]
        assert len(after_kill) == 1, bad  # the restarted planner met it
        assert {b["level"] for b in bad} == {"warning"}
        capsys.readouterr()
        assert main(["transcript", "show", status.transcript]) == 0  # the poison is in it: shown, not a crash
        assert "Traceback" not in capsys.readouterr().err
    finally:
        ctx.destroy(linger=0)
        stop_stack(bus, supervisor)
        for pid in everything:
            if not gone(pid):
                kill_tree(pid)
        shutil.rmtree(d, ignore_errors=True)
