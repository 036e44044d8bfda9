"""The four agents as real processes on a real broker: sessions in both modes, a dose engine killed mid-session,
a planner swapped mid-session, replay of a recorded session, malformed messages to every agent."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import Procs, run_m2m, running, wait_until

from m2m.agents.drl import DEFAULT_KNOWLEDGE
from m2m.agents.drl.knowledge import load_knowledge, relabel_knowledge
from m2m.agents.llm.situation import NEAR_LIMIT_FRACTION
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
    SessionResult,
    StatusRequest,
    Step,
    new_session_id,
)
from m2m.agents.runtime import EXIT_FATAL, EXIT_USAGE
from m2m.bus.client import BusClient
from m2m.bus.errors import BadRequest, DecodeError, RemoteError, UnhandledMessage
from m2m.physics.protocol import load_protocol
from m2m.physics.tpp import Direction, Move, TppSet
from m2m.scenarios import load_scenario, read_scenario_data, register_table
from m2m.session.client import recorded_sessions, replay, run_session_request

pytestmark = pytest.mark.slow

SCENARIO = "prostate-basic"
SEEDS = load_scenario(SCENARIO).cohorts.get("test").seeds
OARS = load_scenario(SCENARIO).oar_names


AGENT_HB = 0.25  # heartbeat of every agent process (s): a killed agent is noticed within ~1 s


def _start_services(p: Procs) -> None:
    p.broker("--transcript", str(p.transcript))
    p.agent("dose-engine", "dose-engine-1")
    p.agent("dose-engine", "dose-engine-2")
    p.agent("evaluator", "evaluator-1")
    p.agent("drl-advisor", "drl-advisor-1")
    p.wait_ready("dose-engine-1", "dose-engine-2", "evaluator-1", "drl-advisor-1")


def _stack(request: pytest.FixtureRequest) -> Iterator[Procs]:
    with running("m2mag", request, heartbeat=AGENT_HB) as p:
        _start_services(p)
        yield p


# Shared by the tests that only add planners; tests that kill or swap agents get a stack of their own.
services = pytest.fixture(scope="module", name="services")(_stack)
own_stack = pytest.fixture(name="own_stack")(_stack)


def _answers(tmp: Path, decisions: list[dict[str, str]]) -> Path:
    path = tmp / "answers.json"
    path.write_text(json.dumps(decisions))
    return path


def _session(p: Procs, mode: str, seed: int, cap: int, on_step=lambda s, outcome: None) -> SessionResult:  # type: ignore[no-untyped-def]
    req = SessionRequest(session_id=new_session_id(), scenario=SCENARIO, case_seed=seed, mode=mode, step_cap=cap)
    return asyncio.run(run_session_request(p.config(), req, on_step))


def _check_trajectory(result: SessionResult) -> None:
    """Steps are contiguous from 0, each step but the last changed TPPs, a published step's changes are the step
    applied to that step's TPPs, and the next step was planned with exactly the changed TPPs."""
    steps = result.steps
    assert [s.step for s in steps] == list(range(len(steps))) and result.n_steps == len(steps) - 1
    assert steps[-1].decision is None
    for s, nxt in itertools.pairwise(steps):
        assert s.decision is not None and not s.decision.stopped
        assert nxt.tpps == pytest.approx(s.tpps | {c.tpp: c.after for c in s.decision.changes})
        if s.action is not None:
            assert nxt.tpps == pytest.approx(s.action.apply(TppSet.from_dict(s.tpps, OARS)).as_dict())
    assert result.final_score == steps[-1].score and result.initial_score == steps[0].score


LOOSEN = Move("lambda_rectum", Direction.LOWER)


def test_guided_and_unguided_sessions_with_the_replay_client(services: Procs, tmp_path: Path) -> None:
    # The replayed LLM always proposes to loosen the rectum (lower its weight): harmless in unguided mode, vetoed
    # by the guard in guided mode whenever a rectum criterion fails or is near its limit.
    loosen = {"action": "change", "tpp": "lambda_rectum", "direction": "lower", "rationale": "spare the PTV"}
    answers = _answers(tmp_path, [loosen] * 12)
    services.agent("planner", "planner-replay", "model=replay", f"replay={answers}", "decision=step", impl="llm")
    services.wait_ready("planner-replay")
    try:
        results = {mode: _session(services, mode, SEEDS[0], cap=3) for mode in ("unguided", "guided")}
    finally:
        services.kill("planner-replay")
    for mode, result in results.items():
        _check_trajectory(result)
        assert result.header.mode == mode and result.header.planner == "llm:planner-replay"
        taken = [s.decision for s in result.steps if s.decision is not None]
        assert taken, "the initial plan of this case is not at the maximum: a decision must be taken"
        assert all(d.proposal is not None and d.proposal.move == LOOSEN and d.valid for d in taken)
        assert all(d.proposal is not None and d.proposal.rationale == "spare the PTV" for d in taken)
        assert all(d.answers and json.loads(d.answers[0])["tpp"] == "lambda_rectum" for d in taken)
    unguided = [s.decision for s in results["unguided"].steps[:-1]]
    assert all(d is not None and d.action == LOOSEN and d.source == "proposal" and not d.vetoes for d in unguided)
    guided = results["guided"].steps[:-1]

    def rectum_at_risk(s: Step) -> bool:  # the guard's rule: failing, or within 20 % of the scoring span of its limit
        return any(c.structure == "rectum" and (not c.passed or abs(c.limit - c.value) < NEAR_LIMIT_FRACTION
                                                * abs(c.zero - c.limit)) for c in s.criteria)

    decisions = [s.decision for s in guided]
    assert all(d is not None for d in decisions)
    # Loosening for three steps makes the guard refuse it in this case: both branches below are exercised.
    assert any(d.vetoes for d in decisions if d) and any(not d.vetoes for d in decisions if d), decisions
    for s in guided:
        d = s.decision
        assert d is not None
        if d.vetoes:  # a vetoed proposal is replaced by the DRL's best admissible advice or the safe action
            assert d.source in ("drl_advice", "safe") and d.action != LOOSEN, f"step {s.step}"
        else:  # an admitted proposal is taken as proposed, and loosening an at-risk rectum is never admitted
            assert (d.source, d.action) == ("proposal", LOOSEN) and not rectum_at_risk(s), f"step {s.step}"


def test_value_proposals_on_the_bus_get_one_feedback_turn_and_count_as_owned(services: Procs, tmp_path: Path) -> None:
    # The case starts with the PTV hot spot failing. The replayed LLM first raises t_ptv to its maximum (loosens the
    # failing hot spot), then, told why that was refused, sets it to 1.0: the guard refuses the first and takes the
    # second, which counts as the LLM's own step.
    loosen = {"action": "change", "changes": {"t_ptv": 1.5}, "rationale": "spare the OARs"}
    tighten = {"action": "change", "changes": {"t_ptv": 1.0}, "rationale": "hot spot"}
    answers = _answers(tmp_path, [loosen, tighten] * 6)
    services.agent("planner", "planner-values", "model=replay", f"replay={answers}", "decision=values", impl="llm")
    services.wait_ready("planner-values")
    try:
        result = _session(services, "guided", SEEDS[0], cap=1)
    finally:
        services.kill("planner-values")
    _check_trajectory(result)
    assert any(c.label.startswith("ptv") and not c.passed for c in result.steps[0].criteria)
    first = result.steps[0].decision
    assert first is not None and first.proposal is not None and first.proposal.form == "values"
    # 1.5 is outside t_ptv's valid range [1, 1.2]: clamped to 1.2 and flagged
    assert [(c.tpp, c.after, c.clamped) for c in first.proposal.changes] == [("t_ptv", 1.2, True)]
    assert first.vetoes[0].reason == "loosens_at_risk" and "ptv" in first.vetoes[0].detail
    assert first.retry is not None and first.source == "retry" and first.owned
    assert [(c.tpp, c.after) for c in first.changes] == [("t_ptv", 1.0)] and first.action is None
    assert result.steps[1].tpps["t_ptv"] == 1.0 and len(first.answers) == 2


def test_knowledge_baseline_sets_every_tpp_to_the_median_in_one_step(services: Procs) -> None:
    services.agent("planner", "planner-knowledge", impl="knowledge")
    services.wait_ready("planner-knowledge")
    try:
        result = _session(services, "unguided", SEEDS[1], cap=3)
    finally:
        services.kill("planner-knowledge")
    _check_trajectory(result)
    first = result.steps[0].decision
    assert first is not None and first.source == "proposal" and first.proposal is not None
    assert first.proposal.form == "quantile" and {c.target for c in first.changes} == {"p50"}
    knowledge = relabel_knowledge(load_knowledge(DEFAULT_KNOWLEDGE), load_scenario(SCENARIO).roles)
    medians = {t.label: (10 ** t.quantiles["50"] if t.scale == "log10" else t.quantiles["50"])
               for t in knowledge.tpps}
    assert result.steps[1].tpps == pytest.approx({**result.steps[0].tpps, **medians})
    later = [s.decision for s in result.steps[1:-1]]
    assert all(d is not None and d.action is not None for d in later)  # then the rules planner's steps


def test_dose_engine_killed_mid_session_loses_no_step(own_stack: Procs) -> None:
    own_stack.agent("planner", "planner-drl", impl="drl")
    own_stack.wait_ready("planner-drl")
    reference = _session(own_stack, "unguided", SEEDS[1], cap=8)

    def kill_at_step_two(s: Step, _outcome: str | None) -> None:
        if s.step == 2:
            own_stack.kill("dose-engine-1")

    result = _session(own_stack, "unguided", SEEDS[1], cap=8, on_step=kill_at_step_two)
    assert own_stack["dose-engine-1"].returncode is not None
    _check_trajectory(result)
    # Same steps, same scores: nothing lost, nothing planned twice with a different warm start.
    assert [s.score for s in result.steps] == pytest.approx([s.score for s in reference.steps], abs=1e-9)
    assert result.n_steps == reference.n_steps


def test_planner_swapped_mid_session_resumes_from_the_published_state(own_stack: Procs) -> None:
    own_stack.agent("planner", "planner-a", impl="drl")
    own_stack.wait_ready("planner-a")
    # a case whose guided DRL session runs to the cap: planner-b must come up before the session ends (which
    # cases those are depends on the shipped checkpoint, so the test looks for one)
    for seed in SEEDS[:16]:
        reference = _session(own_stack, "guided", seed, cap=20)
        if reference.n_steps == 20:
            break
    assert reference.n_steps == 20, "the swap needs a session that outlasts a planner's start"

    def swap() -> None:  # the new planner comes up first, then the old one drains: no moment without a planner
        own_stack.agent("planner", "planner-b", impl="drl")
        own_stack.wait_ready("planner-b")
        own_stack.terminate("planner-a")

    swapper = threading.Thread(target=swap)

    def swap_at_step_one(s: Step, _outcome: str | None) -> None:
        if s.step == 1:  # from a thread: the callback runs on the session client's event loop
            swapper.start()

    result = _session(own_stack, "guided", seed, cap=20, on_step=swap_at_step_one)
    swapper.join(timeout=60)
    assert own_stack["planner-a"].wait(timeout=30) == 0  # drained and stopped cleanly
    _check_trajectory(result)  # the whole record, steps of both planners, in the reply of the one that finished
    assert {p.split(":")[1] for p in result.planners} == {"planner-a", "planner-b"}
    assert result.header.planner.endswith("planner-b")
    assert [s.score for s in result.steps] == pytest.approx([s.score for s in reference.steps], abs=1e-9)
    assert result.n_steps == reference.n_steps


def test_replay_of_a_recorded_session_matches_its_scores(services: Procs) -> None:
    services.agent("planner", "planner-drl2", impl="drl")
    services.wait_ready("planner-drl2")
    try:
        result = _session(services, "guided", SEEDS[3], cap=6)
    finally:
        services.kill("planner-drl2")
    recorded = recorded_sessions(services.transcript)[result.header.session_id]
    assert recorded.steps == result.steps
    steps = asyncio.run(replay(services.config(), recorded))
    assert [s.step for s in steps] == list(range(len(recorded.steps)))
    assert all(s.matches for s in steps), [(s.recorded, s.replayed) for s in steps]


async def _bad_requests(p: Procs, missing_file_scenario: str) -> dict[str, list[str]]:
    protocol = load_protocol(SCENARIO)
    good_metrics = {c.id: c.limit for c in protocol.criteria}
    tpps = load_scenario(SCENARIO).default_tpps().as_dict()
    bad = {
        DOSE_PLAN: [
            DosePlanRequest(scenario=SCENARIO, case_seed=SEEDS[0], tpps={**tpps, "t_ptv": 5.0}),
            DosePlanRequest(scenario="no-such-site", case_seed=0, tpps=tpps),
            DosePlanRequest(scenario=SCENARIO, case_seed=SEEDS[0], tpps={"t_ptv": 1.0}),
            DosePlanRequest(scenario=missing_file_scenario, case_seed=0,
                            tpps=load_scenario(missing_file_scenario).default_tpps().as_dict()),
        ],
        EVALUATE: [
            EvaluateRequest(protocol=SCENARIO, metrics={}),
            EvaluateRequest(protocol=SCENARIO, metrics={**good_metrics, protocol.criteria[0].id: float("nan")}),
            EvaluateRequest(protocol="no-such-protocol", metrics=good_metrics),
        ],
        SESSION: [
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
                with pytest.raises((RemoteError, BadRequest)) as info:
                    await bus.request(service, msg, timeout=30)
                errors.setdefault(service, []).append(str(info.value))
        plan = await bus.request(DOSE_PLAN, DosePlanRequest(scenario=SCENARIO, case_seed=SEEDS[0], tpps=tpps),
                                 timeout=60, expect=DosePlanResult)
        with pytest.raises(RemoteError) as info:  # DVH on other bins than the policy's input
            await bus.request(ADVISE, AdviseRequest(scenario=SCENARIO, tpps=tpps, dvh_bins_gy=plan.dvh_bins_gy[:10],
                                                    structures=plan.structures), timeout=10)
        errors[ADVISE] = [str(info.value)]
        # A mode outside the typed vocabulary does not even decode at the planner: a typed decode error comes back.
        with pytest.raises(DecodeError, match="sideways") as decode_info:
            await bus.request(SESSION, SessionRequest(session_id=new_session_id(), scenario=SCENARIO,
                                                      case_seed=SEEDS[0], mode="sideways"), timeout=30)  # type: ignore[arg-type]
        errors[SESSION].append(str(decode_info.value))
        # After all that every agent still answers a good request.
        ev = await bus.request(EVALUATE, EvaluateRequest(protocol=SCENARIO, metrics=plan.metrics), expect=Evaluation)
        assert ev.max_score == 9.0 and len(ev.criteria) == 9
        advice = await bus.request(ADVISE, AdviseRequest(scenario=SCENARIO, tpps=tpps, dvh_bins_gy=plan.dvh_bins_gy,
                                                         structures=plan.structures), expect=Advice)
        assert advice.actions and all(a.move.tpp in tpps for a in advice.actions)
    return errors


def test_malformed_requests_get_typed_errors_and_kill_no_agent(services: Procs, tmp_path: Path) -> None:
    services.agent("planner", "planner-drl3", impl="drl")
    services.wait_ready("planner-drl3")
    # A user scenario whose case file has gone (the dose engines find it by name in the run's scenario folder).
    data = read_scenario_data("tg119")
    data["case"]["path"] = str(tmp_path / "gone.mat")
    gone = register_table({**data, "name": "gone-case"}, tmp_path).name
    try:
        errors = asyncio.run(_bad_requests(services, gone))
        assert "t_ptv" in errors[DOSE_PLAN][0] and "no-such-site" in errors[DOSE_PLAN][1]
        assert "missing" in errors[DOSE_PLAN][2]
        # A case file that cannot be read is the requester's problem: a typed, non-retryable answer naming the file.
        assert errors[DOSE_PLAN][3].startswith(f"{tmp_path / 'gone.mat'}: not found")
        assert "no value" in errors[EVALUATE][0] and "not finite" in errors[EVALUATE][1]
        assert "nowhere" in errors[SESSION][0] and "sideways" in errors[SESSION][1]
        assert "bins" in errors[ADVISE][0]
        alive = ("broker", "dose-engine-1", "dose-engine-2", "evaluator-1", "drl-advisor-1", "planner-drl3")
        assert all(services[name].poll() is None for name in alive)
        # bad input is the requester's problem: warnings in the agents' logs, never tracebacks (those are for bugs)
        for name in ("broker", "dose-engine-1", "dose-engine-2", "evaluator-1"):
            log = services.log(name).read_text()
            assert "Traceback" not in log, f"{name}: {log[-3000:]}"
    finally:
        services.kill("planner-drl3")


def test_agent_exit_codes_for_bad_options_and_failed_setup(tmp_path: Path) -> None:
    bus = ["--connect", f"ipc://{tmp_path}/none", "--pub-connect", f"ipc://{tmp_path}/none-pub"]
    bad_option = run_m2m("agent", "evaluator", "--option", "speed=11", *bus)
    assert bad_option.returncode == EXIT_USAGE and "speed" in bad_option.stdout + bad_option.stderr
    bad_impl = run_m2m("agent", "planner", "--impl", "oracle", *bus)
    assert bad_impl.returncode == EXIT_USAGE and "oracle" in bad_impl.stdout + bad_impl.stderr
    # refused before it connects
    bad_value = run_m2m("agent", "planner", "--impl", "llm", "--option", "model=foo", *bus)
    assert bad_value.returncode == EXIT_USAGE and "option model must be" in bad_value.stdout + bad_value.stderr
    no_ckpt = run_m2m("agent", "drl-advisor", "--option", f"checkpoint={tmp_path}/none.pt", *bus)
    assert no_ckpt.returncode == EXIT_FATAL and "none.pt" in no_ckpt.stdout + no_ckpt.stderr


def test_sigterm_drains_and_exits_zero(services: Procs) -> None:
    services.agent("evaluator", "evaluator-2")
    services.wait_ready("evaluator-2")
    services.terminate("evaluator-2")
    assert services["evaluator-2"].wait(timeout=30) == 0
    assert "agent_stopped" in services.log("evaluator-2").read_text()


def test_guided_session_with_the_embedded_model(services: Procs) -> None:
    """The real path: the llama.cpp model from the PyPI packages, constrained JSON, one decision on the bus."""
    services.agent("planner", "planner-embedded", "model=embedded", impl="llm")
    services.wait_ready("planner-embedded", timeout=300)
    try:
        result = _session(services, "guided", SEEDS[0], cap=1)
    finally:
        services.kill("planner-embedded")
    _check_trajectory(result)
    first = result.steps[0].decision
    assert result.n_steps == 1 and result.header.planner == "llm:planner-embedded" and first is not None
    assert first.valid and first.proposal is not None and first.proposal.changes
    assert first.proposal.form in ("quantile", "values")  # the default form, or values when no point helps
    assert all(c.tpp in result.steps[0].tpps for c in first.proposal.changes)
    answer = json.loads(first.answers[0])  # the model's own text is JSON of the decision schema
    assert {c.tpp for c in first.proposal.changes} <= set(answer["changes"])  # (a no-op value entry is dropped)


def test_agent_joins_a_curve_broker_over_tcp_with_its_keys(tmp_path: Path, procs: Procs) -> None:
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
    # both on the command line, with its default heartbeat (the harness's broker() would set the tests' one)
    procs.m2m("broker", "--endpoint", ep, "--pub-endpoint", pub, "--curve-secret", str(keys / "broker.key_secret"),
              "--curve-clients", str(allowed), name="broker")
    procs.m2m("agent", "evaluator", "--name", "evaluator-curve", "--connect", ep, "--pub-connect", pub,
              "--curve-secret", str(allowed / "evaluator.key_secret"), "--curve-server", str(keys / "broker.key"),
              name="evaluator-curve")
    protocol = load_protocol(SCENARIO)
    metrics = {c.id: c.limit for c in protocol.criteria}
    curve = ClientKeys.load(allowed / "client.key_secret", keys / "broker.key")

    async def main() -> Evaluation:
        async with BusClient("curve-client", endpoint=ep, pub_endpoint=pub, curve=curve) as bus:
            return await bus.request(EVALUATE, EvaluateRequest(protocol=SCENARIO, metrics=metrics), timeout=60,
                                     expect=Evaluation)

    ev = asyncio.run(main())
    assert ev.total == 9.0 and not ev.failing  # every metric exactly at its limit passes


def test_a_planner_started_before_the_broker_gets_the_knowledge_later(procs: Procs) -> None:
    """Started first, the planner waits for a broker (saying so at warning level), then for the knowledge; once the
    broker, the other agents and the drl-advisor appear, a guided session (which needs the knowledge) succeeds."""
    procs.heartbeat = AGENT_HB
    procs.agent("planner", "planner-rules", impl="rules")
    log = procs.log("planner-rules")
    wait_until(lambda: "knowledge_waiting_for_broker" in log.read_text(errors="replace"),
               "the planner says it waits for a broker", timeout=60)
    assert procs["planner-rules"].poll() is None
    procs.broker("--transcript", str(procs.transcript))
    procs.agent("dose-engine", "dose-engine-1")
    procs.agent("evaluator", "evaluator-1")
    procs.wait_ready("dose-engine-1", "evaluator-1")
    procs.agent("drl-advisor", "drl-advisor-1")
    procs.wait_ready("drl-advisor-1")
    wait_until(lambda: "knowledge_received" in log.read_text(errors="replace"), "the planner got the knowledge",
               timeout=60)
    result = _session(procs, "guided", SEEDS[0], cap=1)
    assert result.header.mode == "guided" and result.header.planner == "rules:planner-rules"
    assert len(result.steps) >= 1
