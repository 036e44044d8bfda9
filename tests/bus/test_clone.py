"""Knowledge topics (Clone: last value + snapshot for late joiners) and gap detection on event topics."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from busapp import Fact
from bushelpers import HB, HERE, Procs, wait_until

from m2m.bus.client import BusClient
from m2m.bus.clone import Delivery

pytestmark = pytest.mark.timeout(60)


def client(ps: Procs, name: str = "tester") -> BusClient:
    return BusClient(name, endpoint=ps.endpoint, pub_endpoint=ps.pub, heartbeat=HB)


def publisher(ps: Procs, topic: str, count: int, *, retain: bool, name: str = "pub"):  # type: ignore[no-untyped-def]
    args = [str(HERE / "busapp.py"), "publisher", "--endpoint", ps.endpoint, "--pub", ps.pub, "--topic", topic,
            "--count", str(count), "--heartbeat", str(HB), "--name", name]
    return ps.spawn(*args, *(["--retain"] if retain else []), name=name)


def published(ps: Procs, n: int = 1) -> bool:
    return sum("published" in log.read_text() for log in ps.logs if log.name.startswith("pub")) >= n


async def snapshot_value(bus: BusClient, prefix: str, want: int, timeout: float = 15.0) -> Delivery:
    """Subscribe as a late joiner until the snapshot holds ``want`` (the publisher may still be sending)."""
    end = time.monotonic() + timeout
    while True:
        sub = bus.subscribe(prefix)
        try:
            d = await sub.get(timeout=2)
        except TimeoutError:
            d = None
        finally:
            sub.close()
        if d is not None and d.snapshot and isinstance(d.message, Fact) and d.message.value == want:
            return d
        assert time.monotonic() < end, f"snapshot never reached {want}: {d}"
        await asyncio.sleep(0.05)


def test_late_joiner_gets_knowledge_snapshot_then_updates(procs: Procs) -> None:
    procs.broker()
    pub = publisher(procs, "k.fact", 5, retain=True, name="pub-k")
    publisher(procs, "ev.noise", 3, retain=False, name="pub-ev")
    wait_until(lambda: published(procs, 2), timeout=20)

    async def main() -> None:
        async with client(procs, "late") as bus:
            d = await snapshot_value(bus, "k.", 4)
            assert d.retained and d.topic == "k.fact" and d.seq == 5 and d.gap == 0
            assert d.envelope.sender == "pub-k" and d.envelope.schema == "test.fact"
            sub = bus.subscribe("")
            first = await sub.get(timeout=5)
            assert first.snapshot and first.topic == "k.fact"  # events are not knowledge: not in the snapshot
            await asyncio.sleep(0.3)  # let the SUB connection settle before the live update
            await bus.publish("k.fact", Fact(value=99), retain=True)
            live = await sub.get(timeout=5)
            while live.topic != "k.fact":  # events published meanwhile (none expected, but not our subject)
                live = await sub.get(timeout=5)
            assert (live.snapshot, live.seq, live.message, live.gap) == (False, 6, Fact(value=99), 0)
            sub.close()
            assert pub.poll() is None

    asyncio.run(main())


def test_subscriber_detects_sequence_gap(procs: Procs) -> None:
    procs.broker("--pub-hwm", "20")
    total = 20_000

    async def main() -> None:
        async with client(procs, "slow") as bus:
            sub = bus.subscribe("ev.", snapshot=False, hwm=10)
            # make sure the subscription is live before the burst (slow-joiner syndrome)
            end = time.monotonic() + 10
            while True:
                await bus.publish("ev.probe", Fact(value=-1))
                try:
                    await sub.get(timeout=0.2)
                    break
                except TimeoutError:
                    assert time.monotonic() < end
            publisher(procs, "ev.tick", total, retain=False, name="pub-burst")
            wait_until(lambda: published(procs), timeout=30)  # blocks the loop: the subscriber reads nothing
            await asyncio.sleep(0.5)
            got: list[Delivery] = []
            while True:
                try:
                    d = await sub.get(timeout=0.5)
                except TimeoutError:
                    break
                if d.topic == "ev.tick":
                    got.append(d)
            assert got, "nothing arrived"
            gaps = sum(d.gap for d in got)
            assert gaps > 0 and any(d.gap for d in got)  # the loss is visible to the subscriber
            assert len(got) + gaps == got[-1].seq - got[0].seq + 1  # and exactly accounted for
            assert [d.message.value for d in got] == [d.seq - 1 for d in got]  # type: ignore[attr-defined]
            sub.close()

    asyncio.run(main())


@pytest.mark.timeout(90)
def test_knowledge_survives_broker_restart(procs: Procs) -> None:
    broker = procs.broker()
    publisher(procs, "k.plan", 3, retain=True, name="pub-k")
    wait_until(lambda: published(procs), timeout=20)

    async def main() -> None:
        async with client(procs, "late") as bus:
            await snapshot_value(bus, "k.", 2)
            broker.send_signal(signal.SIGKILL)
            broker.wait(timeout=10)
            procs.broker()
            # the publisher sees the new broker incarnation and re-asserts its last value
            d = await snapshot_value(bus, "k.", 2, timeout=20)
            assert d.seq == 1 and d.envelope.sender == "pub-k"

    asyncio.run(main())


def test_subscriber_survives_undecodable_deliveries(procs: Procs) -> None:
    """A newer agent's unknown message type (or junk) on a topic is skipped and counted, not fatal."""
    import msgspec
    import zmq

    from m2m.bus import protocol as P
    from m2m.bus.messages import Envelope

    procs.broker()

    async def main() -> None:
        async with client(procs, "reader") as bus:
            sub = bus.subscribe("k.", snapshot=False)
            end = time.monotonic() + 10
            while True:  # subscription live?
                await bus.publish("k.probe", Fact(value=-1))
                try:
                    await sub.get(timeout=0.2)
                    break
                except TimeoutError:
                    assert time.monotonic() < end
            ctx = zmq.Context()
            raw = ctx.socket(zmq.DEALER)
            raw.linger = 5000  # deliver before close
            raw.connect(procs.endpoint)
            for schema, payload in (("from.the.future", b"\x80"), ("test.fact", b"\xc1"), ("test.fact", b"\x81")):
                env = msgspec.msgpack.encode(Envelope(id="x", schema=schema, version=1, kind="event"))
                raw.send_multipart([P.CLIENT, P.PUBLISH, b"k.x", b"\x00", env, payload])
            raw.close()
            ctx.term()
            while sub.errors < 3:  # the broker numbered and forwarded them; the subscriber skipped them
                assert time.monotonic() < end + 10
                await asyncio.sleep(0.01)
            await bus.publish("k.x", Fact(value=42))
            d = await sub.get(timeout=5)
            while d.topic != "k.x":
                d = await sub.get(timeout=5)
            assert d.message == Fact(value=42) and d.seq == 4 and d.gap == 0  # 3 bad ones numbered, skipped
            assert sub.errors == 3

    asyncio.run(main())


def test_value_published_before_the_subscription_is_live_still_arrives(procs: Procs) -> None:
    """A retained value that misses both the first snapshot and the live stream (the SUB subscription was not
    active yet) comes with the follow-up snapshot."""
    import zmq

    procs.broker()

    async def main() -> None:
        async with client(procs, "watcher") as bus, client(procs, "announcer") as other:
            sub = bus.subscribe("status.")
            with pytest.raises(TimeoutError):
                await sub.get(timeout=0.1)  # the first snapshot: nothing retained yet
            sub.conn.sock.setsockopt(zmq.UNSUBSCRIBE, b"status.")  # the live stream misses what comes next
            await other.publish("status.a", Fact(value=7), retain=True)
            d = await sub.get(timeout=5)
            assert isinstance(d.message, Fact) and d.message.value == 7 and d.snapshot
            sub.close()

    asyncio.run(main())


def test_retained_reads_the_current_values_once(procs: Procs) -> None:
    procs.broker()

    async def main() -> None:
        async with client(procs, "reader") as bus, client(procs, "writer") as other:
            assert await bus.retained("state.") == {}  # nothing yet: an answer at once, not a wait
            await other.publish("state.a", Fact(value=1), retain=True)
            await other.publish("state.a", Fact(value=2), retain=True)
            await other.publish("other.b", Fact(value=3), retain=True)
            end = time.monotonic() + 10
            while (got := await bus.retained("state.")).get("state.a") != Fact(value=2) and time.monotonic() < end:
                await asyncio.sleep(0.05)  # the writer's publishes reach the broker on another socket
            assert list(got) == ["state.a"] and got["state.a"] == Fact(value=2)  # the last value, one topic only

    asyncio.run(main())
