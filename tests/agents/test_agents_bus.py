"""The four agents as real processes on a real broker: sessions in both modes, a dose engine killed mid-session,
a planner swapped mid-session, replay of a recorded session, malformed messages to every agent."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from m2m.agents.dose_engine import tpps_from_dict
from m2m.agents.messages import (
    ADVISE,
    DOSE_PLAN,
    EVALUATE,
    SESSION,
    Advice,
    AdviseRequest,
    DosePlanRequest,
    DosePlanResult,
    EvaluateRequest,
    Evaluation,
    SessionRequest,
    StatusRequest,
    StepEvent,
    new_session_id,
)
from m2m.agents.runtime import EXIT_FATAL, EXIT_USAGE
from m2m.agents.session_client import recorded_sessions, replay, run_session_request
from m2m.bus.client import BusClient
from m2m.bus.errors import RemoteError, UnhandledMessage
from m2m.physics.protocol import load_protocol
from m2m.physics.tpp import step as tpp_step
from m2m.scenarios import load_scenario

sys.path.insert(0, str(Path(__file__).parent))
import itertools

from stackhelpers import AgentProcs

pytestmark = pytest.mark.slow

SCENARIO = "prostate-basic"
SEEDS = load_scenario(SCENARIO).cohorts.get("test").seeds
OARS = load_scenario(SCENARIO).oar_names


def _procs() -> AgentProcs:
    return AgentProcs(Path(tempfile.mkdtemp(prefix="m2mag", dir="/tmp")))


def _teardown(p: AgentProcs, request: pytest.FixtureRequest) -> None:
    p.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(p.dump_logs())
    shutil.rmtree(p.dir, ignore_errors=True)


def _start_services(p: AgentProcs) -> None:
    p.broker()
    p.agent("dose-engine", "dose-engine-1")
    p.agent("dose-engine", "dose-engine-2")
    p.agent("evaluator", "evaluator-1")
    p.agent("drl-advisor", "drl-advisor-1")
    p.wait_ready("dose-engine-1", "dose-engine-2", "evaluator-1", "drl-advisor-1")


def _stack(request: pytest.FixtureRequest) -> Iterator[AgentProcs]:
    p = _procs()
    try:
        _start_services(p)
        yield p
    finally:
        _teardown(p, request)


# Shared by the tests that only add planners; tests that kill or swap agents get a stack of their own.
services = pytest.fixture(scope="module", name="services")(_stack)
own_stack = pytest.fixture(name="own_stack")(_stack)


def _answers(tmp: Path, decisions: list[dict[str, str]]) -> Path:
    path = tmp / "answers.json"
    path.write_text(json.dumps(decisions))
    return path


def _session(p: AgentProcs, mode: str, seed: int, cap: int, on_step=lambda e: None):  # type: ignore[no-untyped-def]
    req = SessionRequest(session_id=new_session_id(), scenario=SCENARIO, case_seed=seed, mode=mode, step_cap=cap)
    return asyncio.run(run_session_request(p.config(), req, on_step))


def _check_trajectory(events: list[StepEvent]) -> None:
    """Steps are contiguous from 0, each taken step is the guarded action applied to that step's TPPs, and the
    next step was planned with exactly those TPPs."""
    assert [e.step for e in events] == list(range(len(events)))
    assert events[-1].done and not any(e.done for e in events[:-1])
    for e, nxt in itertools.pairwise(events):
        expected = tpp_step(tpps_from_dict(dict(e.tpps), OARS), e.action_tpp, e.action_direction).as_dict()
        assert e.next_tpps == pytest.approx(expected)
        assert nxt.tpps == pytest.approx(e.next_tpps)


def test_guided_and_unguided_sessions_with_the_replay_client(services: AgentProcs, tmp_path: Path) -> None:
    # The replayed LLM always proposes to loosen the rectum (lower its weight): harmless in unguided mode, vetoed
    # by the knowledge in guided mode whenever a rectum criterion fails or is near its limit.
    loosen = {"action": "change", "tpp": "lambda_rectum", "direction": "lower", "rationale": "spare the PTV"}
    answers = _answers(tmp_path, [loosen] * 12)
    services.agent("planner", "planner-replay", "model=replay", f"replay={answers}", impl="llm")
    services.wait_ready("planner-replay")
    try:
        results = {mode: _session(services, mode, SEEDS[0], cap=3) for mode in ("unguided", "guided")}
    finally:
        services.kill("planner-replay")
    for mode, (result, events) in results.items():
        _check_trajectory(events)
        assert result.mode == mode and all(e.mode == mode for e in events)
        assert result.steps == len(events) - 1 and result.final_score == events[-1].score
        taken = events[:-1]
        assert taken, "the initial plan of this case is not at the maximum: a decision must be taken"
        assert all(e.raw_tpp == "lambda_rectum" and e.raw_direction == "lower" and e.valid for e in taken)
        assert all(e.llm_answers and json.loads(e.llm_answers[0])["tpp"] == "lambda_rectum" for e in taken)
    unguided = results["unguided"][1][:-1]
    assert all(e.action_tpp == "lambda_rectum" and e.action_direction == -1 and not e.vetoes for e in unguided)
    guided = results["guided"][1][:-1]
    rectum_at_risk = [any(c.structure == "rectum" and (not c.passed or c.value > 0.9 * c.limit) for c in e.criteria)
                      for e in guided]
    for e, at_risk in zip(guided, rectum_at_risk, strict=True):
        if e.vetoes:  # a vetoed proposal is replaced by the DRL's best admissible action (or the safe action)
            assert e.action_source in ("drl", "safe") and (e.action_tpp, e.action_direction) != ("lambda_rectum", -1)
        elif at_risk:
            raise AssertionError(f"step {e.step}: loosening an at-risk rectum was not vetoed")


def test_dose_engine_killed_mid_session_loses_no_step(own_stack: AgentProcs) -> None:
    own_stack.agent("planner", "planner-drl", impl="drl")
    own_stack.wait_ready("planner-drl")
    reference, ref_events = _session(own_stack, "unguided", SEEDS[1], cap=8)

    def kill_at_step_two(e: StepEvent) -> None:
        if e.step == 2:
            own_stack.kill("dose-engine-1")

    result, events = _session(own_stack, "unguided", SEEDS[1], cap=8, on_step=kill_at_step_two)
    assert own_stack.procs["dose-engine-1"].returncode is not None
    _check_trajectory(events)
    # Same steps, same scores: nothing lost, nothing planned twice with a different warm start.
    assert [e.score for e in events] == pytest.approx([e.score for e in ref_events], abs=1e-9)
    assert result.steps == reference.steps


def test_planner_swapped_mid_session_resumes_from_the_published_state(own_stack: AgentProcs) -> None:
    own_stack.agent("planner", "planner-a", impl="drl")
    own_stack.wait_ready("planner-a")
    # a case whose guided DRL session runs to the cap: planner-b must come up before the session ends (which
    # cases those are depends on the shipped checkpoint, so the test looks for one)
    for seed in SEEDS[:16]:
        reference, ref_events = _session(own_stack, "guided", seed, cap=20)
        if reference.steps == 20:
            break
    assert reference.steps == 20, "the swap needs a session that outlasts a planner's start"

    def swap() -> None:  # the new planner comes up first, then the old one drains: no moment without a planner
        own_stack.agent("planner", "planner-b", impl="drl")
        own_stack.wait_ready("planner-b")
        own_stack.terminate("planner-a")

    swapper = threading.Thread(target=swap)

    def swap_at_step_one(e: StepEvent) -> None:
        if e.step == 1:  # from a thread: the callback runs on the session client's event loop
            swapper.start()

    result, events = _session(own_stack, "guided", seed, cap=20, on_step=swap_at_step_one)
    swapper.join(timeout=60)
    assert own_stack.procs["planner-a"].wait(timeout=30) == 0  # drained and stopped cleanly
    _check_trajectory(events)
    assert {e.planner.split(":")[1] for e in events} == {"planner-a", "planner-b"}
    assert [e.score for e in events] == pytest.approx([e.score for e in ref_events], abs=1e-9)
    assert result.steps == reference.steps


def test_replay_of_a_recorded_session_matches_its_scores(services: AgentProcs) -> None:
    services.agent("planner", "planner-drl2", impl="drl")
    services.wait_ready("planner-drl2")
    try:
        result, _ = _session(services, "guided", SEEDS[3], cap=6)
    finally:
        services.kill("planner-drl2")
    recorded = recorded_sessions(services.transcript)[result.session_id]
    assert len(recorded) == result.steps + 1
    steps = asyncio.run(replay(services.config(), recorded))
    assert [s.step for s in steps] == list(range(len(recorded)))
    assert all(s.matches for s in steps), [(s.recorded, s.replayed) for s in steps]


async def _bad_requests(p: AgentProcs) -> dict[str, list[str]]:
    protocol = load_protocol(SCENARIO)
    good_metrics = {c.label: c.limit for c in protocol.criteria}
    tpps = load_scenario(SCENARIO).default_tpps().as_dict()
    bad = {
        DOSE_PLAN: [
            DosePlanRequest(scenario=SCENARIO, case_seed=SEEDS[0], tpps={**tpps, "t_ptv": 5.0}),
            DosePlanRequest(scenario="no-such-site", case_seed=0, tpps=tpps),
            DosePlanRequest(scenario=SCENARIO, case_seed=SEEDS[0], tpps={"t_ptv": 1.0}),
        ],
        EVALUATE: [
            EvaluateRequest(protocol=SCENARIO, metrics={}),
            EvaluateRequest(protocol=SCENARIO, metrics={**good_metrics, protocol.criteria[0].label: float("nan")}),
            EvaluateRequest(protocol="no-such-protocol", metrics=good_metrics),
        ],
        SESSION: [
            SessionRequest(session_id=new_session_id(), scenario=SCENARIO, case_seed=SEEDS[0], mode="sideways"),
            SessionRequest(session_id=new_session_id(), scenario="nowhere", case_seed=0),
        ],
    }
    errors: dict[str, list[str]] = {}
    async with BusClient("test-hostile", p.config()) as bus:
        for service in (DOSE_PLAN, EVALUATE, ADVISE, SESSION):
            with pytest.raises(UnhandledMessage):
                await bus.request(service, StatusRequest(), timeout=10)
        for service, msgs in bad.items():
            for msg in msgs:
                with pytest.raises(RemoteError) as info:
                    await bus.request(service, msg, timeout=30)
                errors.setdefault(service, []).append(str(info.value))
        plan = await bus.request(DOSE_PLAN, DosePlanRequest(scenario=SCENARIO, case_seed=SEEDS[0], tpps=tpps),
                                 timeout=60, expect=DosePlanResult)
        with pytest.raises(RemoteError) as info:  # DVH on other bins than the policy's input
            await bus.request(ADVISE, AdviseRequest(scenario=SCENARIO, tpps=tpps, dvh_bins_gy=plan.dvh_bins_gy[:10],
                                                    structures=plan.structures), timeout=10)
        errors[ADVISE] = [str(info.value)]
        # After all that every agent still answers a good request.
        ev = await bus.request(EVALUATE, EvaluateRequest(protocol=SCENARIO, metrics=plan.metrics), expect=Evaluation)
        assert ev.max_score == 9.0 and len(ev.criteria) == 9
        advice = await bus.request(ADVISE, AdviseRequest(scenario=SCENARIO, tpps=tpps, dvh_bins_gy=plan.dvh_bins_gy,
                                                         structures=plan.structures), expect=Advice)
        assert advice.actions and all(a.tpp in tpps for a in advice.actions)
    return errors


def test_malformed_requests_get_typed_errors_and_kill_no_agent(services: AgentProcs) -> None:
    services.agent("planner", "planner-drl3", impl="drl")
    services.wait_ready("planner-drl3")
    try:
        errors = asyncio.run(_bad_requests(services))
        assert "t_ptv" in errors[DOSE_PLAN][0] and "no-such-site" in errors[DOSE_PLAN][1]
        assert "missing" in errors[DOSE_PLAN][2]
        assert "no value" in errors[EVALUATE][0] and "not finite" in errors[EVALUATE][1]
        assert "sideways" in errors[SESSION][0]
        assert "bins" in errors[ADVISE][0]
        alive = ("broker", "dose-engine-1", "dose-engine-2", "evaluator-1", "drl-advisor-1", "planner-drl3")
        assert all(services.procs[name].poll() is None for name in alive)
    finally:
        services.kill("planner-drl3")


def _m2m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m2m.agents.cli", *args], capture_output=True, text=True, timeout=120)


def test_agent_exit_codes_for_bad_options_and_failed_setup(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/none"
    bad_option = _m2m("agent", "evaluator", "--option", "speed=11", "--connect", endpoint)
    assert bad_option.returncode == EXIT_USAGE and "speed" in bad_option.stdout + bad_option.stderr
    bad_impl = _m2m("agent", "planner", "--impl", "oracle", "--connect", endpoint)
    assert bad_impl.returncode == EXIT_USAGE and "oracle" in bad_impl.stdout + bad_impl.stderr
    no_ckpt = _m2m("agent", "drl-advisor", "--option", f"checkpoint={tmp_path}/none.pt", "--connect", endpoint)
    assert no_ckpt.returncode == EXIT_FATAL and "none.pt" in no_ckpt.stdout + no_ckpt.stderr


def test_sigterm_drains_and_exits_zero(services: AgentProcs) -> None:
    services.agent("evaluator", "evaluator-2")
    services.wait_ready("evaluator-2")
    services.terminate("evaluator-2")
    assert services.procs["evaluator-2"].wait(timeout=30) == 0
    assert "agent_stopped" in (services.dir / "evaluator-2.log").read_text()


def test_guided_session_with_the_embedded_model(services: AgentProcs) -> None:
    """The real path: the llama.cpp model from the PyPI packages, constrained JSON, one decision on the bus."""
    services.agent("planner", "planner-embedded", "model=embedded", impl="llm")
    services.wait_ready("planner-embedded", timeout=300)
    try:
        result, events = _session(services, "guided", SEEDS[0], cap=1)
    finally:
        services.kill("planner-embedded")
    _check_trajectory(events)
    first = events[0]
    assert result.steps == 1 and first.planner == "llm:planner-embedded"
    assert first.valid and first.raw_tpp in first.tpps and first.raw_direction in ("raise", "lower")
    answer = json.loads(first.llm_answers[-1])  # the model's own text is JSON of the decision schema
    assert answer["tpp"] == first.raw_tpp and answer["action"] == "change"


def test_agent_joins_a_curve_broker_over_tcp_with_its_keys(tmp_path: Path) -> None:
    """The off-host path: a TCP broker that admits only authorised CURVE keys, an evaluator given its keys on the
    command line, a client with its own authorised key."""
    import socket

    from m2m.bus.security import ClientKeys, generate_keys

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    generate_keys("broker", keys)
    generate_keys("evaluator", allowed)
    generate_keys("client", allowed)
    ep, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    p = AgentProcs(Path(tempfile.mkdtemp(prefix="m2mcurve", dir="/tmp")))
    try:
        p._spawn("broker", ["broker", "--endpoint", ep, "--pub-endpoint", pub, "--curve-secret",
                            str(keys / "broker.key_secret"), "--curve-clients", str(allowed)])
        p._spawn("evaluator-curve", ["agent", "evaluator", "--name", "evaluator-curve", "--connect", ep,
                                     "--pub-connect", pub, "--curve-secret", str(allowed / "evaluator.key_secret"),
                                     "--curve-server", str(keys / "broker.key")])
        protocol = load_protocol(SCENARIO)
        metrics = {c.label: c.limit for c in protocol.criteria}
        curve = ClientKeys.load(allowed / "client.key_secret", keys / "broker.key")

        async def main() -> Evaluation:
            async with BusClient("curve-client", endpoint=ep, pub_endpoint=pub, curve=curve) as bus:
                return await bus.request(EVALUATE, EvaluateRequest(protocol=SCENARIO, metrics=metrics), timeout=60,
                                         expect=Evaluation)

        ev = asyncio.run(main())
        assert ev.total == 9.0 and not ev.failing  # every metric exactly at its limit passes
    finally:
        p.close()
        shutil.rmtree(p.dir, ignore_errors=True)
