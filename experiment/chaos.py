"""The bus chaos suite (``m2m chaos``; a short form runs in ``make test``): a real stack plans the same cases twice,
once undisturbed (the reference) and once while agents and the broker are ``kill -9``-ed, replies and requests are
forged and hostile frames are fuzzed at the broker. It counts what chaos must never cause:

* **lost steps**: reference steps missing from the chaos run's session result (a session that failed loses all);
* **changed steps**: a step whose score differs from the reference's (a forged reply that got through);
* **duplicated steps**: a dose optimisation or evaluation that ran twice for one idempotency key (two different
  non-error replies for it in the broker's transcript), or one step's progress event published twice.

All three must be 0. The attacks:

* ``kill``: SIGKILL a random agent process or the broker (the supervisor restarts it);
* ``forge-reply``: a peer that was never dispatched the request — an unregistered DEALER, and a peer registered as
  a worker of another service — sends a reply with a perfect score for every key a running session will use
  (``<session>:<step>:evaluate``; session ids are broadcast on ``session.*``);
* ``forge-request``: a request under a victim's idempotency key with other content (a plan for other TPPs);
* ``fuzz``: random multipart frames, bad headers, truncated envelopes and poisoned array specs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from m2m.agents.messages import (
    DOSE_PLAN,
    EVALUATE,
    DosePlanRequest,
    Evaluation,
    SessionRequest,
    SessionResult,
    StackStatus,
    StepEvent,
    new_session_id,
)
from m2m.bus import protocol as P
from m2m.bus.client import BusClient, BusConfig
from m2m.bus.errors import BusError
from m2m.bus.messages import ArraySpec, Envelope, encode, new_id
from m2m.bus.transcript import read_transcript
from m2m.physics.protocol import SCORE_TOLERANCE
from m2m.session.client import run_session_request

ATTACKS = ("kill", "forge-reply", "forge-request", "fuzz")


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run. ``sessions`` cases (seeds ``seed``, ``seed + 1``, …) of ``scenario`` planned by ``planners``
    instances of planner ``planner`` with ``step_cap`` steps; during the chaos run one attack every
    ``attack_every_s`` seconds (kills: at most ``kills``, of which up to ``broker_kills`` hit the broker)."""

    scenario: str = "prostate-basic"
    sessions: int = 6
    seed: int = 0
    step_cap: int = 5
    planner: str = "rules"
    planners: int = 2
    dose_engines: int = 2
    evaluators: int = 2
    attack_every_s: float = 0.8
    kills: int = 6
    broker_kills: int = 2
    fuzz_frames: int = 2000
    rng_seed: int = 1


SHORT = ChaosConfig()
LONG = ChaosConfig(sessions=24, step_cap=8, planners=4, kills=40, broker_kills=8, fuzz_frames=100_000,
                   attack_every_s=1.0)


@dataclass
class ChaosReport:
    config: ChaosConfig
    reference_wall_s: float = 0.0
    chaos_wall_s: float = 0.0
    attacks: Counter[str] = field(default_factory=Counter)
    killed: Counter[str] = field(default_factory=Counter)
    reference_steps: int = 0
    lost_steps: int = 0
    changed_steps: int = 0
    duplicated_solves: int = 0
    duplicated_events: int = 0
    failed_sessions: list[str] = field(default_factory=list)

    @property
    def duplicated_steps(self) -> int:
        return self.duplicated_solves + self.duplicated_events

    @property
    def ok(self) -> bool:
        return self.lost_steps == 0 and self.changed_steps == 0 and self.duplicated_steps == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config), "reference_wall_s": round(self.reference_wall_s, 1),
            "chaos_wall_s": round(self.chaos_wall_s, 1), "attacks": dict(self.attacks), "killed": dict(self.killed),
            "reference_steps": self.reference_steps, "lost_steps": self.lost_steps,
            "changed_steps": self.changed_steps, "duplicated_solves": self.duplicated_solves,
            "duplicated_events": self.duplicated_events, "failed_sessions": self.failed_sessions, "ok": self.ok,
        }


def stack_config_text(cfg: ChaosConfig, folder: Path) -> str:
    """The stack config of a chaos run (its transcript under ``folder``)."""
    agents = [("dose-engine", "", cfg.dose_engines), ("evaluator", "", cfg.evaluators),
              ("drl-advisor", "", 1), ("planner", cfg.planner, cfg.planners)]
    lines = ["[bus]", f'transcript_dir = "{folder}/stack"', "", "[restart]", "max_restarts = 1000", "window_s = 1",
             "ready_timeout_s = 120", "stop_timeout_s = 30"]
    for role, impl, n in agents:
        lines += ["", "[[agent]]", f'role = "{role}"', f"instances = {n}"]
        if impl:
            lines.append(f'impl = "{impl}"')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ sessions
async def _plan_all(bus: BusConfig, cfg: ChaosConfig) -> dict[int, SessionResult | BaseException]:
    """Plan every case at once; a session that fails gives its exception."""

    async def one(seed: int) -> SessionResult | BaseException:
        req = SessionRequest(session_id=new_session_id(), scenario=cfg.scenario, case_seed=seed, mode="unguided",
                             step_cap=cfg.step_cap)
        try:
            return await run_session_request(bus, req, lambda step, outcome: None)
        except (BusError, TimeoutError, OSError) as exc:
            return exc

    seeds = [cfg.seed + i for i in range(cfg.sessions)]
    results = await asyncio.gather(*(one(s) for s in seeds))
    return dict(zip(seeds, results, strict=True))


def _compare(report: ChaosReport, ref: dict[int, SessionResult | BaseException],
             got: dict[int, SessionResult | BaseException]) -> None:
    for seed, r in ref.items():
        if not isinstance(r, SessionResult):
            raise RuntimeError(f"the undisturbed reference session of case {seed} failed: {r!r}")
        report.reference_steps += len(r.steps)
        g = got[seed]
        if not isinstance(g, SessionResult):
            report.lost_steps += len(r.steps)
            report.failed_sessions.append(f"case {seed}: {type(g).__name__}: {g}")
            continue
        report.lost_steps += max(0, len(r.steps) - len(g.steps))
        for a, b in zip(r.steps, g.steps, strict=False):
            if abs(a.score - b.score) > SCORE_TOLERANCE:
                report.changed_steps += 1


def count_duplicates(transcript: Path, sessions: set[str]) -> tuple[int, int]:
    """(solves, events) that happened twice for the given sessions: distinct non-error replies of the dose engine
    or evaluator for one idempotency key, and distinct step events for one (session, step)."""
    replies: dict[tuple[str, str], set[str]] = {}
    events: dict[tuple[str, int], set[str]] = {}
    for rec in read_transcript(transcript).records:
        if rec.session not in sessions or rec.direction != "in":
            continue
        try:
            env = rec.decode_envelope()
        except BusError:
            continue
        if rec.kind == "reply" and rec.route in (DOSE_PLAN, EVALUATE) and env.idem:
            replies.setdefault((rec.route, env.idem), set()).add(env.id)
        elif rec.kind == "event" and env.schema == StepEvent.schema:
            try:
                msg = rec.decode()
            except BusError:
                continue
            if isinstance(msg, StepEvent):
                events.setdefault((rec.session, msg.record.step), set()).add(env.id)
    return (sum(len(v) - 1 for v in replies.values()), sum(len(v) - 1 for v in events.values()))


# ------------------------------------------------------------------------------------------------ attacks
class Attacker:
    """Runs the attacks against one stack (its bus config and supervisor status)."""

    def __init__(self, bus: BusConfig, cfg: ChaosConfig, report: ChaosReport,
                 status: Callable[[], Any]) -> None:
        self.bus, self.cfg, self.report, self.status = bus, cfg, report, status
        self.rng = random.Random(cfg.rng_seed)
        self.ctx = zmq.asyncio.Context()
        self.sessions: set[str] = set()
        self.fuzzed = 0

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def _dealer(self) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndhwm = 100_000
        s.connect(self.bus.endpoint)
        return s

    async def watch_sessions(self) -> None:
        """Collect the ids of running sessions from their broadcast progress (what an attacker can see)."""
        async with BusClient(f"chaos-watch-{os.getpid()}", self.bus) as bus:
            sub = bus.subscribe("session.", snapshot=False)
            async for d in sub:
                if isinstance(d.message, StepEvent):
                    self.sessions.add(d.topic.removeprefix("session."))

    async def run(self, stop: asyncio.Event) -> None:
        kinds = list(ATTACKS)
        while not stop.is_set():
            kind = kinds[self.rng.randrange(len(kinds))]
            if kind == "kill" and sum(self.report.killed.values()) >= self.cfg.kills:
                kind = "forge-reply"
            try:
                await getattr(self, "_" + kind.replace("-", "_"))()
                self.report.attacks[kind] += 1
            except (OSError, zmq.ZMQError, BusError) as exc:  # the broker may be down right now
                self.report.attacks[f"{kind} (failed: {type(exc).__name__})"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.attack_every_s)

    async def _kill(self) -> None:
        status: StackStatus | None = await self.status()
        if status is None:
            return
        victims = [(a.role, a.pid) for a in status.agents if a.pid > 0]
        broker = self.broker_pid()
        if broker and self.report.killed["broker"] < self.cfg.broker_kills and self.rng.random() < 0.3:
            victims = [("broker", broker)]
        if not victims:
            return
        role, pid = victims[self.rng.randrange(len(victims))]
        try:
            os.kill(pid, signal.SIGKILL)
            self.report.killed[role] += 1
        except ProcessLookupError:
            pass

    def broker_pid(self) -> int | None:
        """The stack's broker process, as its supervisor records its children in the stack registry."""
        from m2m.stack import registry
        from m2m.stack.supervisor import BROKER_NAME

        entry = registry.stack_at(self.bus.endpoint)
        if entry is None:
            return None
        return next((pid for name, pid in registry.live_children(entry) if name == BROKER_NAME), None)

    @staticmethod
    def forged_evaluation() -> Evaluation:
        """What a forger answers for an evaluation: a perfect score with no criteria behind it. Were it taken, the
        session would stop at once with 9/9 (a changed step)."""
        return Evaluation(protocol="forged", criteria=[], total=9.0, max_score=9.0, failing=[])

    async def _forge_reply(self) -> None:
        """Replies for every evaluate key of every session seen, from an unregistered peer and from a peer
        registered as a worker of another service."""
        rogue_worker = self._dealer()
        rogue_worker.send_multipart([P.WORKER, P.READY, b"chaos.rogue", b"1"])
        stranger = self._dealer()
        for sid in list(self.sessions):
            for step in range(self.cfg.step_cap + 1):
                key = f"{sid}:{step}:evaluate"
                env = Envelope(id=new_id(), schema="", version=0, sender="evaluator-1", kind="reply", route=EVALUATE,
                               idem=key, session=sid, ts=time.time())
                frames = [bytes(f) for f in encode(self.forged_evaluation(), env)]
                for sock in (stranger, rogue_worker):
                    await sock.send_multipart([P.WORKER, P.REPLY, b"\x00k", *frames])
        await asyncio.sleep(0.05)
        rogue_worker.send_multipart([P.WORKER, P.DISCONNECT])
        rogue_worker.close()
        stranger.close()

    async def _forge_request(self) -> None:
        """A plan request under a victim's next dose key with other TPPs (the reply must not reach the victim)."""
        s = self._dealer()
        for sid in list(self.sessions):
            for step in range(1, self.cfg.step_cap + 1):
                key = f"{sid}:{step}:dose"
                env = Envelope(id=new_id(), schema="", version=0, sender="planner-1", kind="request",
                               route=DOSE_PLAN, idem=key, session=sid, ts=time.time(), deadline=time.time() + 30)
                req = DosePlanRequest(scenario=self.cfg.scenario, case_seed=self.cfg.seed, tpps={"t_ptv": 0.5})
                frames = [bytes(f) for f in encode(req, env)]
                await s.send_multipart([P.CLIENT, P.REQUEST, DOSE_PLAN.encode(), *frames])
        await asyncio.sleep(0.05)
        s.close()

    async def _fuzz(self) -> None:
        s = self._dealer()
        n = max(1, self.cfg.fuzz_frames // max(1, self.cfg.kills))
        for _ in range(n):
            await s.send_multipart(self.fuzz_frames())
            self.fuzzed += 1
        s.close()

    def fuzz_frames(self) -> list[bytes]:
        """One hostile multipart message."""
        r = self.rng
        choice = r.randrange(6)
        rnd = lambda k: r.randbytes(r.randrange(k))  # noqa: E731
        if choice == 0:
            return [rnd(64) for _ in range(r.randrange(1, 6))]
        if choice == 1:
            return [P.CLIENT, bytes([r.randrange(256)]), rnd(32)]
        env = Envelope(id=new_id(), schema=EVALUATE, version=2, kind="request", route=EVALUATE,
                       arrays=[ArraySpec(r.choice([",", "O", "V8", "<f8", "(2,)f8"]), (r.randrange(-2, 9),))])
        raw = msgspec.msgpack.encode(env)
        if choice == 2:
            return [P.CLIENT, P.REQUEST, EVALUATE.encode(), raw[: r.randrange(len(raw))], rnd(16)]
        if choice == 3:
            return [P.CLIENT, P.REQUEST, EVALUATE.encode(), raw, rnd(16), rnd(64)]
        if choice == 4:
            return [P.CLIENT, P.PUBLISH, b"session.fuzz", b"\x01", raw, rnd(16), rnd(64)]
        return [P.WORKER, P.REPLY, rnd(8), raw, rnd(16)]


# ------------------------------------------------------------------------------------------------ the run
async def run_chaos(cfg: ChaosConfig, folder: Path | None = None,
                    progress: Callable[[str], None] = lambda line: None) -> ChaosReport:
    """Start a stack, run the reference and the chaos pass, take the stack down; returns the report."""
    from m2m.stack.control import stack_status, start_detached, take_down

    report = ChaosReport(cfg)
    with tempfile.TemporaryDirectory(prefix="m2m-chaos-") as tmp:
        d = Path(folder or tmp)
        d.mkdir(parents=True, exist_ok=True)
        config_path = d / "stack.toml"
        config_path.write_text(stack_config_text(cfg, d))
        progress("starting the stack")
        status = await asyncio.to_thread(start_detached, config_path)
        bus = BusConfig(endpoint=status.endpoint, pub_endpoint=status.pub_endpoint)
        try:
            progress(f"reference: {cfg.sessions} sessions, undisturbed")
            t = time.monotonic()
            ref = await _plan_all(bus, cfg)
            report.reference_wall_s = time.monotonic() - t

            attacker = Attacker(bus, cfg, report, lambda: stack_status(bus, timeout=2.0))
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            watch = loop.create_task(attacker.watch_sessions())
            attack = loop.create_task(attacker.run(stop))
            progress(f"chaos: the same {cfg.sessions} sessions under attack")
            t = time.monotonic()
            try:
                got = await _plan_all(bus, cfg)
            finally:
                stop.set()
                await attack
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
                attacker.close()
            report.chaos_wall_s = time.monotonic() - t
            _compare(report, ref, got)
            chaos_ids = {r.header.session_id for r in got.values() if isinstance(r, SessionResult)}
            chaos_ids |= attacker.sessions
            report.duplicated_solves, report.duplicated_events = count_duplicates(Path(status.transcript), chaos_ids)
        finally:
            progress("taking the stack down")
            await take_down(bus, timeout=60.0)
    return report
