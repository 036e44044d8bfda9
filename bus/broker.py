"""The broker process: Majordomo-style request routing by service name, Paranoid-Pirate heartbeats with
workers, a PUB path for events with Clone-style knowledge (last value per topic + snapshot), and an optional
Titanic-like transcript of everything it routes.

Run it with ``m2m broker`` or ``python -m m2m.bus.broker``. The loop is synchronous (one poller, no threads
besides the ZAP authenticator) and never blocks on a send: every send is non-blocking and a peer that cannot
take a message loses it with a log line (requests are retried by clients).

What it guarantees (see :mod:`m2m.bus.protocol` for the frames and the request key):

* **Replies come from the worker that holds the request.** A REPLY is accepted only from the worker the request
  was dispatched to, or from one that reported the key in flight when it (re-)registered; anything else is
  dropped (not cached, not forwarded) with one warning per peer. Requests are keyed by (service, idempotency key,
  content digest), so a request that reuses someone else's key with other content is another request and cannot
  poison their reply. Identical requests from several clients while one is pending are all answered (at most
  ``clients_per_request``).
* **Capacity is never exceeded.** A worker's load is the union of what the broker dispatched to it and what it
  reports in flight in every READY/HEARTBEAT; nothing new goes to a worker at capacity. A request that still
  reaches a full worker (a race) comes back as :class:`WorkerBusy`, which the broker requeues; the client never
  sees it.
* **Exactly once across broker restarts.** Workers register with the keys they are running and the keys whose
  replies they hold; a request with such a key goes to that worker (at no cost to its capacity: it joins the
  running job or answers from its cache). A fresh broker holds every dispatch for ``grace`` seconds so that
  workers can register before the clients' resends are dispatched.
* **Liveness that load cannot fool.** A worker is dead after ``heartbeat × liveness`` s without a heartbeat; its
  heartbeats come from a thread independent of its event loop (HEARTBEAT_FOR). When the broker's own loop was
  not scheduled for longer than a heartbeat, every worker's expiry is extended by that stall before any purge.
* **Bounded resources.** Every pending request has a deadline (``default_deadline`` when the envelope has none,
  at most ``max_deadline``) and is dropped with a typed error when it passes; per-client pending requests, queue
  length, retained topics and bytes, snapshot replies, message size and frame count are capped
  (:class:`BrokerConfig`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import heapq
import itertools
import random
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq

from m2m.bus import protocol as P
from m2m.bus import reactor
from m2m.bus.clone import KnowledgeStore, RetainedLog
from m2m.bus.errors import (
    BusError,
    DecodeError,
    MessageTooLarge,
    ProtocolError,
    RequestTimeout,
    ServiceUnavailable,
    TooManyRequests,
    WorkerBusy,
    WorkerLost,
    error_for_code,
)
from m2m.bus.messages import (
    INCARNATION,
    Envelope,
    ErrorReply,
    decode_envelope,
    decode_payload,
    encode,
    frames_size,
    new_id,
)
from m2m.bus.reactor import send_frames
from m2m.bus.security import ServerKeys, apply_server, require_safe_bind, start_authenticator
from m2m.bus.transcript import DEFAULT_KEEP_SEGMENTS, DEFAULT_SEGMENT_BYTES, TranscriptWriter

MiB = 1 << 20
EXPIRY_MARGIN = 0.02
"""Queued requests are failed this long (s) before their deadline so the typed error beats the client's timer."""
WARNED_PEERS = 10_000
"""Peers remembered for once-per-peer warnings (the set is cleared beyond this)."""

TRIM_EVERY_S = 10.0
"""The broker hands freed heap back to the system (glibc ``malloc_trim``) at most this often (s), when requests were
forgotten (answered or expired) or messages refused since the last time."""

Key = tuple[str, str, bytes]
"""A request's key at the broker: (service, idempotency key, content digest)."""


def _key_bytes(key: Key) -> bytes:
    """A reply-cache key as the :class:`RetainedLog` of replies stores it: ``service NUL idem NUL digest-hex``."""
    service, idem, digest = key
    return b"\0".join((service.encode(), idem.encode("utf-8", "surrogateescape"), digest.hex().encode()))


def _key_from_bytes(data: bytes) -> Key | None:
    """The inverse of :func:`_key_bytes`; None for a record that is not one."""
    service, sep, rest = data.partition(b"\0")
    idem, sep2, digest = rest.rpartition(b"\0")
    if not sep or not sep2:
        return None
    try:
        return service.decode(), idem.decode("utf-8", "surrogateescape"), bytes.fromhex(digest.decode())
    except (UnicodeDecodeError, ValueError):
        return None


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere). After a burst of requests is freed, glibc keeps the memory in its
    arenas (the chaos run saw +383 MB kept after 20k requests); trimming returns it to the system."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


@dataclass
class BrokerConfig:
    """Broker settings. Times in seconds, sizes in bytes.

    ``max_message_size``: largest message (all frames); a bigger one gets :class:`MessageTooLarge` and is not
    copied further while it is received (and ZeroMQ drops a connection that sends a single frame over twice it).
    ``max_frames``: most frames in one message (beyond: :class:`MessageTooLarge`).
    ``queue_limit``: most requests queued per service (beyond: :class:`ServiceUnavailable`).
    ``default_deadline``: deadline of a request whose envelope has none; ``max_deadline``: the most any request
    is kept (a later envelope deadline is clamped). A pending request is dropped with a typed error at its
    deadline (a dispatched one ``heartbeat × liveness`` later, so the worker's own timeout reply gets through).
    ``max_pending_per_client``: requests one client may have pending (beyond: :class:`TooManyRequests`).
    ``clients_per_request``: clients answered when several send the identical request while it is pending.
    ``max_retained_topics`` / ``max_retained_bytes``: knowledge kept for late joiners; a value beyond either is
    published as an event but not retained (logged at warning).
    ``snapshot_max_bytes``: most bytes of values in one snapshot reply (the rest is left out and KVEND says so).
    ``grace``: after start, dispatch waits this long so workers can re-register (None: 1.5 heartbeats).
    ``retained``: a file that keeps the knowledge values across broker restarts (:class:`RetainedLog`; None: they
    live in memory only and publishers re-assert them). ``replies``: a file that keeps the reply cache across broker
    restarts the same way, so a request whose worker died after answering is still answered once.
    ``transcript_max_bytes`` / ``transcript_keep``: the transcript rotates to a new segment at this size and keeps
    this many closed segments (0: all); see :class:`~m2m.bus.transcript.TranscriptWriter`.
    """

    endpoint: str = P.DEFAULT_ENDPOINT
    pub_endpoint: str = P.DEFAULT_PUB_ENDPOINT
    heartbeat: float = P.DEFAULT_HEARTBEAT_S
    liveness: int = P.DEFAULT_LIVENESS
    max_message_size: int = P.DEFAULT_MAX_MESSAGE_SIZE
    max_frames: int = 256
    hwm: int = P.DEFAULT_HWM
    pub_hwm: int = P.DEFAULT_PUB_HWM
    queue_limit: int = 10_000
    reply_cache_entries: int = 4096
    reply_cache_bytes: int = 64 * MiB
    default_deadline: float = 600.0
    max_deadline: float = 4 * 3600.0
    max_pending_per_client: int = 1000
    clients_per_request: int = 8
    max_retained_topics: int = 10_000
    max_retained_bytes: int = 256 * MiB
    snapshot_max_bytes: int = 32 * MiB
    grace: float | None = None
    transcript: str | Path | None = None
    retained: str | Path | None = None
    replies: str | Path | None = None
    transcript_max_bytes: int = DEFAULT_SEGMENT_BYTES
    transcript_keep: int = DEFAULT_KEEP_SEGMENTS
    curve: ServerKeys | None = None


@dataclass
class _Worker:
    identity: bytes
    service: str
    capacity: int
    expiry: float
    """monotonic s after which it is dead unless it sends a heartbeat."""
    dispatched: set[Key] = field(default_factory=set)
    """Sent to it by this broker and not answered yet."""
    reported: set[Key] = field(default_factory=set)
    """In flight at the worker, by its last READY/HEARTBEAT."""
    cached: set[Key] = field(default_factory=set)
    """Replies it holds in its cache, by its last READY."""
    full: bool = False
    """It answered WorkerBusy since its last report: send it nothing new until the next one."""
    skip_until: float = 0.0
    """monotonic s: unreachable at the last send (its connection is not up yet); no new work until then."""
    greeted: bool = False
    """This broker's HEARTBEAT reached it (it answers a new incarnation with READY and its cached keys)."""

    def load(self) -> int:
        """Jobs it runs: what this broker sent it and what it reported, each counted once."""
        return len(self.dispatched | self.reported) if self.reported else len(self.dispatched)

    def holds(self, key: Key) -> bool:
        """Whether it is running ``key`` or holds its reply (the request may go to it at no cost)."""
        return key in self.reported or key in self.cached or key in self.dispatched


@dataclass(eq=False)
class _Pending:
    key: Key
    env: Envelope
    frames: list[bytes]
    deadline: float
    """epoch s."""
    clients: list[bytes] = field(default_factory=list)
    worker: bytes | None = None
    queued: bool = False


@dataclass
class _Service:
    name: str
    workers: deque[bytes] = field(default_factory=deque)
    queue: deque[_Pending] = field(default_factory=deque)
    """Requests waiting for a worker, oldest first; entries that are no longer queued are skipped lazily."""
    waiting: int = 0
    """Entries of ``queue`` still waiting."""


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
        self.pending: dict[Key, _Pending] = {}
        self._expiries: list[tuple[float, int, _Pending]] = []  # heap of (epoch s, tie-break, pending)
        self._tie = itertools.count()
        self._per_client: dict[bytes, int] = {}
        self.cache: OrderedDict[Key, list[bytes]] = OrderedDict()
        self._cache_bytes = 0
        self.knowledge = KnowledgeStore(self.incarnation, max_topics=config.max_retained_topics,
                                        max_bytes=config.max_retained_bytes)
        self.retained_log = RetainedLog(config.retained) if config.retained else None
        if self.retained_log is not None:  # the knowledge of the broker before this one, publishers dead or alive
            for topic, frames in self.retained_log.load():
                self.knowledge.stamp(topic, P.RETAIN, frames)
            self.retained_log.rewrite(self.knowledge.items())
        self.replies_log = RetainedLog(config.replies) if config.replies else None
        if self.replies_log is not None:  # answers the broker before this one gave: repeated keys get them again
            for key_b, frames in self.replies_log.load():
                key = _key_from_bytes(key_b)
                if key is not None:
                    self._cache_put(key, frames, persist=False)
            self.replies_log.rewrite(self._cached_items())
        self._warned: set[tuple[str, bytes]] = set()
        self._seq = 0
        self._stop = False
        self._grace = 1.5 * config.heartbeat if config.grace is None else config.grace
        self._hold_until = 0.0
        self._holding = self._grace > 0
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._auth = start_authenticator(self.ctx, config.curve) if config.curve else None
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.linger = 0
            if config.curve:
                apply_server(sock, config.curve)
        self.router.router_mandatory = 1
        # a worker that reconnects (new socket, same routing id) takes its identity over from the stale connection
        self.router.router_handover = 1
        self.router.sndhwm = self.router.rcvhwm = config.hwm
        # Frames up to 2x the limit still arrive and get a typed MessageTooLarge reply; beyond that ZeroMQ
        # drops the connection (it cannot tell the sender), which keeps memory bounded.
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * config.max_message_size)
        self.pub.sndhwm = config.pub_hwm
        self.router.bind(config.endpoint)
        self.pub.bind(config.pub_endpoint)
        self.transcript = (TranscriptWriter(config.transcript, max_bytes=config.transcript_max_bytes,
                                            keep=config.transcript_keep) if config.transcript else None)
        self._trim = _malloc_trim()
        self._forgotten = 0  # requests resolved since the last trim
        self._trimmed_at = time.monotonic()
        self.stats = {"requests": 0, "replies": 0, "events": 0, "errors": 0, "dropped": 0, "forged": 0,
                      "busy": 0, "expired": 0, "stalls": 0}

    # ------------------------------------------------------------------------------------------ main loop
    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self) -> None:
        cfg = self.cfg
        self.log.info("broker_up", endpoint=cfg.endpoint, pub_endpoint=cfg.pub_endpoint,
                      curve=cfg.curve is not None, transcript=str(cfg.transcript or ""))
        router = self.router
        items = [(router, zmq.POLLIN)]
        next_hb = time.monotonic() + cfg.heartbeat
        self._hold_until = time.monotonic() + self._grace
        try:
            while not self._stop:
                before = time.monotonic()
                wait = min(next_hb - before, 0.25)
                if self._holding:
                    wait = min(wait, self._hold_until - before)
                if self._expiries:
                    wait = min(wait, self._expiries[0][0] - time.time())
                wait = max(0.0, wait)
                # zmq_poll itself, not zmq.Poller (whose Python wrapping cost more than the poll), and between
                # messages ZMQ_EVENTS, not a receive that ends in zmq.Again (an exception built in Python), except
                # in a burst (see reactor.BURST)
                if zmq.zmq_poll(items, int(wait * 1000)):
                    for n in range(1000):
                        got = self._recv()
                        if got is None:
                            break
                        self._handle(*got)
                        if n < reactor.BURST and not reactor.readable(router):  # in a burst: until Again
                            break
                now = time.monotonic()
                stall = now - before - wait
                if stall > cfg.heartbeat:
                    self._stalled(stall)
                self._expire(time.time())
                if self._holding and now >= self._hold_until:
                    self._holding = False
                    for svc in list(self.services.values()):
                        self._dispatch(svc)
                if now >= next_hb:
                    self._heartbeat()
                    next_hb = time.monotonic() + cfg.heartbeat
        finally:
            self.close()

    def _stalled(self, stall: float) -> None:
        """This loop was not scheduled (or worked) for ``stall`` s: heartbeats that arrived meanwhile are still
        unread, so no worker is blamed for it."""
        self.stats["stalls"] += 1
        self.log.warning("broker_stalled", seconds=round(stall, 3), workers=len(self.workers))
        for w in self.workers.values():
            w.expiry += stall

    def close(self) -> None:
        for ident in list(self.workers):
            self._send(ident, [P.WORKER, P.DISCONNECT])
        if self.transcript:
            self.transcript.close()
        for log in (self.retained_log, self.replies_log):
            if log is not None:
                log.close()
        if self._auth is not None:
            self._auth.stop()
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()
        self.log.info("broker_down", **self.stats)

    def _recv(self) -> tuple[list[bytes], str] | None:
        """One message from the ROUTER (see :func:`~m2m.bus.reactor.recv_bounded`), or None when none is waiting."""
        try:
            return reactor.recv_bounded(self.router, self.cfg.max_message_size, self.cfg.max_frames)
        except zmq.Again:
            return None

    def _send(self, identity: bytes, frames: Sequence[bytes]) -> bool:
        try:
            send_frames(self.router, [identity, *frames])
            return True
        except zmq.Again:
            self.stats["dropped"] += 1
            self._warn_once("peer_full_dropped", identity)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY)
            self.stats["dropped"] += 1
            self.log.info("peer_unreachable", peer=identity.hex(), error=str(exc))
        return False

    def _warn_once(self, event: str, peer: bytes, **kw: Any) -> None:
        """A warning about what ``peer`` sent, logged once per (event, peer): hostile input cannot flood the log."""
        if (event, peer) in self._warned:
            return
        if len(self._warned) >= WARNED_PEERS:
            self._warned.clear()
        self._warned.add((event, peer))
        self.log.warning(event, peer=peer.hex(), **kw)

    # ------------------------------------------------------------------------------------------ dispatch
    def _handle(self, frames: list[bytes], over: str = "") -> None:
        identity = frames[0]
        try:
            if over:
                raise MessageTooLarge(over)
            if len(frames) < 3:
                raise ProtocolError(f"{len(frames) - 1} frames is too few")
            header, cmd = frames[1], frames[2]
            if header == P.CLIENT:
                self._from_client(identity, cmd, frames[3:])
            elif header == P.WORKER:
                self._from_worker(identity, cmd, frames[3:])
            else:
                raise ProtocolError("unknown protocol header")
        except BusError as exc:  # bad input from a peer: a warning and a typed reply, no traceback
            self.stats["errors"] += 1
            self._forgotten += 1  # a flood of hostile frames leaves freed heap behind like a burst of requests
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
        key = (service, env.idem or env.id, P.content_digest(m[1:]))
        cached = self.cache.get(key)
        p = self.pending.get(key)
        # a resend (same key) is recorded as "retry" so a replay can tell it from new work
        self._record("in", "retry" if cached is not None or p is not None else "request", service, cid, env, m)
        if cached is not None:
            self.cache.move_to_end(key)
            self._send(cid, [P.CLIENT, P.REPLY, service_b, *cached])
            return
        if p is not None:  # the same request again (a resend, or another client): the one reply answers all
            if not self._add_client(p, cid):
                self._error(cid, service, env, self._too_many())
            elif p.worker is not None:  # in case the worker lost it: it joins the running job or answers again
                self._send(p.worker, [P.WORKER, P.REQUEST, key[2], *m])
            return
        now = time.time()
        deadline = min(env.deadline or now + self.cfg.default_deadline, now + self.cfg.max_deadline)
        if env.deadline and deadline - EXPIRY_MARGIN <= now:
            self._error(cid, service, env, RequestTimeout("deadline passed before the request reached the broker"))
            return
        if self._per_client.get(cid, 0) >= self.cfg.max_pending_per_client:
            self._error(cid, service, env, self._too_many())
            return
        svc = self._service(service)
        if svc.waiting >= self.cfg.queue_limit:
            self._error(cid, service, env, ServiceUnavailable(f"{service}: {svc.waiting} requests queued"))
            return
        p = self.pending[key] = _Pending(key, env, m, deadline)
        self._add_client(p, cid)
        heapq.heappush(self._expiries, (deadline - EXPIRY_MARGIN, next(self._tie), p))
        if not self._holding:
            w = self._affine(svc, key)
            if w is not None and self._send_to(w, p):
                return
        self._enqueue(svc, p)
        self._dispatch(svc)

    def _too_many(self) -> TooManyRequests:
        return TooManyRequests(f"more than {self.cfg.max_pending_per_client} requests pending")

    def _add_client(self, p: _Pending, cid: bytes) -> bool:
        """Answer ``cid`` too when ``p`` is answered; False when ``cid`` has too many requests pending."""
        if cid in p.clients:
            return True
        n = self._per_client.get(cid, 0)
        if n >= self.cfg.max_pending_per_client:
            return False
        self._per_client[cid] = n + 1
        p.clients.append(cid)
        if len(p.clients) > self.cfg.clients_per_request:
            self._client_done(p.clients.pop(0))
        return True

    def _client_done(self, cid: bytes) -> None:
        n = self._per_client.get(cid, 0) - 1
        if n > 0:
            self._per_client[cid] = n
        else:
            self._per_client.pop(cid, None)

    def _resolve(self, p: _Pending) -> None:
        """Forget ``p`` (answered, expired or its worker lost); its clients are answered by the caller."""
        if self.pending.get(p.key) is p:
            del self.pending[p.key]
        if p.worker is not None:
            w = self.workers.get(p.worker)
            if w is not None:
                w.dispatched.discard(p.key)
        if p.queued:
            self._unqueue(self._service(p.key[0]), p)
        for c in p.clients:
            self._client_done(c)
        self._forgotten += 1

    def _enqueue(self, svc: _Service, p: _Pending, *, front: bool = False) -> None:
        p.worker = None
        if not p.queued:
            p.queued = True
            svc.waiting += 1
            if front:
                svc.queue.appendleft(p)
            else:
                svc.queue.append(p)

    @staticmethod
    def _unqueue(svc: _Service, p: _Pending) -> None:
        """``p`` stops waiting in ``svc``'s queue (its entry there is skipped and dropped lazily)."""
        p.queued = False
        svc.waiting -= 1

    def _affine(self, svc: _Service, key: Key) -> _Worker | None:
        """A live worker that runs ``key`` or holds its reply (after a broker restart or a re-registration)."""
        for wid in svc.workers:
            w = self.workers[wid]
            if w.holds(key):
                return w
        return None

    def _free(self, svc: _Service) -> _Worker | None:
        """The next worker (round robin) with a free slot."""
        now = time.monotonic()
        for _ in range(len(svc.workers)):
            wid = svc.workers[0]
            svc.workers.rotate(-1)  # the chosen one goes to the back
            w = self.workers[wid]
            if not w.full and w.skip_until <= now and w.load() < w.capacity:
                return w
        return None

    def _send_to(self, w: _Worker, p: _Pending) -> bool:
        if not self._send(w.identity, [P.WORKER, P.REQUEST, p.key[2], *p.frames]):
            w.skip_until = time.monotonic() + self.cfg.heartbeat
            return False
        p.worker = w.identity
        w.dispatched.add(p.key)
        return True

    def _dispatch(self, svc: _Service) -> None:
        if self._holding:
            return
        q = svc.queue
        while svc.waiting and svc.workers:
            p = q[0]
            if not p.queued or self.pending.get(p.key) is not p:
                q.popleft()
                continue
            w = self._affine(svc, p.key) or self._free(svc)
            if w is None:
                return
            q.popleft()
            self._unqueue(svc, p)
            if not self._send_to(w, p):
                self._enqueue(svc, p, front=True)
                return
        if len(q) > 2 * svc.waiting + 64:  # drop entries that stopped waiting
            svc.queue = deque(p for p in q if p.queued and self.pending.get(p.key) is p)

    def _expire(self, now: float) -> None:
        """Fail what passed its deadline: queued requests at the deadline, dispatched ones ``heartbeat × liveness``
        later (the worker's own RequestTimeout normally comes first)."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, _, p = heapq.heappop(heap)
            if self.pending.get(p.key) is not p:
                continue
            service = p.key[0]
            if p.worker is not None:
                late = p.deadline + self.cfg.heartbeat * self.cfg.liveness
                if late > now:
                    heapq.heappush(heap, (late, next(self._tie), p))
                    continue
                exc: BusError = RequestTimeout(f"{service!r} worker did not answer before the deadline")
            elif not self._service(service).workers:
                exc = ServiceUnavailable(f"no live worker for {service!r}")
            else:
                exc = RequestTimeout(f"{service!r} workers busy until the deadline")
            self.stats["expired"] += 1
            self._resolve(p)
            for c in p.clients:
                self._error(c, service, p.env, exc)
        if len(heap) > 2 * len(self.pending) + 1024:  # entries of answered requests: drop them
            self._expiries = [e for e in heap if self.pending.get(e[2].key) is e[2]]
            heapq.heapify(self._expiries)

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
        if cmd == P.READY:
            if not 2 <= len(rest) <= 4:
                raise ProtocolError("READY needs service, capacity[, inflight[, cached]]")
            self._register(wid, *self._hello(rest[0], rest[1], rest[2] if len(rest) > 2 else None),
                           cached=P.unpack_keys(rest[3]) if len(rest) > 3 else None, ready=True)
        elif cmd == P.HEARTBEAT:
            if not 2 <= len(rest) <= 3:
                raise ProtocolError("HEARTBEAT needs service, capacity[, inflight]")
            self._register(wid, *self._hello(rest[0], rest[1], rest[2] if len(rest) > 2 else None))
        elif cmd == P.HEARTBEAT_FOR:
            if not 3 <= len(rest) <= 4:
                raise ProtocolError("HEARTBEAT_FOR needs worker, service, capacity[, inflight]")
            target = rest[0]
            if not target or target[0] == 0:  # ids starting with 0 are ZeroMQ's own (clients): never a worker
                raise ProtocolError("HEARTBEAT_FOR names no worker routing id")
            self._register(target, *self._hello(rest[1], rest[2], rest[3] if len(rest) > 3 else None))
        elif cmd == P.REPLY:
            if len(rest) < 3:
                raise ProtocolError("REPLY needs token, envelope, payload")
            self._reply(wid, rest[0], rest[1:])
        elif cmd == P.DISCONNECT:
            self._purge(wid, "disconnect")
        else:
            raise ProtocolError(f"unknown worker command {cmd!r}")

    @staticmethod
    def _hello(service_b: bytes, capacity_b: bytes, inflight_b: bytes | None) -> tuple[str, int, set[P.Key] | None]:
        try:
            service, capacity = service_b.decode(), int(capacity_b)
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("bad service name or capacity") from None
        return service, capacity, P.unpack_keys(inflight_b) if inflight_b is not None else None

    def _register(self, wid: bytes, service: str, capacity: int, inflight: set[P.Key] | None, *,
                  cached: set[P.Key] | None = None, ready: bool = False) -> None:
        """A READY or heartbeat of worker ``wid``: (re-)register it and take its report of what it runs (and, on
        READY, what it has cached)."""
        w = self.workers.get(wid)
        expiry = time.monotonic() + self.cfg.heartbeat * self.cfg.liveness
        if w is not None and w.service != service:
            self._purge(wid, "service changed")
            w = None
        svc = self._service(service)
        new = w is None
        if w is None:
            w = self.workers[wid] = _Worker(wid, service, 0, expiry)
            svc.workers.append(wid)
        w.expiry = expiry
        w.capacity = max(0, capacity)  # 0: the worker is draining
        if inflight is not None:
            w.reported = {(service, i, d) for i, d in inflight}
            w.full = False
        if cached is not None:
            w.cached = {(service, i, d) for i, d in cached}
        if ready:
            w.skip_until = 0.0  # its own connection is up
        if new:
            self.log.info("worker_ready", worker=wid.hex(), service=service, capacity=capacity,
                          inflight=len(w.reported), cached=len(w.cached))
        if not w.greeted:
            # its event loop answers a new broker incarnation with a READY that lists its cached replies; until
            # its own connection is up (a heartbeat thread may be quicker) this is tried at every heartbeat
            w.greeted = ready or self._send(wid, [P.WORKER, P.HEARTBEAT, self._inc_bytes])
        if (new or ready) and not self._holding and svc.waiting:
            for p in list(svc.queue):  # queued requests that this worker already runs or has answered
                if p.queued and self.pending.get(p.key) is p and w.holds(p.key):
                    self._unqueue(svc, p)
                    if not self._send_to(w, p):
                        self._enqueue(svc, p, front=True)
        self._dispatch(svc)

    def _reply(self, wid: bytes, token: bytes, m: list[bytes]) -> None:
        env = decode_envelope(m[0])
        w = self.workers.get(wid)
        if w is None:
            self._forged(wid, env, "not a registered worker")
            return
        key = (w.service, env.idem or env.corr, token)
        p = self.pending.get(key)
        if not ((p is not None and p.worker == wid) or key in w.reported or key in w.dispatched):
            if key in self.cache:
                return  # the same reply again (a resend the worker answered from its cache)
            self._forged(wid, env, "request not dispatched to this worker")
            return
        w.expiry = max(w.expiry, time.monotonic() + self.cfg.heartbeat * self.cfg.liveness)
        w.dispatched.discard(key)
        w.reported.discard(key)
        err = self._error_reply(env, m)
        if err is not None and err.code == WorkerBusy.code:
            # the worker is full (its report was behind): it holds nothing for this key; requeue, client unaware
            self.stats["busy"] += 1
            w.full = True
            w.cached.discard(key)
            svc = self._service(w.service)
            if p is not None and p.worker == wid:
                self._enqueue(svc, p, front=True)
                self._dispatch(svc)
            return
        self.stats["replies"] += 1
        service = w.service
        self._record("in", "error" if err is not None else "reply", service, wid, env, m)
        if err is None or (not err.retryable and error_for_code(err.code).remembered):
            self._cache_put(key, m)
        if p is not None:
            self._resolve(p)
            out = [P.CLIENT, P.REPLY, service.encode(), *m]
            for c in p.clients:
                self._send(c, out)
        self._dispatch(self._service(service))

    def _forged(self, wid: bytes, env: Envelope, why: str) -> None:
        """A reply the broker did not ask this peer for: dropped (neither cached nor forwarded)."""
        self.stats["forged"] += 1
        self._warn_once("unexpected_reply_dropped", wid, reason=why, idem=env.idem[:80], route=env.route[:80])

    @staticmethod
    def _error_reply(env: Envelope, m: list[bytes]) -> ErrorReply | None:
        """The ErrorReply in a worker's reply (None for a normal reply; a retryable one when it does not decode)."""
        if env.schema != ErrorReply.schema:
            return None
        try:
            err = decode_payload(env, m[1], m[2:])
        except DecodeError:
            return ErrorReply(code=DecodeError.code, retryable=True)
        return err if isinstance(err, ErrorReply) else ErrorReply(code=DecodeError.code, retryable=True)

    def _cache_put(self, key: Key, m: list[bytes], *, persist: bool = True) -> None:
        size = frames_size(m)
        if size > self.cfg.reply_cache_bytes // 4:
            return
        old = self.cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= frames_size(old)
        self.cache[key] = m
        self._cache_bytes += size
        while len(self.cache) > self.cfg.reply_cache_entries or self._cache_bytes > self.cfg.reply_cache_bytes:
            _, gone = self.cache.popitem(last=False)
            self._cache_bytes -= frames_size(gone)
        if persist and self.replies_log is not None and key in self.cache:
            try:
                self.replies_log.append(_key_bytes(key), m, self._cache_bytes, self._cached_items)
            except OSError as exc:
                self.log.error("replies_write_failed", error=str(exc))

    def _cached_items(self) -> Iterator[tuple[bytes, list[bytes]]]:
        return ((_key_bytes(k), m) for k, m in self.cache.items())

    def _purge(self, wid: bytes, reason: str) -> None:
        w = self.workers.pop(wid, None)
        if w is None:
            return
        self.log.info("worker_gone", worker=wid.hex(), service=w.service, reason=reason, inflight=len(w.dispatched))
        svc = self._service(w.service)
        with contextlib.suppress(ValueError):
            svc.workers.remove(wid)
        for key in list(w.dispatched):
            p = self.pending.get(key)
            if p is not None and p.worker == wid:
                self._resolve(p)
                for c in p.clients:
                    self._error(c, w.service, p.env, WorkerLost(f"worker of {w.service!r} died ({reason})"))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for wid, w in list(self.workers.items()):
            if w.expiry < now:
                self._purge(wid, "heartbeat")
            else:
                self._send(wid, [P.WORKER, P.HEARTBEAT, self._inc_bytes])
        for name, svc in list(self.services.items()):  # names clients asked for that nobody serves
            if not svc.workers and not svc.waiting:
                del self.services[name]
        for svc in list(self.services.values()):  # a worker skipped as unreachable may be reachable now
            self._dispatch(svc)
        # at most every TRIM_EVERY_S, whenever anything was freed since the last trim (so the tail of a burst that
        # came after a trim is handed back too)
        if self._forgotten and now - self._trimmed_at >= TRIM_EVERY_S and self._trim is not None:
            self._forgotten = 0
            self._trimmed_at = now
            self._trim(0)

    # ------------------------------------------------------------------------------------------ pub/sub
    def _publish(self, cid: bytes, topic: bytes, flags_b: bytes, m: list[bytes]) -> None:
        env = decode_envelope(m[0])
        if len(flags_b) != 1:
            raise ProtocolError("flags must be one byte")
        try:
            topic_s = topic.decode()
        except UnicodeDecodeError:
            raise ProtocolError("topic is not UTF-8") from None
        refused = self.knowledge.refused
        header = self.knowledge.stamp(topic, flags_b[0], m)
        kept = bool(flags_b[0] & P.RETAIN)
        if self.knowledge.refused != refused:
            kept = False
            self._warn_once("retained_value_refused", cid, topic=topic_s[:200],
                            topics=len(self.knowledge.values), retained_bytes=self.knowledge.bytes)
        self.stats["events"] += 1
        if kept and self.retained_log is not None:
            try:
                self.retained_log.append(topic, m, self.knowledge.bytes, self.knowledge.items)
            except OSError as exc:
                self.log.error("retained_write_failed", error=str(exc))
        if self.transcript is not None:
            self._record("in", "event", topic_s, cid, env, m)
        try:
            send_frames(self.pub, [topic, header, *m])
        except zmq.Again:
            self.stats["dropped"] += 1

    def _snapshot(self, cid: bytes, prefix: bytes, token: bytes) -> None:
        items, truncated = self.knowledge.snapshot(prefix, self.cfg.snapshot_max_bytes)
        for topic, header, m in items:
            self._send(cid, [P.CLIENT, P.KVITEM, token, topic, header, *m])
        if truncated:
            self._warn_once("snapshot_truncated", cid, prefix=prefix.decode("utf-8", "replace")[:200],
                            sent=len(items), limit=self.cfg.snapshot_max_bytes)
        self._send(cid, [P.CLIENT, P.KVEND, token, self._inc_bytes, P.TRUNCATED if truncated else P.COMPLETE])

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
