"""Titanic-like durable transcript: append-only segment files of every message the broker routes.

Segment layout: a 8-byte magic ``M2MTRN01``, then records ``[u32 length][u32 crc32(body)][body]`` where ``body``
is a msgpack :class:`Record`. Each record is written with one ``write`` on an ``O_APPEND`` descriptor (flushed to
the OS per record, so a killed process loses at most the record it was writing).

Rotation: a transcript ``bus.m2mt`` is the segment being written; when it would grow past ``max_bytes``
(:data:`DEFAULT_SEGMENT_BYTES`) it is renamed ``bus.m2mt.<k>`` (``k`` = 1, 2, ...: a higher number is newer) and a
fresh ``bus.m2mt`` is started. Record numbers run on across segments. At most ``keep`` segments
(:data:`DEFAULT_KEEP_SEGMENTS`, the one being written included) are kept: the oldest are deleted, so the disk a
transcript takes is bounded (about ``keep × max_bytes``) by default; ``keep=0`` keeps every segment.

Index: ``bus.m2mt.idx`` (JSON) lists each closed segment (file, first and last record number, bytes, offset and
CRC of its last record) and, after a clean close, the same for the segment being written. It is rewritten
(atomically) at each rotation and at close; a writer that restarts reads the index, checks it against the files,
and reads only what was appended after the last index entry: at most one segment, never the whole history
(:attr:`TranscriptWriter.bytes_read_at_open` says how much it read). A transcript small enough never to have
rotated (under 1 MiB at close) gets no index: a restart reads it whole, which costs nothing.

Readers (:func:`read_transcript`, :func:`iter_records`, :func:`session_index`) read every segment in order and
need no index; a single-file transcript of earlier versions is a transcript of one segment. A reader stops a
segment at a torn or corrupt record (checksum or length wrong) and reports where; a record whose checksum holds but
whose body does not decode is skipped with one warning and reading goes on. A writer reopening a segment with a
torn tail cuts the tail first. Records keep the raw envelope, payload and array frames, receive time, direction and
route: enough to replay.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

from m2m.bus.errors import DecodeError
from m2m.bus.messages import Envelope, Message, decode_envelope, decode_payload

MAGIC = b"M2MTRN01"
_HEAD = struct.Struct(">II")
MAX_RECORD = 1 << 31
DEFAULT_SEGMENT_BYTES = 64 << 20
"""A segment is closed and a new one started before it would grow past this many bytes."""
DEFAULT_KEEP_SEGMENTS = 8
"""Segments kept (the one being written included); older ones are deleted. 0 keeps all."""
INDEX_SUFFIX = ".idx"
_INDEX_FORMAT = 1
_INDEX_MIN_BYTES = 1 << 20  # a closing writer indexes a never-rotated transcript only from this size on

log = structlog.get_logger("m2m.bus.transcript")


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
        """The typed message; raises a :class:`DecodeError` (subclass) and nothing else."""
        return decode_payload(self.decode_envelope(), self.payload, self.arrays)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Record)


def _decode_record(body: bytes) -> Record:
    try:
        return _dec.decode(body)
    except Exception as exc:  # the decode boundary: hostile bytes give a DecodeError only
        raise DecodeError(f"bad transcript record: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------- segments
def index_path(path: str | Path) -> Path:
    """The index file of the transcript ``path``."""
    p = Path(path)
    return p.with_name(p.name + INDEX_SUFFIX)


def _numbered(path: Path) -> list[tuple[int, Path]]:
    """The closed segments ``path.<k>`` on disk, oldest (lowest k) first."""
    pattern = re.compile(re.escape(path.name) + r"\.([0-9]+)")
    out = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            out.append((int(m.group(1)), path.with_name(name)))
    return sorted(out)


def segments(path: str | Path) -> list[Path]:
    """Every segment file of the transcript ``path``, oldest first (the one being written last)."""
    p = Path(path)
    out = [s for _, s in _numbered(p)]
    if p.exists():
        out.append(p)
    return out


@dataclass
class SegmentEntry:
    """One segment in the index. Record numbers ``first``..``last`` (``last = first - 1``: none), ``bytes`` its
    length, ``last_offset``/``last_crc`` where its last record starts and that record's CRC (-1/0: none)."""

    file: str
    first: int
    last: int
    bytes: int
    last_offset: int = -1
    last_crc: int = 0


@dataclass
class TranscriptIndex:
    segments: list[SegmentEntry] = field(default_factory=list)
    """Closed segments, oldest first."""
    current: SegmentEntry | None = None
    """The segment being written, as it was at the last clean close (None: unknown, read it)."""

    def to_json(self) -> str:
        return json.dumps({"format": _INDEX_FORMAT, "segments": [asdict(s) for s in self.segments],
                           "current": asdict(self.current) if self.current else None})

    @classmethod
    def load(cls, path: Path) -> TranscriptIndex | None:
        """The index at ``path``, or None when it is missing or unreadable (the writer then reads the files)."""
        try:
            raw: Any = json.loads(path.read_text())
            if raw.get("format") != _INDEX_FORMAT:
                return None
            cur = raw.get("current")
            return cls([SegmentEntry(**s) for s in raw["segments"]], SegmentEntry(**cur) if cur else None)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None


def _write_index(path: Path, index: TranscriptIndex) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(index.to_json())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class BadRecord:
    """A spot in a segment that holds no readable record. ``torn``: the framing is broken (a torn tail, or a
    checksum or length that does not hold): the rest of that segment is unreadable. Otherwise the record's frame is
    sound but its body does not decode: that one record is skipped."""

    file: Path
    offset: int
    torn: bool
    reason: str


class _Reader:
    """Reads one segment from ``start``; counts the bytes it read."""

    def __init__(self, file: Path, start: int = 0) -> None:
        self.file = file
        self.start = start
        self.bytes_read = 0

    def items(self) -> Iterator[tuple[int, int, Record | BadRecord]]:
        """``(offset, end, item)`` from ``start`` (0: check the magic first)."""
        with open(self.file, "rb") as f:
            if self.start == 0:
                head = f.read(len(MAGIC))
                self.bytes_read += len(head)
                if head != MAGIC:
                    if len(head) < len(MAGIC) and MAGIC.startswith(head):
                        if head:
                            yield 0, 0, BadRecord(self.file, 0, True, "torn magic")
                        return
                    raise DecodeError(f"{self.file} is not a bus transcript")
                pos = len(MAGIC)
            else:
                f.seek(self.start)
                pos = self.start
            data = f.read()
        self.bytes_read += len(data)
        base, end_of_data = pos, pos + len(data)
        while pos < end_of_data:
            i = pos - base
            if pos + _HEAD.size > end_of_data:
                yield pos, pos, BadRecord(self.file, pos, True, "torn record header")
                return
            length, crc = _HEAD.unpack_from(data, i)
            end = pos + _HEAD.size + length
            body = data[i + _HEAD.size : end - base]
            if end > end_of_data:
                yield pos, pos, BadRecord(self.file, pos, True, "torn record")
                return
            if zlib.crc32(body) != crc:
                yield pos, pos, BadRecord(self.file, pos, True, "checksum mismatch")
                return
            try:
                rec: Record | BadRecord = _decode_record(body)
            except DecodeError as exc:
                rec = BadRecord(self.file, pos, False, str(exc)[:300])
            yield pos, end, rec
            pos = end


def _walk(path: str | Path) -> Iterator[tuple[int, Record | BadRecord]]:
    files = segments(path)
    if not files:
        raise FileNotFoundError(f"no transcript at {path}")
    for file in files:
        try:
            for pos, _, item in _Reader(file).items():
                if isinstance(item, BadRecord):
                    log.warning("transcript_bad_record", file=str(item.file), offset=item.offset, torn=item.torn,
                                reason=item.reason)
                yield pos, item
        except FileNotFoundError:
            if file == Path(path):
                raise
            continue  # an old segment removed by the writer's retention meanwhile


def scan(path: str | Path) -> Iterator[Record | BadRecord]:
    """Every record of every segment of ``path`` in order, with a :class:`BadRecord` for each unreadable spot (one
    warning is logged for each). Raises :class:`DecodeError` when ``path`` is not a transcript, ``OSError`` when it
    cannot be read; a segment deleted by retention while this runs is passed over."""
    for _, item in _walk(path):
        yield item


def iter_records(path: str | Path) -> Iterator[tuple[int, Record | None]]:
    """Yield ``(offset, record)`` over every segment; ``(offset, None)`` marks a spot that holds no readable record
    (a torn or corrupt tail ends its segment; a record whose body does not decode is skipped). ``offset`` is the
    byte offset in its own segment."""
    for pos, item in _walk(path):
        yield pos, (None if isinstance(item, BadRecord) else item)


@dataclass
class TranscriptContents:
    records: list[Record] = field(default_factory=list)
    torn_at: int | None = None
    """Byte offset of the first torn or corrupt record (None when every segment ends cleanly), in ``torn_file``."""
    torn_file: Path | None = None
    skipped: list[BadRecord] = field(default_factory=list)
    """Records whose frame is sound but whose body does not decode (skipped; reading went on)."""


def read_transcript(path: str | Path) -> TranscriptContents:
    """Every readable record of every segment, in order (see :func:`scan`)."""
    out = TranscriptContents()
    for item in scan(path):
        if isinstance(item, Record):
            out.records.append(item)
        elif not item.torn:
            out.skipped.append(item)
        elif out.torn_at is None:
            out.torn_at, out.torn_file = item.offset, item.file
    return out


def session_index(path: str | Path) -> dict[str, list[int]]:
    """session → record numbers, in order."""
    idx: dict[str, list[int]] = {}
    for rec in scan(path):
        if isinstance(rec, Record):
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


# ---------------------------------------------------------------------------------------------- writing
class TranscriptWriter:
    """Appends records to the transcript ``path`` (see the module notes for segments, index and retention).

    ``max_bytes``: a segment is closed before it would grow past this (a record larger than that gets a segment of
    its own). ``keep``: segments kept, the current one included (0: all). Not safe for two writers at once.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_SEGMENT_BYTES,
                 keep: int = DEFAULT_KEEP_SEGMENTS) -> None:
        if max_bytes <= len(MAGIC) or keep < 0:
            raise ValueError(f"max_bytes must exceed {len(MAGIC)} and keep be >= 0 (got {max_bytes}, {keep})")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.index_file = index_path(self.path)
        self.bytes_read_at_open = 0
        """Bytes of segment files this writer read when it opened (at most about one segment)."""
        self._fd = -1
        stored = TranscriptIndex.load(self.index_file)
        on_disk = _numbered(self.path)
        self._next_segment = on_disk[-1][0] + 1 if on_disk else 1
        self._index = TranscriptIndex(self._closed_entries(stored, on_disk))
        self._first = self._next_after_closed(on_disk)
        self._n = self._first
        self._last_offset, self._last_crc = -1, 0
        if self.path.exists() and self.path.stat().st_size > 0:
            self._reopen(stored.current if stored else None)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(self._fd, MAGIC)
            self._bytes = len(MAGIC)
        self._indexed = stored is not None

    # -------------------------------------------------------------------------------------- opening
    def _closed_entries(self, stored: TranscriptIndex | None, on_disk: list[tuple[int, Path]]) -> list[SegmentEntry]:
        """The index entries of the closed segments still on disk (entries that no longer match a file go)."""
        if stored is None:
            return []
        names = {p.name: p for _, p in on_disk}
        out = []
        for e in stored.segments:
            p = names.get(e.file)
            try:
                if p is not None and p.stat().st_size == e.bytes:
                    out.append(e)
            except OSError:
                continue
        return out

    def _next_after_closed(self, on_disk: list[tuple[int, Path]]) -> int:
        """The record number after the newest closed segment: from the index, or by reading that one segment."""
        if not on_disk:
            return 0
        newest = on_disk[-1][1]
        for e in self._index.segments:
            if e.file == newest.name:
                return e.last + 1
        first, last = -1, -1
        reader = _Reader(newest)
        try:
            for _, _, item in reader.items():
                if isinstance(item, Record):
                    first = item.n if first < 0 else first
                    last = item.n
        except (OSError, DecodeError) as exc:
            log.warning("transcript_segment_unreadable", file=str(newest), error=str(exc))
        self.bytes_read_at_open += reader.bytes_read
        if last >= 0:
            self._index.segments.append(SegmentEntry(newest.name, first, last, newest.stat().st_size))
        return last + 1

    def _reopen(self, current: SegmentEntry | None) -> None:
        size = self.path.stat().st_size
        start, n = 0, self._n
        if current is not None and current.bytes <= size and self._matches(current):
            start, n = current.bytes, current.last + 1
            self._first = current.first
            self._last_offset, self._last_crc = current.last_offset, current.last_crc
        reader = _Reader(self.path, start)
        torn_at: int | None = None
        first_seen = start > 0
        end = start or len(MAGIC)
        for pos, rec_end, item in reader.items():
            if isinstance(item, BadRecord):
                if item.torn:
                    torn_at = pos
                    break
                continue
            if not first_seen:
                self._first, first_seen = item.n, True
            n = item.n + 1
            end = rec_end
            self._last_offset = pos
        self.bytes_read_at_open += reader.bytes_read
        if self._last_offset >= 0 and (start == 0 or self._last_offset >= start):
            with open(self.path, "rb") as f:
                f.seek(self._last_offset)
                self._last_crc = _HEAD.unpack(f.read(_HEAD.size))[1]
        if torn_at is not None:
            torn_at = torn_at if torn_at >= len(MAGIC) else 0  # a torn magic: start the segment afresh
            os.truncate(self.path, torn_at)  # cut a torn tail so later records stay readable
            end = torn_at
            log.warning("transcript_torn_tail_cut", file=str(self.path), offset=torn_at)
        if not first_seen:
            self._first = n
        self._n = n
        self._bytes = end if torn_at is not None else size
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        if self._bytes == 0:
            os.write(self._fd, MAGIC)
            self._bytes = len(MAGIC)

    def _matches(self, e: SegmentEntry) -> bool:
        """The index entry still describes the file's head: its last record is where the index says."""
        if e.last_offset < 0:
            return e.bytes == len(MAGIC)
        try:
            with open(self.path, "rb") as f:
                f.seek(e.last_offset)
                head = f.read(_HEAD.size)
            self.bytes_read_at_open += len(head)
            length, crc = _HEAD.unpack(head)
        except (OSError, struct.error):
            return False
        return crc == e.last_crc and e.last_offset + _HEAD.size + length == e.bytes

    # -------------------------------------------------------------------------------------- writing
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
        crc = zlib.crc32(body)
        data = _HEAD.pack(len(body), crc) + body
        if self._bytes > len(MAGIC) and self._bytes + len(data) > self.max_bytes:
            self._rotate()
        os.write(self._fd, data)
        self._last_offset, self._last_crc = self._bytes, crc
        self._bytes += len(data)
        self._n += 1
        return n

    def _entry(self, file: str) -> SegmentEntry:
        return SegmentEntry(file, self._first, self._n - 1, self._bytes, self._last_offset, self._last_crc)

    def _rotate(self) -> None:
        """Close the current segment as ``path.<k>``, apply retention, index, and start a new segment."""
        os.close(self._fd)
        self._fd = -1
        closed = self.path.with_name(f"{self.path.name}.{self._next_segment}")
        self._next_segment += 1
        os.replace(self.path, closed)
        self._index.segments.append(self._entry(closed.name))
        if self.keep:
            closed_now = _numbered(self.path)
            for _, old in closed_now[: max(0, len(closed_now) - (self.keep - 1))]:
                old.unlink(missing_ok=True)
                self._index.segments = [e for e in self._index.segments if e.file != old.name]
        self._index.current = None
        _write_index(self.index_file, self._index)
        self._indexed = True
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, MAGIC)
        self._bytes = len(MAGIC)
        self._first = self._n
        self._last_offset, self._last_crc = -1, 0

    def close(self) -> None:
        """Close the file and record the segment being written in the index (when there is one to keep)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._indexed or self._index.segments or self._bytes >= _INDEX_MIN_BYTES:
                self._index.current = self._entry(self.path.name)
                try:
                    _write_index(self.index_file, self._index)
                except OSError as exc:
                    log.warning("transcript_index_not_written", file=str(self.index_file), error=str(exc))
