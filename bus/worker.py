"""Paranoid-Pirate worker, run by :meth:`BusClient.serve <m2m.bus.client.BusClient.serve>`.

Heartbeats both ways. The worker's heartbeats go out from a daemon thread with its own DEALER socket
(HEARTBEAT_FOR naming the worker's routing id, which the worker sets itself: random, never shown to other peers),
so a handler that keeps the event loop busy does not make the worker look dead; a stopped process sends nothing
and is declared dead after ``heartbeat × liveness``. Each heartbeat carries the keys the worker is running, so the
broker never hands it more than its capacity, even after the worker re-registered. When the broker falls silent
for ``liveness`` heartbeats the worker drops its socket and reconnects with back-off; whenever it sees a new
broker incarnation it registers again (READY) with the keys it runs and the keys of the replies it holds, so a
restarted broker sends resends of those requests back to it.

Requests are answered once per key (idempotency key and content digest, see :mod:`m2m.bus.protocol`): a resend
that arrives while the handler runs waits for the same result, and later ones get the cached reply (bounded LRU)
instead of doing the work twice. A new request beyond the capacity (a race with the broker) is answered
:class:`WorkerBusy`, which the broker requeues. A malformed request gets a typed error reply; a handler that
raises gets :class:`RemoteError`; one that runs past the deadline gets :class:`RequestTimeout`. Nothing a peer
sends stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from m2m.bus import protocol as P
from m2m.bus.errors import (
    BusError,
    DecodeError,
    MessageTooLarge,
    RemoteError,
    RequestTimeout,
    UnhandledMessage,
    WorkerBusy,
)
from m2m.bus.messages import Envelope, ErrorReply, Message, decode_envelope, decode_payload, encode, frames_size
from m2m.bus.reactor import Conn

if TYPE_CHECKING:
    from m2m.bus.client import BusClient


@dataclass
class RequestContext:
    """What a handler knows about the request besides the message."""

    envelope: Envelope
    service: str
    client: BusClient


Handler = Callable[[Any, RequestContext], Awaitable[Message]]
Handlers = Handler | Mapping[type[Message], Handler]


class Worker:
    """A Paranoid-Pirate worker for one service, run by :meth:`BusClient.serve`."""

    def __init__(self, client: BusClient, service: str, handlers: Handlers, capacity: int) -> None:
        self.client = client
        self.service = service
        self.capacity = max(1, capacity)
        self.handlers = handlers
        self.log = client.log.bind(service=service)
        self._service_b = service.encode()
        self.identity = b"W" + uuid.uuid4().bytes
        """The routing id of this worker's socket (the heartbeat thread names it in HEARTBEAT_FOR)."""
        self._cache: OrderedDict[P.Key, list[bytes]] = OrderedDict()
        self._inflight: dict[P.Key, asyncio.Future[list[bytes]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._beat: _HeartbeatThread | None = None
        self.conn: Conn | None = None
        self.broker_incarnation = 0
        self.last_seen = 0.0
        self.handled = 0
        self.reconnects = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._beat = _HeartbeatThread(self)
        self._beat.start()

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.stop()
            self._beat = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        for j in list(self._jobs):
            j.cancel()

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests, let those in progress finish (at most ``timeout`` s), then leave the broker.

        The broker routes nothing more once it sees capacity 0 (a request that crosses it is answered
        :class:`WorkerBusy` and requeued), so no request is lost; a job still running at the timeout is cancelled
        and its client retries elsewhere (it gets :class:`WorkerLost`). Returns True when every job finished.
        """
        self.capacity = 0
        if self.conn is not None:
            self.conn.send_nowait([P.WORKER, P.HEARTBEAT, *self.hello_frames()])
        finished = True
        if self._jobs:
            _, pending = await asyncio.wait(list(self._jobs), timeout=timeout)
            finished = not pending
        await self.stop()
        return finished

    def hello_frames(self) -> list[bytes]:
        """The frames of a heartbeat or READY: service, capacity, keys in flight. Built when a heartbeat goes out,
        not at every change of the keys (that cost two msgpack encodings per request). The heartbeat thread calls
        it too: ``list()`` of a dict is one step under the GIL, so it sees a consistent set of keys."""
        return [self._service_b, str(self.capacity).encode(), P.pack_keys(list(self._inflight))]

    def _ready(self) -> None:
        """Register with the broker: capacity, keys in flight and the keys of the newest cached replies."""
        if self.conn is not None:
            cached = list(self._cache)[-P.MAX_KEYS:]
            self.conn.send_nowait([P.WORKER, P.READY, *self.hello_frames(), P.pack_keys(cached)])

    async def _run(self) -> None:
        cfg = self.client.cfg
        loop = asyncio.get_running_loop()
        backoff = cfg.heartbeat
        try:
            while True:
                sock = self.client._socket(zmq.DEALER)
                sock.setsockopt(zmq.ROUTING_ID, self.identity)
                sock.connect(cfg.endpoint)
                self.conn = Conn(sock, self._on_frames)
                self._ready()
                self.last_seen = loop.time()
                while True:
                    await asyncio.sleep(cfg.heartbeat)
                    self.conn.drain()  # a busy loop may not have read the broker's heartbeats yet: read them now
                    if loop.time() - self.last_seen > cfg.heartbeat * cfg.liveness:
                        self.log.warning("broker_silent_reconnecting", backoff=backoff)
                        break
                    backoff = cfg.heartbeat
                self.conn.close()
                self.reconnects += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, cfg.heartbeat * 4)
        finally:
            if self.conn is not None:
                self.conn.send_nowait([P.WORKER, P.DISCONNECT])
                self.conn.close()

    def _on_frames(self, frames: list[bytes]) -> None:
        self.last_seen = self.conn.loop.time() if self.conn is not None else 0.0
        if len(frames) < 2 or frames[0] != P.WORKER:
            self.log.warning("bad_frames_from_broker", frames=len(frames))
            return
        cmd = frames[1]
        if cmd == P.REQUEST and len(frames) >= 5:
            # the job removes itself from _jobs when it ends (a done callback would cost a turn of the loop)
            self._jobs.add(asyncio.get_running_loop().create_task(self._handle(frames[2], frames[3:])))
        elif cmd == P.HEARTBEAT:
            if len(frames) > 2 and len(frames[2]) == 8:
                incarnation = P.unpack_u64(frames[2])
                if incarnation != self.broker_incarnation:  # a new broker: tell it what we run and hold
                    self.broker_incarnation = incarnation
                    self._ready()
        elif cmd == P.DISCONNECT:
            # The broker does not know us (it restarted) or is going down: register again.
            self._ready()
        else:
            self.log.warning("bad_frames_from_broker", command=cmd.hex())

    async def _handle(self, token: bytes, m: list[bytes]) -> None:
        try:
            try:
                reply = await self._reply_for(token, m)
            except Exception as exc:  # never let one request kill the worker
                self.log.exception("worker_failed", error=repr(exc))
                return
            out = [P.WORKER, P.REPLY, token, *reply]
            conn = self.conn
            if conn is None or conn.send_nowait(out):
                return
            cfg = self.client.cfg
            try:
                await conn.send(out, conn.loop.time() + cfg.heartbeat * cfg.liveness)
            except RequestTimeout:
                self.log.warning("reply_lost", reason="broker not taking messages")  # a retry hits the cache
        finally:
            self._jobs.discard(asyncio.current_task())

    async def _reply_for(self, token: bytes, m: list[bytes]) -> list[bytes]:
        try:
            env = decode_envelope(m[0])
        except DecodeError as exc:
            self.log.warning("bad_request", error=str(exc)[:200])
            return self._encode_error(None, exc)
        # the broker's token is the content digest; compute it when it is not one
        digest = token if len(token) == P.DIGEST_SIZE else P.content_digest(m[1:])
        key = (env.idem or env.id, digest)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.log.info("request_replayed_from_cache", msg_id=env.id, idem=key[0], requester=env.sender)
            return cached
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        if len(self._inflight) >= self.capacity:
            self.log.info("request_over_capacity", msg_id=env.id, inflight=len(self._inflight),
                          capacity=self.capacity)
            return self._encode_error(env, WorkerBusy(f"{self.service!r} worker at capacity {self.capacity}"))
        fut: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            reply, cacheable = await self._run_handler(env, m)
            if cacheable:
                self._cache[key] = reply
                while len(self._cache) > self.client.cfg.reply_cache:
                    self._cache.popitem(last=False)
            fut.set_result(reply)
            return reply
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._inflight[key]

    async def _run_handler(self, env: Envelope, m: list[bytes]) -> tuple[list[bytes], bool]:
        try:
            msg = decode_payload(env, m[1], m[2:])  # the envelope is decoded already
            if isinstance(self.handlers, Mapping):
                fn = self.handlers.get(type(msg))
                if fn is None:
                    raise UnhandledMessage(f"{self.service!r} has no handler for {type(msg).__name__}")
            else:
                fn = self.handlers
            ctx = RequestContext(env, self.service, self.client)
            remaining = env.deadline - time.time() if env.deadline else None
            if remaining is not None and remaining <= 0:
                raise RequestTimeout("deadline passed before the worker started")
            try:
                async with asyncio.timeout(remaining):  # no extra task, unlike wait_for
                    result = await fn(msg, ctx)
            except TimeoutError:
                raise RequestTimeout(f"{self.service!r} handler ran past the deadline") from None
            if not isinstance(result, Message):
                raise RemoteError(f"handler returned {type(result).__name__}, not a Message")
        except BusError as exc:  # bad input or a typed refusal: a warning without a traceback
            log = self.log.info if isinstance(exc, RequestTimeout) else self.log.warning
            log("handler_error", msg_id=env.id, requester=env.sender, error=type(exc).__name__,
                detail=str(exc)[:200])
            return self._encode_error(env, exc), not exc.retryable and exc.remembered
        except Exception as exc:
            self.log.exception("handler_raised", msg_id=env.id, requester=env.sender)
            return self._encode_error(env, RemoteError(f"{type(exc).__name__}: {exc}")), True
        self.handled += 1
        r_env = self.client._envelope("reply", self.service, corr=env.id, idem=env.idem)
        r_env.session = env.session
        try:
            frames = encode(result, r_env)
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. an object array in the reply
            self.log.error("reply_not_encodable", msg_id=env.id, error=repr(exc))
            return self._encode_error(env, RemoteError(f"reply not encodable: {exc}")), True
        if frames_size(frames) > self.client.cfg.max_message_size:
            err = MessageTooLarge(f"reply of {frames_size(frames)} bytes, limit {self.client.cfg.max_message_size}")
            return self._encode_error(env, err), True
        return [bytes(f) if isinstance(f, memoryview) else f for f in frames], True

    def _encode_error(self, req: Envelope | None, exc: BusError) -> list[bytes]:
        env = self.client._envelope("error", self.service, corr=req.id if req else "", idem=req.idem if req else "")
        if req is not None:
            env.session = req.session
        frames = encode(ErrorReply(code=exc.code, message=str(exc)[:2000], retryable=exc.retryable), env)
        return [bytes(f) for f in frames]


class _HeartbeatThread(threading.Thread):
    """Sends the worker's heartbeat (HEARTBEAT_FOR its routing id, with its capacity and keys in flight) every
    half ``heartbeat`` from its own DEALER socket, whatever the worker's event loop is doing. Twice per heartbeat
    and a quick reconnect: a restarted broker learns the keys in flight well within its grace (1.5 heartbeats)
    before it dispatches resent requests. Heartbeats are not queued while the broker is unreachable
    (ZMQ_IMMEDIATE), so a returning broker gets no stale burst."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name=f"m2m-heartbeat-{worker.service}", daemon=True)
        self.worker = worker
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Stop and wait for the thread (it closes its socket before the client's context is terminated)."""
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5.0)

    def run(self) -> None:
        w = self.worker
        cfg = w.client.cfg
        sock = w.client._socket(zmq.DEALER)
        try:
            sock.sndhwm = max(1, cfg.liveness)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, max(10, int(cfg.heartbeat * 250)))
            sock.connect(cfg.endpoint)
            while not self._stopped.wait(cfg.heartbeat / 2):
                with contextlib.suppress(zmq.ZMQError):  # Again: the broker is not reachable now
                    sock.send_multipart([P.WORKER, P.HEARTBEAT_FOR, w.identity, *w.hello_frames()], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the context is being terminated
            w.log.info("heartbeat_thread_stopped", error=str(exc))
        finally:
            sock.close(0)
