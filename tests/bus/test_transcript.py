"""Transcripts: append-only, checksummed, tolerant of a torn last record."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from support.busapp import Echo
from support.procs import Procs, wait_until

from m2m.bus.messages import Envelope, encode, new_id
from m2m.bus.transcript import MAGIC, TranscriptWriter, read_transcript, session_index

pytestmark = pytest.mark.timeout(60)


def _write(path: Path, n: int) -> None:
    w = TranscriptWriter(path)
    for i in range(n):
        env = Envelope(id=new_id(), schema="", version=0, sender=f"a{i % 2}", session=f"s{i % 3}")
        frames = [bytes(f) for f in encode(Echo(text=f"m{i}"), env)]
        w.append(t=float(i), direction="in", kind="request", route="echo", peer="00", session=env.session,
                 frames=frames)
    w.close()


def test_round_trip_and_session_index(tmp_path: Path) -> None:
    p = tmp_path / "t.m2mt"
    _write(p, 9)
    c = read_transcript(p)
    assert c.torn_at is None
    assert [r.n for r in c.records] == list(range(9))
    assert [r.decode().text for r in c.records] == [f"m{i}" for i in range(9)]  # type: ignore[attr-defined]
    assert session_index(p) == {"s0": [0, 3, 6], "s1": [1, 4, 7], "s2": [2, 5, 8]}


def test_every_possible_torn_tail_keeps_all_complete_records(tmp_path: Path) -> None:
    p = tmp_path / "t.m2mt"
    _write(p, 3)
    data = p.read_bytes()
    boundaries = []  # file lengths at which the file ends exactly after a record
    for cut in range(len(MAGIC), len(data) + 1):
        p.write_bytes(data[:cut])
        c = read_transcript(p)
        if c.torn_at is None:
            boundaries.append(cut)
        else:
            assert c.torn_at == boundaries[-1]  # the torn record starts where the last complete one ended
        # every record that ends at or before the cut is returned, none after it
        assert len(c.records) == len(boundaries) - 1
        assert [r.n for r in c.records] == list(range(len(c.records)))
    assert len(boundaries) == 4  # magic + 3 records


def test_corrupt_byte_stops_reading_at_that_record(tmp_path: Path) -> None:
    p = tmp_path / "t.m2mt"
    _write(p, 4)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # flip a byte inside the last record: its crc32 no longer matches
    p.write_bytes(bytes(data))
    c = read_transcript(p)
    assert len(c.records) == 3 and c.torn_at is not None


def test_writer_reopening_a_torn_file_cuts_the_tail_and_continues(tmp_path: Path) -> None:
    p = tmp_path / "t.m2mt"
    _write(p, 3)
    with open(p, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")  # a torn record
    _write(p, 2)
    c = read_transcript(p)
    assert c.torn_at is None and [r.n for r in c.records] == [0, 1, 2, 3, 4]


@pytest.mark.timeout(30)
def test_kill_minus_9_writer_loses_nothing_before_the_torn_record(tmp_path: Path, procs: Procs) -> None:
    p = tmp_path / "t.m2mt"
    for _round in range(3):  # each new writer reopens the file a killed one left, torn tail and all
        start = p.stat().st_size if p.exists() else 0
        proc = procs.busapp("writer", "--file", str(p), name="writer")
        wait_until(lambda: p.exists() and p.stat().st_size >= start + 200_000,  # noqa: B023 (called in this round)
                   "the writer appended 200 kB", timeout=20, step=0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        c = read_transcript(p)
        assert [r.n for r in c.records] == list(range(len(c.records)))
        by_writer: dict[str, list[int]] = {}
        for r in c.records:
            by_writer.setdefault(r.route, []).append(int(r.payload))
        assert len(by_writer) == _round + 1
        for counters in by_writer.values():  # each writer's records 0..k-1, none lost before its last one
            assert len(counters) > 10 and counters == list(range(len(counters)))
