"""The loopback check parses addresses; a broker that cannot bind says so in one line and exits 2."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from support.procs import Procs

from m2m.bus.errors import SecurityError
from m2m.bus.security import is_local, require_safe_bind

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("endpoint", "local"), [
    ("tcp://127.0.0.1:5555", True),
    ("tcp://127.3.4.5:5555", True),
    ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True),
    ("ipc:///tmp/x", True),
    ("inproc://x", True),
    ("tcp://127.evil.com:5555", False),
    ("tcp://127.0.0.1.evil.com:5555", False),
    ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False),
    ("tcp://[::]:5555", False),
    ("tcp://10.0.0.1:5555", False),
    ("tcp://eth0;127.0.0.1:5555", False),
    ("tcp://127.0.0.1", False),
    ("udp://127.0.0.1:5555", False),
])
def test_is_local_parses_the_address(endpoint: str, local: bool) -> None:
    assert is_local(endpoint) is local


def test_insecure_bind_beyond_loopback_is_refused() -> None:
    with pytest.raises(SecurityError):
        require_safe_bind("tcp://127.evil.com:5555", curve=False)
    require_safe_bind("tcp://127.evil.com:5555", curve=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_second_broker_on_the_same_port_says_so_in_one_line(procs: Procs) -> None:
    ep = f"tcp://127.0.0.1:{_free_port()}"
    procs.broker(endpoint=ep, pub=f"tcp://127.0.0.1:{_free_port()}")
    r = subprocess.run([sys.executable, "-m", "m2m.cli.main", "broker", "--endpoint", ep,
                        "--pub-endpoint", f"tcp://127.0.0.1:{_free_port()}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"m2m broker: cannot bind {ep}: Address already in use"], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_bad_address_says_so_in_one_line(procs: Procs) -> None:
    ep = f"ipc://{procs.dir}/no-such-folder/bus"
    r = subprocess.run([sys.executable, "-m", "m2m.bus.broker", "--endpoint", ep, "--pub-endpoint",
                        f"ipc://{procs.dir}/pub"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"m2m broker: cannot bind {ep}: "), r.stderr


def test_bad_peer_input_is_a_warning_without_a_traceback(procs: Procs) -> None:
    """Hostile frames to the broker (bad header, bad command, truncated envelope, poisoned array spec) and a request
    the worker cannot decode are warnings in the logs, never errors with tracebacks (those are for bugs)."""
    import asyncio

    import msgspec
    import zmq
    from support.busapp import Echo

    from m2m.bus import protocol as P
    from m2m.bus.client import BusClient
    from m2m.bus.messages import ArraySpec, Envelope, encode, new_id

    procs.broker()
    procs.worker()
    env = Envelope(id=new_id(), schema="", version=0, kind="request", route="echo", idem="k1")
    good = [bytes(f) for f in encode(Echo(text="x"), env)]
    unknown = msgspec.msgpack.encode(Envelope(id=new_id(), schema="no.such.schema", version=1, kind="request",
                                              route="echo", idem="k2"))
    poisoned = msgspec.msgpack.encode(Envelope(id=new_id(), schema=Echo.schema, version=Echo.version,
                                               kind="request", route="echo", idem="k3",
                                               arrays=[ArraySpec(",", (1,))]))
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(procs.endpoint)
    for frames in ([b"XX", b"\x01", b"?"], [P.CLIENT, b"\x7f", b"?"], [P.CLIENT, P.REQUEST, b"echo", good[0][:5], b""],
                   [P.CLIENT, P.REQUEST, b"echo", unknown, good[1]],
                   [P.CLIENT, P.REQUEST, b"echo", poisoned, good[1], b"\x00"]):
        s.send_multipart(frames)

    async def still_served() -> str:
        async with BusClient("after", procs.config()) as bus:
            reply = await bus.request("echo", Echo(text="after"), timeout=10)
            return str(reply.text)

    assert asyncio.run(still_served()) == "after"
    s.close()
    ctx.term()
    broker_log = procs.log("broker").read_text()
    worker_log = procs.log("worker").read_text()
    assert broker_log.count("bad_message") >= 3, broker_log[-3000:]
    for log in (broker_log, worker_log):
        assert "Traceback" not in log, log[-3000:]
        assert "[error" not in log and '"level": "error"' not in log, log[-3000:]
