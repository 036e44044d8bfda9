"""Clone pattern: the broker's :class:`KnowledgeStore` (per-topic sequence numbers, last value of knowledge
topics, snapshots) and the client's :class:`Subscription` (snapshot first, then live updates; duplicates
dropped, gaps reported).

Topics are of two kinds, chosen by the publisher per message:

* **knowledge** (``publish(..., retain=True)``): the broker keeps the last value per topic; a subscriber (a late
  joiner or a swapped-in agent) gets every value under its prefix first, then updates newer than the snapshot.
  Publishers re-assert their values when the broker restarts. Reliable as "last value wins".
* **events** (``retain=False``): best effort. A slow subscriber may lose some (HWM); it sees the loss as
  ``Delivery.gap`` (count of missed sequence numbers on that topic) and in ``Subscription.gaps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from m2m.bus import protocol as P
from m2m.bus.errors import BusClosed, DecodeError
from m2m.bus.messages import Envelope, Message, decode
from m2m.bus.reactor import Conn

if TYPE_CHECKING:
    from m2m.bus.client import BusClient

CATCH_UP_S = 0.5
"""When the follow-up snapshot is taken (s after the first one); see :meth:`Subscription._catch_up`."""


class KnowledgeStore:
    """Broker side: numbers every published message per topic and keeps the last value of knowledge topics."""

    def __init__(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self.seq: dict[bytes, int] = {}
        self.values: dict[bytes, tuple[bytes, list[bytes]]] = {}  # topic → (header, frames)

    def stamp(self, topic: bytes, flags: int, frames: list[bytes]) -> bytes:
        """The header for the next message on ``topic``; keeps it when it is knowledge."""
        seq = self.seq.get(topic, 0) + 1
        self.seq[topic] = seq
        header = P.pack_header(self.incarnation, seq, flags)
        if flags & P.RETAIN:
            self.values[topic] = (header, frames)
        return header

    def snapshot(self, prefix: bytes) -> list[tuple[bytes, bytes, list[bytes]]]:
        """(topic, header, frames) of every knowledge value under ``prefix``."""
        return [(t, h, m) for t, (h, m) in self.values.items() if t.startswith(prefix)]


@dataclass(frozen=True)
class Delivery:
    topic: str
    message: Message
    envelope: Envelope
    seq: int
    retained: bool
    snapshot: bool = False
    gap: int = 0
    """How many sequence numbers on this topic were missed just before this one (0 = none)."""


class Subscription:
    """Async iterator of :class:`Delivery`. Created by :meth:`BusClient.subscribe`.

    Messages are read from the SUB socket into a buffer of at most ``hwm`` deliveries; while the buffer is
    full the socket is left alone, so ZeroMQ's own HWM drops the excess and the loss shows up as gaps.
    """

    def __init__(self, client: BusClient, prefix: str, *, snapshot: bool = True, hwm: int | None = None) -> None:
        self.client = client
        self.prefix = prefix.encode()
        self.want_snapshot = snapshot
        sock = client._socket(zmq.SUB)
        if hwm is not None:
            sock.rcvhwm = hwm
        self.limit = max(1, sock.rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, self.prefix)
        sock.connect(client.cfg.pub_endpoint)
        self.last: dict[str, int] = {}
        self.broker_incarnation = 0
        self.gaps = 0
        self.errors = 0
        self._buf: deque[Delivery] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._need_snapshot = snapshot
        self._catch_up_due: float | None = None
        self._closed = False
        self.conn = Conn(sock, self._on_frames, paused=lambda: len(self._buf) >= self.limit)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._need_snapshot:
                await self._load_snapshot()
            loop = self.conn.loop
            if self._catch_up_due is not None and loop.time() >= self._catch_up_due:
                self._catch_up_due = None
                await self._catch_up()
            if self._buf:
                d = self._buf.popleft()
                if len(self._buf) == self.limit - 1:
                    self.conn.schedule()  # the buffer was full: read the socket again
                return d
            self._waiter = loop.create_future()
            try:
                if self._catch_up_due is None:
                    await self._waiter
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._waiter, max(0.0, self._catch_up_due - loop.time()))
            finally:
                self._waiter = None

    async def get(self, timeout: float | None = None) -> Delivery:
        """The next delivery, or ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    def _on_frames(self, frames: list[bytes]) -> None:
        d = self._accept(frames, snapshot=False)
        if d is not None:
            self._buf.append(d)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    async def _load_snapshot(self) -> None:
        self._need_snapshot = False
        try:
            items = await self.client._request_snapshot(self.prefix)
        except (TimeoutError, asyncio.CancelledError):
            self._need_snapshot = True  # broker not reachable yet, or the caller gave up: try again next call
            raise
        # Clone: live updates that arrived while the snapshot was on its way stay after it; older ones go
        live = list(self._buf)
        self._buf.clear()
        self.last.clear()
        for item in items:
            d = self._accept(item, snapshot=True)
            if d is not None:
                self._buf.append(d)
        for d in live:
            last = self.last.get(d.topic)
            if last is None or d.seq > last:
                self.last[d.topic] = d.seq
                self._buf.append(d)
        self._catch_up_due = self.conn.loop.time() + CATCH_UP_S

    async def _catch_up(self) -> None:
        """The SUB socket's subscription reaches the broker a moment after it connects: a value published in
        between is in neither the snapshot nor the live stream, and if it is the last on its topic no later
        sequence number reveals the gap. One more snapshot, once the subscription is surely active, delivers
        what is newer than what was seen."""
        try:
            items = await self.client._request_snapshot(self.prefix)
        except TimeoutError:
            return
        for item in items:
            d = self._accept(item, snapshot=True)
            if d is not None:
                self._buf.append(d)

    def _accept(self, frames: list[bytes], *, snapshot: bool) -> Delivery | None:
        try:
            if len(frames) < 4:
                raise DecodeError("too few frames")
            incarnation, seq, flags = P.unpack_header(frames[1])
            topic = frames[0].decode()
            if incarnation != self.broker_incarnation:
                if self.broker_incarnation and self.want_snapshot and not snapshot:
                    self._need_snapshot = True  # a new broker: fetch the re-asserted knowledge
                self.broker_incarnation = incarnation
                self.last.clear()
            last = self.last.get(topic)
            gap = 0
            if last is not None:
                if seq <= last:
                    return None  # duplicate (snapshot and update overlap)
                gap = seq - last - 1
            self.last[topic] = seq
            if gap:
                self.gaps += gap
            env, msg = decode(frames[2:])
        except (DecodeError, struct.error, UnicodeDecodeError) as exc:
            self.errors += 1
            self.client.log.warning("bad_delivery", prefix=self.prefix.decode("utf-8", "replace"), error=str(exc))
            return None
        return Delivery(topic, msg, env, seq, bool(flags & P.RETAIN), snapshot, gap)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.conn.close()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["BusClosed", "Delivery", "Subscription"]
