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
    [C1, KVEND, token, broker_incarnation]

Worker (DEALER) → broker::

    [W1, READY, service, capacity]        registration (also sent again as its heartbeat)
    [W1, HEARTBEAT, service, capacity]
    [W1, REPLY, client_identity, *M]
    [W1, DISCONNECT]

Broker → worker::

    [W1, REQUEST, client_identity, *M]
    [W1, HEARTBEAT, broker_incarnation]
    [W1, DISCONNECT]

Broker PUB → subscribers::

    [topic, header, *M]                   header = broker incarnation u64, per-topic seq u64, flags u8
"""

from __future__ import annotations

import struct

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
READY = b"\x11"
HEARTBEAT = b"\x12"
DISCONNECT = b"\x13"

RETAIN = 1
"""Publish flag: a knowledge value (kept by the broker, sent to late joiners)."""

_HEADER = struct.Struct(">QQB")
HEADER_SIZE = _HEADER.size


def pack_header(incarnation: int, seq: int, flags: int) -> bytes:
    return _HEADER.pack(incarnation, seq, flags)


def unpack_header(data: bytes) -> tuple[int, int, int]:
    """(broker incarnation, per-topic seq, flags); raises ``struct.error`` on a bad header."""
    a, b, c = _HEADER.unpack(data)
    return a, b, c


def pack_u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def unpack_u64(b: bytes) -> int:
    if len(b) != 8:
        raise ValueError("u64 frame must be 8 bytes")
    return int.from_bytes(b, "big")
