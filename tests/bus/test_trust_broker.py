"""A broker that cannot be fooled: forged replies and requests change nothing, capacity holds across
re-registration, a request runs once across a broker restart, and every resource is bounded.

Real broker processes (``Procs.broker``) where the behaviour is end to end; an in-process :class:`Broker` in a
thread where a test reads its tables (bounds). Hostile peers are raw ZeroMQ DEALER sockets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from support.busapp import Echo, EchoReply, Fact, Work, WorkDone
from support.procs import HB, Procs, wait_until, wait_until_async

from m2m.bus import protocol as P
from m2m.bus.broker import Broker, BrokerConfig
from m2m.bus.client import BusClient
from m2m.bus.errors import WorkerBusy
from m2m.bus.messages import Envelope, ErrorReply, Message, decode, encode, new_id

pytestmark = pytest.mark.timeout(90)


def client(ps: Procs, name: str = "tester", **kw: Any) -> BusClient:
    return BusClient(name, endpoint=ps.endpoint, pub_endpoint=ps.pub, heartbeat=HB, **kw)


def marker_lines(path: Path, kind: str) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith(kind + " ")]


def frames_of(msg: Message, *, idem: str = "", kind: str = "request", route: str = "echo", corr: str = "",
              deadline: float | None = 30.0) -> list[bytes]:
    """``[envelope, payload, *arrays]`` of ``msg`` as a raw peer would send it (``deadline`` s from now; None: no
    deadline)."""
    env = Envelope(id=new_id(), schema="", version=0, sender="raw", kind=kind, route=route, idem=idem, corr=corr,
                   deadline=time.time() + deadline if deadline is not None else 0.0)
    return [bytes(f) for f in encode(msg, env)]


class Raw:
    """A raw DEALER on the broker's endpoint: a hostile client or a hand-driven worker."""

    def __init__(self, endpoint: str, identity: bytes | None = None, rcvhwm: int | None = None) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if rcvhwm is not None:
            self.sock.rcvhwm = rcvhwm
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(endpoint)
        self.service = "echo"
        self.capacity = 1
        self.inflight: list[P.Key] = []

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> list[bytes] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.sock.recv_multipart()

    def sync(self) -> None:
        """Wait until the broker has handled everything this socket sent (it answers a PING in order)."""
        self.send(P.CLIENT, P.PING)
        while (frames := self.recv()) is not None:
            if frames[:2] == [P.CLIENT, P.PONG]:
                return
        raise AssertionError("no PONG from the broker")

    # as a worker ---------------------------------------------------------------------------------------------
    def ready(self, service: str = "echo", capacity: int = 1, inflight: list[P.Key] | None = None) -> None:
        self.service, self.capacity, self.inflight = service, capacity, inflight or []
        self.send(P.WORKER, P.READY, service.encode(), str(capacity).encode(), P.pack_keys(self.inflight),
                  P.pack_keys([]))

    def beat(self) -> None:
        self.send(P.WORKER, P.HEARTBEAT, self.service.encode(), str(self.capacity).encode(),
                  P.pack_keys(self.inflight))

    def next_request(self, timeout: float = 5.0) -> tuple[bytes, Envelope, Message] | None:
        """The next REQUEST (token, envelope, message), heartbeating meanwhile; None when none came."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.beat()
            frames = self.recv(min(HB, max(0.0, end - time.monotonic())))
            if frames is not None and frames[:2] == [P.WORKER, P.REQUEST]:
                env, msg = decode(frames[3:])
                return frames[2], env, msg
        return None

    def reply(self, token: bytes, msg: Message, req: Envelope) -> None:
        self.send(P.WORKER, P.REPLY, token, *frames_of(msg, idem=req.idem, kind="reply", corr=req.id))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raws() -> Iterator[list[Raw]]:
    made: list[Raw] = []
    yield made
    for r in made:
        r.close()


def reply_of(frames: list[bytes] | None) -> Message:
    assert frames is not None, "no reply"
    assert frames[:2] == [P.CLIENT, P.REPLY], frames[:2]
    return decode(frames[3:])[1]


# ------------------------------------------------------------------------------------------ forged replies
def test_forged_replies_from_a_stranger_and_from_an_idle_worker_change_nothing(procs: Procs,
                                                                               raws: list[Raw]) -> None:
    """The attack of the chaos run: session ids are public, keys are predictable, content can be guessed. Two
    forgers send a reply with the right key and even the right content digest while the real worker runs the
    request: a DEALER that never registered, and a registered worker of the same service that was not sent the
    request. The client gets the real reply, and a later request with the same key gets it from the cache."""
    broker = procs.broker()
    w = procs.worker(name="w1")
    marker = procs.dir / "marker"
    key = "S1:1:evaluate"
    work = Work(key="real", marker=str(marker), sleep=1.0)
    digest = P.content_digest(frames_of(work)[1:])
    forged = EchoReply(text="forged 9/9", pid=-1)

    async def main() -> None:
        async with client(procs) as bus:
            await bus.request("echo", Echo(text="warm"), timeout=20)  # w1 registered
            task = asyncio.create_task(bus.request("echo", work, timeout=20, idempotency_key=key))
            await wait_until_async(lambda: marker_lines(marker, "start"), "w1 started the real work", timeout=10)
            stranger = Raw(procs.endpoint)
            idle = Raw(procs.endpoint, identity=b"Widle-worker")
            raws.extend([stranger, idle])
            idle.ready(capacity=0)  # registered for "echo", never dispatched anything (capacity 0)
            for forger in (stranger, idle):
                forger.send(P.WORKER, P.REPLY, digest, *frames_of(forged, idem=key, kind="reply"))
            reply = await task
            assert reply == WorkDone(pid=w.pid)
            again = await bus.request("echo", work, timeout=20, idempotency_key=key)  # from the broker's cache
            assert again == WorkDone(pid=w.pid)
            assert len(marker_lines(marker, "done")) == 1

    asyncio.run(main())
    broker.send_signal(signal.SIGTERM)
    broker.wait(timeout=10)
    log = procs.log("broker").read_text()
    dropped = [line for line in log.splitlines() if "unexpected_reply_dropped" in line]
    assert len(dropped) == 2, dropped
    assert any("not a registered worker" in line for line in dropped)
    assert any("not dispatched to this worker" in line for line in dropped)
    assert '"forged": 2' in log  # the broker's closing stats


def test_forged_request_with_a_victims_key_does_not_change_the_victims_reply(procs: Procs) -> None:
    """A forger sends the victim's guessable key with other content first (its reply is cached under that key and
    content) and once more while the victim's request runs: the victim's reply is computed from the victim's
    content. Identical requests from two clients while one runs are both answered, and run once."""
    procs.broker()
    procs.worker("echo", "--capacity", "2", name="w1")
    marker = procs.dir / "marker"
    key = "S1:3:evaluate"

    async def main() -> None:
        async with client(procs, "forger") as evil, client(procs, "victim") as good:
            poisoned = await evil.request("echo", Echo(text="forged"), timeout=20, idempotency_key=key)
            assert poisoned.text == "forged"
            r = await good.request("echo", Echo(text="genuine"), timeout=20, idempotency_key=key)
            assert r.text == "genuine"
            # both pending at once, same key, different content: each gets its own
            slow = Work(key="victim", marker=str(marker), sleep=0.5)
            both = await asyncio.gather(
                good.request("echo", slow, timeout=20, idempotency_key="S1:4:evaluate"),
                evil.request("echo", Echo(text="forged again"), timeout=20, idempotency_key="S1:4:evaluate"))
            assert isinstance(both[0], WorkDone) and both[1].text == "forged again"
        # two clients, one identical request while it runs: both answered, run once
        async with client(procs, "c1") as c1, client(procs, "c2") as c2:
            same = Work(key="shared", marker=str(marker), sleep=0.5)
            r1, r2 = await asyncio.gather(c1.request("echo", same, timeout=20, idempotency_key="K-shared"),
                                          c2.request("echo", same, timeout=20, idempotency_key="K-shared"))
            assert r1 == r2
            assert [line.split()[1] for line in marker_lines(marker, "done")] == ["victim", "shared"]

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ capacity
def test_capacity_one_worker_never_gets_two_jobs_even_after_it_re_registers(procs: Procs, raws: list[Raw]) -> None:
    """A hand-driven capacity-1 worker gets job A, then re-registers as if it had lost the broker (READY without A:
    its report is behind): B is not sent until A is answered. It then reports a job X that this broker never sent
    (it still runs it, e.g. from before a broker restart): C waits for X too. Finally it answers a job with
    WorkerBusy (a race): the broker requeues it and the client never sees that error."""
    procs.broker()
    worker = Raw(procs.endpoint, identity=b"Wcap1")
    cl = Raw(procs.endpoint)
    raws.extend([worker, cl])
    worker.ready(capacity=1)
    cl.send(P.CLIENT, P.REQUEST, b"echo", *frames_of(Echo(text="A"), idem="A"))
    got = worker.next_request()
    assert got is not None and isinstance(got[2], Echo) and got[2].text == "A"
    token_a, env_a, _ = got
    worker.ready(capacity=1, inflight=[])  # stale registration: it does not list A
    cl.send(P.CLIENT, P.REQUEST, b"echo", *frames_of(Echo(text="B"), idem="B"))
    assert worker.next_request(1.5) is None, "a second job went to a worker at capacity"
    worker.reply(token_a, EchoReply(text="A", pid=1), env_a)
    assert reply_of(cl.recv()) == EchoReply(text="A", pid=1)
    got = worker.next_request()
    assert got is not None and got[2] == Echo(text="B")
    worker.reply(got[0], EchoReply(text="B", pid=1), got[1])
    assert reply_of(cl.recv()) == EchoReply(text="B", pid=1)

    # a job the worker reports in flight that this broker never dispatched also fills its slot
    worker.ready(capacity=1, inflight=[("X", b"x" * P.DIGEST_SIZE)])
    worker.sync()
    cl.send(P.CLIENT, P.REQUEST, b"echo", *frames_of(Echo(text="C"), idem="C"))
    assert worker.next_request(1.5) is None, "a job went to a worker that reported itself busy"
    worker.inflight = []  # X done: the next heartbeat frees the slot
    got = worker.next_request()
    assert got is not None and got[2] == Echo(text="C")

    # a race: the worker is full after all and answers WorkerBusy; the broker requeues, the client waits
    busy = frames_of(ErrorReply(code=WorkerBusy.code, message="full", retryable=True), idem=got[1].idem,
                     kind="error", corr=got[1].id)
    worker.send(P.WORKER, P.REPLY, got[0], *busy)
    again = worker.next_request()
    assert again is not None and again[2] == Echo(text="C") and again[0] == got[0]
    worker.reply(again[0], EchoReply(text="C", pid=1), again[1])
    assert reply_of(cl.recv()) == EchoReply(text="C", pid=1)
    assert cl.recv(0.3) is None  # nothing else: no WorkerBusy reached the client


def test_busy_worker_keeps_its_job_when_the_broker_restarts(procs: Procs) -> None:
    """A capacity-1 worker runs job A when the broker is killed; a new broker gets B first: B must wait for A
    (the worker's registration carries A), so the worker never runs two jobs at once."""
    broker = procs.broker()
    procs.worker(name="w1")
    marker = procs.dir / "marker"

    async def main() -> None:
        async with client(procs, liveness=100) as bus:
            await bus.request("echo", Echo(text="warm"), timeout=20)
            a = asyncio.create_task(bus.request("echo", Work(key="A", marker=str(marker), sleep=2.0), timeout=30))
            await wait_until_async(lambda: marker_lines(marker, "start"), "the worker started A", timeout=10)
            broker.send_signal(signal.SIGKILL)
            broker.wait(timeout=10)
            procs.broker(ready=False)
            b = asyncio.create_task(bus.request("echo", Work(key="B", marker=str(marker)), timeout=30))
            await asyncio.gather(a, b)
        lines = [line.split()[:2] for line in marker.read_text().splitlines()]
        assert lines == [["start", "A"], ["done", "A"], ["start", "B"], ["done", "B"]]

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ exactly once
def test_slow_request_runs_exactly_once_across_a_broker_restart(procs: Procs) -> None:
    """Two workers; the broker is SIGKILLed while one of them runs a slow request, and restarted. The client's
    resend reaches the new broker, which sends it to the worker that runs it (it registered with the key in
    flight), not to the idle one: the handler ran once and the client got its reply."""
    broker = procs.broker()
    w1, w2 = procs.worker(name="w1"), procs.worker(name="w2")
    marker = procs.dir / "marker"

    async def main() -> None:
        async with client(procs, liveness=100) as bus:
            pids: set[int] = set()
            while len(pids) < 2:
                pids.add((await bus.request("echo", Echo(text="warm"), timeout=20)).pid)
            task = asyncio.create_task(bus.request("echo", Work(key="once", marker=str(marker), sleep=2.0),
                                                   timeout=40, idempotency_key="S9:1:dose"))
            await wait_until_async(lambda: marker_lines(marker, "start"), "a worker started the work", timeout=10)
            broker.send_signal(signal.SIGKILL)
            broker.wait(timeout=10)
            procs.broker(ready=False)
            reply = await task
            runner = int(marker_lines(marker, "start")[0].split()[2])
            assert reply == WorkDone(pid=runner)
            # after the handler finished: a resend with the same key and content is answered, not run again
            again = await bus.request("echo", Work(key="once", marker=str(marker), sleep=2.0), timeout=20,
                                      idempotency_key="S9:1:dose")
            assert again == reply
        assert len(marker_lines(marker, "start")) == 1 and len(marker_lines(marker, "done")) == 1
        assert {w1.pid, w2.pid} >= {runner}

    asyncio.run(main())


def test_after_a_restart_a_worker_answers_repeated_keys_from_its_cache(procs: Procs) -> None:
    """The reply cache of a killed broker is gone; the worker that answered registers the key with the new
    broker, which routes a repeat to it: answered from the worker's cache, not run again on the other worker."""
    broker = procs.broker()
    procs.worker(name="w1")
    procs.worker(name="w2")
    marker = procs.dir / "marker"

    async def main() -> None:
        async with client(procs, liveness=100) as bus:
            work = Work(key="k", marker=str(marker))
            first = await bus.request("echo", work, timeout=20, idempotency_key="S2:1:dose")
            broker.send_signal(signal.SIGKILL)
            broker.wait(timeout=10)
            procs.broker(ready=False)
            for _ in range(4):  # whichever worker is free: the key goes to the one that holds it
                assert await bus.request("echo", work, timeout=30, idempotency_key="S2:1:dose") == first
        assert len(marker_lines(marker, "done")) == 1

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ bounds
class InProcess:
    """A :class:`Broker` run in a thread of the test process, so the test can read its tables."""

    def __init__(self, tmp: Path, **cfg: Any) -> None:
        self.endpoint = f"ipc://{tmp}/bus"
        self.broker = Broker(BrokerConfig(endpoint=self.endpoint, pub_endpoint=f"ipc://{tmp}/pub", heartbeat=HB,
                                          grace=0, **cfg))
        self.thread = threading.Thread(target=self.broker.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.broker.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="m2mt", dir="/tmp"))  # ipc paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_requests_without_deadline_expire_at_the_default_and_leave_nothing_behind(short_tmp: Path,
                                                                                  raws: list[Raw]) -> None:
    """20k requests without a deadline to a service nobody serves (the chaos run's +383 MB): each is failed at
    the configured default deadline, and afterwards the broker holds no pending request, no queue, no per-client
    count, no expiry entry and no service entry for them."""
    n = 20_000
    b = InProcess(short_tmp, default_deadline=1.0, max_pending_per_client=n, queue_limit=n, hwm=2 * n)
    cl = Raw(b.endpoint, rcvhwm=0)  # take every error reply, however fast they come
    raws.append(cl)
    try:
        payload = frames_of(Echo(text="x"), deadline=None)
        for i in range(n):
            env = msgspec.msgpack.decode(payload[0], type=Envelope)
            env.id = env.idem = f"r{i}"
            cl.send(P.CLIENT, P.REQUEST, b"nobody", msgspec.msgpack.encode(env), payload[1])
        codes: dict[str, int] = {}
        for _ in range(n):
            err = reply_of(cl.recv(10))
            assert isinstance(err, ErrorReply)
            codes[err.code] = codes.get(err.code, 0) + 1
        assert codes == {"service_unavailable": n}
        br = b.broker
        wait_until(lambda: not br.services, "the unserved service entry is dropped", timeout=10)
        assert not br.pending and not br._per_client and not br._expiries
    finally:
        b.close()


def test_deadline_clamp_and_per_client_cap(short_tmp: Path, raws: list[Raw]) -> None:
    b = InProcess(short_tmp, max_deadline=60.0, max_pending_per_client=3)
    cl = Raw(b.endpoint)
    raws.append(cl)
    try:
        for i in range(3):
            cl.send(P.CLIENT, P.REQUEST, b"nobody", *frames_of(Echo(text=str(i)), idem=f"k{i}", deadline=86400.0))
        wait_until(lambda: len(b.broker.pending) == 3, "three requests pending", timeout=10)
        assert all(p.deadline <= time.time() + 60.0 for p in list(b.broker.pending.values()))
        cl.send(P.CLIENT, P.REQUEST, b"nobody", *frames_of(Echo(text="4"), idem="k4"))
        err = reply_of(cl.recv())
        assert isinstance(err, ErrorReply) and err.code == "too_many_requests" and err.retryable
        # the same request again (a resend) is not a new one: no error, still three pending
        cl.send(P.CLIENT, P.REQUEST, b"nobody", *frames_of(Echo(text="0"), idem="k0", deadline=86400.0))
        assert cl.recv(0.5) is None and len(b.broker.pending) == 3
    finally:
        b.close()


def test_retained_topics_snapshot_and_message_size_are_capped(short_tmp: Path, raws: list[Raw]) -> None:
    b = InProcess(short_tmp, max_retained_topics=2, snapshot_max_bytes=600, max_message_size=10_000, max_frames=8)
    cl = Raw(b.endpoint)
    raws.append(cl)
    try:
        for i in range(3):  # the third topic is beyond the cap: published, not retained
            cl.send(P.CLIENT, P.PUBLISH, f"k.t{i}".encode(), bytes([P.RETAIN]),
                    *frames_of(Fact(value=i), kind="event", route=f"k.t{i}"))
        wait_until(lambda: b.broker.stats["events"] == 3, "three values published", timeout=10)
        assert sorted(b.broker.knowledge.values) == [b"k.t0", b"k.t1"] and b.broker.knowledge.refused == 1
        cl.send(P.CLIENT, P.SNAPSHOT, b"k.", b"tok")
        items = []
        while (frames := cl.recv()) is not None and frames[1] == P.KVITEM:
            items.append(frames[3])
        assert frames is not None and frames[1] == P.KVEND and frames[2] == b"tok" and frames[4] == b"\x00"
        assert items == [b"k.t0", b"k.t1"]
        # a big value: retained (well under the byte cap) but a snapshot of everything is over its 600 bytes
        cl.send(P.CLIENT, P.PUBLISH, b"k.t0", bytes([P.RETAIN]),
                *frames_of(Echo(text="y" * 500), kind="event", route="k.t0"))
        wait_until(lambda: b.broker.stats["events"] == 4, "the big value published", timeout=10)
        cl.send(P.CLIENT, P.SNAPSHOT, b"k.", b"tok2")
        items = []
        while (frames := cl.recv()) is not None and frames[1] == P.KVITEM:
            items.append(frames[3])
        assert frames is not None and frames[1] == P.KVEND and frames[4] == b"\x01"  # truncated
        assert items == [b"k.t1"]

        # many frames, each small, over the total size: typed reply, not accepted
        env = frames_of(Echo(text="z"))[0]
        cl.send(P.CLIENT, P.REQUEST, b"echo", env, *([b"x" * 3000] * 5))
        err = reply_of(cl.recv())
        assert isinstance(err, ErrorReply) and err.code == "message_too_large"
        cl.send(P.CLIENT, P.REQUEST, b"echo", env, *([b"x"] * 20))  # over the frame count
        err = reply_of(cl.recv())
        assert isinstance(err, ErrorReply) and err.code == "message_too_large"
        assert not b.broker.pending
    finally:
        b.close()


# ------------------------------------------------------------------------------------------ liveness
BUSY_WORKER = """
import asyncio, os, sys, time
from support.busapp import Work, WorkDone
from m2m.bus.client import BusClient

async def on_work(msg, ctx):
    with open(msg.marker, "a") as f:
        f.write(f"start {msg.key} {os.getpid()}\\n")
    end = time.monotonic() + msg.sleep
    while time.monotonic() < end:  # CPU-bound, holding the event loop (bounded: msg.sleep s)
        sum(range(1000))
    with open(msg.marker, "a") as f:
        f.write(f"done {msg.key} {os.getpid()}\\n")
    return WorkDone(pid=os.getpid())

async def main():
    async with BusClient("busy", endpoint=sys.argv[1], pub_endpoint=sys.argv[2], heartbeat=float(sys.argv[3])) as bus:
        await bus.serve("echo", {Work: on_work})
        print("serving", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_cpu_bound_worker_is_not_declared_dead_and_a_stopped_one_is(procs: Procs) -> None:
    """A handler that holds the worker's event loop for 5 liveness periods: its heartbeat thread keeps it alive
    (no ``worker_gone``, the job runs once, no WorkerLost retry). A SIGSTOPped worker sends nothing: it is
    declared dead after ``heartbeat × liveness`` and its job is served by the other worker."""
    broker = procs.broker()
    busy = procs.spawn("-c", BUSY_WORKER, procs.endpoint, procs.pub, str(HB), name="busy")
    marker = procs.dir / "marker"

    async def main() -> None:
        async with client(procs, liveness=100) as bus:
            r = await bus.request("echo", Work(key="cpu", marker=str(marker), sleep=5 * 3 * HB), timeout=30)
            assert r == WorkDone(pid=busy.pid)
            assert len(marker_lines(marker, "start")) == 1
            log = procs.log("broker").read_text()
            assert "worker_gone" not in log and "broker_stalled" not in log

            w2 = procs.worker(name="w2")
            pids: set[int] = set()
            while w2.pid not in pids:  # w2 registered
                pids.add((await bus.request("echo", Work(key="warm", marker=str(marker)), timeout=20)).pid)
            task = asyncio.create_task(bus.request("echo", Work(key="stop", marker=str(marker), sleep=1.0),
                                                   timeout=30))
            await wait_until_async(lambda: [ln for ln in marker_lines(marker, "start") if " stop " in ln],
                                   "a worker started the job", timeout=10)
            victim = int(next(ln for ln in marker_lines(marker, "start") if " stop " in ln).split()[2])
            os.kill(victim, signal.SIGSTOP)
            reply = await task
            assert reply.pid != victim
            await wait_until_async(lambda: '"reason": "heartbeat"' in procs.log("broker").read_text(),
                                   "the broker declares the stopped worker dead", timeout=10)

    asyncio.run(main())
    broker.kill()


def test_a_broker_that_was_not_scheduled_does_not_blame_its_workers(procs: Procs) -> None:
    """The broker is stopped (SIGSTOP, its ZeroMQ I/O thread too) for longer than ``heartbeat × liveness`` while
    its worker keeps heartbeating; after SIGCONT it extends the expiries by the stall instead of declaring the
    worker dead."""
    broker = procs.broker()
    w = procs.worker(name="w1")

    async def main() -> None:
        async with client(procs, liveness=100) as bus:
            assert (await bus.request("echo", Echo(text="before"), timeout=20)).pid == w.pid
            broker.send_signal(signal.SIGSTOP)
            await asyncio.sleep(3 * 3 * HB)
            broker.send_signal(signal.SIGCONT)
            assert (await bus.request("echo", Echo(text="after"), timeout=20)).pid == w.pid
            await wait_until_async(lambda: "broker_stalled" in procs.log("broker").read_text(),
                                   "the broker notices its stall", timeout=10)
        assert "worker_gone" not in procs.log("broker").read_text()

    asyncio.run(main())


def test_worker_commands_with_hostile_content_are_refused(short_tmp: Path, raws: list[Raw]) -> None:
    """HEARTBEAT_FOR cannot name a ZeroMQ-generated (client) identity, and a KEYS frame must be a short list of
    (key, 16-byte digest) pairs: anything else is a typed protocol_error, and registers nothing."""
    b = InProcess(short_tmp)
    peer = Raw(b.endpoint)
    raws.append(peer)
    try:
        cases = [
            [P.WORKER, P.HEARTBEAT_FOR, b"\x00\x01\x02\x03\x04", b"echo", b"1", P.pack_keys([])],
            [P.WORKER, P.READY, b"echo", b"1", msgspec.msgpack.encode([["k", b"short"]]), P.pack_keys([])],
            [P.WORKER, P.READY, b"echo", b"1", msgspec.msgpack.encode([["k", b"d" * 16]] * (P.MAX_KEYS + 1)),
             P.pack_keys([])],
            [P.WORKER, P.HEARTBEAT, b"echo", b"1", b"\xc1 not msgpack"],
        ]
        for frames in cases:
            peer.send(*frames)
            err = reply_of(peer.recv())
            assert isinstance(err, ErrorReply) and err.code == "protocol_error", (frames[1], err)
        assert not b.broker.workers
    finally:
        b.close()


# ------------------------------------------------------------------------------------------ retained knowledge
def test_knowledge_outlives_its_publisher_and_the_broker(procs: Procs) -> None:
    """A retained value whose publisher is gone survives a ``kill -9`` of the broker (``--retained FILE``): before,
    a planner's takeover state died with the broker when the planner had died first, and the session started over
    from step 0 (the chaos suite's duplicated solves)."""
    retained = procs.dir / "retained.m2mt"
    broker = procs.broker("--retained", str(retained))

    async def publish() -> None:
        async with client(procs, name="publisher") as bus:
            await bus.wait_for_broker(10)
            await bus.publish("takeover.s1", Fact(value=1), retain=True)
            await bus.publish("takeover.s1", Fact(value=7), retain=True)  # the last value is the one kept
            await bus.publish("takeover.s2", Fact(value=2), retain=True)
            assert set(await bus.retained("takeover.")) == {"takeover.s1", "takeover.s2"}

    asyncio.run(publish())  # the publisher has gone: nobody will re-assert these values
    broker.send_signal(signal.SIGKILL)
    broker.wait(timeout=10)
    procs.broker("--retained", str(retained), name="broker-2")

    async def read() -> dict[str, Message]:
        async with client(procs, name="reader") as bus:
            await bus.wait_for_broker(10)
            return await bus.retained("takeover.")

    got = asyncio.run(read())
    assert {t: m.value for t, m in got.items() if isinstance(m, Fact)} == {"takeover.s1": 7, "takeover.s2": 2}


def test_retained_log_is_compacted_to_one_record_per_topic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from m2m.bus.clone import KnowledgeStore, RetainedLog
    from m2m.bus.transcript import read_transcript

    monkeypatch.setattr(RetainedLog, "COMPACT_FLOOR", 10_000)
    store = KnowledgeStore(1)
    log = RetainedLog(tmp_path / "r.m2mt")
    for i in range(2000):  # ~1 MB of updates of two topics
        topic = b"k.%d" % (i % 2)
        frames = [b"env-%d" % i, b"x" * 500]
        store.stamp(topic, P.RETAIN, frames)
        log.append(topic, frames, store.bytes, store.items)
    log.close()
    assert (tmp_path / "r.m2mt").stat().st_size < 30_000  # compacted, not 2000 records
    assert len(read_transcript(tmp_path / "r.m2mt").records) < 60
    assert dict(RetainedLog(tmp_path / "r.m2mt").load()) == {b"k.0": [b"env-1998", b"x" * 500],
                                                             b"k.1": [b"env-1999", b"x" * 500]}


def test_a_reply_outlives_its_worker_and_the_broker(procs: Procs) -> None:
    """``--replies FILE``: the worker that answered and the broker both die; the same request sent again (a
    step redone after a takeover) is answered from the broker's kept cache, not run a second time."""
    replies = procs.dir / "replies.m2mt"
    broker = procs.broker("--replies", str(replies))
    worker = procs.worker(name="w1")
    marker = procs.dir / "marker"
    work = Work(key="once", marker=str(marker))

    async def ask() -> WorkDone:
        async with client(procs, name="asker") as bus:
            reply: WorkDone = await bus.request("echo", work, timeout=30, idempotency_key="s1:3:dose")
            return reply

    first = asyncio.run(ask())
    for p in (worker, broker):
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    procs.broker("--replies", str(replies), name="broker-2")
    procs.worker(name="w2")
    again = asyncio.run(ask())
    assert again == first
    assert len(marker_lines(marker, "done")) == 1  # the work ran once


def test_refusals_of_malformed_requests_do_not_flood_the_reply_cache() -> None:
    """A decode error is cheap to give again: it is never kept for its key (a fuzz flood evicted real answers from
    the bounded cache in the chaos suite); a refusal that cost the handler work (BadRequest) and an answer are."""
    from m2m.bus.errors import BadRequest, DecodeError, MessageTooLarge, ProtocolError, UnhandledMessage, UnknownSchema

    assert not any(e.remembered for e in (DecodeError, UnknownSchema, UnhandledMessage, ProtocolError,
                                          MessageTooLarge))
    assert BadRequest.remembered and not BadRequest.retryable
