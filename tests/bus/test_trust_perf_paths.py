"""The fast paths of the bus (issue 19, "Speed") keep their meaning: message boundaries on the reactor's and the
broker's frame-by-frame receive, the rest of an oversized message discarded, a worker's heartbeat frames built
from the keys it runs when they are sent, finished jobs forgotten, and the bench's numbers consistent. No timing
asserts: speed is measured by ``m2m bench bus``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import zmq
from support.busapp import Echo, EchoReply
from support.procs import HB, Procs

from m2m.bus import bench
from m2m.bus import protocol as P
from m2m.bus.client import BusClient, RequestContext
from m2m.bus.errors import MessageTooLarge
from m2m.bus.messages import ErrorReply, decode, new_id
from m2m.bus.reactor import Conn, readable, recv_frames

pytestmark = pytest.mark.timeout(90)

MESSAGES = [
    [b"a", b"", b"c"],
    [b"single"],
    [b"", b"x" * (1 << 20), b"tail"],
    [b"last", b"\x00" * 3],
]


def test_reactor_keeps_message_boundaries_and_sees_input_after_a_send(procs: Procs) -> None:
    """Messages of several frames (empty and 1 MiB ones too) arrive whole and in order through :class:`Conn`,
    including those that arrived before the reader was added, and a send does not hide waiting input."""
    ctx: zmq.Context[Any] = zmq.Context()
    peer = ctx.socket(zmq.ROUTER)
    peer.linger = 0
    ep = procs.endpoint + "-reactor"  # in the fixture's short temp folder
    peer.bind(ep)

    async def main() -> list[list[bytes]]:
        got: list[list[bytes]] = []
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(ep)
        sock.send_multipart([b"hello"])
        ident, hello = peer.recv_multipart()
        assert hello == b"hello"
        for m in MESSAGES[:2]:  # before the Conn exists: its first drain must find them
            peer.send_multipart([ident, *m])
        await asyncio.sleep(0.05)
        conn = Conn(sock, got.append)
        for m in MESSAGES[2:]:
            peer.send_multipart([ident, *m])
        await asyncio.sleep(0.05)
        assert conn.send_nowait([b"after", b"send"])  # input that comes with a send is still read
        peer.send_multipart([ident, b"late"])
        for _ in range(200):
            if len(got) == len(MESSAGES) + 1:
                break
            await asyncio.sleep(0.01)
        assert peer.recv_multipart() == [ident, b"after", b"send"]
        assert not readable(sock)
        conn.close()
        return got

    try:
        got = asyncio.run(main())
    finally:
        peer.close(0)
        ctx.term()
    assert got == [*MESSAGES, [b"late"]]


def test_recv_frames_reads_one_message_at_a_time() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://frames")
        b.connect("inproc://frames")
        for m in MESSAGES:
            a.send_multipart(m)
        out = []
        for _ in MESSAGES:
            assert b.poll(2000)
            out.append(recv_frames(b))
        assert out == MESSAGES
        with pytest.raises(zmq.Again):
            recv_frames(b)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_broker_discards_the_rest_of_an_oversized_message_and_reads_the_next_one(procs: Procs) -> None:
    procs.broker("--max-message-size", "4096", "--max-frames", "8")
    ctx: zmq.Context[Any] = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(procs.endpoint)
    try:
        env = b"\x80"  # never decoded: the size check comes first
        s.send_multipart([P.CLIENT, P.REQUEST, b"echo", env, *([b"x" * 1500] * 6)])  # 9000 bytes > 4096
        s.send_multipart([P.CLIENT, P.REQUEST, b"echo", env, *([b"y"] * 12)])  # too many frames
        s.send_multipart([P.CLIENT, P.PING])
        answers: list[list[bytes]] = []
        while len(answers) < 3 and s.poll(10_000):
            answers.append(s.recv_multipart())
        assert [a[:2] for a in answers] == [[P.CLIENT, P.REPLY]] * 2 + [[P.CLIENT, P.PONG]]
        for a in answers[:2]:
            _, err = decode(a[3:])
            assert isinstance(err, ErrorReply) and err.code == MessageTooLarge.code
    finally:
        s.close(0)
        ctx.term()


def test_worker_reports_running_keys_at_heartbeat_time_and_forgets_finished_jobs(procs: Procs) -> None:
    procs.broker()

    async def main() -> None:
        release = asyncio.Event()
        started = asyncio.Event()

        async def on_echo(msg: Echo, ctx: RequestContext) -> EchoReply:
            started.set()
            await release.wait()
            return EchoReply(text=msg.text, pid=os.getpid())

        async with BusClient("perf-w", endpoint=procs.endpoint, pub_endpoint=procs.pub, heartbeat=HB) as srv, \
                BusClient("perf-c", endpoint=procs.endpoint, pub_endpoint=procs.pub, heartbeat=HB) as cl:
            w = await srv.serve("echo", {Echo: on_echo}, capacity=2)
            assert P.unpack_keys(w.hello_frames()[2]) == set()
            idem = new_id()
            call = asyncio.create_task(cl.request("echo", Echo(text="hi"), timeout=20, idempotency_key=idem))
            await asyncio.wait_for(started.wait(), 15)
            service, capacity, keys = w.hello_frames()
            assert (service, capacity) == (b"echo", b"2")
            assert [k[0] for k in P.unpack_keys(keys)] == [idem]
            assert len(w._jobs) == 1
            release.set()
            reply = await call
            assert isinstance(reply, EchoReply) and reply.text == "hi"
            for _ in range(100):
                if not w._jobs:
                    break
                await asyncio.sleep(0.01)
            assert not w._jobs and P.unpack_keys(w.hello_frames()[2]) == set()
            # many at once through the same sockets: every reply reaches its caller
            replies = await asyncio.gather(*(cl.request("echo", Echo(text=str(i)), timeout=20) for i in range(200)))
            assert [r.text for r in replies] == [str(i) for i in range(200)]

    asyncio.run(main())


def test_new_ids_are_unique_hex() -> None:
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in list(ids)[:100])


def test_bench_cpu_meter_and_json_numbers(tmp_path: Path) -> None:
    """The bench writes its numbers as JSON; the ratios are the ratios of the medians it printed, and every
    process's CPU per round trip is there (values are not asserted: they depend on the machine)."""
    own = bench._cpu(os.getpid())
    if own is None:
        pytest.skip("no /proc: the bench reports CPU as n/a here")
    assert own[0] >= own[1] >= 0
    out = tmp_path / "bench.json"
    assert bench.main(argparse.Namespace(n=30, events=300, json=str(out))) == 0
    r = json.loads(out.read_text())
    assert r["ratio_bus_proxy"] == pytest.approx(r["bus_rt_us"] / r["proxy_rt_us"])
    assert r["ratio_bus_raw"] == pytest.approx(r["bus_rt_us"] / r["raw_rt_us"])
    assert (r["goal_ratio_bus_proxy"], r["goal_events_per_s"]) == (1.3, 100_000)
    assert set(r["cpu_per_rt"]) == {"bus", "proxy", "raw"}
    assert set(r["cpu_per_rt"]["bus"]) == {"broker", "worker", "client"}
    assert set(r["cpu_per_rt"]["proxy"]) == {"proxy", "echo", "client"}
    assert set(r["cpu_per_event"]) == {"publisher", "broker", "subscriber"}
    for v in r["cpu_per_rt"]["bus"].values():
        assert v["total_us"] >= v["io_thread_us"] >= 0
    assert r["events_received"] > 0
