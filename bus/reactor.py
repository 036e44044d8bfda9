"""Drive a plain ZeroMQ socket from an asyncio loop through its file descriptor.

``zmq.asyncio`` wraps every send and receive in a Future; on this workload that cost dominated the round trip.
Here the loop watches the socket's FD (edge-triggered: after a wake-up, read while ``ZMQ_EVENTS`` says POLLIN) and
hands each message to a callback; sends are non-blocking, with a bounded wait when the peer's queue is full.

Costs that shaped this module (pyzmq 27, profiled in ``m2m bench bus``): every ``getsockopt`` goes through a
Python-level enum conversion (~2 µs), so a frame's "more" flag is read from the :class:`zmq.Frame` that
``recv(copy=False)`` fills in C instead of asking ``RCVMORE`` per frame (8 vs 20 µs for a 6-frame message); and a
request or reply re-checks ``ZMQ_EVENTS`` in place instead of scheduling a drain with ``call_soon``, which cost one
more turn of the event loop (an ``epoll`` call and a callback) per request (see :meth:`Conn.send_nowait`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from m2m.bus.errors import RequestTimeout

BATCH = 2000
"""Messages read per wake-up before yielding to other callbacks."""
BURST = 2
"""Messages read in one wake-up after which the rest is read until ``zmq.Again``, without asking ``ZMQ_EVENTS``."""

try:  # pyzmq's send_multipart/recv_multipart spend most of their time on enum arithmetic; skip it
    from zmq.backend import Socket as _Base

    _send, _recv, _get = _Base.send, _Base.recv, _Base.get
except (ImportError, AttributeError):  # pragma: no cover - other pyzmq backends
    _send, _recv, _get = zmq.Socket.send, zmq.Socket.recv, zmq.Socket.getsockopt  # type: ignore[assignment]

_MORE_NB = int(zmq.SNDMORE | zmq.NOBLOCK)
_NB = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send_frames(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """Non-blocking multipart send; raises ``zmq.Again`` when the first frame cannot be queued (then nothing
    was sent: ZeroMQ queues the remaining parts of a message atomically)."""
    if not frames:
        return
    for f in frames[:-1]:
        _send(sock, f, _MORE_NB)
    _send(sock, frames[-1], _NB)


def recv_frames(sock: zmq.Socket[Any]) -> list[bytes]:
    """Non-blocking multipart receive; raises ``zmq.Again`` when nothing is waiting."""
    f = _recv(sock, _NB, False)
    out = [f.bytes]
    while f.more:
        f = _recv(sock, _NB, False)
        out.append(f.bytes)
    return out


def recv_bounded(sock: zmq.Socket[Any], max_bytes: int, max_frames: int) -> tuple[list[bytes], str]:
    """:func:`recv_frames` for a peer that may be hostile: ``(frames, over)`` where ``over`` says why the message is
    over ``max_bytes`` (frames after the first, counted while they arrive) or ``max_frames``; then only its first
    frames are kept (enough to answer it: identity, header, command, route, envelope) and the rest is received
    without a copy into Python and discarded. Raises ``zmq.Again`` when nothing is waiting."""
    f = _recv(sock, _NB, False)
    frames = [f.bytes]
    total, over = 0, ""
    while f.more:
        f = _recv(sock, _NB, False)
        if over:
            continue  # the rest of an oversized message is never copied into Python
        b = f.bytes
        frames.append(b)
        total += len(b)
        if total > max_bytes:
            over = f"message over the limit of {max_bytes} bytes ({total} bytes received before it was cut)"
        elif len(frames) - 1 > max_frames:
            over = f"message of more than {max_frames} frames"
        if over:
            del frames[6:]
    return frames, over


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message is waiting (``ZMQ_EVENTS`` has POLLIN). Reading ``ZMQ_EVENTS`` also re-arms the socket's
    FD: after it answers False the FD signals the next arrival, which a send alone does not guarantee."""
    events = _get(sock, _EVENTS)
    return bool(events & _POLLIN) if isinstance(events, int) else False


class Conn:
    def __init__(self, sock: zmq.Socket[Any], on_frames: Callable[[list[bytes]], None], *,
                 paused: Callable[[], bool] | None = None) -> None:
        self.sock = sock
        self.on_frames = on_frames
        self.paused = paused
        self.loop = asyncio.get_running_loop()
        fd = sock.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self.fd = fd
        self._scheduled = False
        self.loop.add_reader(self.fd, self.drain)
        self.log = structlog.get_logger("m2m.bus.reactor")
        self.schedule()  # messages may have arrived before the reader was added

    def schedule(self) -> None:
        if not self._scheduled and not self.sock.closed:
            self._scheduled = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        if sock.closed:
            return
        for n in range(BATCH):
            if self.paused is not None and self.paused():
                return  # the consumer will call schedule() when it wants more
            try:
                # ZMQ_EVENTS (2 µs) is cheaper than provoking zmq.Again (6 µs) once; in a burst (a third message
                # in one drain) one Again at its end is cheaper than ZMQ_EVENTS before every message
                if n < BURST and not readable(sock):
                    return
                frames = recv_frames(sock)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self.log.warning("recv_failed", error=str(exc))
                return
            try:
                self.on_frames(frames)
            except Exception as exc:  # hostile or stale frames never kill the agent
                self.log.warning("bad_frames", error=repr(exc)[:200])
        self.schedule()  # more may be waiting: continue after other callbacks had a turn

    def send_nowait(self, frames: list[Any], *, burst: bool = False) -> bool:
        """Send if the peer can take it now; False otherwise (or when the socket is closed).

        A send can consume the FD's edge (it processes the socket's commands), so input is looked for again
        after it: in place by default (a request or reply is followed by a wait for input, and a drain scheduled
        with ``call_soon`` would cost a turn of the loop), or with one drain scheduled for the next turn when
        ``burst`` (many sends in a row, e.g. events: one deferred drain for all of them instead of a
        ``ZMQ_EVENTS`` read per send)."""
        if self.sock.closed:
            return False
        try:
            send_frames(self.sock, frames)
            sent = True
        except zmq.ZMQError:  # Again (full / no peer) or a closing socket
            sent = False
        if burst:
            self.schedule()
        elif not self._scheduled:
            try:
                if readable(self.sock):
                    self.schedule()
            except zmq.ZMQError:  # closed meanwhile
                pass
        return sent

    async def send(self, frames: list[Any], deadline: float, *, burst: bool = False) -> None:
        """Send, waiting (not blocking the loop) until ``deadline`` (loop time) at most; ``burst`` as in
        :meth:`send_nowait`."""
        delay = 0.0005
        while not self.send_nowait(frames, burst=burst):
            if self.sock.closed or self.loop.time() >= deadline:
                raise RequestTimeout("the broker is not taking messages")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def close(self) -> None:
        if not self.sock.closed:
            self.loop.remove_reader(self.fd)
            self.sock.close(0)
