"""Knowledge topics (Clone: last value + snapshot for late joiners) and gap detection on event topics."""

from __future__ import annotations

import asyncio
import signal

import pytest
from support.busapp import Fact
from support.procs import HB, Procs, wait_until, wait_until_async

from m2m.bus.client import BusClient
from m2m.bus.clone import Delivery, Subscription

pytestmark = pytest.mark.timeout(60)


def client(ps: Procs, name: str = "tester") -> BusClient:
    return BusClient(name, endpoint=ps.endpoint, pub_endpoint=ps.pub, heartbeat=HB)


def publisher(ps: Procs, topic: str, count: int, *, retain: bool, name: str = "pub"):  # type: ignore[no-untyped-def]
    args = ["--endpoint", ps.endpoint, "--pub", ps.pub, "--topic", topic, "--count", str(count), "--heartbeat",
            str(HB), "--name", name]
    return ps.busapp("publisher", *args, *(["--retain"] if retain else []), name=name)


def published(ps: Procs, n: int = 1) -> bool:
    return sum("published" in log.read_text() for log in ps.logs if log.name.startswith("pub")) >= n


async def snapshot_value(bus: BusClient, prefix: str, want: int, timeout: float = 15.0) -> Delivery:
    """Subscribe as a late joiner until the snapshot holds ``want`` (the publisher may still be sending)."""
    got: list[Delivery | None] = []

    async def joined() -> bool:
        sub = bus.subscribe(prefix)
        try:
            got.append(await sub.get(timeout=2))
        except TimeoutError:
            got.append(None)
        finally:
            sub.close()
        d = got[-1]
        return d is not None and d.snapshot and isinstance(d.message, Fact) and d.message.value == want

    await wait_until_async(joined, f"a late joiner's snapshot under {prefix!r} holds {want} (last: {got[-1:]})",
                           timeout=timeout)
    d = got[-1]
    assert d is not None
    return d


async def until_live(bus: BusClient, sub: Subscription, probe: str) -> None:
    """Publish a probe event until ``sub`` receives it on its live stream: the SUB socket's subscription reaches
    the broker a moment after it connects (the slow-joiner syndrome), and until then events are not delivered."""

    async def probe_arrived() -> bool:
        await bus.publish(probe, Fact(value=-1))
        try:
            d = await sub.get(timeout=0.2)
        except TimeoutError:
            return False
        return d.topic == probe and not d.snapshot

    await wait_until_async(probe_arrived, f"the subscription receives live {probe} events", timeout=10, step=0)


def test_late_joiner_gets_knowledge_snapshot_then_updates(procs: Procs) -> None:
    procs.broker()
    pub = publisher(procs, "k.fact", 5, retain=True, name="pub-k")
    publisher(procs, "ev.noise", 3, retain=False, name="pub-ev")
    wait_until(lambda: published(procs, 2), "both publishers published", timeout=20)

    async def main() -> None:
        async with client(procs, "late") as bus:
            d = await snapshot_value(bus, "k.", 4)
            # 5 values; a client re-asserts its knowledge once when it first hears from a broker (a value set
            # before any broker answered may not have reached it), so the last one may have come twice
            assert d.retained and d.topic == "k.fact" and d.seq in (5, 6) and d.gap == 0
            assert d.envelope.sender == "pub-k" and d.envelope.schema == "test.fact"
            sub = bus.subscribe("")
            first = await sub.get(timeout=5)
            assert first.snapshot and first.topic == "k.fact"  # events are not knowledge: not in the snapshot
            await until_live(bus, sub, "ev.probe")  # so the update comes on the live stream, not a snapshot
            await bus.publish("k.fact", Fact(value=99), retain=True)
            last = first.seq
            live = await sub.get(timeout=5)
            while live.message != Fact(value=99):  # other events (not our subject), or that re-assertion
                if live.topic == "k.fact":
                    last = live.seq
                live = await sub.get(timeout=5)
            assert (live.topic, live.snapshot, live.seq, live.gap) == ("k.fact", False, last + 1, 0)
            sub.close()
            assert pub.poll() is None

    asyncio.run(main())


def test_subscriber_detects_sequence_gap(procs: Procs) -> None:
    procs.broker("--pub-hwm", "20")
    total = 20_000

    async def main() -> None:
        async with client(procs, "slow") as bus:
            sub = bus.subscribe("ev.", snapshot=False, hwm=10)
            await until_live(bus, sub, "ev.probe")  # before the burst
            publisher(procs, "ev.tick", total, retain=False, name="pub-burst")
            # the slow subscriber: it reads nothing while the burst is published (wait_until blocks the loop), then
            # idles half a second more while the broker still forwards the tail (part of the scenario, not a settle)
            wait_until(lambda: published(procs), "the burst was published", timeout=30)
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
    wait_until(lambda: published(procs), "the publisher published", timeout=20)

    async def main() -> None:
        async with client(procs, "late") as bus:
            await snapshot_value(bus, "k.", 2)
            broker.send_signal(signal.SIGKILL)
            broker.wait(timeout=10)
            procs.broker(ready=False)  # in the coroutine: no blocking wait
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
            await until_live(bus, sub, "k.probe")
            ctx = zmq.Context()
            raw = ctx.socket(zmq.DEALER)
            raw.linger = 5000  # deliver before close
            raw.connect(procs.endpoint)
            for schema, payload in (("from.the.future", b"\x80"), ("test.fact", b"\xc1"), ("test.fact", b"\x81")):
                env = msgspec.msgpack.encode(Envelope(id="x", schema=schema, version=1, kind="event"))
                raw.send_multipart([P.CLIENT, P.PUBLISH, b"k.x", b"\x00", env, payload])
            raw.close()
            ctx.term()
            # the broker numbered and forwarded them; the subscriber skipped them
            await wait_until_async(lambda: sub.errors >= 3, "the subscriber counted 3 undecodable deliveries",
                                   timeout=20, step=0.01)
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
            got: dict[str, object] = {}

            async def current() -> bool:
                got.clear()
                got.update(await bus.retained("state."))
                return got.get("state.a") == Fact(value=2)

            # the writer's publishes reach the broker on another socket
            await wait_until_async(current, "the broker retains state.a = 2", timeout=10)
            assert list(got) == ["state.a"] and got["state.a"] == Fact(value=2)  # the last value, one topic only

    asyncio.run(main())
