"""Transcript rotation: numbered segments, an index so that a restarted writer reads at most one segment,
a retention cap, and readers that read every segment in order (old single-file transcripts included)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from support.busapp import Echo

from m2m.bus.messages import Envelope, encode, new_id
from m2m.bus.transcript import (
    MAGIC,
    TranscriptWriter,
    filter_records,
    index_path,
    iter_records,
    read_transcript,
    segments,
    session_index,
)
from m2m.cli.bus import add_commands

pytestmark = pytest.mark.timeout(60)

SEGMENT = 4096  # bytes: a few dozen records per segment


def _append(w: TranscriptWriter, i: int) -> int:
    env = Envelope(id=new_id(), schema="", version=0, sender="a", session=f"s{i % 3}")
    frames = [bytes(f) for f in encode(Echo(text=f"m{i}" + "x" * 60), env)]
    return w.append(t=float(i), direction="in", kind="request", route="echo", peer="00", session=env.session,
                    frames=frames)


def _write(path: Path, start: int, count: int, **kw: int) -> TranscriptWriter:
    w = TranscriptWriter(path, max_bytes=SEGMENT, **kw)
    for i in range(start, start + count):
        assert _append(w, i) == i  # record numbers run on across segments and restarts
    return w


def test_rotation_numbers_records_across_segments_and_readers_read_them_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "bus.m2mt"
    _write(p, 0, 300, keep=0).close()
    files = segments(p)
    assert len(files) >= 5 and files[-1] == p  # the newest is the one being written
    assert [f.name for f in files[:-1]] == [f"bus.m2mt.{k}" for k in range(1, len(files))]
    assert all(f.stat().st_size <= SEGMENT for f in files)
    assert all(f.read_bytes()[: len(MAGIC)] == MAGIC for f in files)
    c = read_transcript(p)
    assert c.torn_at is None and not c.skipped
    assert [r.n for r in c.records] == list(range(300))
    assert [getattr(r.decode(), "text", "")[:4] for r in c.records[:3]] == ["m0xx", "m1xx", "m2xx"]
    assert [r.n for _, r in iter_records(p) if r is not None] == list(range(300))
    assert session_index(p)["s1"] == list(range(1, 300, 3))
    assert [r.n for r, _ in filter_records(c.records, session="s2")] == list(range(2, 300, 3))
    assert index_path(p).exists()

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub, sub.add_parser("bench").add_subparsers())
    args = parser.parse_args(["transcript", "show", str(p), "--session", "s0"])
    capsys.readouterr()
    assert args.func(args) == 0
    assert "300 records" in capsys.readouterr().out


def test_restarted_writer_reads_the_index_not_the_history(tmp_path: Path) -> None:
    p = tmp_path / "bus.m2mt"
    _write(p, 0, 300, keep=0).close()
    w = _write(p, 300, 50, keep=0)  # clean close before: only the index and its last record's header are read
    assert w.bytes_read_at_open < 64
    # a crash (no close, so the index does not cover what this writer appended): the next writer reads the tail
    # since the last index entry, which lies in the segment being written
    w2 = _write(p, 350, 10, keep=0)
    assert 0 < w2.bytes_read_at_open <= SEGMENT
    with open(p, "ab") as f:
        f.write(b"\x00\x00\x01\x00torn")  # and a torn tail the crash left
    w3 = TranscriptWriter(p, max_bytes=SEGMENT, keep=0)
    assert w3.bytes_read_at_open <= SEGMENT
    assert _append(w3, 360) == 360
    w3.close()
    c = read_transcript(p)
    assert c.torn_at is None and [r.n for r in c.records] == list(range(361))
    # without an index at all (lost, or a crash between a rotation and its index), still at most ~two segments
    index_path(p).unlink()
    w4 = TranscriptWriter(p, max_bytes=SEGMENT, keep=0)
    assert w4.bytes_read_at_open <= 2 * SEGMENT
    assert _append(w4, 361) == 361
    w4.close()
    assert [r.n for r in read_transcript(p).records] == list(range(362))


def test_retention_keeps_the_newest_segments_only(tmp_path: Path) -> None:
    p = tmp_path / "bus.m2mt"
    _write(p, 0, 600, keep=3).close()
    files = segments(p)
    assert len(files) == 3 and files[-1] == p
    assert sum(f.stat().st_size for f in files) <= 3 * SEGMENT  # bounded disk
    ns = [r.n for r in read_transcript(p).records]
    assert ns[-1] == 599 and ns[0] > 0 and ns == list(range(ns[0], 600))  # the newest records, contiguous
    w = _write(p, 600, 200, keep=3)  # numbering goes on after a restart; retention still applies
    w.close()
    assert len(segments(p)) == 3
    assert read_transcript(p).records[-1].n == 799


def test_single_file_transcript_of_earlier_versions_is_read_and_continued(tmp_path: Path) -> None:
    p = tmp_path / "old.m2mt"
    w = TranscriptWriter(p)  # default segment size: a small transcript stays one file, with no index
    for i in range(100):
        _append(w, i)
    w.close()
    assert segments(p) == [p] and not index_path(p).exists()
    size = p.stat().st_size
    assert size > SEGMENT
    w2 = _write(p, 100, 5, keep=0)  # reopened with smaller segments: the big file is closed as segment 1
    w2.close()
    assert [f.name for f in segments(p)] == ["old.m2mt.1", "old.m2mt"]
    assert (tmp_path / "old.m2mt.1").stat().st_size == size
    assert [r.n for r in read_transcript(p).records] == list(range(105))


def test_a_lost_segment_file_is_passed_over(tmp_path: Path) -> None:
    p = tmp_path / "bus.m2mt"
    _write(p, 0, 300, keep=0).close()
    os.remove(segments(p)[1])
    ns = [r.n for r in read_transcript(p).records]
    assert ns[0] == 0 and ns[-1] == 299 and len(ns) < 300
