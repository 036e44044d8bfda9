"""Wire protocol between clients, workers and the broker (Majordomo-like, over one ROUTER endpoint).

All frames below follow the ROUTER's identity frame (added/removed by ZeroMQ). ``M`` = ``[env, payload, *arrays]``.

Client (DEALER) → broker::

    [C1, REQUEST, service, *M]            request for a service
    [C1, PUBLISH, topic, flags, *M]       event (flags=0) or knowledge (flags=RETAIN)
    [C1, PING]                            client heartbeat; broker answers PONG
    [C1, SNAPSHOT, prefix, token]         Clone: ask for retained values under prefix

Broker → client::

    [C1, REPLY, service, *M]              reply or ErrorReply (schema bus.error)
    [C1, PONG, broker_incarnation]
    [C1, KVITEM, token, topic, header, *M]  one retained value
    [C1, KVEND, token, broker_incarnation, truncated]
                                          end of a snapshot; truncated = b"\x01" when values beyond the broker's
                                          snapshot byte cap were left out (b"\x00" otherwise)

Worker (DEALER, routing id set by the worker: random, never shown to other peers) → broker::

    [W1, READY, service, capacity, inflight, cached]   registration: on connect and whenever the worker sees a new
                                          broker incarnation; inflight/cached are KEYS frames
    [W1, HEARTBEAT, service, capacity, inflight]       (capacity 0: draining)
    [W1, REPLY, token, *M]                token = the one the broker sent with the REQUEST
    [W1, DISCONNECT]

Worker heartbeat thread (its own DEALER) → broker::

    [W1, HEARTBEAT_FOR, worker_routing_id, service, capacity, inflight]
                                          the worker's heartbeat, sent by a thread independent of the worker's
                                          event loop so that CPU-bound work cannot silence it

Broker → worker::

    [W1, REQUEST, token, *M]              token = content digest of the request (see :func:`content_digest`)
    [W1, HEARTBEAT, broker_incarnation]
    [W1, DISCONNECT]

Broker PUB → subscribers::

    [topic, header, *M]                   header = broker incarnation u64, per-topic seq u64, flags u8

A request is identified by its **key** ``(service, idem, digest)``: the envelope's idempotency key (its id when it
has none) and :func:`content_digest` of payload and array frames (not the envelope: a resend has a new envelope
id and timestamp but the same content). A request that reuses someone else's idempotency key with other content is
therefore a different request. A KEYS frame is a msgpack list of ``[idem, digest]`` pairs (at most
:data:`MAX_KEYS`): the requests a worker is running, or the ones whose replies it holds in its cache.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

import msgspec

from m2m.bus.errors import ProtocolError

#: Default endpoints: ipc:// is local-only, so a default bus needs no keys.
DEFAULT_ENDPOINT = "ipc:///tmp/m2m-bus.sock"
DEFAULT_PUB_ENDPOINT = "ipc:///tmp/m2m-bus-pub.sock"
#: Defaults both ends must agree on: a peer is dead after LIVENESS missed heartbeats of HEARTBEAT_S seconds.
DEFAULT_HEARTBEAT_S = 1.0
DEFAULT_LIVENESS = 3
DEFAULT_MAX_MESSAGE_SIZE = 64 << 20
DEFAULT_HWM = 10_000
DEFAULT_PUB_HWM = 100_000

CLIENT = b"C1"
WORKER = b"W1"

REQUEST = b"\x01"
REPLY = b"\x02"
PUBLISH = b"\x03"
PING = b"\x04"
PONG = b"\x05"
SNAPSHOT = b"\x06"
KVITEM = b"\x07"
KVEND = b"\x08"
TRUNCATED = b"\x01"
"""KVEND's last frame when the snapshot left values out (the broker's ``snapshot_max_bytes``); else ``b"\\x00"``."""
COMPLETE = b"\x00"
READY = b"\x11"
HEARTBEAT = b"\x12"
DISCONNECT = b"\x13"
HEARTBEAT_FOR = b"\x14"

DIGEST_SIZE = 16
"""Bytes of a request's content digest (blake2b)."""
MAX_KEYS = 1024
"""Most keys in one KEYS frame: a worker reports at most this many cached replies when it registers."""

RETAIN = 1
"""Publish flag: a knowledge value (kept by the broker, sent to late joiners)."""

_HEADER = struct.Struct(">QQB")
HEADER_SIZE = _HEADER.size


def pack_header(incarnation: int, seq: int, flags: int) -> bytes:
    return _HEADER.pack(incarnation, seq, flags)


def unpack_header(data: bytes) -> tuple[int, int, int]:
    """(broker incarnation, per-topic seq, flags); raises :class:`ProtocolError` on a bad header."""
    try:
        a, b, c = _HEADER.unpack(data)
    except struct.error:
        raise ProtocolError(f"a header frame is {_HEADER.size} bytes, got {len(data)}") from None
    return a, b, c


def pack_u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def unpack_u64(b: bytes) -> int:
    if len(b) != 8:
        raise ProtocolError(f"a u64 frame is 8 bytes, got {len(b)}")
    return int.from_bytes(b, "big")


Key = tuple[str, bytes]
"""A request key as a worker knows it: (idempotency key, content digest); the service is the worker's own."""


def content_digest(frames: Sequence[bytes | memoryview]) -> bytes:
    """blake2b digest (:data:`DIGEST_SIZE` bytes) of a request's payload and array frames (``M[1:]``), each frame
    length-prefixed so that moving bytes between frames changes the digest."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for f in frames:
        h.update(len(f).to_bytes(8, "big"))
        h.update(f)
    return h.digest()


_keys_decoder = msgspec.msgpack.Decoder(list[tuple[str, bytes]])


def pack_keys(keys: Iterable[Key]) -> bytes:
    """A KEYS frame (the first :data:`MAX_KEYS` of ``keys``)."""
    out: list[Key] = []
    for k in keys:
        if len(out) >= MAX_KEYS:
            break
        out.append(k)
    return msgspec.msgpack.encode(out)


def unpack_keys(data: bytes) -> set[Key]:
    """The keys of a KEYS frame; :class:`ProtocolError` for anything else (too many, wrong types, bad digest)."""
    try:
        keys = _keys_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"bad KEYS frame: {exc}") from None
    if len(keys) > MAX_KEYS or any(len(d) != DIGEST_SIZE for _, d in keys):
        raise ProtocolError(f"bad KEYS frame: more than {MAX_KEYS} keys or a digest not of {DIGEST_SIZE} bytes")
    return set(keys)
