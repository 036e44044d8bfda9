"""Drive a plain ZeroMQ socket from an asyncio loop through its file descriptor.

``zmq.asyncio`` wraps every send and receive in a Future; on this workload that cost dominated the round trip.
Here the loop watches the socket's FD (edge-triggered: after a wake-up, read until ``Again``) and hands each
message to a callback; sends are non-blocking, with a bounded wait when the peer's queue is full.
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

try:  # pyzmq's send_multipart/recv_multipart spend most of their time on enum arithmetic; skip it
    from zmq.backend import Socket as _Base

    _send, _recv, _get = _Base.send, _Base.recv, _Base.get
except (ImportError, AttributeError):  # pragma: no cover - other pyzmq backends
    _send, _recv, _get = zmq.Socket.send, zmq.Socket.recv, zmq.Socket.getsockopt  # type: ignore[assignment]

_MORE_NB = int(zmq.SNDMORE | zmq.NOBLOCK)
_NB = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send_frames(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """Non-blocking multipart send; raises ``zmq.Again`` when the first frame cannot be queued (then nothing
    was sent: ZeroMQ queues the remaining parts of a message atomically)."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        _send(sock, f, _MORE_NB if i < last else _NB)


def recv_frames(sock: zmq.Socket[Any]) -> list[bytes]:
    """Non-blocking multipart receive; raises ``zmq.Again`` when nothing is waiting."""
    out = [_recv(sock, _NB)]
    while _get(sock, _RCVMORE):
        out.append(_recv(sock, _NB))
    return out


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
        for _ in range(BATCH):
            if self.paused is not None and self.paused():
                return  # the consumer will call schedule() when it wants more
            try:
                events = _get(sock, _EVENTS)
                if isinstance(events, int) and not events & _POLLIN:  # cheaper than provoking zmq.Again
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

    def send_nowait(self, frames: list[Any]) -> bool:
        """Send if the peer can take it now; False otherwise (or when the socket is closed)."""
        if self.sock.closed:
            return False
        try:
            send_frames(self.sock, frames)
        except zmq.ZMQError:  # Again (full / no peer) or a closing socket
            return False
        finally:
            self.schedule()  # a send can consume the FD's edge: look for input again
        return True

    async def send(self, frames: list[Any], deadline: float) -> None:
        """Send, waiting (not blocking the loop) until ``deadline`` (loop time) at most."""
        delay = 0.0005
        while not self.send_nowait(frames):
            if self.sock.closed or self.loop.time() >= deadline:
                raise RequestTimeout("the broker is not taking messages")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def close(self) -> None:
        if not self.sock.closed:
            self.loop.remove_reader(self.fd)
            self.sock.close(0)
