"""Titanic-like durable transcript: an append-only file of every message the broker routes.

File layout: a 8-byte magic ``M2MTRN01``, then records ``[u32 length][u32 crc32(body)][body]`` where ``body`` is a
msgpack :class:`Record`. Each record is written with one ``write`` on an ``O_APPEND`` descriptor (flushed to the
OS per record, so a killed process loses at most the record it was writing). A reader stops at the first torn or
corrupt record and returns everything before it; a writer reopening such a file cuts the torn tail first.
Records keep the raw envelope, payload and array frames, receive time, direction and route: enough to replay.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from m2m.bus.errors import DecodeError
from m2m.bus.messages import Envelope, Message, decode_envelope, decode_payload

MAGIC = b"M2MTRN01"
_HEAD = struct.Struct(">II")
MAX_RECORD = 1 << 31


class Record(msgspec.Struct, array_like=True):
    """One routed message. ``direction``: ``in`` (a peer sent it to the broker) or ``out`` (the broker made it,
    e.g. an error reply). ``peer``: hex routing id of the sending socket. ``session``: copied from the envelope
    for indexing."""

    n: int
    t: float
    direction: str
    kind: str
    route: str
    peer: str
    session: str
    envelope: bytes
    payload: bytes
    arrays: list[bytes] = []

    def decode_envelope(self) -> Envelope:
        return decode_envelope(self.envelope)

    def decode(self) -> Message:
        return decode_payload(self.decode_envelope(), self.payload, self.arrays)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Record)


class TranscriptWriter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._n = 0
        if self.path.exists() and self.path.stat().st_size > 0:
            result = read_transcript(self.path)
            if result.torn_at is not None:
                os.truncate(self.path, result.torn_at)  # cut a torn tail so later records stay readable
            self._n = result.records[-1].n + 1 if result.records else 0
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, MAGIC)

    def append(
        self,
        *,
        t: float,
        direction: str,
        kind: str,
        route: str,
        peer: str,
        session: str,
        frames: Sequence[bytes],
    ) -> int:
        """Append one message (frames ``[envelope, payload, *arrays]``); returns its record number."""
        n = self._n
        rec = Record(n, t, direction, kind, route, peer, session, bytes(frames[0]), bytes(frames[1]),
                     [bytes(f) for f in frames[2:]])
        body = _enc.encode(rec)
        os.write(self._fd, _HEAD.pack(len(body), zlib.crc32(body)) + body)
        self._n += 1
        return n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class TranscriptContents:
    records: list[Record] = field(default_factory=list)
    torn_at: int | None = None
    """Byte offset of a torn or corrupt record (None when the file ends cleanly)."""


def iter_records(path: str | Path) -> Iterator[tuple[int, Record | None]]:
    """Yield ``(offset, record)``; a final ``(offset, None)`` marks a torn/corrupt tail."""
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            if data:
                yield 0, None
            return
        raise DecodeError(f"{path} is not a bus transcript")
    pos = len(MAGIC)
    while pos < len(data):
        if pos + _HEAD.size > len(data):
            yield pos, None
            return
        length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        body = data[pos + _HEAD.size : end]
        if end > len(data) or zlib.crc32(body) != crc:
            yield pos, None
            return
        try:
            rec = _dec.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
            yield pos, None
            return
        yield pos, rec
        pos = end


def read_transcript(path: str | Path) -> TranscriptContents:
    out = TranscriptContents()
    for pos, rec in iter_records(path):
        if rec is None:
            out.torn_at = pos
        else:
            out.records.append(rec)
    return out


def session_index(path: str | Path) -> dict[str, list[int]]:
    """session → record numbers, in order."""
    idx: dict[str, list[int]] = {}
    for _, rec in iter_records(path):
        if rec is not None:
            idx.setdefault(rec.session, []).append(rec.n)
    return idx


def filter_records(
    records: Sequence[Record], *, session: str | None = None, agent: str | None = None, schema: str | None = None
) -> Iterator[tuple[Record, Envelope | None]]:
    for rec in records:
        if session is not None and rec.session != session:
            continue
        try:
            env: Envelope | None = rec.decode_envelope()
        except DecodeError:
            env = None
        if agent is not None and (env is None or env.sender != agent):
            continue
        if schema is not None and (env is None or not env.schema.startswith(schema)):
            continue
        yield rec, env
