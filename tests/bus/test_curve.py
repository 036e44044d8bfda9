"""CURVE: only peers with an authorised key may talk to a broker; non-local binds require CURVE."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.busapp import Echo
from support.procs import HB, Procs, wait_until_async

from m2m.bus.broker import Broker, BrokerConfig
from m2m.bus.client import BusClient
from m2m.bus.errors import BrokerUnavailable, RequestTimeout, SecurityError
from m2m.bus.security import ClientKeys, generate_keys, is_local

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_is_local() -> None:
    assert is_local("ipc:///tmp/x") and is_local("tcp://127.0.0.1:5555") and is_local("tcp://localhost:1")
    assert not is_local("tcp://0.0.0.0:5555") and not is_local("tcp://*:5555") and not is_local("tcp://10.0.0.1:1")


def test_non_local_bind_without_curve_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurityError):
        Broker(BrokerConfig(endpoint=f"tcp://0.0.0.0:{free_port()}", pub_endpoint=f"ipc://{tmp_path}/p"))
    r = subprocess.run([sys.executable, "-m", "m2m.bus.broker", "--endpoint", f"tcp://*:{free_port()}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "CURVE" in r.stderr


def test_curve_broker_admits_only_authorised_keys(procs: Procs) -> None:
    keys = procs.dir / "keys"
    allowed = procs.dir / "allowed"
    generate_keys("broker", keys)
    generate_keys("agent", allowed)
    generate_keys("rogue", keys)  # a valid key pair the broker has never been told about
    ep, pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    procs.broker("--curve-secret", str(keys / "broker.key_secret"), "--curve-clients", str(allowed),
                 endpoint=ep, pub=pub)
    procs.busapp("worker", "--endpoint", ep, "--pub", pub, "--heartbeat", str(HB),
                 "--secret", str(allowed / "agent.key_secret"), "--server-key", str(keys / "broker.key"),
                 name="worker")
    good = ClientKeys.load(allowed / "agent.key_secret", keys / "broker.key")
    rogue = ClientKeys.load(keys / "rogue.key_secret", keys / "broker.key")

    async def main() -> None:
        async with BusClient("good", endpoint=ep, pub_endpoint=pub, heartbeat=HB, curve=good) as bus:
            replies: list[Echo] = []

            async def answered() -> bool:
                try:
                    replies.append(await bus.request("echo", Echo(text="secret"), timeout=2))
                except RequestTimeout:  # the worker may still be starting
                    return False
                return True

            await wait_until_async(answered, "the authorised worker answers over CURVE", timeout=20, step=0)
            assert replies[0].text == "secret"
        for curve in (rogue, None):
            async with BusClient("bad", endpoint=ep, pub_endpoint=pub, heartbeat=HB, curve=curve) as bad:
                with pytest.raises((RequestTimeout, BrokerUnavailable)):
                    await bad.request("echo", Echo(text="let me in"), timeout=1.0)
                assert bad.broker_incarnation == 0  # not even a heartbeat answer got through

    asyncio.run(main())
