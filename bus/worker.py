"""Paranoid-Pirate worker, run by :meth:`BusClient.serve <m2m.bus.client.BusClient.serve>`.

Heartbeats both ways; when the broker falls silent for ``liveness`` heartbeats the worker drops its socket and
reconnects with back-off; any HEARTBEAT it sends registers it again with a restarted broker. Requests are
answered once per idempotency key: a resend that arrives while the handler runs waits for the same result, and
later ones get the cached reply (bounded LRU) instead of doing the work twice. A malformed request gets a typed
error reply; a handler that raises gets :class:`RemoteError`; one that runs past the deadline gets
:class:`RequestTimeout`. Nothing a peer sends stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
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
)
from m2m.bus.messages import Envelope, ErrorReply, Message, decode, decode_envelope, encode, frames_size
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
        self._cache: OrderedDict[str, list[bytes]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[list[bytes]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self.conn: Conn | None = None
        self.last_seen = 0.0
        self.handled = 0
        self.reconnects = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        for j in list(self._jobs):
            j.cancel()

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests, let those in progress finish (at most ``timeout`` s), then leave the broker.

        The broker routes nothing more once it sees capacity 0, so no request is lost; a job still running at
        the timeout is cancelled and its client retries elsewhere (it gets :class:`WorkerLost`). Returns True
        when every job finished.
        """
        self.capacity = 0
        if self.conn is not None:
            self.conn.send_nowait([P.WORKER, P.HEARTBEAT, *self._hello()])
        finished = True
        if self._jobs:
            _, pending = await asyncio.wait(list(self._jobs), timeout=timeout)
            finished = not pending
        await self.stop()
        return finished

    def _hello(self) -> list[bytes]:
        return [self.service.encode(), str(self.capacity).encode()]

    async def _run(self) -> None:
        cfg = self.client.cfg
        loop = asyncio.get_running_loop()
        backoff = cfg.heartbeat
        try:
            while True:
                sock = self.client._socket(zmq.DEALER)
                sock.connect(cfg.endpoint)
                self.conn = Conn(sock, self._on_frames)
                self.conn.send_nowait([P.WORKER, P.READY, *self._hello()])
                self.last_seen = loop.time()
                while True:
                    await asyncio.sleep(cfg.heartbeat)
                    self.conn.send_nowait([P.WORKER, P.HEARTBEAT, *self._hello()])
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
            job = asyncio.get_running_loop().create_task(self._handle(frames[2], frames[3:]))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
        elif cmd == P.DISCONNECT:
            # The broker does not know us (it restarted) or is going down: register again.
            if self.conn is not None:
                self.conn.send_nowait([P.WORKER, P.READY, *self._hello()])
        elif cmd != P.HEARTBEAT:
            self.log.warning("bad_frames_from_broker", command=cmd.hex())

    async def _handle(self, cid: bytes, m: list[bytes]) -> None:
        try:
            reply = await self._reply_for(m)
        except Exception as exc:  # never let one request kill the worker
            self.log.exception("worker_failed", error=repr(exc))
            return
        out = [P.WORKER, P.REPLY, cid, *reply]
        conn = self.conn
        if conn is None or conn.send_nowait(out):
            return
        cfg = self.client.cfg
        try:
            await conn.send(out, conn.loop.time() + cfg.heartbeat * cfg.liveness)
        except RequestTimeout:
            self.log.warning("reply_lost", reason="broker not taking messages")  # a retry hits the cache

    async def _reply_for(self, m: list[bytes]) -> list[bytes]:
        try:
            env = decode_envelope(m[0])
        except DecodeError as exc:
            self.log.warning("bad_request", error=str(exc)[:200])
            return self._encode_error(None, exc)
        key = env.idem or env.id
        cached = self._cache.get(key)
        if cached is not None:
            self.log.info("request_replayed_from_cache", msg_id=env.id, idem=key, requester=env.sender)
            return cached
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
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
            _, msg = decode(m)
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
        except BusError as exc:
            if not isinstance(exc, DecodeError | UnhandledMessage | RequestTimeout):
                self.log.warning("handler_error", msg_id=env.id, error=repr(exc))
            return self._encode_error(env, exc), not exc.retryable
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
