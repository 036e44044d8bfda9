"""``m2m bench bus``: the bus measured against raw ZeroMQ in one run (ratios, not absolute speeds).

Three request round trips over the same ipc transport and ~370-byte message: raw DEALER→ROUTER echo (2
processes), raw DEALER → one-hop ``zmq.proxy`` → DEALER echo (3 processes: the floor of any broker) and the bus
(client → broker → worker, 3 processes). Goals: bus ≤ 1.3× the proxy round trip, ≥ 100 k events/s from a
publisher process through the broker to a subscriber.

Beside each round trip the bench prints the CPU each process spent per round trip (per event for the event
stream), all its threads together, and how much of that was ZeroMQ's I/O thread: on a machine with few cores the
round trip is roughly the sum of that serialized work, so this is where the time goes. CPU is read from
``/proc/<pid>/task/*/stat`` (clock ticks: meaningful over thousands of round trips; "n/a" without /proc).

Helper processes (``python -m m2m.bus.bench raw-echo|proxy|dealer-echo|worker|publisher ...``) are started and
killed here; ``python -m m2m.bus.bench run [--n N] [--events N] [--json FILE]`` runs the bench itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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
from m2m.bus.serve import add_bench_args


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
GOAL_VS_PROXY = 1.3
"""Goal: bus round trip at most this many times the raw one-hop zmq.proxy round trip."""
GOAL_EVENTS_PER_S = 100_000
"""Goal: events per second from a publisher process through the broker to a subscriber."""


# ------------------------------------------------------------------------------------------ CPU accounting
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) of process ``pid``: (all threads, ZeroMQ's background threads); None without
    /proc."""
    total = io = 0.0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for t in tasks:
        try:
            stat = (t / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rpartition(")")[2].split()
        used = (int(fields[11]) + int(fields[12])) / _TICK
        total += used
        if stat[stat.index("(") + 1:].startswith("ZMQbg"):
            io += used
    return total, io


class _CpuMeter:
    """CPU spent by some processes between :meth:`start` and :meth:`stop`, per unit of work (µs)."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self._t0: dict[str, tuple[float, float] | None] = {}
        self.per_unit: dict[str, tuple[float, float] | None] = {}

    def start(self) -> None:
        self._t0 = {k: _cpu(p) for k, p in self.pids.items()}

    def stop(self, units: int) -> dict[str, tuple[float, float] | None]:
        for k, p in self.pids.items():
            a, b = self._t0.get(k), _cpu(p)
            self.per_unit[k] = (None if a is None or b is None or units <= 0
                                else ((b[0] - a[0]) / units * 1e6, (b[1] - a[1]) / units * 1e6))
        return self.per_unit


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
def _raw_round_trip(d: Path, n: int, *, via_proxy: bool = False) -> tuple[list[float], dict[str, Any]]:
    """Round-trip times (s) and CPU per round trip (µs: all threads, I/O threads) of each process."""
    import zmq

    ep = f"ipc://{d}/raw{int(via_proxy)}"
    helpers = (
        [("proxy", ("m2m.bus.bench", "proxy", ep, ep + "b")), ("echo", ("m2m.bus.bench", "dealer-echo", ep + "b"))]
        if via_proxy else [("echo", ("m2m.bus.bench", "raw-echo", ep))]
    )
    with contextlib.ExitStack() as stack:
        pids = {name: stack.enter_context(_spawned(*h)).pid for name, h in helpers}
        meter = _CpuMeter(**pids, client=os.getpid())
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
        meter.start()
        for _ in range(n):
            t = time.perf_counter()
            s.send_multipart(frames)
            s.recv_multipart()
            times.append(time.perf_counter() - t)
        cpu = meter.stop(n)
        s.close()
        ctx.term()
    return times, cpu


async def _bus_measurements(d: Path, n: int, events: int) -> dict[str, Any]:
    ep, pub = f"ipc://{d}/bus", f"ipc://{d}/pub"
    out: dict[str, Any] = {}
    go = d / "go"
    with (
        _spawned("m2m.bus.broker", "--endpoint", ep, "--pub-endpoint", pub, "--log-level", "warning") as broker,
        _spawned("m2m.bus.bench", "worker", ep, pub) as worker,
        _spawned("m2m.bus.bench", "publisher", ep, pub, str(events), str(go)) as publisher,
    ):
        async with BusClient("bench", endpoint=ep, pub_endpoint=pub) as bus:
            msg = BenchPing(n=0, text=PING_TEXT)
            await bus.request("bench", msg, timeout=30)  # wait for the worker
            for _ in range(200):
                await bus.request("bench", msg)
            times = []
            meter = _CpuMeter(broker=broker.pid, worker=worker.pid, client=os.getpid())
            meter.start()
            for _ in range(n):
                t = time.perf_counter()
                await bus.request("bench", msg)
                times.append(time.perf_counter() - t)
            out["rt_cpu"] = meter.stop(n)
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
            meter = _CpuMeter(publisher=publisher.pid, broker=broker.pid, subscriber=os.getpid())
            meter.start()
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
            out["event_cpu"] = meter.stop(events)  # all of them were published (some may have been lost)
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


def _fmt_cpu(cpu: dict[str, tuple[float, float] | None], unit: str) -> str:
    """``broker 120 µs (I/O thread 40)`` for each process, or n/a."""
    parts = []
    for name, v in cpu.items():
        parts.append(f"{name} n/a" if v is None else f"{name} {v[0]:.{0 if v[0] >= 10 else 1}f} {unit} (io {v[1]:.0f})")
    return ", ".join(parts)


def _cpu_json(cpu: dict[str, tuple[float, float] | None]) -> dict[str, dict[str, float] | None]:
    return {k: None if v is None else {"total_us": round(v[0], 2), "io_thread_us": round(v[1], 2)}
            for k, v in cpu.items()}


def measure(n: int, events: int) -> dict[str, Any]:
    """Every number of the bench (times in µs, rates per second) as one JSON-ready dict."""
    with tempfile.TemporaryDirectory(prefix="m2mbench", dir="/tmp") as tmp:
        d = Path(tmp)
        raw, raw_cpu = _raw_round_trip(d, n)
        proxied, proxy_cpu = _raw_round_trip(d, n, via_proxy=True)
        bus = asyncio.run(_bus_measurements(d, n, events))
    ours, as_list = _array_codec()
    raw_med, prox_med, bus_med = (statistics.median(x) * 1e6 for x in (raw, proxied, bus["rt"]))
    got, gaps, span = bus["events"]
    rate = got / span if span == span and span > 0 else float("nan")
    return {
        "n": n, "events_sent": events, "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpus": os.cpu_count(),
        "bus_rt_us": bus_med, "proxy_rt_us": prox_med, "raw_rt_us": raw_med,
        "bus_p90_us": float(np.percentile(bus["rt"], 90)) * 1e6, "raw_p90_us": float(np.percentile(raw, 90)) * 1e6,
        "ratio_bus_proxy": bus_med / prox_med, "goal_ratio_bus_proxy": GOAL_VS_PROXY,
        "ratio_bus_raw": bus_med / raw_med, "ratio_proxy_raw": prox_med / raw_med,
        "events_per_s": rate, "goal_events_per_s": GOAL_EVENTS_PER_S, "events_received": got, "events_lost": gaps,
        "cpu_per_rt": {"bus": _cpu_json(bus["rt_cpu"]), "proxy": _cpu_json(proxy_cpu), "raw": _cpu_json(raw_cpu)},
        "cpu_per_event": _cpu_json(bus["event_cpu"]),
        "late_join_ms": statistics.median(bus["late_join"]) * 1e3,
        "late_join_p90_ms": float(np.percentile(bus["late_join"], 90)) * 1e3,
        "array_codec_us": ours * 1e6, "array_as_list_us": as_list * 1e6,
        "_cpu": {"bus": bus["rt_cpu"], "proxy": proxy_cpu, "raw": raw_cpu, "events": bus["event_cpu"]},
    }


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print("[dim]raw DEALER/ROUTER and one-hop zmq.proxy round trips, bus round trips, events, late joins, "
                  "array codec…[/]")
    r = measure(args.n, args.events)
    cpu = r.pop("_cpu")
    table = Table(title=f"m2m bench bus (one run, {r['cpus']} CPUs, load {r['load_avg'][0]:.2f} at the end)"
                  if r["load_avg"] else "m2m bench bus (one run)")
    for col in ("measurement", "value", "reference", "ratio", "goal"):
        table.add_column(col)
    ok = "[green]met[/]", "[red]not met[/]"
    table.add_row("request round trip via broker (median)", f"{r['bus_rt_us']:.0f} µs",
                  f"raw one-hop zmq.proxy {r['proxy_rt_us']:.0f} µs", f"{r['ratio_bus_proxy']:.2f}×",
                  f"≤ {GOAL_VS_PROXY}× proxy: {ok[r['ratio_bus_proxy'] > GOAL_VS_PROXY]}")
    table.add_row("", "", f"raw DEALER/ROUTER {r['raw_rt_us']:.0f} µs", f"{r['ratio_bus_raw']:.2f}×", "")
    table.add_row("  p90 round trip", f"{r['bus_p90_us']:.0f} µs", f"raw p90 {r['raw_p90_us']:.0f} µs",
                  f"{r['bus_p90_us'] / r['raw_p90_us']:.2f}×", "")
    table.add_row("  CPU per round trip, bus", _fmt_cpu(cpu["bus"], "µs"), "all threads (io: ZeroMQ I/O thread)", "",
                  "")
    table.add_row("  CPU per round trip, proxy path", _fmt_cpu(cpu["proxy"], "µs"), "", "", "")
    table.add_row("  CPU per round trip, raw", _fmt_cpu(cpu["raw"], "µs"), "", "", "")
    rate = r["events_per_s"]
    table.add_row("typed event publish→receive", f"{rate / 1e3:.0f} k msgs/s",
                  f"{r['events_received']} of {r['events_sent']} received, {r['events_lost']} lost (gaps)", "",
                  f"≥ {GOAL_EVENTS_PER_S // 1000} k msgs/s: {ok[not rate >= GOAL_EVENTS_PER_S]}")
    table.add_row("  CPU per event", _fmt_cpu(cpu["events"], "µs"), "", "", "")
    table.add_row("knowledge late join (subscribe → snapshot)", f"{r['late_join_ms']:.2f} ms",
                  f"p90 {r['late_join_p90_ms']:.2f} ms", "", "")
    table.add_row("encode+decode 10,000-float64 message", f"{r['array_codec_us']:.1f} µs",
                  f"as a msgpack list {r['array_as_list_us']:.0f} µs",
                  f"{r['array_as_list_us'] / r['array_codec_us']:.0f}× faster", "")
    console.print(table)
    out = getattr(args, "json", None)
    if out:
        Path(out).write_text(json.dumps(r, indent=2) + "\n")
        console.print(f"[dim]numbers written to {out}[/]")
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
    elif role == "run":
        ap = argparse.ArgumentParser(prog="python -m m2m.bus.bench run", description="m2m bench bus")
        add_bench_args(ap)
        sys.exit(main(ap.parse_args(sys.argv[2:])))
