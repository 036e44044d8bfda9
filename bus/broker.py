"""The broker process: Majordomo-style request routing by service name, Paranoid-Pirate heartbeats with
workers, a PUB path for events with Clone-style knowledge (last value per topic + snapshot), and an optional
Titanic-like transcript of everything it routes.

Run it with ``m2m broker`` or ``python -m m2m.bus.broker``. The loop is synchronous (one poller, no threads
besides the ZAP authenticator) and never blocks on a send: every send is non-blocking and a peer that cannot
take a message loses it with a log line (requests are retried by clients).
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq

from m2m.bus import protocol as P
from m2m.bus.clone import KnowledgeStore
from m2m.bus.errors import (
    BusError,
    DecodeError,
    MessageTooLarge,
    ProtocolError,
    RequestTimeout,
    ServiceUnavailable,
    WorkerLost,
)
from m2m.bus.messages import INCARNATION, Envelope, ErrorReply, decode_envelope, decode_payload, encode, new_id
from m2m.bus.reactor import recv_frames, send_frames
from m2m.bus.security import ServerKeys, apply_server, require_safe_bind, start_authenticator
from m2m.bus.transcript import TranscriptWriter

MiB = 1 << 20
EXPIRY_MARGIN = 0.02
"""Queued requests are failed this long before their deadline so the typed error beats the client's timer."""


@dataclass
class BrokerConfig:
    endpoint: str = P.DEFAULT_ENDPOINT
    pub_endpoint: str = P.DEFAULT_PUB_ENDPOINT
    heartbeat: float = P.DEFAULT_HEARTBEAT_S
    liveness: int = P.DEFAULT_LIVENESS
    max_message_size: int = P.DEFAULT_MAX_MESSAGE_SIZE
    hwm: int = P.DEFAULT_HWM
    pub_hwm: int = P.DEFAULT_PUB_HWM
    queue_limit: int = 10_000
    reply_cache_entries: int = 4096
    reply_cache_bytes: int = 64 * MiB
    transcript: str | Path | None = None
    curve: ServerKeys | None = None


@dataclass
class _Worker:
    identity: bytes
    service: str
    capacity: int
    expiry: float
    inflight: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class _Pending:
    client: bytes
    service: str
    env: Envelope
    frames: list[bytes]
    deadline: float
    worker: bytes | None = None


@dataclass
class _Service:
    name: str
    workers: deque[bytes] = field(default_factory=deque)
    queue: deque[tuple[str, str]] = field(default_factory=deque)


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.cfg = config
        for ep in (config.endpoint, config.pub_endpoint):
            require_safe_bind(ep, config.curve is not None)
        self.incarnation = random.getrandbits(63) or 1
        self._inc_bytes = P.pack_u64(self.incarnation)
        self.log = structlog.get_logger("m2m.bus.broker").bind(sender="broker", incarnation=INCARNATION)
        self.workers: dict[bytes, _Worker] = {}
        self.services: dict[str, _Service] = {}
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.cache: OrderedDict[tuple[str, str], list[bytes]] = OrderedDict()
        self._cache_bytes = 0
        self.knowledge = KnowledgeStore(self.incarnation)
        self._seq = 0
        self._stop = False
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._auth = start_authenticator(self.ctx, config.curve) if config.curve else None
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.linger = 0
            if config.curve:
                apply_server(sock, config.curve)
        self.router.router_mandatory = 1
        self.router.sndhwm = self.router.rcvhwm = config.hwm
        # Frames up to 2x the limit still arrive and get a typed MessageTooLarge reply; beyond that ZeroMQ
        # drops the connection (it cannot tell the sender), which keeps memory bounded.
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * config.max_message_size)
        self.pub.sndhwm = config.pub_hwm
        self.router.bind(config.endpoint)
        self.pub.bind(config.pub_endpoint)
        self.transcript = TranscriptWriter(config.transcript) if config.transcript else None
        self.stats = {"requests": 0, "replies": 0, "events": 0, "errors": 0, "dropped": 0}

    # ------------------------------------------------------------------------------------------ main loop
    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self) -> None:
        cfg = self.cfg
        self.log.info("broker_up", endpoint=cfg.endpoint, pub_endpoint=cfg.pub_endpoint,
                      curve=cfg.curve is not None, transcript=str(cfg.transcript or ""))
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        next_hb = time.monotonic() + cfg.heartbeat
        try:
            while not self._stop:
                queued = any(s.queue for s in self.services.values())
                wait = max(0.0, next_hb - time.monotonic())
                if queued:
                    wait = min(wait, 0.01)
                if poller.poll(int(min(wait, 0.25) * 1000)):
                    for _ in range(1000):
                        try:
                            frames = recv_frames(self.router)
                        except zmq.Again:
                            break
                        self._handle(frames)
                if queued:
                    self._expire_queued()
                if time.monotonic() >= next_hb:
                    self._heartbeat()
                    next_hb = time.monotonic() + cfg.heartbeat
        finally:
            self.close()

    def close(self) -> None:
        for ident in list(self.workers):
            self._send(ident, [P.WORKER, P.DISCONNECT])
        if self.transcript:
            self.transcript.close()
        if self._auth is not None:
            self._auth.stop()
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()
        self.log.info("broker_down", **self.stats)

    def _send(self, identity: bytes, frames: Sequence[bytes]) -> bool:
        try:
            send_frames(self.router, [identity, *frames])
            return True
        except zmq.Again:
            self.stats["dropped"] += 1
            self.log.warning("peer_full_dropped", peer=identity.hex())
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY)
            self.stats["dropped"] += 1
            self.log.info("peer_unreachable", peer=identity.hex(), error=str(exc))
        return False

    # ------------------------------------------------------------------------------------------ dispatch
    def _handle(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            if len(frames) < 3:
                raise ProtocolError(f"{len(frames) - 1} frames is too few")
            if sum(len(f) for f in frames) > self.cfg.max_message_size:
                raise MessageTooLarge(f"message of {sum(len(f) for f in frames)} bytes, limit "
                                      f"{self.cfg.max_message_size}")
            header, cmd = frames[1], frames[2]
            if header == P.CLIENT:
                self._from_client(identity, cmd, frames[3:])
            elif header == P.WORKER:
                self._from_worker(identity, cmd, frames[3:])
            else:
                raise ProtocolError("unknown protocol header")
        except BusError as exc:
            self.stats["errors"] += 1
            env = None
            if len(frames) > 4 and frames[1] in (P.CLIENT, P.WORKER):
                try:
                    env = decode_envelope(frames[4] if frames[2] != P.PUBLISH else frames[5])
                except (DecodeError, IndexError):
                    env = None
            self.log.warning("bad_message", peer=identity.hex(), error=type(exc).__name__, detail=str(exc)[:200],
                             msg_id=env.id if env else "")
            route = frames[3].decode("utf-8", "replace") if len(frames) > 3 else ""
            self._error(identity, route, env, exc)
        except Exception as exc:  # a bug must not kill the broker: log it and carry on
            self.stats["errors"] += 1
            self.log.exception("handler_failed", peer=identity.hex(), error=repr(exc))

    def _from_client(self, cid: bytes, cmd: bytes, rest: list[bytes]) -> None:
        if cmd == P.REQUEST:
            if len(rest) < 3:
                raise ProtocolError("REQUEST needs service, envelope, payload")
            self._request(cid, rest[0], rest[1:])
        elif cmd == P.PUBLISH:
            if len(rest) < 4:
                raise ProtocolError("PUBLISH needs topic, flags, envelope, payload")
            self._publish(cid, rest[0], rest[1], rest[2:])
        elif cmd == P.PING:
            self._send(cid, [P.CLIENT, P.PONG, self._inc_bytes])
        elif cmd == P.SNAPSHOT:
            if len(rest) != 2:
                raise ProtocolError("SNAPSHOT needs prefix, token")
            self._snapshot(cid, rest[0], rest[1])
        else:
            raise ProtocolError(f"unknown client command {cmd!r}")

    def _request(self, cid: bytes, service_b: bytes, m: list[bytes]) -> None:
        env = decode_envelope(m[0])
        try:
            service = service_b.decode()
        except UnicodeDecodeError:
            raise ProtocolError("service name is not UTF-8") from None
        self.stats["requests"] += 1
        key = (service, env.idem or env.id)
        cached = self.cache.get(key)
        pending = self.pending.get(key)
        # a resend (same idempotency key) is recorded as "retry" so a replay can tell it from new work
        self._record("in", "retry" if cached is not None or pending is not None else "request", service, cid, env, m)
        if cached is not None:
            self.cache.move_to_end(key)
            self._send(cid, [P.CLIENT, P.REPLY, service_b, *cached])
            return
        if pending is not None:  # a retry of a request still in flight or queued: the first reply will do
            pending.client = cid
            return
        if env.deadline and env.deadline - EXPIRY_MARGIN <= time.time():
            self._error(cid, service, env, RequestTimeout("deadline passed before the request reached the broker"))
            return
        svc = self._service(service)
        if len(svc.queue) >= self.cfg.queue_limit:
            self._error(cid, service, env, ServiceUnavailable(f"{service}: {len(svc.queue)} requests queued"))
            return
        self.pending[key] = _Pending(cid, service, env, m, env.deadline)
        svc.queue.append(key)
        self._dispatch(svc)

    def _dispatch(self, svc: _Service) -> None:
        while svc.queue and svc.workers:
            chosen = None
            for _ in range(len(svc.workers)):
                ident = svc.workers[0]
                svc.workers.rotate(-1)  # round robin: the chosen one goes to the back
                w = self.workers[ident]
                if len(w.inflight) < w.capacity:
                    chosen = w
                    break
            if chosen is None:
                return
            key = svc.queue.popleft()
            p = self.pending.get(key)
            if p is None:
                continue
            p.worker = chosen.identity
            chosen.inflight.add(key)
            if not self._send(chosen.identity, [P.WORKER, P.REQUEST, p.client, *p.frames]):
                chosen.inflight.discard(key)
                p.worker = None
                svc.queue.appendleft(key)
                self._purge(chosen.identity, "unreachable")

    def _expire_queued(self) -> None:
        now = time.time()
        for svc in self.services.values():
            if not svc.queue:
                continue
            keep: deque[tuple[str, str]] = deque()
            for key in svc.queue:
                p = self.pending.get(key)
                if p is None:
                    continue
                if p.deadline and p.deadline - EXPIRY_MARGIN <= now:
                    del self.pending[key]
                    exc: BusError = (ServiceUnavailable(f"no live worker for {svc.name!r}") if not svc.workers
                                     else RequestTimeout(f"{svc.name!r} workers busy until the deadline"))
                    self._error(p.client, svc.name, p.env, exc)
                else:
                    keep.append(key)
            svc.queue = keep

    def _service(self, name: str) -> _Service:
        svc = self.services.get(name)
        if svc is None:
            svc = self.services[name] = _Service(name)
        return svc

    def _error(self, cid: bytes, route: str, req: Envelope | None, exc: BusError) -> None:
        self.stats["errors"] += 1
        env = Envelope(id=new_id(), schema="", version=0, sender="broker", incarnation=INCARNATION,
                       seq=self._next_seq(), ts=time.time(), kind="error", route=route,
                       corr=req.id if req else "", idem=req.idem if req else "", session=req.session if req else "")
        frames = encode(ErrorReply(code=exc.code, message=str(exc), retryable=exc.retryable), env)
        m = [bytes(f) for f in frames]
        self._record("out", "error", route, b"", env, m)
        self._send(cid, [P.CLIENT, P.REPLY, route.encode(), *m])

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------------------------------ workers
    def _from_worker(self, wid: bytes, cmd: bytes, rest: list[bytes]) -> None:
        if cmd in (P.READY, P.HEARTBEAT):
            if len(rest) != 2:
                raise ProtocolError("READY/HEARTBEAT need service, capacity")
            try:
                service, capacity = rest[0].decode(), int(rest[1])
            except (UnicodeDecodeError, ValueError):
                raise ProtocolError("bad service name or capacity") from None
            self._register(wid, service, capacity)
        elif cmd == P.REPLY:
            if len(rest) < 3:
                raise ProtocolError("REPLY needs client, envelope, payload")
            self._reply(wid, rest[0], rest[1:])
        elif cmd == P.DISCONNECT:
            self._purge(wid, "disconnect")
        else:
            raise ProtocolError(f"unknown worker command {cmd!r}")

    def _register(self, wid: bytes, service: str, capacity: int) -> None:
        w = self.workers.get(wid)
        expiry = time.monotonic() + self.cfg.heartbeat * self.cfg.liveness
        if w is not None and w.service == service:
            w.expiry = expiry
            w.capacity = max(0, capacity)  # 0: the worker is draining
        else:
            if w is not None:
                self._purge(wid, "service changed")
            self.workers[wid] = _Worker(wid, service, max(1, capacity), expiry)
            svc = self._service(service)
            svc.workers.append(wid)
            self.log.info("worker_ready", worker=wid.hex(), service=service, capacity=capacity)
        self._dispatch(self._service(service))

    def _reply(self, wid: bytes, cid: bytes, m: list[bytes]) -> None:
        env = decode_envelope(m[0])
        w = self.workers.get(wid)
        service = w.service if w else env.route
        key = (service, env.idem or env.corr)
        self.stats["replies"] += 1
        self._record("in", "error" if env.schema == ErrorReply.schema else "reply", service, wid, env, m)
        p = self.pending.pop(key, None)
        if w is not None:
            w.inflight.discard(key)
            w.expiry = time.monotonic() + self.cfg.heartbeat * self.cfg.liveness
        if p is not None:
            cid = p.client
        if self._cacheable(env, m):
            self._cache_put(key, m)
        self._send(cid, [P.CLIENT, P.REPLY, service.encode(), *m])
        if w is not None:
            self._dispatch(self._service(service))

    def _cacheable(self, env: Envelope, m: list[bytes]) -> bool:
        if env.schema != ErrorReply.schema:
            return True
        try:
            err = decode_payload(env, m[1], m[2:])
        except DecodeError:
            return False
        return isinstance(err, ErrorReply) and not err.retryable

    def _cache_put(self, key: tuple[str, str], m: list[bytes]) -> None:
        size = sum(len(f) for f in m)
        if size > self.cfg.reply_cache_bytes // 4:
            return
        self.cache[key] = m
        self._cache_bytes += size
        while len(self.cache) > self.cfg.reply_cache_entries or self._cache_bytes > self.cfg.reply_cache_bytes:
            _, old = self.cache.popitem(last=False)
            self._cache_bytes -= sum(len(f) for f in old)

    def _purge(self, wid: bytes, reason: str) -> None:
        w = self.workers.pop(wid, None)
        if w is None:
            return
        self.log.info("worker_gone", worker=wid.hex(), service=w.service, reason=reason, inflight=len(w.inflight))
        svc = self._service(w.service)
        with contextlib.suppress(ValueError):
            svc.workers.remove(wid)
        for key in w.inflight:
            p = self.pending.pop(key, None)
            if p is not None:
                self._error(p.client, w.service, p.env, WorkerLost(f"worker of {w.service!r} died ({reason})"))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for wid, w in list(self.workers.items()):
            if w.expiry < now:
                self._purge(wid, "heartbeat")
            else:
                self._send(wid, [P.WORKER, P.HEARTBEAT, self._inc_bytes])

    # ------------------------------------------------------------------------------------------ pub/sub
    def _publish(self, cid: bytes, topic: bytes, flags_b: bytes, m: list[bytes]) -> None:
        env = decode_envelope(m[0])
        if len(flags_b) != 1:
            raise ProtocolError("flags must be one byte")
        try:
            topic.decode()
        except UnicodeDecodeError:
            raise ProtocolError("topic is not UTF-8") from None
        header = self.knowledge.stamp(topic, flags_b[0], m)
        self.stats["events"] += 1
        if self.transcript is not None:
            self._record("in", "event", topic.decode("utf-8", "replace"), cid, env, m)
        try:
            send_frames(self.pub, [topic, header, *m])
        except zmq.Again:
            self.stats["dropped"] += 1

    def _snapshot(self, cid: bytes, prefix: bytes, token: bytes) -> None:
        for topic, header, m in self.knowledge.snapshot(prefix):
            self._send(cid, [P.CLIENT, P.KVITEM, token, topic, header, *m])
        self._send(cid, [P.CLIENT, P.KVEND, token, self._inc_bytes])

    # ------------------------------------------------------------------------------------------ transcript
    def _record(self, direction: str, kind: str, route: str, peer: bytes, env: Envelope, m: list[bytes]) -> None:
        if self.transcript is None:
            return
        try:
            self.transcript.append(t=time.time(), direction=direction, kind=kind, route=route, peer=peer.hex(),
                                   session=env.session, frames=m)
        except OSError as exc:
            self.log.error("transcript_write_failed", error=str(exc))


def serve_forever(config: BrokerConfig) -> int:
    broker = Broker(config)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.run()
    return 0


if __name__ == "__main__":
    import sys

    from m2m.bus.serve import main_broker

    sys.exit(main_broker())
