"""The storage engine: vaults, streams, exactly-once appends, group commits, reads, durability."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stream_writer import expected, experience_structure

from expvault.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    InvalidNameError,
    NotFoundError,
    OffsetGapError,
    SchemaMismatchError,
    StorageError,
    StreamBusyError,
)
from expvault.schema import Schema
from expvault.storage import Store, Stream, default_chunk_steps, resolve_compression
from expvault.storage.logfiles import LogFiles

WRITER = Path(__file__).with_name("stream_writer.py")
SCHEMA = Schema.from_experience(experience_structure())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "root")
    yield s
    s.close()


def _stream(
    store: Store,
    *,
    chunk_steps: int = 16,
    compression: str = "none",
    vault: str = "v",
    uid: str = "u",
) -> Stream:
    store.create_vault(vault, SCHEMA, compression=compression, chunk_steps=chunk_steps)
    return store.open_stream(vault, uid, create=True)


def _wal_files(stream: Stream) -> list[str]:
    """The log's segments on disk that hold steps not yet in the arrays, as a reader in another
    process finds them (a log file keeps materialized records until it is used again)."""
    found = LogFiles(stream.path.parent.parent).segments(stream.key)
    return sorted(n.name for n in found if n.stop > stream.materialized)


def _assert_equal(got: list[np.ndarray[Any, Any]], want: list[np.ndarray[Any, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def _append_pieces(stream: Stream, stop: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    offset = stream.length
    while offset < stop:
        n = min(int(rng.integers(1, 40)), stop - offset)
        assert stream.append(offset, expected(offset, offset + n)) == offset + n
        offset += n


def _wait_materialized(stream: Stream, steps: int, timeout_s: float = 30.0) -> None:
    """Waits until the background materializer has moved `steps` steps into the arrays."""
    deadline = time.monotonic() + timeout_s
    while stream.materialized < steps:
        assert time.monotonic() < deadline, f"materialized {stream.materialized} < {steps}"
        time.sleep(0.005)


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# -- vaults -------------------------------------------------------------------------------------


def test_create_vault_is_idempotent_for_the_same_structure(store: Store) -> None:
    info, created = store.create_vault("v", SCHEMA, compression="lz4", metadata={"env": "cartpole"})
    assert created
    assert info.vault_name == "v"
    assert info.metadata == {"env": "cartpole"}
    assert info.compression == resolve_compression("lz4")
    assert info.chunk_steps == default_chunk_steps(SCHEMA)
    assert info.streams == ()
    again, created = store.create_vault("v", SCHEMA, compression="gzip", chunk_steps=8)
    assert not created
    assert again.compression == info.compression  # the existing settings win
    assert again.chunk_steps == info.chunk_steps
    assert store.list_vaults() == ["v"]


def test_create_vault_with_another_structure_is_refused(store: Store) -> None:
    store.create_vault("v", SCHEMA)
    document = (store.root / "v" / "vault.json").read_bytes()
    other = Schema.from_experience({**experience_structure(), "done": np.zeros((2, 1), np.int8)})
    with pytest.raises(AlreadyExistsError, match=r"'done\.' has dtype int8, the vault has bool"):
        store.create_vault("v", other)
    assert (store.root / "v" / "vault.json").read_bytes() == document


def test_vault_and_stream_listing_and_deletion(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.get_vault("nope")
    with pytest.raises(NotFoundError):
        store.open_stream("nope", "u")
    stream = _stream(store, uid="u1")
    stream.append(0, expected(0, 20))
    store.open_stream("v", "u2", create=True)
    with pytest.raises(NotFoundError):
        store.open_stream("v", "u3")
    assert store.list_streams("v") == ["u1", "u2"]
    info = store.get_vault("v")
    assert [(s.vault_uid, s.length) for s in info.streams] == [("u1", 20), ("u2", 0)]
    assert all(s.bytes_on_disk > 0 for s in info.streams)
    assert store.open_stream("v", "u1") is stream  # one object per stream
    store.delete_vault("v")
    assert store.list_vaults() == []
    assert not (store.root / "v").exists()
    with pytest.raises(NotFoundError):
        store.delete_vault("v")


def test_user_metadata_is_stored_as_flashbax_stores_it(store: Store) -> None:
    store.create_vault("v", SCHEMA, metadata={"seed": 3, "env": {"id": "x"}, "obj": object})
    stream = store.open_stream("v", "u", create=True)
    on_disk = json.loads((stream.path / "metadata.json").read_text())
    assert on_disk["seed"] == 3
    assert on_disk["env"] == {"id": "x"}
    assert on_disk["obj"] == str(object)
    assert on_disk["version"] == 1.2
    assert stream.metadata["seed"] == 3
    with pytest.raises(InvalidArgumentError, match="reserved"):
        store.create_vault("w", SCHEMA, metadata={"version": 2})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression": "brotli"}, "unknown compression 'brotli'"),
        ({"compression": {"level": 3}}, "zarr compressor dict with 'id'"),
        ({"chunk_steps": 0}, r"chunk_steps must be in \[1, 2\*\*24\]"),
    ],
)
def test_bad_vault_settings_are_refused(store: Store, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        store.create_vault("v", SCHEMA, **kwargs)
    assert store.list_vaults() == []


BAD_NAMES = ["../x", "a/b", "..", ".", "", "a\x00b", "x" * 201, "y" * 5000, "/abs", "a\\b", "-x"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:12]))
def test_invalid_names_are_refused_and_create_nothing(tmp_path: Path, name: str) -> None:
    store = Store(tmp_path / "root")
    try:
        store.create_vault("ok", SCHEMA)
        before = _tree(tmp_path)
        with pytest.raises(InvalidNameError, match="is not valid"):
            store.create_vault(name, SCHEMA)
        with pytest.raises(InvalidNameError):
            store.get_vault(name)
        with pytest.raises(InvalidNameError):
            store.open_stream(name, "u", create=True)
        with pytest.raises(InvalidNameError, match="vault_uid"):
            store.open_stream("ok", name, create=True)
        with pytest.raises(InvalidNameError):
            store.delete_vault(name)
        assert _tree(tmp_path) == before
    finally:
        store.close()


def test_the_longest_valid_name_works(store: Store) -> None:
    name = "n" * 200
    store.create_vault(name, SCHEMA)
    assert store.open_stream(name, name, create=True).length == 0


# -- appends: exactly once ----------------------------------------------------------------------


def test_duplicate_overlap_and_gap(store: Store) -> None:
    stream = _stream(store, chunk_steps=1024)
    assert stream.length == 0
    assert stream.append(0, expected(0, 10)) == 10
    assert len(_wal_files(stream)) == 1
    # A retry of committed steps is acknowledged with the same length and writes nothing.
    assert stream.append(0, expected(0, 10)) == 10
    assert stream.append(4, expected(4, 8)) == 10
    assert len(_wal_files(stream)) == 1
    # An overlap appends only the tail: the committed part is kept as it was.
    changed = expected(5, 25)
    for a in changed:
        a[:, :5] = a[:, :5][:, ::-1]  # differs from what is stored at [5, 10)
    assert stream.append(5, changed) == 25
    _assert_equal(stream.read(0, 25), expected(0, 25))
    # A gap is refused, naming the offset to resend from; nothing is written.
    with pytest.raises(OffsetGapError, match="resend from 25") as info:
        stream.append(26, expected(26, 30))
    assert info.value.expected_offset == 25
    assert info.value.metadata == {"expected_offset": "25"}
    assert stream.length == 25
    assert len(_wal_files(stream)) == 2
    # Empty appends are acknowledged with the committed length.
    assert stream.append(25, expected(25, 25)) == 25
    assert stream.append(3, expected(3, 3)) == 25


def test_negative_start_is_refused(store: Store) -> None:
    stream = _stream(store)
    with pytest.raises(InvalidArgumentError, match="must be >= 0"):
        stream.submit(-1, expected(0, 3))
    assert stream.length == 0


@pytest.mark.parametrize(
    "change",
    [
        lambda a: [a[0], a[1].astype(np.float64), a[2]],
        lambda a: [a[0][:1], a[1][:1], a[2][:1]],
        lambda a: [a[0], a[1][..., :4], a[2]],
        lambda a: a[:2],
        lambda a: [a[0], a[1][:, :2], a[2]],
    ],
    ids=["dtype", "batch", "step-shape", "leaf-missing", "ragged-steps"],
)
def test_schema_mismatch_on_submit_writes_nothing(store: Store, change: Any) -> None:
    stream = _stream(store)
    stream.append(0, expected(0, 5))
    with pytest.raises(SchemaMismatchError):
        stream.submit(5, change(expected(5, 8)))
    assert stream.length == 5
    assert _wal_files(stream) == ["00000000000000000000-00000000000000000005.seg"]
    _assert_equal(stream.read(0, 5), expected(0, 5))


def test_pending_appends_are_group_committed(store: Store) -> None:
    stream = _stream(store, chunk_steps=4096)
    entered, release = threading.Event(), threading.Event()
    commits: list[int] = []

    def hold_the_first_commit(length: int) -> None:
        commits.append(length)
        if len(commits) == 1:
            entered.set()
            release.wait(30)

    stream.on_commit(hold_the_first_commit)
    first = stream.submit(0, expected(0, 1))
    assert entered.wait(30)
    # While the committer is busy, 100 appends queue up; they are committed as one group.
    futures = [stream.submit(i, expected(i, i + 1)) for i in range(1, 101)]
    release.set()
    assert first.result(30) == 1
    assert [f.result(30) for f in futures] == [101] * 100
    assert commits == [1, 101]
    assert len(_wal_files(stream)) == 2  # one log write per group
    _assert_equal(stream.read(0, 101), expected(0, 101))


def test_one_bad_append_in_a_group_fails_alone(store: Store) -> None:
    stream = _stream(store, chunk_steps=4096)
    entered, release = threading.Event(), threading.Event()

    def hold(length: int) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(30)

    stream.on_commit(hold)
    first = stream.submit(0, expected(0, 4))
    assert entered.wait(30)
    gap = stream.submit(10, expected(10, 12))
    good = stream.submit(4, expected(4, 9))
    duplicate = stream.submit(2, expected(2, 9))
    late_gap = stream.submit(12, expected(12, 13))  # 9 is the end once `good` is in
    release.set()
    assert first.result(30) == 4
    with pytest.raises(OffsetGapError) as info:
        gap.result(30)
    assert info.value.expected_offset == 4
    assert good.result(30) == 9
    assert duplicate.result(30) == 9
    with pytest.raises(OffsetGapError) as info:
        late_gap.result(30)
    assert info.value.expected_offset == 9
    assert stream.length == 9
    _assert_equal(stream.read(0, 9), expected(0, 9))


def test_many_submits_resolve_in_order_with_fewer_log_writes(store: Store) -> None:
    stream = _stream(store, chunk_steps=1 << 16)
    done: list[int] = []
    futures = []
    for i in range(500):
        future = stream.submit(i, expected(i, i + 1))
        future.add_done_callback(lambda f, i=i: done.append(i))
        futures.append(future)
    results = [f.result(60) for f in futures]
    assert all(r >= i + 1 for i, r in enumerate(results))
    assert results == sorted(results)
    assert results[-1] == 500
    assert done == sorted(done)
    assert len(_wal_files(stream)) <= 100  # measured: 2 log writes for the 500 appends
    _assert_equal(stream.read(0, 500), expected(0, 500))


def test_on_commit_callbacks(store: Store) -> None:
    stream = _stream(store)
    seen: list[int] = []
    unsubscribe = stream.on_commit(seen.append)

    def broken(length: int) -> None:
        raise RuntimeError("a listener failing must not fail the commit")

    stream.on_commit(broken)
    _append_pieces(stream, 100)
    assert seen[-1] == 100
    assert seen == sorted(set(seen))
    stream.append(50, expected(50, 100))  # a duplicate commits nothing
    assert seen[-1] == 100
    count = len(seen)
    unsubscribe()
    unsubscribe()  # idempotent
    stream.append(100, expected(100, 110))
    assert len(seen) == count
    assert stream.length == 110


# -- reads --------------------------------------------------------------------------------------


def test_reads_are_bit_exact_across_the_log_and_the_arrays(store: Store) -> None:
    stream = _stream(store, chunk_steps=16)
    _append_pieces(stream, 700, seed=1)
    length = stream.length
    _wait_materialized(stream, 688)
    assert stream.materialized == 688  # whole chunks in the arrays, the 12 last steps in the log
    assert stream.materialized % 16 == 0
    want = expected(0, length)
    rng = np.random.default_rng(2)
    edges = [0, 1, 15, 16, 17, stream.materialized - 1, stream.materialized, length - 1, length]
    ranges = [(a, b) for a in edges for b in edges if a <= b]
    ranges += [tuple(sorted(rng.integers(0, length + 1, 2))) for _ in range(100)]
    for a, b in ranges:
        _assert_equal(stream.read(a, b), [w[:, a:b] for w in want])
    stream.flush()
    assert stream.materialized == length
    assert _wal_files(stream) == []
    for a, b in ranges[::5]:
        _assert_equal(stream.read(a, b), [w[:, a:b] for w in want])


@pytest.mark.parametrize("bad", [(-1, 2), (5, 3), (0, 41), (41, 42), (-3, -1)])
def test_bad_read_ranges_are_refused(store: Store, bad: tuple[int, int]) -> None:
    stream = _stream(store)
    stream.append(0, expected(0, 40))
    with pytest.raises(InvalidArgumentError, match=r"read range .* is invalid"):
        stream.read(*bad)


def test_empty_reads(store: Store) -> None:
    stream = _stream(store)
    empty = stream.read(0, 0)
    assert [a.shape for a in empty] == [(2, 0), (2, 0, 5), (2, 0)]
    assert [a.dtype for a in empty] == [np.bool_, np.float32, np.int64]
    stream.append(0, expected(0, 40))
    assert [a.shape for a in stream.read(40, 40)] == [(2, 0), (2, 0, 5), (2, 0)]


def test_leaf_subsets(store: Store) -> None:
    stream = _stream(store)
    _append_pieces(stream, 50)
    done, obs, step = expected(0, 50)
    _assert_equal(stream.read(10, 40, leaves=["obs."]), [obs[:, 10:40]])
    # Returned in schema order whatever the order asked.
    _assert_equal(stream.read(3, 33, leaves=["step.", "done."]), [done[:, 3:33], step[:, 3:33]])
    assert stream.read(0, 5, leaves=[]) == []
    with pytest.raises(InvalidArgumentError, match=r"unknown leaves \['nope\.'\]"):
        stream.read(0, 5, leaves=["nope.", "obs."])


def test_a_concurrent_reader_sees_only_whole_committed_steps(store: Store) -> None:
    stream = _stream(store, chunk_steps=16)
    total = 3000
    want = expected(0, total)
    errors: list[BaseException] = []
    reads = [0]
    writer_done = threading.Event()

    def write() -> None:
        try:
            _append_pieces(stream, total, seed=3)
        except BaseException as e:
            errors.append(e)
        finally:
            writer_done.set()

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not writer_done.is_set():
                length = stream.length
                a = int(rng.integers(0, length + 1))
                b = int(rng.integers(a, length + 1))
                if rng.random() < 0.3:
                    a = max(0, length - int(rng.integers(0, 40)))
                    b = length
                got = stream.read(a, b)
                _assert_equal(got, [w[:, a:b] for w in want])
                reads[0] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write)] + [
        threading.Thread(target=read, args=(s,)) for s in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors[0]
    assert stream.length == total
    assert reads[0] > 20


# -- lifecycle and durability -------------------------------------------------------------------


def test_close_flush_and_reopen_keep_everything(tmp_path: Path) -> None:
    store = Store(tmp_path)
    stream = _stream(store, chunk_steps=16)
    _append_pieces(stream, 333)
    assert stream.materialized < 333
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        stream.submit(333, expected(333, 334))
    assert _wal_files(stream) == []  # everything is in the arrays
    again = Store(tmp_path)
    try:
        reopened = again.open_stream("v", "u")
        assert reopened is not stream
        assert (reopened.length, reopened.materialized) == (333, 333)
        _assert_equal(reopened.read(0, 333), expected(0, 333))
        # Appends continue at the committed offset.
        with pytest.raises(OffsetGapError) as info:
            reopened.append(334, expected(334, 340))
        assert info.value.expected_offset == 333
        _append_pieces(reopened, 400)
        _assert_equal(reopened.read(0, 400), expected(0, 400))
    finally:
        again.close()


def test_acknowledged_steps_are_on_disk_before_close(tmp_path: Path) -> None:
    writer = Store(tmp_path)
    try:
        stream = _stream(writer, chunk_steps=16)
        _append_pieces(stream, 123)
        _wait_materialized(stream, 112)
        # Another store (another process would do the same) finds every acknowledged step: the
        # whole chunks in the arrays, the rest in the write-ahead log.
        reader = Store(tmp_path)
        try:
            seen = reader.open_stream("v", "u")
            assert seen.length == 123
            assert seen.materialized == stream.materialized
            _assert_equal(seen.read(0, 123), expected(0, 123))
        finally:
            reader.close()
    finally:
        writer.close()


def test_a_stale_stream_object_does_not_overwrite_newer_commits(tmp_path: Path) -> None:
    """A Stream opened before another writer appended must not write over those appends.

    It loaded its committed length (0) when opened; becoming the writer must reload it, else it
    appends at its stale offset and truncates the stream (as it did before the writer reload).
    """
    first = Store(tmp_path)
    first.create_vault("v", SCHEMA, chunk_steps=16)
    first.open_stream("v", "u", create=True)
    second = Store(tmp_path)
    stale = second.open_stream("v", "u")  # e.g. a reader, opened while the stream is empty
    first.open_stream("v", "u").append(0, expected(0, 40))
    first.close()  # releases the writer lock
    try:
        try:
            acked = stale.append(0, expected(0, 3))
        except OffsetGapError:
            acked = 40
        assert acked == 40  # steps [0, 3) are already committed: a duplicate
    finally:
        second.close()
    check = Store(tmp_path)
    try:
        stream = check.open_stream("v", "u")
        assert stream.length == 40
        _assert_equal(stream.read(0, 40), expected(0, 40))
    finally:
        check.close()


def test_a_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    first = Store(tmp_path)
    second = Store(tmp_path)
    try:
        stream = _stream(first)
        stream.append(0, expected(0, 5))
        other = second.open_stream("v", "u")
        with pytest.raises(StreamBusyError, match="one writer at a time"):
            other.submit(5, expected(5, 6))
        assert stream.length == 5
        assert stream.append(5, expected(5, 8)) == 8
    finally:
        second.close()
        first.close()


def test_a_second_writer_process_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    Store(root).create_vault("v", SCHEMA, compression="none", chunk_steps=16)
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(root), "v", "u"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "start 0", proc.stderr
        assert proc.stdout.readline().startswith("ack "), proc.stderr
        store = Store(root)
        try:
            stream = store.open_stream("v", "u")
            length = stream.length
            with pytest.raises(StreamBusyError, match="another process"):
                stream.submit(length, expected(length, length + 1))
        finally:
            store.close()
    finally:
        proc.kill()
        proc.wait(30)
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    # The lock dies with its process: a new writer (a fresh open) takes over where it stopped.
    store = Store(root)
    try:
        stream = store.open_stream("v", "u")
        length = stream.length
        assert length > 0
        assert stream.append(length, expected(length, length + 5)) == length + 5
        _assert_equal(stream.read(0, length + 5), expected(0, length + 5))
    finally:
        store.close()


def test_a_crashed_log_write_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    """A kill during a log write leaves `<segment>.seg.tmp`; recovery must not keep it forever.

    Seen in test_crash: every kill that lands mid-write leaves one such file in `wal/`; it is not
    a segment, so neither recovery nor materializing sees it.
    """
    store = Store(tmp_path)
    stream = _stream(store, chunk_steps=16)
    stream.append(0, expected(0, 20))
    store.close()
    (stream.path / "wal").mkdir(exist_ok=True)
    leftover = stream.path / "wal" / "00000000000000000020-00000000000000000031.seg.tmp"
    leftover.write_bytes(b"EXVW" + bytes(1000))  # a torn, never renamed segment
    store = Store(tmp_path)
    try:
        reopened = store.open_stream("v", "u")
        assert reopened.length == 20  # the torn write was never acknowledged
        _append_pieces(reopened, 50)
        _assert_equal(reopened.read(0, 50), expected(0, 50))
    finally:
        store.close()
    assert not leftover.exists()


def test_a_stale_tensorstore_lock_file_does_not_corrupt_the_stream(tmp_path: Path) -> None:
    """A writer killed while tensorstore writes `manifest.ocdbt` leaves `manifest.ocdbt.__lock`.

    tensorstore's file kvstore writes the next manifest into that file without truncating it and
    renames it: the manifest keeps the old tail ("Length in header (461) does not match actual
    length (466)") and the whole stream no longer opens. Seen in test_crash about once in 40 runs
    of 10 kills. The writer, which holds the stream's lock, must delete such files first.
    """
    store = Store(tmp_path)
    stream = _stream(store, chunk_steps=16)
    stream.append(0, expected(0, 40))
    store.close()
    (stream.path / "manifest.ocdbt.__lock").write_bytes(b"\xff" * 5000)
    writer = Store(tmp_path)
    try:
        stream = writer.open_stream("v", "u")
        assert stream.append(40, expected(40, 45)) == 45  # less than a chunk: stays in the log
        stream.flush()  # exactly one manifest write
        reader = Store(tmp_path)
        try:
            seen = reader.open_stream("v", "u")
            assert (seen.length, seen.materialized) == (45, 45)
            _assert_equal(seen.read(0, 45), expected(0, 45))
        finally:
            reader.close()
    finally:
        writer.close()


def test_exiting_without_close_right_after_an_ack_does_not_abort(tmp_path: Path) -> None:
    """Chunks are materialized after the ack; a process exiting then must not crash.

    Without closing open writers at exit, the interpreter tears down while a daemon thread is
    inside tensorstore and the process dies with SIGABRT ("terminate called without an active
    exception"). The acknowledged steps are safe in the log either way.
    """
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(WRITER.parent)!r})\n"
        "from stream_writer import expected, experience_structure\n"
        "from expvault.schema import Schema\n"
        "from expvault.storage import Store\n"
        f"store = Store({str(tmp_path)!r})\n"
        "store.create_vault('v', Schema.from_experience(experience_structure()), chunk_steps=16)\n"
        "stream = store.open_stream('v', 'u', create=True)\n"
        "print(stream.append(0, expected(0, 16 * 500)), flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == str(16 * 500)
    store = Store(tmp_path)
    try:
        stream = store.open_stream("v", "u")
        assert stream.length == 16 * 500
        _assert_equal(stream.read(0, 16 * 500), expected(0, 16 * 500))
    finally:
        store.close()
    assert done.returncode == 0, done.stderr[-2000:]


# -- bytes on disk ------------------------------------------------------------------------------


def test_bytes_on_disk_stay_close_to_bytes_appended(tmp_path: Path) -> None:
    schema = Schema.from_experience({"obs": np.zeros((4, 1, 64), np.float32)})
    chunk = default_chunk_steps(schema)
    assert chunk == 1024  # 1 KiB per step: 1 MiB chunks
    store = Store(tmp_path)
    try:
        store.create_vault("disk", schema, compression="none")
        stream = store.open_stream("disk", "u", create=True)
        rng = np.random.default_rng(0)
        appended = 0
        started = time.monotonic()
        for i in range(1000):
            block = rng.random((4, 64, 64), dtype=np.float32)
            assert stream.append(i * 64, [block]) == (i + 1) * 64
            appended += block.nbytes
        elapsed = time.monotonic() - started
        _wait_materialized(stream, 64000 // chunk * chunk)
        assert stream.materialized == 64000 // chunk * chunk  # whole chunks only
        in_flight = stream.bytes_on_disk() / appended
        store.close()
        after_close = stream.bytes_on_disk() / appended
    finally:
        store.close()
    # Each chunk is written once: a single rewrite of every chunk would double the size.
    assert in_flight <= 1.2, (in_flight, elapsed)
    assert after_close <= 1.2, (after_close, elapsed)


def test_read_windows_returns_single_rows_across_the_log_boundary(store: Store) -> None:
    stream = _stream(store, chunk_steps=16)
    _append_pieces(stream, 100)
    stream.flush()
    _append_pieces(stream, 141)  # [100, 141): partly a new chunk, partly still in the log
    materialized = stream.materialized
    assert 100 <= materialized < 141
    full = stream.read(0, 141)
    windows = [(0, 0), (1, materialized - 5), (0, 128), (1, 141 - 12), (0, 90)]
    got = stream.read_windows(windows, 12)
    for k, array in enumerate(full):
        for w, (row, start) in enumerate(windows):
            np.testing.assert_array_equal(got[k][w], array[row, start : start + 12])
    picked = stream.read_windows(windows[:2], 12, leaves=[SCHEMA.leaves[0].name])
    assert len(picked) == 1
    np.testing.assert_array_equal(picked[0], got[0][:2])


@pytest.mark.parametrize("cache_bytes", [0, 300, 32 << 20])
def test_read_windows_cut_from_cached_chunks_match_the_stream(
    tmp_path: Path, cache_bytes: int
) -> None:
    # Every leaf here is small (at most 40 bytes per row and step): sampled windows are cut out
    # of whole chunks kept in the store's chunk cache; 300 bytes keeps one chunk at a time, 0
    # none (tensorstore's indexed read).
    store = Store(tmp_path / "root", small_chunk_cache_bytes=cache_bytes)
    try:
        stream = _stream(store, chunk_steps=16)
        _append_pieces(stream, 200)
        stream.flush()
        _append_pieces(stream, 230)  # the last ones still in the log
        full = stream.read(0, 230)
        rng = np.random.default_rng(1)
        for length in (1, 5, 16, 40):
            windows = [
                (int(r), int(s))
                for r, s in zip(
                    rng.integers(0, SCHEMA.batch_size, 50),
                    rng.integers(0, 230 - length + 1, 50),
                    strict=True,
                )
            ]
            windows += [(1, max(0, 16 - length // 2)), (0, 0), (1, 230 - length)]
            for _ in range(2):  # cold, then from the cache
                got = stream.read_windows(windows, length)
                for k, array in enumerate(full):
                    want = np.stack([array[row, start : start + length] for row, start in windows])
                    np.testing.assert_array_equal(got[k], want)
        assert store.chunk_cache.nbytes <= cache_bytes
        assert (store.chunk_cache.nbytes > 0) == (cache_bytes > 0)
    finally:
        store.close()


def test_a_chunk_read_before_it_filled_up_is_not_kept(store: Store) -> None:
    stream = _stream(store, chunk_steps=16)
    _append_pieces(stream, 40)
    stream.flush()  # chunk [32, 48) written with 8 steps of 16
    first = stream.read_windows([(0, 34), (1, 30)], 6)
    np.testing.assert_array_equal(first[2][0], expected(34, 40)[2][0])
    _append_pieces(stream, 60)
    stream.flush()  # now whole: a kept copy of its first write would hold zeros for [40, 48)
    again = stream.read_windows([(0, 36), (1, 40)], 10)
    for k, array in enumerate(expected(36, 50)):
        np.testing.assert_array_equal(again[k][0], array[0, :10])
        np.testing.assert_array_equal(again[k][1], array[1, 4:14])


@pytest.mark.parametrize(("row", "start"), [(-1, 0), (SCHEMA.batch_size, 0), (0, -1), (0, 30)])
def test_read_windows_refuses_windows_outside_the_stream(
    store: Store, row: int, start: int
) -> None:
    stream = _stream(store)
    _append_pieces(stream, 40)
    with pytest.raises(InvalidArgumentError, match="is outside stream"):
        stream.read_windows([(row, start)], 12)


def test_overlapping_log_segments_load_each_step_once(tmp_path: Path) -> None:
    # A segment renamed into place whose append then failed (directory fsync) is removed, but
    # one left by an older version would overlap the retry's; loading keeps each step once.
    from expvault.storage import files
    from expvault.storage.location import SegmentName

    store = Store(tmp_path / "root")
    stream = _stream(store, chunk_steps=64)
    stream.append(0, expected(0, 5))
    location = store.location
    store.close()
    segment = files.Segment(3, tuple(expected(3, 9)))
    name = SegmentName(3, 9, 0)
    location.write_segment("v/u", name, files.encode_segment(segment))
    reopened = Store(tmp_path / "root")
    try:
        again = reopened.open_stream("v", "u")
        assert again.length == 9
        _assert_equal(again.read(0, 9), expected(0, 9))
        assert again.append(9, expected(9, 12)) == 12
        _assert_equal(again.read(0, 12), expected(0, 12))
    finally:
        reopened.close()


def test_a_stream_without_metadata_is_reported_not_hidden(store: Store) -> None:
    stream = _stream(store)
    stream.append(0, expected(0, 4))
    other = store.open_stream("v", "ok", create=True)
    other.append(0, expected(0, 2))
    store.close()
    (stream.path / "metadata.json").unlink()
    fresh = Store(store.root)
    try:
        assert fresh.list_vaults() == ["v"]
        info = fresh.get_vault("v")
        assert [s.vault_uid for s in info.streams] == ["ok"]
        assert [uid for uid, _ in info.damaged] == ["u"]
        report = info.damage_report()
        assert "stream 'u'" in report
        assert "metadata.json" in report
        assert "missing" in report
        with pytest.raises(StorageError, match="missing"):
            fresh.open_stream("v", "u", create=True)  # never recreated over the data
    finally:
        fresh.close()


def test_small_steps_move_into_the_arrays_by_megabytes_not_by_eight_chunks(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 58-byte steps in chunks of 16: eight chunks are 7 KiB, too little to pay an OCDBT commit.
    from expvault.storage import stream as stream_module

    monkeypatch.setattr(stream_module, "MATERIALIZE_AFTER_S", 3600.0)  # no timer: bytes only
    stream = _stream(store, chunk_steps=16)
    assert stream.append(0, expected(0, 256)) == 256  # sixteen chunks
    time.sleep(0.3)
    assert stream.materialized == 0
    need = -(-stream_module.MATERIALIZE_MIN_BYTES // SCHEMA.step_bytes)
    assert stream.append(256, expected(256, need + 16)) == need + 16
    _wait_materialized(stream, 16)
    assert stream.materialized % 16 == 0
    _assert_equal(stream.read(0, need + 16), expected(0, need + 16))
