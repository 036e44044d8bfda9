"""The async client agents use (zmq.asyncio): ``request``, ``serve``, ``publish``, ``subscribe``.

* Requests are Lazy-Pirate style: resent with the same idempotency key when an attempt window passes with no
  reply or the broker reports the worker lost; they fail with a typed error at the deadline, never hang.
* ``serve`` runs a Paranoid-Pirate :class:`~m2m.bus.worker.Worker` (its own DEALER).
* ``publish(retain=True)`` sets a knowledge value: the broker keeps the last value per topic and late
  subscribers get it first (Clone); this client re-asserts its values after a broker restart.
* The client pings the broker every heartbeat; a new broker incarnation makes it resend pending requests and
  re-publish its knowledge at once, which is how traffic resumes after a broker restart.
* Liveness: any frame from the broker (a PONG, a reply, a snapshot item) proves it alive. After ``liveness``
  heartbeats in a row with none (``heartbeat × liveness`` s, 3 s with the defaults; detected within one more
  heartbeat), the broker is *lost*: :attr:`BusClient.broker_alive` turns False and every pending request fails at
  once with :class:`~m2m.bus.errors.BrokerUnavailable`. A request made while the broker is silent waits for it at
  most the rest of that window (a whole window once it is declared lost) and then fails the same way. A broker
  that answers again (a restart within the window: a new incarnation) is re-joined transparently.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
import zmq

from m2m.bus import protocol as P
from m2m.bus.clone import Subscription
from m2m.bus.errors import (
    BrokerUnavailable,
    BusClosed,
    BusError,
    DecodeError,
    MessageTooLarge,
    RequestTimeout,
    WorkerLost,
    error_for_code,
)
from m2m.bus.messages import (
    INCARNATION,
    Envelope,
    ErrorReply,
    Message,
    decode,
    decode_envelope,
    decode_payload,
    encode,
    frames_size,
    new_id,
)
from m2m.bus.reactor import Conn
from m2m.bus.security import ClientKeys, apply_client
from m2m.bus.worker import Handlers, RequestContext, Worker

__all__ = ["BusClient", "BusConfig", "Handlers", "RequestContext", "Subscription", "Worker"]

M = TypeVar("M", bound=Message)
Frames = list[bytes | memoryview]


@dataclass
class _Pending:
    future: asyncio.Future[tuple[Envelope, list[bytes]]]
    frames: list[bytes]
    service: bytes


@dataclass
class BusConfig:
    endpoint: str = P.DEFAULT_ENDPOINT
    pub_endpoint: str = P.DEFAULT_PUB_ENDPOINT
    heartbeat: float = P.DEFAULT_HEARTBEAT_S
    liveness: int = P.DEFAULT_LIVENESS
    max_message_size: int = P.DEFAULT_MAX_MESSAGE_SIZE
    hwm: int = P.DEFAULT_HWM
    curve: ClientKeys | None = None
    reply_cache: int = 1024


class BusClient:
    """One agent's connection to the bus. Use ``async with BusClient(name, ...) as bus:``."""

    def __init__(self, name: str, config: BusConfig | None = None, *, session: str = "", **overrides: Any) -> None:
        cfg = config or BusConfig()
        for k, v in overrides.items():
            setattr(cfg, k, v)
        self.name = name
        self.cfg = cfg
        self.session = session
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.log = structlog.get_logger("m2m.bus.client").bind(sender=name, bus_incarnation=INCARNATION)
        self._seq = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._snapshots: dict[bytes, asyncio.Queue[list[bytes] | None]] = {}
        self._retained: dict[bytes, list[bytes]] = {}
        self._workers: list[Worker] = []
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.broker_incarnation = 0
        self._closed = False
        self._conn: Conn | None = None
        self._heard = False  # a frame came from the broker since the ping loop last looked
        self._missed = 0  # heartbeats in a row without a frame from the broker
        self._lost = False  # declared lost, and nothing heard since
        self._last_heard = 0.0  # loop time of the last frame from the broker (of the start before the first)

    # ------------------------------------------------------------------------------------------ lifecycle
    def _socket(self, kind: int) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = self.cfg.hwm
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.max_message_size)  # a hostile peer cannot flood memory
        if self.cfg.curve:
            apply_client(sock, self.cfg.curve)
        return sock

    @property
    def conn(self) -> Conn:
        if self._conn is None:
            raise BusClosed("client not started: use 'async with BusClient(...)' or 'await client.start()'")
        return self._conn

    async def start(self) -> BusClient:
        if self._conn is None:
            sock = self._socket(zmq.DEALER)
            sock.connect(self.cfg.endpoint)
            self._conn = Conn(sock, self._on_frames)
            self._last_heard = self._conn.loop.time()
            self._tasks = [asyncio.get_running_loop().create_task(self._ping_loop())]
        return self

    async def __aenter__(self) -> BusClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            await w.stop()
        for s in self._subs:
            s.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(BusClosed("client closed"))
        if self._conn is not None:
            self._conn.close()
        self.ctx.term()

    def _envelope(self, kind: str, route: str, **kw: Any) -> Envelope:
        seq = next(self._seq)
        return Envelope(id=f"{INCARNATION}.{seq}", schema="", version=0, sender=self.name, incarnation=INCARNATION,
                        seq=seq, ts=time.time(), kind=kind, route=route, session=self.session, **kw)

    def _check_size(self, frames: Frames) -> None:
        size = frames_size(frames)
        if size > self.cfg.max_message_size:
            raise MessageTooLarge(f"message of {size} bytes, limit {self.cfg.max_message_size}")

    # ------------------------------------------------------------------------------------------ background
    def _on_frames(self, frames: list[bytes]) -> None:
        self._heard = True  # whatever it is, only the broker sends on this socket: it is alive
        self._last_heard = self.conn.loop.time()
        if self._lost:
            self._lost = False
            self.log.info("broker_back", endpoint=self.cfg.endpoint)
        try:
            self._dispatch(frames)
        except BusError:
            raise
        except Exception as exc:  # the decode boundary: typed errors only
            raise DecodeError(f"bad frames from the broker: {type(exc).__name__}: {exc}") from None

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[0] != P.CLIENT:
            raise DecodeError("not a client frame")
        cmd = frames[1]
        if cmd == P.REPLY:
            if len(frames) < 5:
                raise DecodeError("short reply")
            env = decode_envelope(frames[3])
            p = self._pending.get(env.idem or env.corr)
            if p is not None and not p.future.done():
                p.future.set_result((env, frames[3:]))
        elif cmd == P.PONG:
            self._saw_broker(P.unpack_u64(frames[2]))
        elif cmd in (P.KVITEM, P.KVEND):
            q = self._snapshots.get(frames[2])
            if q is not None:
                q.put_nowait(frames[3:] if cmd == P.KVITEM else None)
            if cmd == P.KVEND and len(frames) > 3:
                self._saw_broker(P.unpack_u64(frames[3]))
                if len(frames) > 4 and frames[4] == P.TRUNCATED:
                    self.log.warning("snapshot_truncated", detail="the broker's snapshot byte cap left values out")

    def _saw_broker(self, incarnation: int) -> None:
        old = self.broker_incarnation
        self.broker_incarnation = incarnation
        if old == incarnation:
            return
        # a new broker (a restart), or the first one seen: a knowledge value set before any broker answered (an
        # agent announcing its state while the broker starts) may never have reached it
        for topic, m in self._retained.items():
            self.conn.send_nowait([P.CLIENT, P.PUBLISH, topic, _RETAIN, *m])
        if old:  # a restart: what the old broker held for us is gone
            self.log.info("broker_restarted", pending=len(self._pending), retained=len(self._retained))
            for p in self._pending.values():
                if not p.future.done():
                    self.conn.send_nowait([P.CLIENT, P.REQUEST, p.service, *p.frames])

    @property
    def broker_alive(self) -> bool:
        """True while the broker answers: it has answered at least once, and not been silent for ``liveness``
        heartbeats in a row since (see the module notes). False before the first answer and once it is lost."""
        return bool(self.broker_incarnation) and not self._lost and self._conn is not None and not self._closed

    async def wait_for_broker(self, timeout: float = 10.0) -> int:
        """Wait (``timeout`` s at most) until the broker answers a heartbeat; returns its incarnation or raises
        :class:`~m2m.bus.errors.BrokerUnavailable`."""
        loop = self.conn.loop
        end = loop.time() + timeout
        while not self.broker_alive:
            if self._closed:
                raise BusClosed("client closed")
            if loop.time() >= end:
                raise BrokerUnavailable(f"no broker answers at {self.cfg.endpoint} (waited {timeout:.3g} s)")
            self.conn.send_nowait([P.CLIENT, P.PING])
            await asyncio.sleep(0.01)
        return self.broker_incarnation

    async def _ping_loop(self) -> None:
        conn = self.conn
        while True:
            conn.send_nowait([P.CLIENT, P.PING])
            await asyncio.sleep(self.cfg.heartbeat)
            conn.drain()  # answers that arrived while this loop was busy elsewhere count
            if self._heard:
                self._heard = False
                self._missed = 0
                continue
            self._missed += 1
            if self._missed >= self.cfg.liveness:
                self._missed = 0  # one window later it is declared again: requests made meanwhile fail then
                self._broker_lost()

    def _broker_lost(self) -> None:
        silent = self.conn.loop.time() - self._last_heard
        if not self._lost:
            self._lost = True
            self.log.warning("broker_lost", endpoint=self.cfg.endpoint, silent_s=round(silent, 3),
                             pending=len(self._pending))
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_result(_LOST)

    def _lost_error(self) -> BrokerUnavailable:
        silent = self.conn.loop.time() - self._last_heard
        return BrokerUnavailable(
            f"the broker at {self.cfg.endpoint} is unavailable: silent for {silent:.1f} s "
            f"({self.cfg.liveness} heartbeats of {self.cfg.heartbeat:g} s missed)"
        )

    # ------------------------------------------------------------------------------------------ requests
    async def request(
        self,
        service: str,
        msg: Message,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        idempotency_key: str | None = None,
        expect: type[M] | None = None,
        session: str | None = None,
    ) -> Any:
        """Send ``msg`` to ``service`` and return the typed reply.

        Raises :class:`RequestTimeout` / :class:`ServiceUnavailable` at the deadline (``timeout`` seconds),
        :class:`BrokerUnavailable` as soon as the broker is lost (``heartbeat × liveness`` s of silence, whatever
        the deadline), or the typed error the worker sent. ``session`` tags the request (and so the transcript)
        with a session id other than the client's. The request is resent with the same idempotency key every
        ``timeout / (retries + 1)`` seconds without a reply, and at once when its worker is lost.
        """
        if self._closed:
            raise BusClosed("client closed")
        conn = self.conn
        loop = conn.loop
        idem = idempotency_key or new_id()
        existing = self._pending.get(idem)
        if existing is not None:  # the same key already in flight from this client: share its reply
            while True:
                got = await asyncio.shield(existing.future)
                if got is _LOST:
                    raise self._lost_error()
                if got is not _TIMEOUT:
                    env, m = got
                    return self._result(env, m, expect)
                if idem not in self._pending:
                    raise RequestTimeout(f"no reply from {service!r}")
                existing = self._pending[idem]
        env = self._envelope("request", service, deadline=time.time() + timeout, idem=idem)
        if session is not None:
            env.session = session
        frames = encode(msg, env)
        self._check_size(frames)
        raw = [f if isinstance(f, bytes) else bytes(f) for f in frames]
        service_b = service.encode()
        out = [P.CLIENT, P.REQUEST, service_b, *raw]
        deadline = loop.time() + timeout
        window = timeout / (retries + 1)
        pending = _Pending(loop.create_future(), raw, service_b)
        self._pending[idem] = pending
        try:
            while True:
                if not conn.send_nowait(out):
                    try:
                        await conn.send(out, deadline)
                    except RequestTimeout:
                        break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                fut = pending.future
                timer = loop.call_later(min(window, remaining), _expire, fut)
                try:
                    got = await fut
                finally:
                    timer.cancel()
                if got is _LOST:
                    raise self._lost_error()
                if got is _TIMEOUT:
                    if deadline - loop.time() <= 0:
                        break
                    pending.future = loop.create_future()
                    self.log.debug("request_retry", msg_id=env.id, service=service, reason="no reply")
                    continue
                r_env, m = got
                if r_env.schema == ErrorReply.schema:
                    err = self._error(r_env, m)
                    if isinstance(err, WorkerLost) and deadline - loop.time() > 0:
                        self.log.info("request_retry", msg_id=env.id, service=service, reason="worker lost")
                        pending.future = loop.create_future()
                        continue
                    raise err
                return self._result(r_env, m, expect)
            raise RequestTimeout(f"no reply from {service!r} within {timeout:.3g} s")
        finally:
            if not pending.future.done():
                pending.future.set_result(_TIMEOUT)
            self._pending.pop(idem, None)

    def _error(self, env: Envelope, m: list[bytes]) -> BusError:
        try:
            err = decode_payload(env, m[1], m[2:])
        except DecodeError as exc:
            return exc
        if not isinstance(err, ErrorReply):
            return DecodeError(f"error envelope with a {type(err).__name__} payload")
        return error_for_code(err.code)(err.message)

    def _result(self, env: Envelope, m: list[bytes], expect: type[M] | None) -> Any:
        if env.schema == ErrorReply.schema:
            raise self._error(env, m)
        msg = decode_payload(env, m[1], m[2:])
        if expect is not None and not isinstance(msg, expect):
            raise DecodeError(f"expected {expect.__name__}, got {type(msg).__name__}")
        return msg

    # ------------------------------------------------------------------------------------------ serving
    async def serve(self, service: str, handlers: Handlers, *, capacity: int = 1) -> Worker:
        """Serve ``service``: ``handlers`` is one ``async (msg, ctx) -> reply`` or a mapping from message type to
        such a function (one handler per message type). Returns the running :class:`Worker`."""
        w = Worker(self, service, handlers, capacity)
        self._workers.append(w)
        w.start()
        return w

    # ------------------------------------------------------------------------------------------ pub/sub
    async def publish(self, topic: str, msg: Message, *, retain: bool = False, session: str | None = None) -> None:
        """Publish an event (best effort) or, with ``retain=True``, a knowledge value (last value kept by the
        broker and sent to late joiners); ``session`` as in :meth:`request`."""
        env = self._envelope("event", topic)
        if session is not None:
            env.session = session
        frames = encode(msg, env)
        self._check_size(frames)
        topic_b = topic.encode()
        out: list[Any] = [P.CLIENT, P.PUBLISH, topic_b, _RETAIN if retain else _EVENT, *frames]
        if retain:
            self._retained[topic_b] = [f if isinstance(f, bytes) else bytes(f) for f in frames]
        conn = self.conn
        if not conn.send_nowait(out, burst=True):  # events come in bursts: one deferred drain for all of them
            await conn.send(out, conn.loop.time() + self.cfg.heartbeat * self.cfg.liveness, burst=True)

    def subscribe(self, prefix: str = "", *, snapshot: bool = True, hwm: int | None = None) -> Subscription:
        """An async iterator of :class:`~m2m.bus.clone.Delivery` for topics starting with ``prefix``; with
        ``snapshot`` the retained values come first."""
        sub = Subscription(self, prefix, snapshot=snapshot, hwm=hwm)
        self._subs.append(sub)
        return sub

    async def retained(self, prefix: str) -> dict[str, Message]:
        """The retained value of every topic under ``prefix`` right now (one snapshot, no subscription): for a
        one-off read of state, where a subscription would wait for updates that may never come. A value that does
        not decode is left out."""
        out: dict[str, Message] = {}
        for item in await self._request_snapshot(prefix.encode()):
            try:
                _, msg = decode(item[2:])
                out[item[0].decode()] = msg
            except (BusError, UnicodeDecodeError, IndexError) as exc:
                self.log.warning("bad_retained_value", prefix=prefix, error=str(exc)[:200])
        return out

    async def _request_snapshot(self, prefix: bytes) -> list[list[bytes]]:
        token = new_id().encode()
        q: asyncio.Queue[list[bytes] | None] = asyncio.Queue()
        self._snapshots[token] = q
        conn = self.conn
        try:
            await conn.send([P.CLIENT, P.SNAPSHOT, prefix, token], conn.loop.time() + self.cfg.heartbeat)
            items: list[list[bytes]] = []
            async with asyncio.timeout(self.cfg.heartbeat * self.cfg.liveness):
                while (item := await q.get()) is not None:
                    items.append(item)
            return items
        except RequestTimeout:
            raise TimeoutError("no snapshot from the broker") from None
        finally:
            self._snapshots.pop(token, None)


_TIMEOUT: Any = object()
_LOST: Any = object()  # a pending request's result when the broker is declared lost
_RETAIN = bytes([P.RETAIN])
_EVENT = b"\x00"


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_TIMEOUT)
