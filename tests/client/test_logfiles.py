"""A local directory's write-ahead log: records in log files that are used again.

Each check reopens the stream through a new `Store` (as another process, or the next writer after
a crash, would) and compares every step with what was appended.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stream_writer import expected, experience_structure

from expvault.schema import Schema
from expvault.storage import Store, Stream, logfiles
from expvault.storage import stream as stream_module
from expvault.storage.files import Segment, SegmentName, encode_segment, write_durably
from expvault.storage.logfiles import LogFiles

SCHEMA = Schema.from_experience(experience_structure())
STEP_BYTES = 2 * (5 * 4 + 8 + 1)


def _open(root: Path, *, chunk_steps: int = 64, create: bool = False) -> tuple[Store, Stream]:
    store = Store(root)
    if create:
        store.create_vault("v", SCHEMA, compression="none", chunk_steps=chunk_steps)
    return store, store.open_stream("v", "u", create=create)


def _check(root: Path, length: int) -> None:
    """A new Store (another process, the next writer, or a reader) finds exactly `length` steps."""
    store, stream = _open(root)
    try:
        assert stream.length == length
        for got, want in zip(stream.read(0, length), expected(0, length), strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        store.close()


def _append(stream: Stream, stop: int, rng: np.random.Generator) -> None:
    while stream.length < stop:
        start = stream.length
        n = min(int(rng.integers(1, 30)), stop - start)
        assert stream.append(start, expected(start, start + n)) == start + n


def _wal(stream: Stream) -> list[str]:
    return sorted(os.listdir(stream.path / "wal"))


def _log_files(stream: Stream) -> list[Path]:
    return sorted((stream.path / "wal").glob("0*.log"))


def test_appends_go_to_one_log_file_and_close_leaves_none(tmp_path: Path) -> None:
    store, stream = _open(tmp_path, create=True)
    _append(stream, 40, np.random.default_rng(0))
    assert _wal(stream) == [f"{0:020d}.log"]
    store.close()
    assert _wal(stream) == []  # everything is in the arrays: no file is kept
    _check(tmp_path, 40)


@pytest.mark.parametrize("tear", ["cut", "checksum"])
def test_a_torn_last_record_is_never_taken(tmp_path: Path, tear: str) -> None:
    """A crash during a log write leaves part of a record (never acknowledged) at the file's end."""
    store, stream = _open(tmp_path, create=True)
    _append(stream, 9, np.random.default_rng(1))
    stream.end_writing()  # keeps the log (nothing is materialized: chunks of 64 steps)
    store.close()
    [log] = _log_files(stream)
    record = b"".join(bytes(c) for c in encode_segment(Segment(9, tuple(expected(9, 12)))))
    if tear == "cut":
        record = record[: len(record) // 2]
    else:
        record = record[:-5] + bytes([record[-5] ^ 1]) + record[-4:]
    with open(log, "ab") as f:
        f.write(record)
    _check(tmp_path, 9)
    store, stream = _open(tmp_path)
    try:
        _append(stream, 30, np.random.default_rng(2))  # from 9, in a new log file
        assert len(_log_files(stream)) == 2
        stream.end_writing()
    finally:
        store.close()
    _check(tmp_path, 30)


def test_files_are_used_again_and_never_give_back_old_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With small log files the writer rotates and reuses them many times while chunks move
    into the arrays; readers and the next writer find exactly the stream's steps."""
    monkeypatch.setattr(logfiles, "LOG_FILE_MIN_BYTES", 40 * STEP_BYTES)
    monkeypatch.setattr(logfiles, "RECORDS_PER_FILE", 1)
    monkeypatch.setattr(stream_module, "MATERIALIZE_MIN_BYTES", 0)  # every 8 chunks
    store, stream = _open(tmp_path, create=True, chunk_steps=16)
    rng = np.random.default_rng(3)
    spares: set[int] = set()  # inodes seen as spares (which are only deleted when writing ends)
    reused = 0  # log files seen holding one of them
    most = 0
    try:
        for stop in range(100, 3001, 100):
            _append(stream, stop, rng)
            wal = stream.path / "wal"
            names = _wal(stream)
            most = max(most, len(names))
            inodes = {n: i for n in names if (i := _inode(wal / n)) is not None}
            reused += sum(1 for n, i in inodes.items() if n.endswith(".log") and i in spares)
            spares |= {i for n, i in inodes.items() if n.startswith("spare-")}
            if stop % 1000 == 0:
                _check(tmp_path, stop)
        assert stream.materialized > 2000
        stream.end_writing()  # the partial chunk's steps stay in the log
    finally:
        store.close()
    assert most <= 12  # the files holding unmaterialized steps, the current one, two spares
    assert reused > 0
    _check(tmp_path, 3000)


def _inode(path: Path) -> int | None:
    """The file's inode; None when the materializer renamed or deleted it meanwhile."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def test_a_reader_follows_the_writer_across_log_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logfiles, "LOG_FILE_MIN_BYTES", 30 * STEP_BYTES)
    monkeypatch.setattr(logfiles, "RECORDS_PER_FILE", 1)
    writer, stream = _open(tmp_path, create=True, chunk_steps=16)
    reader = Store(tmp_path)
    follower = reader.open_stream("v", "u")
    rng = np.random.default_rng(4)
    try:
        for stop in range(50, 1001, 50):
            _append(stream, stop, rng)
            deadline = time.monotonic() + 10
            while follower.refresh() < stop:
                assert time.monotonic() < deadline, (follower.length, stop)
            got = follower.read(0, stop)
            for g, w in zip(got, expected(0, stop), strict=True):
                np.testing.assert_array_equal(g, w)
    finally:
        reader.close()
        writer.close()


def test_a_record_whose_file_was_used_again_reads_as_gone(tmp_path: Path) -> None:
    writer = LogFiles(tmp_path)
    reader = LogFiles(tmp_path)
    (tmp_path / "v" / "u").mkdir(parents=True)

    def record(start: int, stop: int) -> list[Any]:
        return encode_segment(Segment(start, tuple(expected(start, stop))))

    writer.write("v/u", SegmentName(0, 5, 0), record(0, 5))
    writer.write("v/u", SegmentName(5, 8, 0), record(5, 8))
    found = sorted(reader.segments("v/u"), key=lambda n: n.start)
    assert found == [SegmentName(0, 5, 0), SegmentName(5, 8, 0)]
    # Both materialized; the file becomes a spare once the writer moves to the next one.
    writer.remove("v/u", SegmentName(0, 5, 0))
    writer.remove("v/u", SegmentName(5, 8, 0))
    writer.release("v/u")  # no spare kept: the next file is new
    writer.write("v/u", SegmentName(8, 20, 0), record(8, 20))
    assert reader.segments("v/u") == [SegmentName(8, 20, 0)]
    assert reader.read("v/u", SegmentName(8, 20, 0)) == b"".join(bytes(c) for c in record(8, 20))
    with pytest.raises(FileNotFoundError):
        reader.read("v/u", SegmentName(0, 5, 0))


def test_segment_files_of_earlier_versions_are_read_then_removed(tmp_path: Path) -> None:
    store, stream = _open(tmp_path, create=True, chunk_steps=16)
    store.close()
    wal = stream.path / "wal"
    wal.mkdir(exist_ok=True)
    for start, stop in [(0, 7), (7, 20)]:
        name = SegmentName(start, stop, 0).name
        write_durably(wal / name, encode_segment(Segment(start, tuple(expected(start, stop)))))
    _check(tmp_path, 20)
    store, stream = _open(tmp_path)
    try:
        _append(stream, 50, np.random.default_rng(5))
        stream.flush()
        assert not [n for n in _wal(stream) if n.endswith(".seg")]
    finally:
        store.close()
    _check(tmp_path, 50)


def test_a_listing_older_than_the_current_file_does_not_lose_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The materializer lists the log while the committer begins a new file: a listing taken
    just before the file existed must not make the writer forget it (seen in the kill -9 soak:
    the next append failed with a KeyError and acks stopped)."""
    log = LogFiles(tmp_path)
    (tmp_path / "v" / "u").mkdir(parents=True)
    first = encode_segment(Segment(0, tuple(expected(0, 5))))
    log.write("v/u", SegmentName(0, 5, 0), first)
    listdir = os.listdir
    monkeypatch.setattr(logfiles.os, "listdir", lambda path: [])  # taken before the file began
    assert log.segments("v/u") == []
    monkeypatch.setattr(logfiles.os, "listdir", listdir)
    log.write("v/u", SegmentName(5, 9, 0), encode_segment(Segment(5, tuple(expected(5, 9)))))
    found = sorted(log.segments("v/u"), key=lambda n: n.start)
    assert found == [SegmentName(0, 5, 0), SegmentName(5, 9, 0)]


def test_an_overlap_is_taken_and_a_gap_ends_the_file(tmp_path: Path) -> None:
    """A record written but not counted (its commit failed after the write) is followed by the
    retry at its start: both are read, the stream keeps each step once. A record past a gap
    cannot come from the writer: reading stops there."""
    writer = LogFiles(tmp_path)
    (tmp_path / "v" / "u").mkdir(parents=True)
    for start, stop in [(0, 5), (0, 8), (20, 24), (8, 10)]:  # (8, 10) lies past the gap
        writer.write("v/u", SegmentName(start, stop, 0), encode_segment(_segment(start, stop)))
    found = sorted(LogFiles(tmp_path).segments("v/u"), key=lambda n: (n.start, n.stop))
    assert found == [SegmentName(0, 5, 0), SegmentName(0, 8, 0)]


def _segment(start: int, stop: int) -> Segment:
    return Segment(start, tuple(expected(start, stop)))


def test_small_records_after_large_ones_begin_a_file_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file is sized by the records written now: small appends after a few large ones (a
    bulk load, then an actor) go to a file of their size instead of growing the large one
    (growing a file makes every fdatasync journal its new size)."""
    monkeypatch.setattr(logfiles, "LOG_FILE_MIN_BYTES", 1000)
    monkeypatch.setattr(logfiles, "RECORDS_PER_FILE", 2)
    log = LogFiles(tmp_path)
    (tmp_path / "v" / "u").mkdir(parents=True)
    for start, stop in [(0, 80), (80, 160), (160, 163), (163, 166)]:
        log.write("v/u", SegmentName(start, stop, 0), encode_segment(_segment(start, stop)))
    wal = tmp_path / "v" / "u" / "wal"
    assert sorted(p.name for p in wal.iterdir()) == [f"{0:020d}.log", f"{160:020d}.log"]
    found = sorted(LogFiles(tmp_path).segments("v/u"), key=lambda n: n.start)
    assert [(n.start, n.stop) for n in found] == [(0, 80), (80, 160), (160, 163), (163, 166)]
