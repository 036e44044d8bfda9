"""The supervisor with real processes: a real broker and real agents on ipc endpoints in a short temp folder.

Every stack a test starts is taken down in teardown (a DownRequest, then SIGTERM, then SIGKILL of the supervisor
and of every process it started), and the supervisor, a child of this process, is reaped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import zmq
from support.procs import Procs, children_of, gone, reap, stop_stack, wait_until

from m2m.agents.messages import (
    CONTROL,
    DOSE_PLAN,
    EVALUATE,
    DosePlanRequest,
    DosePlanResult,
    EvaluateRequest,
    Evaluation,
    StackStatus,
    StatusRequest,
    SwapRequest,
)
from m2m.bus import protocol as P
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import UnhandledMessage
from m2m.bus.messages import Envelope, ErrorReply, decode, new_id
from m2m.cli.main import main
from m2m.physics.protocol import load_protocol
from m2m.scenarios import load_scenario
from m2m.stack.config import StackConfigError, StackError, load_stack_config
from m2m.stack.control import shutdown, stack_status, start_detached, swap
from m2m.stack.supervisor import PID_FILE_NAME

pytestmark = pytest.mark.timeout(120)

STANDARD_AGENTS = """
[[agent]]
role = "dose-engine"
instances = 2

[[agent]]
role = "evaluator"
"""

# ------------------------------------------------------------------------------------------------ helpers


def write_config(d: Path, agents: str, restart: str = "max_restarts = 3\nwindow_s = 30") -> Path:
    path = d / "stack.toml"
    path.write_text(
        f'[bus]\nendpoint = "ipc://{d}/bus"\npub_endpoint = "ipc://{d}/pub"\ntranscript_dir = "{d}/runs"\n\n'
        f"[restart]\n{restart}\nready_timeout_s = 60\nstop_timeout_s = 20\n{agents}"
    )
    return path


@dataclass
class Stack:
    dir: Path
    config: Path
    bus: BusConfig
    status: StackStatus | None = None
    supervisor_pid: int | None = None

    @property
    def run_dir(self) -> Path:
        assert self.status is not None
        return Path(self.status.transcript).parent

    def agent(self, name: str) -> int:
        assert self.status is not None
        return next(a.pid for a in self.status.agents if a.name == name)

    def refresh(self) -> StackStatus:
        status = asyncio.run(stack_status(self.bus, timeout=10.0))
        assert status is not None, "the stack did not answer"
        self.status = status
        return status

    def logs(self) -> str:
        if self.status is None:
            return ""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.run_dir.glob("*.log"))
        )


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="m2msv", dir="/tmp"))  # ipc paths must stay short
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def stack(stack_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """Two dose engines and an evaluator under a detached supervisor."""
    monkeypatch.setenv("M2M_CACHE_DIR", str(stack_dir / "cache"))  # the agents inherit it
    monkeypatch.setenv("M2M_RUNTIME_DIR", str(stack_dir / "rt"))  # the stack registry (m2m.stack.registry)
    path = write_config(stack_dir, STANDARD_AGENTS)
    st = Stack(stack_dir, path, BusConfig(endpoint=f"ipc://{stack_dir}/bus", pub_endpoint=f"ipc://{stack_dir}/pub"))
    try:
        st.status = start_detached(path)
        st.supervisor_pid = int((st.run_dir / PID_FILE_NAME).read_text())
        yield st
    finally:
        stop_stack(st.bus, st.supervisor_pid)
        print(st.logs())  # pytest shows captured teardown output only when the test failed


def criteria_limits() -> list[tuple[str, float, float]]:
    """(criterion id, limit, zero point) of each prostate-basic criterion."""
    return [(c.id, c.limit, c.zero) for c in load_protocol("prostate-basic").criteria]


# ------------------------------------------------------------------------------------------------ config
def test_missing_config_file_and_cli_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StackConfigError, match="cannot read"):
        load_stack_config(tmp_path / "none.toml")
    with pytest.raises(StackError, match=r"none\.toml: cannot read"):  # start_detached callers catch one type
        start_detached(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[agent]]\nrole = "evaluator"\ninstances = -2\n')
    assert main(["up", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "agent[0].instances" in err


def test_no_stack_answers(stack_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bus = ["--connect", f"ipc://{stack_dir}/bus", "--pub-connect", f"ipc://{stack_dir}/pub"]
    assert main(["status", *bus, "--timeout", "0.5"]) == 1
    assert "no stack answers" in capsys.readouterr().err
    assert main(["down", *bus, "--timeout", "0.5"]) == 1
    assert "no stack answers" in capsys.readouterr().err
    assert main(["swap", "evaluator", "--impl", "protocol", *bus, "--timeout", "0.5"]) == 1
    assert "no stack answers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ live stack
def test_up_detached_reports_every_agent_ready(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    status = stack.status
    assert status is not None
    assert [(a.name, a.role, a.impl) for a in status.agents] == [
        ("dose-engine-1", "dose-engine", "pencil-beam"),
        ("dose-engine-2", "dose-engine", "pencil-beam"),
        ("evaluator-1", "evaluator", "protocol"),
    ]
    assert all(a.state == "ready" and a.restarts == 0 for a in status.agents)
    assert status.endpoint == stack.bus.endpoint
    assert stack.run_dir.parent == stack.dir / "runs" and Path(status.transcript).name == "bus.m2mt"
    assert Path(status.transcript).stat().st_size > 0
    # each agent is its own OS process, started by the supervisor, with its own log; the broker is a fourth
    pids = {a.pid for a in status.agents}
    assert stack.supervisor_pid is not None
    children = children_of(stack.supervisor_pid)
    assert len(pids) == 3 and pids < children and len(children) == 4
    assert {p.name for p in stack.run_dir.glob("*.log")} >= {f"{a.name}.log" for a in status.agents} | {"broker.log"}

    bus = ["--connect", stack.bus.endpoint, "--pub-connect", stack.bus.pub_endpoint]
    assert main(["status", *bus]) == 0
    out = capsys.readouterr().out
    assert all(a.name in out for a in status.agents) and status.transcript in out

    # a second stack on the same endpoint is refused (an ipc bind would silently take the socket over): the
    # registry knows the stack there, before anything starts
    with pytest.raises(StackError, match=f"stack {status.stack_id} already runs at {stack.bus.endpoint}"):
        start_detached(stack.config)
    assert {a.pid for a in stack.refresh().agents} == pids


def test_killed_dose_engine_is_restarted_and_dose_plan_still_served(stack: Stack) -> None:
    old = stack.agent("dose-engine-1")
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        a = next(a for a in stack.refresh().agents if a.name == "dose-engine-1")
        return a.restarts == 1 and a.state == "ready"

    wait_until(restarted, what="dose-engine-1 restarted and ready")
    new = stack.agent("dose-engine-1")
    assert new != old and gone(old)
    assert stack.agent("dose-engine-2") in children_of(stack.supervisor_pid or 0)
    log = (stack.run_dir / "dose-engine-1.log").read_text()
    assert '"incarnation": 1' in log  # the restart was told its incarnation

    sc = load_scenario("prostate-basic")

    async def plan() -> DosePlanResult:
        async with BusClient("tester", stack.bus) as bus:
            request = DosePlanRequest(scenario=sc.name, case_seed=0, tpps=sc.default_tpps().as_dict())
            result: DosePlanResult = await bus.request(DOSE_PLAN, request, timeout=90, expect=DosePlanResult)
            return result

    result = asyncio.run(plan())
    assert set(result.metrics) == {label for label, _, _ in criteria_limits()}
    assert result.engine in {"dose-engine-1", "dose-engine-2"} and result.fluence.size > 0


def test_killed_broker_is_restarted_and_agents_reconnect(stack: Stack) -> None:
    sup = stack.supervisor_pid
    assert sup is not None and stack.status is not None
    agents = {a.pid for a in stack.status.agents}
    [broker] = children_of(sup) - agents
    os.kill(broker, signal.SIGKILL)
    wait_until(lambda: len(children_of(sup) - agents) == 1 and broker not in children_of(sup), what="new broker")
    # the agents were not restarted: they reconnected to the new broker and announced themselves again
    after = stack.refresh()
    assert {a.pid for a in after.agents} == agents and all(a.restarts == 0 for a in after.agents)

    async def evaluate() -> Evaluation:
        async with BusClient("tester", stack.bus) as bus:
            request = EvaluateRequest(protocol="prostate-basic", metrics={c: lim for c, lim, _ in criteria_limits()})
            evaluation: Evaluation = await bus.request(EVALUATE, request, timeout=30, expect=Evaluation)
            return evaluation

    assert asyncio.run(evaluate()).failing == []


def test_swap_evaluator_replaces_the_process(stack: Stack) -> None:
    old = stack.agent("evaluator-1")
    with pytest.raises(StackError, match="does not take option"):  # the new instance fails: the old one stays
        asyncio.run(swap(stack.bus, "evaluator", "protocol", {"bogus": "1"}))
    with pytest.raises(StackError, match="no implementation 'llm'"):
        asyncio.run(swap(stack.bus, "evaluator", "llm"))
    assert [(a.name, a.pid) for a in stack.refresh().agents if a.role == "evaluator"] == [("evaluator-1", old)]

    result = asyncio.run(swap(stack.bus, "evaluator", "protocol", []))
    assert result.stopped == ["evaluator-1"] and len(result.started) == 1
    assert result.started[0].startswith("evaluator-") and result.started[0] != "evaluator-1"
    assert gone(old)  # the old process drained and exited before the reply
    evaluators = [a for a in stack.refresh().agents if a.role == "evaluator"]
    assert [(a.name, a.state) for a in evaluators] == [(result.started[0], "ready")] and evaluators[0].pid != old

    criteria = criteria_limits()

    async def evaluate(metrics: dict[str, float]) -> Evaluation:
        async with BusClient("tester", stack.bus) as bus:
            request = EvaluateRequest(protocol="prostate-basic", metrics=metrics)
            evaluation: Evaluation = await bus.request(EVALUATE, request, timeout=20, expect=Evaluation)
            return evaluation

    at_limits = asyncio.run(evaluate({cid: limit for cid, limit, _ in criteria}))
    assert at_limits.total == pytest.approx(at_limits.max_score) and at_limits.failing == []
    at_zero = asyncio.run(evaluate({cid: zero for cid, _, zero in criteria}))
    assert at_zero.total == pytest.approx(0.0) and len(at_zero.failing) == len(criteria)


def test_down_stops_every_process(stack: Stack) -> None:
    sup = stack.supervisor_pid
    assert sup is not None and stack.status is not None
    processes = children_of(sup)  # the broker and the three agents
    assert len(processes) == 4
    result = asyncio.run(shutdown(stack.bus, timeout=60))
    assert result is not None
    assert sorted(result.stopped) == sorted(a.name for a in stack.status.agents)
    assert reap(sup, 30) == 0
    assert all(gone(p) for p in processes | {sup})
    assert asyncio.run(stack_status(stack.bus, timeout=0.5)) is None
    assert not (stack.run_dir / PID_FILE_NAME).exists()
    assert '"agent_stopped"' in (stack.run_dir / "evaluator-1.log").read_text()  # it drained, not killed


def _envelope(schema: str, version: int = 1) -> bytes:
    env = Envelope(id=new_id(), schema=schema, version=version, kind="request", route=CONTROL,
                   deadline=time.time() + 10)
    return msgspec.msgpack.encode(env)


def test_malformed_control_messages_do_not_kill_the_supervisor(stack: Stack) -> None:
    before = stack.status
    assert before is not None
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(stack.bus.endpoint)
    try:
        cases = [
            ([_envelope(StatusRequest.schema), b"\xc1 not msgpack"], "decode_error"),
            ([_envelope(SwapRequest.schema), msgspec.msgpack.encode({"role": 5, "impl": []})], "decode_error"),
            ([_envelope("who.knows"), b"\x80"], "unknown_schema"),
        ]
        for frames, code in cases:
            s.send_multipart([P.CLIENT, P.REQUEST, CONTROL.encode(), *frames])
            assert s.poll(10_000), "no reply"
            reply = s.recv_multipart()
            assert reply[:2] == [P.CLIENT, P.REPLY]
            _, err = decode(reply[3:])
            assert isinstance(err, ErrorReply) and err.code == code
    finally:
        s.close(0)
        ctx.term()

    async def wrong_type() -> None:
        async with BusClient("tester", stack.bus) as bus:
            with pytest.raises(UnhandledMessage):
                await bus.request(CONTROL, EvaluateRequest(protocol="x", metrics={}), timeout=10)

    asyncio.run(wrong_type())
    after = stack.refresh()
    assert reap(stack.supervisor_pid or 0, 0) is None  # still running
    assert [(a.name, a.pid, a.state) for a in after.agents] == [(a.name, a.pid, a.state) for a in before.agents]


def test_restart_intensity_stops_the_stack(stack_dir: Path, procs: Procs) -> None:
    path = write_config(
        stack_dir,
        '[[agent]]\nrole = "evaluator"\n\n[[agent]]\nrole = "drl-advisor"\noptions = { checkpoint = "/nonexistent" }\n',
        restart="max_restarts = 1\nwindow_s = 120",
    )
    p = procs.m2m("up", "--config", str(path), name="up")  # in the foreground: killed with its children if it hangs
    assert p.wait(timeout=100) == 1
    text = procs.log("up").read_text()
    failure = next(line for line in text.splitlines() if line.startswith("stack failed: "))
    assert "drl-advisor-1" in failure and "max_restarts 1" in failure and "FileNotFoundError" in failure
    [run_dir] = (stack_dir / "runs").iterdir()
    advisor_log = (run_dir / "drl-advisor-1.log").read_text()
    assert advisor_log.count('"event": "agent_setup_failed"') == 2 and '"incarnation": 1' in advisor_log
    assert '"agent_stopped"' in (run_dir / "evaluator-1.log").read_text()  # the healthy agent was stopped too
    assert not (run_dir / PID_FILE_NAME).exists()


def test_an_agent_exiting_with_a_usage_error_stops_the_stack_at_once(
    stack_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad option that got past the config check (a config built in code) makes the agent exit with EXIT_USAGE
    before it connects; the supervisor reports it at once instead of restarting it max_restarts times."""
    from m2m.stack.config import AgentSpec, StackConfig
    from m2m.stack.supervisor import Supervisor

    monkeypatch.setenv("M2M_RUNTIME_DIR", str(stack_dir / "rt"))
    config = StackConfig(
        agents=(AgentSpec("evaluator", "protocol"), AgentSpec("planner", "llm", options={"model": "foo"})),
        transcript_dir=stack_dir / "runs", max_restarts=3, window_s=120, ready_timeout_s=60, stop_timeout_s=20,
    )
    supervisor = Supervisor(config)
    assert asyncio.run(supervisor.run()) == 1
    failure = supervisor.failure or ""
    assert failure.startswith("planner-1 (exit code 64") and "restart cannot fix" in failure
    assert "planner/llm: option model must be embedded, openai or replay, got 'foo'" in failure  # from its log
    assert supervisor.run_dir is not None
    planner_log = (supervisor.run_dir / "planner-1.log").read_text()
    assert planner_log.count("option model must be") == 1  # it ran once: no restart
    assert '"agent_stopped"' in (supervisor.run_dir / "evaluator-1.log").read_text()
    assert list((stack_dir / "rt").iterdir()) == []  # its runtime folder (sockets, stack.json) is gone


def test_stacks_without_endpoints_get_their_own_and_one_with_taken_endpoints_is_refused(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Next to a running stack: a second stack of the default kind (no [bus] endpoints) comes up on sockets of its
    own; one asking for the running stack's endpoints is refused before it starts anything."""
    from m2m.stack import registry

    assert stack.status is not None and stack.status.stack_id
    entry = registry.find_stack(stack.status.stack_id)
    assert (entry.endpoint, entry.isolated, entry.pid) == (stack.bus.endpoint, False, stack.supervisor_pid)
    own = stack.dir / "own.toml"
    own.write_text(f'[bus]\ntranscript_dir = "{stack.dir}/own"\n\n[[agent]]\nrole = "evaluator"\n')
    second = start_detached(own)
    second_bus = BusConfig(endpoint=second.endpoint, pub_endpoint=second.pub_endpoint)
    try:
        assert second.stack_id != stack.status.stack_id and second.endpoint != stack.bus.endpoint
        assert registry.find_stack(second.stack_id).isolated
        assert second.endpoint == f"ipc://{registry.runtime_root()}/{second.stack_id}/bus"
        assert {e.id for e in registry.running_stacks()} >= {stack.status.stack_id, second.stack_id}
        with pytest.raises(StackError, match=f"stack {stack.status.stack_id} already runs at"):
            start_detached(own, endpoint=stack.bus.endpoint, pub_endpoint=stack.bus.pub_endpoint)
        # each stack answers for itself
        assert [a.role for a in stack.refresh().agents] == ["dose-engine", "dose-engine", "evaluator"]
        second_status = asyncio.run(stack_status(second_bus))
        assert second_status is not None and [a.role for a in second_status.agents] == ["evaluator"]
    finally:
        stop_stack(second_bus, int((Path(second.transcript).parent / PID_FILE_NAME).read_text()))
    assert not Path(registry.runtime_root(), second.stack_id).exists()
    assert asyncio.run(stack_status(stack.bus, timeout=5)) is not None  # the first stack still runs
