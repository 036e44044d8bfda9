"""The broker records every routed message; ``m2m transcript show`` prints and filters a session."""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import pytest
from support.busapp import Echo, EchoReply, Fact
from support.procs import HB, Procs

from m2m.bus.client import BusClient
from m2m.bus.errors import ServiceUnavailable
from m2m.bus.transcript import read_transcript, session_index
from m2m.cli.bus import add_commands

pytestmark = pytest.mark.timeout(60)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench").add_subparsers()
    add_commands(sub, bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_broker_transcript_records_requests_replies_events_errors(procs: Procs, capsys) -> None:  # type: ignore[no-untyped-def]
    path = procs.dir / "session.m2mt"
    broker = procs.broker("--transcript", str(path))
    procs.worker(name="w1")

    async def main() -> None:
        async with BusClient("planner", endpoint=procs.endpoint, pub_endpoint=procs.pub, heartbeat=HB,
                             session="S1") as bus:
            r = await bus.request("echo", Echo(text="a", data=np.arange(5.0)), timeout=15)
            assert isinstance(r, EchoReply)
            await bus.publish("k.fact", Fact(value=7), retain=True)
            with pytest.raises(ServiceUnavailable):
                await bus.request("nobody", Echo(text="b"), timeout=0.3, retries=0)
        async with BusClient("other", endpoint=procs.endpoint, pub_endpoint=procs.pub, heartbeat=HB,
                             session="S2") as bus:
            await bus.request("echo", Echo(text="c"), timeout=15)

    asyncio.run(main())
    broker.kill()  # SIGKILL: the transcript was flushed per record
    broker.wait(timeout=10)
    c = read_transcript(path)
    assert c.torn_at is None
    s1 = [r for r in c.records if r.session == "S1"]
    assert [(r.direction, r.kind, r.route) for r in s1] == [
        ("in", "request", "echo"), ("in", "reply", "echo"), ("in", "event", "k.fact"),
        ("in", "request", "nobody"), ("out", "error", "nobody"),
    ]
    # resends of one request are recorded too, as "retry"
    assert {r.kind for r in c.records if r.session == "S2"} == {"request", "reply"}
    req, rep = s1[0], s1[1]
    assert rep.decode_envelope().corr == req.decode_envelope().id  # replies point at their request
    np.testing.assert_array_equal(req.decode().data, np.arange(5.0))  # type: ignore[attr-defined]
    assert all(a.t <= b.t for a, b in zip(c.records, c.records[1:], strict=False))
    assert set(session_index(path)) == {"S1", "S2"}

    capsys.readouterr()
    assert cli(["transcript", "show", str(path), "--session", "S1", "--width", "200"]) == 0
    out = capsys.readouterr().out
    assert "k.fact" in out and "Fact(value=7)" in out and "EchoReply" in out and "S2" not in out
    assert cli(["transcript", "show", str(path), "--agent", "other"]) == 0
    out = capsys.readouterr().out
    assert "S2" in out and "S1" not in out
    assert cli(["transcript", "show", str(path), "--type", "test.fact"]) == 0
    out = capsys.readouterr().out
    assert "Fact(value=7)" in out and "echo" not in out.split("records")[1]


def test_keys_command_writes_a_key_pair(procs: Procs) -> None:
    assert cli(["keys", "alice", "--dir", str(procs.dir / "k")]) == 0
    assert (procs.dir / "k" / "alice.key").exists() and (procs.dir / "k" / "alice.key_secret").exists()
    assert (procs.dir / "k" / "alice.key_secret").stat().st_mode & 0o077 == 0


def test_transcript_show_without_the_message_classes(procs: Procs) -> None:
    """``m2m transcript show`` in a process that never imported the agents' types still prints the fields."""
    import subprocess
    import sys

    from m2m.bus.messages import Envelope, encode, new_id
    from m2m.bus.transcript import TranscriptWriter

    path = procs.dir / "t.m2mt"
    w = TranscriptWriter(path)
    env = Envelope(id=new_id(), schema="", version=0, sender="planner", session="S9")
    frames = [bytes(f) for f in encode(Echo(text="hello", data=np.zeros((2, 3))), env)]
    w.append(t=0.0, direction="in", kind="request", route="echo", peer="", session="S9", frames=frames)
    w.close()
    code = ("import sys; from m2m.cli.bus import add_commands; import argparse; p = argparse.ArgumentParser();"
            "s = p.add_subparsers(); add_commands(s, s.add_parser('b')"
            ".add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    r = subprocess.run([sys.executable, "-c", code, "transcript", "show", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "test.echo{'text': 'hello', 'data': 0}" in r.stdout and "<f8[2, 3]" in r.stdout
