"""A poisoned message (a valid envelope whose array spec numpy cannot even parse) does not stop a follower: the
subscription logs it once, counts it, and delivers what comes next — from the snapshot and live. Transcripts that
hold such a record still show, and replay's reader skips it."""

from __future__ import annotations

import argparse
import asyncio
import time

import msgspec
import pytest
import zmq
from support.busapp import Echo, Fact
from support.procs import Procs, wait_until_async

from m2m.bus import protocol as P
from m2m.bus.client import BusClient
from m2m.bus.clone import CATCH_UP_S
from m2m.bus.messages import ArraySpec, Envelope, new_id
from m2m.bus.transcript import TranscriptWriter, read_transcript
from m2m.cli.bus import add_commands

pytestmark = pytest.mark.timeout(60)


def _poison(route: str) -> list[bytes]:
    """[envelope, payload, array]: a well-formed Echo whose array's dtype is ``","`` (numpy: SyntaxError)."""
    env = Envelope(id=new_id(), schema=Echo.schema, version=Echo.version, sender="mallory", kind="event", route=route,
                   ts=time.time(), arrays=[ArraySpec(",", (1,))])
    return [msgspec.msgpack.encode(env), msgspec.msgpack.encode({"text": "poison", "data": 0}), b"\x00" * 8]


def _publish_raw(procs: Procs, topic: str, retain: bool) -> None:
    """Publish through a raw DEALER (what a hostile peer would do), and make sure the broker has handled it."""
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.linger = 1000
        s.connect(procs.endpoint)
        s.send_multipart([P.CLIENT, P.PUBLISH, topic.encode(), bytes([P.RETAIN if retain else 0]), *_poison(topic)])
        s.send_multipart([P.CLIENT, P.PING])  # answered after the publish was handled (one connection, in order)
        assert s.poll(10_000), "the broker did not answer"
        assert s.recv_multipart()[1] == P.PONG
    finally:
        ctx.destroy(linger=1000)


def test_poisoned_retained_message_is_skipped_once_and_the_follower_goes_on(procs: Procs) -> None:
    procs.broker()

    async def main() -> None:
        async with BusClient("honest", procs.config()) as bus:
            await bus.wait_for_broker(30)
            _publish_raw(procs, "know.a", retain=True)  # poisoned knowledge, retained by the broker
            await bus.publish("know.b", Fact(value=1), retain=True)
            assert set(await bus.retained("know.")) == {"know.b"}  # one-off reads leave the poison out too
            sub = bus.subscribe("know.")
            d = await sub.get(timeout=15)  # from the snapshot
            assert d.topic == "know.b" and isinstance(d.message, Fact) and d.snapshot
            assert sub.errors == 1
            # live: another poisoned value, then a good one; past the catch-up snapshot (which brings the first
            # poison again: not counted twice)
            await asyncio.sleep(CATCH_UP_S + 0.2)
            _publish_raw(procs, "know.c", retain=False)
            await bus.publish("know.d", Fact(value=2), retain=True)
            d = await sub.get(timeout=15)
            assert d.topic == "know.d" and d.message == Fact(value=2) and not d.snapshot
            await wait_until_async(lambda: sub.errors == 2, "the live poison was counted", timeout=10)
            assert sub.errors == 2

    asyncio.run(main())


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub, sub.add_parser("bench").add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_transcript_with_a_poisoned_and_an_undecodable_record_still_shows(
    procs: Procs, capsys: pytest.CaptureFixture[str]
) -> None:
    from m2m.bus.messages import encode

    path = procs.dir / "t.m2mt"
    w = TranscriptWriter(path)
    w.append(t=0.0, direction="in", kind="event", route="know.a", peer="", session="S", frames=_poison("know.a"))
    w.append(t=1.0, direction="in", kind="event", route="know.b", peer="", session="S",
             frames=[bytes(f) for f in encode(Fact(value=5), Envelope(id=new_id(), schema="", version=0))])
    w.close()
    # a third record whose checksum holds but whose body is not a record at all
    import zlib

    body = b"\x93\x01\x02\x03"
    with open(path, "ab") as f:
        f.write(len(body).to_bytes(4, "big") + zlib.crc32(body).to_bytes(4, "big") + body)
    w = TranscriptWriter(path)
    w.append(t=2.0, direction="in", kind="event", route="know.c", peer="", session="S",
             frames=[bytes(f) for f in encode(Fact(value=6), Envelope(id=new_id(), schema="", version=0))])
    w.close()
    c = read_transcript(path)
    assert [r.route for r in c.records] == ["know.a", "know.b", "know.c"] and len(c.skipped) == 1
    assert [r.n for r in c.records] == [0, 1, 2]
    capsys.readouterr()
    assert _cli(["transcript", "show", str(path), "--width", "300"]) == 0
    out = capsys.readouterr().out
    assert "DecodeError" in out and "Fact(value=5)" in out and "Fact(value=6)" in out
    assert "1 unreadable record(s) skipped" in out


def test_replay_reader_skips_a_poisoned_session_record(procs: Procs) -> None:
    """``m2m replay`` reads finished sessions from a transcript: a poisoned session reply is skipped (one warning),
    not a crash."""
    from m2m.agents.messages import SESSION
    from m2m.session.client import recorded_sessions

    path = procs.dir / "t.m2mt"
    w = TranscriptWriter(path)
    frames = _poison(SESSION)
    w.append(t=0.0, direction="in", kind="reply", route=SESSION, peer="", session="S", frames=frames)
    w.close()
    assert recorded_sessions(path) == {}
