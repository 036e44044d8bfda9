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
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from m2m.bus import protocol as P
from m2m.bus.errors import BusClosed, DecodeError
from m2m.bus.messages import Envelope, Message, decode, frames_size
from m2m.bus.reactor import Conn
from m2m.bus.transcript import TranscriptWriter, index_path, read_transcript

if TYPE_CHECKING:
    from m2m.bus.client import BusClient

NEVER_ROTATE = 1 << 62
"""A :class:`RetainedLog` is compacted, never rotated."""
CATCH_UP_S = 0.5
"""When the follow-up snapshot is taken (s after the first one); see :meth:`Subscription._catch_up`."""


class KnowledgeStore:
    """Broker side: numbers every published message per topic and keeps the last value of knowledge topics.

    Retention is bounded: at most ``max_topics`` retained topics holding at most ``max_bytes`` bytes of frames
    (topic names included). A knowledge value that would go beyond either cap is refused: :meth:`stamp` returns a
    header without the RETAIN flag (the value still goes out as an event) and counts it in ``refused``; a refused
    update of a topic already retained also drops that topic's old value, so a late joiner never gets a value
    its publisher has since replaced.
    """

    def __init__(self, incarnation: int, *, max_topics: int = 10_000, max_bytes: int = 256 << 20) -> None:
        self.incarnation = incarnation
        self.max_topics = max_topics
        self.max_bytes = max_bytes
        self.seq: dict[bytes, int] = {}
        self.values: dict[bytes, tuple[bytes, list[bytes]]] = {}  # topic → (header, frames)
        self.bytes = 0
        """Bytes retained now (frames and topic names)."""
        self.refused = 0

    def stamp(self, topic: bytes, flags: int, frames: list[bytes]) -> bytes:
        """The header for the next message on ``topic``; keeps it when it is knowledge and fits the caps (the
        header's flags then carry RETAIN; see the class docstring for a refused value)."""
        seq = self.seq.get(topic, 0) + 1
        self.seq[topic] = seq
        if flags & P.RETAIN:
            old = self.values.pop(topic, None)
            if old is not None:
                self.bytes -= self._size(topic, old[1])
            size = self._size(topic, frames)
            if len(self.values) >= self.max_topics or self.bytes + size > self.max_bytes:
                self.refused += 1
                return P.pack_header(self.incarnation, seq, flags & ~P.RETAIN)
            header = P.pack_header(self.incarnation, seq, flags)
            self.values[topic] = (header, frames)
            self.bytes += size
            return header
        return P.pack_header(self.incarnation, seq, flags)

    def snapshot(self, prefix: bytes, max_bytes: int | None = None) -> tuple[list[tuple[bytes, bytes, list[bytes]]],
                                                                           bool]:
        """(topic, header, frames) of the knowledge values under ``prefix``, and whether some were left out
        because the items would have gone beyond ``max_bytes`` in all (None: no cap)."""
        out: list[tuple[bytes, bytes, list[bytes]]] = []
        total = 0
        for t, (h, m) in self.values.items():
            if not t.startswith(prefix):
                continue
            size = self._size(t, m)
            if max_bytes is not None and total + size > max_bytes:
                return out, True
            total += size
            out.append((t, h, m))
        return out, False

    def items(self) -> Iterator[tuple[bytes, list[bytes]]]:
        """(topic, frames) of every value kept: what a :class:`RetainedLog` writes."""
        return ((topic, frames) for topic, (_, frames) in self.values.items())

    @staticmethod
    def _size(topic: bytes, frames: list[bytes]) -> int:
        return len(topic) + frames_size(frames)


class RetainedLog:
    """Values that outlive the broker (Clone + Titanic): a keyed store — the knowledge values of a
    :class:`KnowledgeStore` (key = topic), or the broker's reply cache — whose every new value is appended to
    ``path`` in the transcript's record format (one crc-checked record per value, route = the key). A starting
    broker reads it back — the last value per key — and rewrites the file with just those. So a value whose
    publisher died before the broker did (a planner's ``takeover.<id>`` state after both were ``kill -9``-ed) is
    still there for the planner that takes the session over, and a reply whose worker died is still answered from
    the cache. The file is compacted again whenever what was appended since the last rewrite exceeds twice what
    the store holds (at least :data:`COMPACT_FLOOR` bytes)."""

    COMPACT_FLOOR = 8 << 20

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._writer: TranscriptWriter | None = None
        self._appended = 0

    def load(self) -> list[tuple[bytes, list[bytes]]]:
        """(key, frames) of the last value of every key in the file, in first-seen order; a torn tail or a bad
        record is passed over (the transcript reader's rules)."""
        if not self.path.exists():
            return []
        last: dict[bytes, list[bytes]] = {}
        for rec in read_transcript(self.path).records:
            last[rec.route.encode("utf-8", "surrogateescape")] = [rec.envelope, rec.payload, *rec.arrays]
        return list(last.items())

    def rewrite(self, values: Iterable[tuple[bytes, list[bytes]]]) -> None:
        """Replace the file by one record per value (written beside it, then renamed over it)."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".new")
        for stale in (tmp, index_path(tmp), index_path(self.path)):
            stale.unlink(missing_ok=True)
        writer = TranscriptWriter(tmp, max_bytes=NEVER_ROTATE, keep=0)
        for key, frames in values:
            self._write(writer, key, frames)
        writer.close()
        index_path(tmp).unlink(missing_ok=True)
        os.replace(tmp, self.path)
        self._writer = TranscriptWriter(self.path, max_bytes=NEVER_ROTATE, keep=0)
        self._appended = 0

    def append(self, key: bytes, frames: list[bytes], held_bytes: int,
               held: Callable[[], Iterable[tuple[bytes, list[bytes]]]]) -> None:
        """Record a new value; ``held_bytes`` is what the store holds now and ``held()`` its values, for the
        compaction (see the class notes)."""
        if self._writer is None:
            self._writer = TranscriptWriter(self.path, max_bytes=NEVER_ROTATE, keep=0)
        self._appended += self._write(self._writer, key, frames)
        if self._appended > max(2 * held_bytes, self.COMPACT_FLOOR):
            self.rewrite(held())

    @staticmethod
    def _write(writer: TranscriptWriter, key: bytes, frames: list[bytes]) -> int:
        writer.append(t=time.time(), direction="in", kind="retained", route=key.decode("utf-8", "surrogateescape"),
                      peer="", session="", frames=frames)
        return len(key) + frames_size(frames)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
        """Messages under the prefix that could not be decoded (each counted and logged once, then skipped)."""
        self._bad: dict[int, None] = {}  # keys of the bad messages seen (bounded, oldest dropped first)
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
        """The delivery in ``frames`` (live ``[topic, header, *M]`` or a snapshot item), or None for a duplicate or
        a message that cannot be decoded. A bad message (hostile bytes, a poisoned retained value) is counted in
        :attr:`errors` and logged at warning level once, however often a snapshot brings it again; the follower
        loop goes on with the next message."""
        try:
            return self._delivery(frames, snapshot)
        except Exception as exc:  # nothing a peer sends may stop a follower
            self._bad_message(frames, exc)
            return None

    def _delivery(self, frames: list[bytes], snapshot: bool) -> Delivery | None:
        if len(frames) < 4:
            raise DecodeError("too few frames")
        try:
            incarnation, seq, flags = P.unpack_header(frames[1])
        except struct.error as exc:
            raise DecodeError(f"bad header: {exc}") from None
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
        return Delivery(topic, msg, env, seq, bool(flags & P.RETAIN), snapshot, gap)

    BAD_KEYS = 1024
    """How many bad messages a subscription remembers so as to count and log each once."""

    def _bad_message(self, frames: list[bytes], exc: Exception) -> None:
        key = hash((bytes(frames[0]), bytes(frames[1]))) if len(frames) >= 2 else hash(tuple(map(bytes, frames)))
        if key in self._bad:
            return
        self._bad[key] = None
        if len(self._bad) > self.BAD_KEYS:
            del self._bad[next(iter(self._bad))]
        self.errors += 1
        topic = bytes(frames[0][:200]).decode("utf-8", "replace") if frames else ""
        error = exc if isinstance(exc, DecodeError) else DecodeError(f"{type(exc).__name__}: {exc}")
        self.client.log.warning("bad_delivery", prefix=self.prefix.decode("utf-8", "replace"), topic=topic,
                                error=str(error)[:300])

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
