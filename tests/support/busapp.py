"""Message types and helper processes for the bus tests (an application layer in miniature).

Run as ``python -m support.busapp worker|publisher|writer ...`` (``Procs.busapp`` sets ``PYTHONPATH``); the tests
import it for the message types.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np

from m2m.bus.client import BusClient, RequestContext
from m2m.bus.messages import Message
from m2m.bus.security import ClientKeys


class Echo(Message):
    schema = "test.echo"
    version = 1
    text: str
    data: np.ndarray | None = None


class EchoReply(Message):
    schema = "test.echo_reply"
    version = 1
    text: str
    pid: int
    total: float = 0.0


class Work(Message):
    """Sleep, then append ``key`` to ``marker`` (the side effect the tests count)."""

    schema = "test.work"
    version = 1
    key: str
    marker: str
    sleep: float = 0.0


class WorkDone(Message):
    schema = "test.work_done"
    version = 1
    pid: int


class Fail(Message):
    """The handler raises (a bug in an agent): the caller gets RemoteError, the worker stays up."""

    schema = "test.fail"
    version = 1
    why: str


class Fact(Message):
    schema = "test.fact"
    version = 1
    value: int


async def on_echo(msg: Echo, ctx: RequestContext) -> EchoReply:
    total = float(msg.data.sum()) if msg.data is not None else 0.0
    return EchoReply(text=msg.text, pid=os.getpid(), total=total)


async def on_work(msg: Work, ctx: RequestContext) -> WorkDone:
    with open(msg.marker, "a") as f:
        f.write(f"start {msg.key} {os.getpid()}\n")
    await asyncio.sleep(msg.sleep)
    with open(msg.marker, "a") as f:
        f.write(f"done {msg.key} {os.getpid()}\n")
    return WorkDone(pid=os.getpid())


async def on_fail(msg: Fail, ctx: RequestContext) -> Message:
    if msg.why == "unencodable reply":
        return Echo(text="x", data=np.array([None], dtype=object))
    raise ValueError(msg.why)


async def worker(args: argparse.Namespace) -> None:
    curve = ClientKeys.load(args.secret, args.server_key) if args.secret else None
    async with BusClient(args.name, endpoint=args.endpoint, pub_endpoint=args.pub, heartbeat=args.heartbeat,
                         curve=curve) as bus:
        await bus.serve(args.service, {Echo: on_echo, Work: on_work, Fail: on_fail}, capacity=args.capacity)
        print("serving", flush=True)
        await asyncio.sleep(3600)


async def publisher(args: argparse.Namespace) -> None:
    async with BusClient(args.name, endpoint=args.endpoint, pub_endpoint=args.pub, heartbeat=args.heartbeat) as bus:
        for i in range(args.count):
            await bus.publish(args.topic, Fact(value=i), retain=args.retain)
        print("published", flush=True)
        await asyncio.sleep(3600)


def writer(args: argparse.Namespace) -> None:
    """Append transcript records forever (the test kills it with SIGKILL)."""
    from m2m.bus.transcript import TranscriptWriter

    w = TranscriptWriter(args.file)
    i = 0
    while True:
        body = os.urandom(int.from_bytes(os.urandom(2), "big") % 5000)
        w.append(t=time.time(), direction="in", kind="event", route=str(os.getpid()), peer="", session=f"s{i % 3}",
                 frames=[b"env", str(i).encode(), body])
        i += 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["worker", "publisher", "writer"])
    p.add_argument("--endpoint")
    p.add_argument("--pub")
    p.add_argument("--name", default="helper")
    p.add_argument("--service", default="echo")
    p.add_argument("--capacity", type=int, default=1)
    p.add_argument("--heartbeat", type=float, default=0.2)
    p.add_argument("--topic", default="k.fact")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--retain", action="store_true")
    p.add_argument("--secret", default=None)
    p.add_argument("--server-key", default=None)
    p.add_argument("--file", default=None)
    args = p.parse_args()
    if args.role == "writer":
        writer(args)
    else:
        asyncio.run(worker(args) if args.role == "worker" else publisher(args))


if __name__ == "__main__":
    main()
