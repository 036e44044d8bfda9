"""``m2m bench bus``: the bus measured against raw ZeroMQ in one run (ratios, not absolute speeds).

Helper processes (``python -m m2m.bus.bench raw-echo|worker|publisher ...``) are started and killed here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from m2m.bus.client import BusClient, RequestContext
from m2m.bus.messages import Envelope, Message, decode, encode, new_id


class BenchPing(Message):
    schema = "bench.ping"
    version = 1
    n: int
    text: str


class BenchTick(Message):
    schema = "bench.tick"
    version = 1
    i: int
    value: float


class BenchArray(Message):
    schema = "bench.array"
    version = 1
    name: str
    values: np.ndarray


class _ListArray(msgspec.Struct):
    name: str
    values: list[float]


PING_TEXT = "x" * 150  # ~200-byte message, as in the raw measurement


async def _on_ping(msg: BenchPing, ctx: RequestContext) -> BenchPing:
    return msg


# ------------------------------------------------------------------------------------------ helper processes
def _raw_echo(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    while True:
        s.send_multipart(s.recv_multipart())


def _proxy(front: str, back: str) -> None:
    import zmq

    ctx = zmq.Context()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    f.bind(front)
    b.bind(back)
    zmq.proxy(f, b)


def _dealer_echo(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    while True:
        s.send_multipart(s.recv_multipart())


async def _worker(endpoint: str, pub: str) -> None:
    async with BusClient("bench-worker", endpoint=endpoint, pub_endpoint=pub) as bus:
        await bus.serve("bench", {BenchPing: _on_ping})
        await asyncio.sleep(3600)


async def _publisher(endpoint: str, pub: str, count: int, go: str) -> None:
    async with BusClient("bench-pub", endpoint=endpoint, pub_endpoint=pub) as bus:
        while not Path(go).exists():
            await asyncio.sleep(0.01)
        for i in range(count):
            await bus.publish("ev.tick", BenchTick(i=i, value=float(i)))
        await asyncio.sleep(3600)


@contextlib.contextmanager
def _spawned(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "M2M_LOG_LEVEL": "warning"}
    p = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=subprocess.DEVNULL)
    try:
        yield p
    finally:
        p.kill()
        p.wait(timeout=10)


# ------------------------------------------------------------------------------------------ measurements
def _raw_round_trip(d: Path, n: int, *, via_proxy: bool = False) -> list[float]:
    import zmq

    ep = f"ipc://{d}/raw{int(via_proxy)}"
    helpers = (
        [("m2m.bus.bench", "proxy", ep, ep + "b"), ("m2m.bus.bench", "dealer-echo", ep + "b")] if via_proxy
        else [("m2m.bus.bench", "raw-echo", ep)]
    )
    with contextlib.ExitStack() as stack:
        for h in helpers:
            stack.enter_context(_spawned(*h))
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(ep)
        env = Envelope(id=new_id(), schema="", version=0, sender="bench", kind="request", route="bench")
        frames = [bytes(f) for f in encode(BenchPing(n=0, text=PING_TEXT), env)]
        for _ in range(100):  # the first waits for the connection
            s.send_multipart(frames)
            s.recv_multipart()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            s.send_multipart(frames)
            s.recv_multipart()
            times.append(time.perf_counter() - t)
        s.close()
        ctx.term()
    return times


async def _bus_measurements(d: Path, n: int, events: int) -> dict[str, Any]:
    ep, pub = f"ipc://{d}/bus", f"ipc://{d}/pub"
    out: dict[str, Any] = {}
    go = d / "go"
    with (
        _spawned("m2m.bus.broker", "--endpoint", ep, "--pub-endpoint", pub, "--log-level", "warning"),
        _spawned("m2m.bus.bench", "worker", ep, pub),
        _spawned("m2m.bus.bench", "publisher", ep, pub, str(events), str(go)),
    ):
        async with BusClient("bench", endpoint=ep, pub_endpoint=pub) as bus:
            msg = BenchPing(n=0, text=PING_TEXT)
            await bus.request("bench", msg, timeout=30)  # wait for the worker
            for _ in range(200):
                await bus.request("bench", msg)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await bus.request("bench", msg)
                times.append(time.perf_counter() - t)
            out["rt"] = times

            # event throughput: a publisher process → broker → this subscriber
            sub = bus.subscribe("ev.", snapshot=False)
            while True:  # subscription live?
                await bus.publish("ev.probe", BenchTick(i=-1, value=0.0))
                try:
                    await sub.get(timeout=0.2)
                    break
                except TimeoutError:
                    pass
            go.touch()
            got, first, last = 0, 0.0, 0.0
            loop = asyncio.get_running_loop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0) as guard:
                    async for dlv in sub:
                        if dlv.topic != "ev.tick":
                            continue
                        last = time.perf_counter()
                        if got == 0:
                            first = last
                        got += 1
                        if isinstance(dlv.message, BenchTick) and dlv.message.i == events - 1:
                            break
                        if got % 1000 == 0:
                            guard.reschedule(loop.time() + 2.0)  # stop 2 s after the stream dries up
            sub.close()
            out["events"] = (got, sub.gaps, (last - first) if got > 1 else float("nan"))

            # knowledge late join: subscribe → first snapshot delivery
            await bus.publish("k.plan", BenchTick(i=1, value=1.0), retain=True)
            lat = []
            for _ in range(30):
                t = time.perf_counter()
                s2 = bus.subscribe("k.")
                dlv = await s2.get(timeout=5)
                lat.append(time.perf_counter() - t)
                s2.close()
                assert dlv.snapshot
            out["late_join"] = lat
    return out


def _array_codec(reps: int = 2000) -> tuple[float, float]:
    values = np.random.default_rng(0).random(10_000)
    msg = BenchArray(name="dose", values=values)
    env = Envelope(id=new_id(), schema="", version=0)
    t = time.perf_counter()
    for _ in range(reps):
        frames = encode(msg, env)
        decode([f if isinstance(f, bytes) else bytes(f) for f in frames])
    ours = (time.perf_counter() - t) / reps
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(_ListArray)
    t = time.perf_counter()
    for _ in range(reps // 10):
        np.asarray(dec.decode(enc.encode(_ListArray("dose", values.tolist()))).values)
    as_list = (time.perf_counter() - t) / (reps // 10)
    return ours, as_list


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    with tempfile.TemporaryDirectory(prefix="m2mbench", dir="/tmp") as tmp:
        d = Path(tmp)
        console.print("[dim]raw DEALER/ROUTER round trips…[/]")
        raw = _raw_round_trip(d, args.n)
        proxied = _raw_round_trip(d, args.n, via_proxy=True)
        console.print("[dim]bus round trips, events, late joins…[/]")
        bus = asyncio.run(_bus_measurements(d, args.n, args.events))
    console.print("[dim]array codec…[/]")
    ours, as_list = _array_codec()

    raw_med, bus_med = statistics.median(raw), statistics.median(bus["rt"])
    got, gaps, span = bus["events"]
    rate = got / span if span == span and span > 0 else float("nan")
    lj = statistics.median(bus["late_join"])
    table = Table(title="m2m bench bus (one run; 2 processes for raw, 3 for the bus)")
    for col in ("measurement", "value", "reference", "ratio", "goal"):
        table.add_column(col)
    table.add_row("request round trip via broker (median)", f"{bus_med * 1e6:.0f} µs",
                  f"raw DEALER/ROUTER {raw_med * 1e6:.0f} µs", f"{bus_med / raw_med:.2f}×", "≤ 2× raw")
    prox_med = statistics.median(proxied)
    table.add_row("  reference: raw through one zmq.proxy hop", f"{prox_med * 1e6:.0f} µs",
                  f"raw DEALER/ROUTER {raw_med * 1e6:.0f} µs", f"{prox_med / raw_med:.2f}×", "")
    table.add_row("  p90 round trip", f"{np.percentile(bus['rt'], 90) * 1e6:.0f} µs",
                  f"raw p90 {np.percentile(raw, 90) * 1e6:.0f} µs",
                  f"{np.percentile(bus['rt'], 90) / np.percentile(raw, 90):.2f}×", "")
    table.add_row("typed event publish→receive", f"{rate / 1e3:.0f} k msgs/s",
                  f"{got} of {args.events} received, {gaps} lost (gaps)", "", "≥ 50 k msgs/s")
    table.add_row("knowledge late join (subscribe → snapshot)", f"{lj * 1e3:.2f} ms",
                  f"p90 {np.percentile(bus['late_join'], 90) * 1e3:.2f} ms", "", "")
    table.add_row("encode+decode 10,000-float64 message", f"{ours * 1e6:.1f} µs",
                  f"as a msgpack list {as_list * 1e6:.0f} µs", f"{as_list / ours:.0f}× faster", "")
    console.print(table)
    return 0


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "raw-echo":
        _raw_echo(sys.argv[2])
    elif role == "proxy":
        _proxy(sys.argv[2], sys.argv[3])
    elif role == "dealer-echo":
        _dealer_echo(sys.argv[2])
    elif role == "worker":
        asyncio.run(_worker(sys.argv[2], sys.argv[3]))
    elif role == "publisher":
        asyncio.run(_publisher(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
