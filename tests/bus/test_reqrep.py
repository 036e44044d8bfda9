"""Request/reply through a real broker process, workers in their own processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from support.busapp import Echo, EchoReply, Fact, Fail, Work, WorkDone
from support.procs import HB, Procs, wait_until, wait_until_async
from zmq.utils.monitor import recv_monitor_message

from m2m.bus import protocol as P
from m2m.bus.client import BusClient
from m2m.bus.errors import (
    BrokerUnavailable,
    MessageTooLarge,
    RemoteError,
    RequestTimeout,
    ServiceUnavailable,
    UnhandledMessage,
)
from m2m.bus.messages import Envelope, ErrorReply, decode, new_id

pytestmark = pytest.mark.timeout(60)


def client(ps: Procs, name: str = "tester", **kw: object) -> BusClient:
    return BusClient(name, endpoint=ps.endpoint, pub_endpoint=ps.pub, heartbeat=HB, **kw)


async def until_pids(bus: BusClient, n: int, service: str = "echo", timeout: float = 20.0) -> set[int]:
    """Send echo requests until ``n`` distinct workers have answered (they are all registered)."""
    pids: set[int] = set()
    end = time.monotonic() + timeout
    while len(pids) < n:
        assert time.monotonic() < end, f"only {pids} answered"
        r = await bus.request(service, Echo(text="warm"), timeout=10)
        pids.add(r.pid)
    return pids


def marker_lines(path: Path, kind: str) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith(kind + " ")]


def test_request_reply_across_processes_with_arrays(procs: Procs) -> None:
    procs.broker()
    w = procs.worker()

    async def main() -> None:
        async with client(procs) as bus:
            data = np.linspace(0, 1, 10_000)
            r = await bus.request("echo", Echo(text="héllo", data=data), timeout=15, expect=EchoReply)
            assert r == EchoReply(text="héllo", pid=w.pid, total=pytest.approx(data.sum()))

    asyncio.run(main())


def test_two_workers_share_load(procs: Procs) -> None:
    procs.broker()
    w1, w2 = procs.worker(name="w1"), procs.worker(name="w2")
    marker = procs.dir / "marker"

    async def main() -> None:
        async with client(procs) as bus:
            await until_pids(bus, 2)
            replies = await asyncio.gather(
                *(bus.request("echo", Work(key=f"k{i}", marker=str(marker), sleep=0.05), timeout=20)
                  for i in range(20))
            )
            counts = {pid: sum(r.pid == pid for r in replies) for pid in (w1.pid, w2.pid)}
            assert all(isinstance(r, WorkDone) for r in replies)
            assert counts[w1.pid] >= 5 and counts[w2.pid] >= 5, counts  # round robin over busy workers
            assert len(marker_lines(marker, "done")) == 20

    asyncio.run(main())


def test_worker_killed_mid_request_retry_served_by_other_once(procs: Procs) -> None:
    procs.broker()
    workers = {p.pid: p for p in (procs.worker(name="w1"), procs.worker(name="w2"))}
    marker = procs.dir / "marker"

    async def main() -> None:
        async with client(procs) as bus:
            await until_pids(bus, 2)
            task = asyncio.create_task(bus.request("echo", Work(key="once", marker=str(marker), sleep=1.0),
                                                   timeout=20, retries=1))
            await wait_until_async(lambda: marker_lines(marker, "start"), "a worker started the work", timeout=10,
                                   step=0.01)
            victim = int(marker_lines(marker, "start")[0].split()[2])
            os.kill(victim, signal.SIGKILL)
            t_kill = time.monotonic()
            reply = await task
            survivor = next(pid for pid in workers if pid != victim)
            assert reply.pid == survivor
            assert marker_lines(marker, "done") == [f"done once {survivor}"]  # the side effect happened once
            print(f"retry served {time.monotonic() - t_kill:.2f} s after the kill")

    asyncio.run(main())


def test_retries_and_repeats_with_one_idempotency_key_run_once(procs: Procs) -> None:
    procs.broker()
    procs.worker(name="w1")
    procs.worker(name="w2")
    marker = procs.dir / "marker"

    async def main() -> None:
        async with client(procs) as bus:
            await until_pids(bus, 2)
            # attempt window 0.25 s < handler 1.0 s: the client resends 3 times while the first still runs
            r1 = await bus.request("echo", Work(key="a", marker=str(marker), sleep=1.0), timeout=2.0, retries=7)
            # a later request with the same key (e.g. from a restarted caller) gets the stored reply
            assert isinstance(r1, WorkDone)
            assert len(marker_lines(marker, "done")) == 1  # done once despite the 3 resends
            # a new request (new key) does it again
            await bus.request("echo", Work(key="a", marker=str(marker), sleep=0.0), timeout=5)
            assert len(marker_lines(marker, "done")) == 2
            # two requests with one explicit key (e.g. a caller that restarted): done once, same reply
            k3 = await bus.request("echo", Work(key="b", marker=str(marker)), timeout=5, idempotency_key="K")
            k4 = await bus.request("echo", Work(key="b", marker=str(marker)), timeout=5, idempotency_key="K")
            assert k3 == k4
            assert [line.split()[1] for line in marker_lines(marker, "done")] == ["a", "a", "b"]

    asyncio.run(main())


def test_no_live_worker_gives_typed_error_within_deadline(procs: Procs) -> None:
    procs.broker()

    async def main() -> None:
        async with client(procs) as bus:
            await bus.wait_for_broker()
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                await bus.request("nobody", Echo(text="?"), timeout=0.5)
            assert time.monotonic() - t0 < 0.5 + 0.5  # hang guard, not a speed assert

    asyncio.run(main())


def test_no_broker_at_all_gives_timeout_not_a_hang(procs: Procs) -> None:
    async def main() -> None:
        async with client(procs) as bus:
            with pytest.raises(BrokerUnavailable):
                await bus.wait_for_broker(0.2)
            t0 = time.monotonic()
            with pytest.raises((RequestTimeout, BrokerUnavailable)):
                await bus.request("echo", Echo(text="?"), timeout=0.3)
            assert time.monotonic() - t0 < 0.3 + 0.5

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ hostile input
def _raw(ps: Procs) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(ps.endpoint)
    return ctx, s


def _recv_error(s: zmq.Socket, timeout: float = 5.0) -> ErrorReply:
    assert s.poll(int(timeout * 1000)), "no error reply"
    frames = s.recv_multipart()
    assert frames[:2] == [P.CLIENT, P.REPLY]
    _, msg = decode(frames[3:])
    assert isinstance(msg, ErrorReply)
    return msg


def _env_bytes(schema: str = "test.echo", **kw: object) -> bytes:
    import msgspec

    e = Envelope(id=new_id(), schema=schema, version=1, kind="request", route="echo",
                 deadline=time.time() + 10, **kw)  # type: ignore[arg-type]
    return msgspec.msgpack.encode(e)


def test_malformed_and_oversized_frames_to_broker(procs: Procs) -> None:
    procs.broker("--max-message-size", "100000")
    w = procs.worker()
    ctx, s = _raw(procs)
    try:
        s.send_multipart([b"XX", b"garbage"])
        assert _recv_error(s).code == "protocol_error"
        s.send_multipart([P.CLIENT, P.REQUEST])
        assert _recv_error(s).code == "protocol_error"
        s.send_multipart([P.CLIENT, P.REQUEST, b"echo", b"\xc1\xff not msgpack", b"x"])
        assert _recv_error(s).code == "decode_error"
        s.send_multipart([P.CLIENT, P.REQUEST, b"echo", b"\x91" * 5000, b"x"])  # deep nesting
        assert _recv_error(s).code == "decode_error"
        s.send_multipart([P.CLIENT, P.REQUEST, b"\xff\xfe", _env_bytes(), b"x"])  # service not UTF-8
        assert _recv_error(s).code == "protocol_error"
        s.send_multipart([P.CLIENT, P.PUBLISH, b"t", b"\x00", b"junk", b"x"])
        assert _recv_error(s).code == "decode_error"
        s.send_multipart([P.CLIENT, b"\x7f", b"x"])
        assert _recv_error(s).code == "protocol_error"
        env = _env_bytes()
        s.send_multipart([P.CLIENT, P.REQUEST, b"echo", env, b"x" * 150_000])  # over the limit: typed reply
        err = _recv_error(s)
        assert err.code == "message_too_large"
        s.send_multipart([P.CLIENT, P.PUBLISH, b"\xff", b"\x00", env, b"\x80"])  # topic not UTF-8
        assert _recv_error(s).code == "protocol_error"
        s.send_multipart([P.WORKER, P.READY, b"echo", b"not a number"])
        assert _recv_error(s).code == "protocol_error"
        s.send_multipart([P.WORKER, P.REPLY, b"nobody", b"junk", b"x"])
        assert _recv_error(s).code == "decode_error"
        # far over the limit: ZeroMQ drops this connection (MAXMSGSIZE); the broker itself stays up
        monitor = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            s.send_multipart([P.CLIENT, P.REQUEST, b"echo", env, b"x" * 1_000_000])
            wait_until(lambda: monitor.poll(0) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED,
                       "the broker drops the connection of the oversized message", timeout=10)
        finally:
            s.disable_monitor()
            monitor.close(0)
    finally:
        s.close(0)
        ctx.term()

    async def main() -> None:
        async with client(procs) as bus:
            r = await bus.request("echo", Echo(text="still up"), timeout=10)
            assert r.text == "still up" and r.pid == w.pid

    asyncio.run(main())


def test_malformed_payloads_reach_worker_and_it_stays_up(procs: Procs) -> None:
    procs.broker()
    w = procs.worker()

    async def main() -> None:
        async with client(procs, max_message_size=50_000) as bus:
            await until_pids(bus, 1)
            with pytest.raises(UnhandledMessage):
                await bus.request("echo", Fact(value=1), timeout=5)
            with pytest.raises(RemoteError, match="ValueError: on purpose"):
                await bus.request("echo", Fail(why="on purpose"), timeout=5)
            with pytest.raises(RemoteError, match="not encodable"):
                await bus.request("echo", Fail(why="unencodable reply"), timeout=5)
            with pytest.raises(MessageTooLarge):
                await bus.request("echo", Echo(text="x", data=np.zeros(100_000)), timeout=1)

    asyncio.run(main())
    ctx, s = _raw(procs)
    try:
        cases = [
            ([_env_bytes(), b"\xc1 bad payload"], "decode_error"),
            ([_env_bytes(), b"\x81\xa4text\x05"], "decode_error"),  # text is an int
            ([_env_bytes("who.knows"), b"\x80"], "unknown_schema"),
            ([_env_bytes(), b"\x82\xa4text\xa1x\xa4data\x00"], "decode_error"),  # array frame missing
        ]
        for m, code in cases:
            s.send_multipart([P.CLIENT, P.REQUEST, b"echo", *m])
            assert _recv_error(s).code == code
    finally:
        s.close(0)
        ctx.term()

    async def again() -> None:
        async with client(procs) as bus:
            r = await bus.request("echo", Echo(text="ok"), timeout=10)
            assert r.pid == w.pid and w.poll() is None

    asyncio.run(again())


# ------------------------------------------------------------------------------------------ broker restart
@pytest.mark.timeout(90)
@pytest.mark.parametrize("down_for", [0.3, 1.5], ids=["quick", "past-liveness"])
def test_broker_killed_and_restarted_traffic_resumes(procs: Procs, down_for: float) -> None:
    """``quick``: the broker is back within the client's liveness window (here 15 heartbeats, 3 s): the pending
    request is resent to the new broker and served. ``past-liveness``: the broker stays down longer than the
    window (3 heartbeats), so the pending request fails with :class:`BrokerUnavailable` (typed, at once, not at
    its 30 s deadline); the same request sent again (same key) once the broker is back is served, once; the worker
    went through its Paranoid-Pirate reconnect (new socket, back-off) meanwhile."""
    broker = procs.broker()
    w = procs.worker()
    marker = procs.dir / "marker"
    quick = down_for < 3 * HB

    async def main() -> None:
        async with client(procs, liveness=15 if quick else 3) as bus:
            await until_pids(bus, 1)
            broker.send_signal(signal.SIGKILL)
            broker.wait(timeout=10)
            # a request sent while no broker runs: it must be served once a new broker is up
            work = Work(key="r", marker=str(marker))
            task = asyncio.create_task(bus.request("echo", work, timeout=30, idempotency_key="r"))
            await asyncio.sleep(down_for)
            if quick:
                assert not task.done()
            else:
                with pytest.raises(BrokerUnavailable):
                    await task
            t0 = time.monotonic()
            procs.broker(ready=False)  # in the coroutine: no blocking wait
            if not quick:  # a lost broker: wait for the new one, then ask again
                await bus.wait_for_broker(20)
                task = asyncio.create_task(bus.request("echo", work, timeout=30, idempotency_key="r"))
            reply = await task
            recovery = time.monotonic() - t0
            assert reply.pid == w.pid  # the same worker re-registered with the new broker
            r2 = await bus.request("echo", Echo(text="after"), timeout=10)
            assert r2.text == "after"
            assert len(marker_lines(marker, "done")) == 1
            print(f"\nBROKER_RESTART_RECOVERY down {down_for} s: {recovery:.3f} s from new broker spawn to reply")
            assert recovery < 20  # hang guard only

    asyncio.run(main())
    worker_log = next(log for log in procs.logs if log.name.startswith("worker")).read_text()
    if down_for > 3 * HB:  # (the quick case may reconnect too: a new broker takes a while to start)
        assert "broker_silent_reconnecting" in worker_log
