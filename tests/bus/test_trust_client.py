"""Clients notice a dead broker: pending requests fail with BrokerUnavailable after ``heartbeat × liveness`` s of
silence (not at their own, much later, deadline), and a broker restarted within that window is re-joined
transparently. Real broker and worker processes on ipc://."""

from __future__ import annotations

import asyncio
import time

import pytest
from support.busapp import Echo, EchoReply
from support.procs import HB, Procs, running, wait_until_async

from m2m.bus.client import BusClient
from m2m.bus.errors import BrokerUnavailable, BusError

pytestmark = pytest.mark.timeout(90)


def test_pending_request_fails_with_broker_unavailable_when_the_broker_dies(procs: Procs) -> None:
    broker = procs.broker()

    async def main() -> None:
        async with BusClient("client", procs.config()) as bus:
            await bus.wait_for_broker(30)
            assert bus.broker_alive
            # no worker for the service: the broker holds the request, which would wait up to its 60 s deadline
            task = asyncio.create_task(bus.request("nobody", Echo(text="?"), timeout=60))
            await asyncio.sleep(3 * HB)
            assert not task.done()
            t0 = time.monotonic()
            broker.kill()
            broker.wait(timeout=10)
            with pytest.raises(BrokerUnavailable) as failed:
                await task
            # a correctness bound (well under the 60 s the request would otherwise wait), not a speed claim
            assert time.monotonic() - t0 < 30
            assert procs.endpoint in str(failed.value) and "silent for" in str(failed.value)
            assert not bus.broker_alive
            # a request made while the broker is gone fails the same way, not at its own 60 s deadline
            t1 = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await bus.request("echo", Echo(text="?"), timeout=60)
            assert time.monotonic() - t1 < 30
            # a broker that comes back later is found again, and serves
            procs.broker(ready=False)  # in the coroutine: no blocking wait
            procs.worker()
            await bus.wait_for_broker(30)
            assert bus.broker_alive
            reply = await bus.request("echo", Echo(text="back"), timeout=30)
            assert isinstance(reply, EchoReply) and reply.text == "back"

    asyncio.run(main())


def test_wait_for_broker_without_a_broker_raises_broker_unavailable(procs: Procs) -> None:
    async def main() -> None:
        async with BusClient("client", procs.config()) as bus:
            with pytest.raises(BrokerUnavailable, match="no broker answers at"):
                await bus.wait_for_broker(0.3)
            assert not bus.broker_alive
            with pytest.raises(BusError):  # RequestTimeout or BrokerUnavailable, whichever comes first
                await bus.request("echo", Echo(text="?"), timeout=0.3)

    asyncio.run(main())


def test_broker_restarted_within_the_window_is_rejoined_transparently(request: pytest.FixtureRequest) -> None:
    # a heartbeat of 1 s and a client liveness of 5: a window of 5 s, ample for a broker process to restart
    with running("m2mr", request, heartbeat=1.0) as procs:
        broker = procs.broker()

        async def main() -> None:
            cfg = procs.config()
            cfg.liveness = 5
            async with BusClient("client", cfg) as bus:
                first = await bus.wait_for_broker(30)
                task = asyncio.create_task(bus.request("echo", Echo(text="kept"), timeout=60))
                await asyncio.sleep(0.3)  # the request reached the first broker (no worker yet)
                broker.kill()
                broker.wait(timeout=10)
                procs.broker(ready=False)
                await wait_until_async(lambda: bus.broker_incarnation not in (0, first),
                                       "the client met the new broker", timeout=30)
                assert not task.done()  # the pending request survived the restart
                assert bus.broker_alive
                procs.worker()
                reply = await task  # resent with its key to the new broker, served by the new worker
                assert isinstance(reply, EchoReply) and reply.text == "kept"

        asyncio.run(main())
