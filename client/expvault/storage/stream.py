"""One stream: a writer's append-only time axis, durable on ack, each time chunk written once.

A stream's data lives in two places:
- the zarr arrays (flashbax's format) hold steps `[0, materialized)`, where `materialized` is the
  stored `vault_index`; they are only ever written in whole time chunks, in one OCDBT transaction
  with `vault_index`, so a chunk is written once and a crash leaves them consistent;
- the write-ahead log holds steps `[materialized, length)`: one segment per group commit (a
  record appended to a log file in a directory, an object on an object store), durable before
  the append is acknowledged, mirrored in memory for readers.

Appends go through one committer thread per stream, which takes every append waiting at that
moment and commits them together (group commit): one log write and one fsync for all of them.
A second thread per stream materializes whole chunks, so acks never wait for zarr commits.

The log's mirror in memory is bounded by a `LogBudget` its store's streams share: when the
materializers fall behind, the committers wait, which slows the writers instead of growing memory.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorstore as ts

from expvault.errors import (
    ExpvaultError,
    InvalidArgumentError,
    OffsetGapError,
    ResourceExhaustedError,
    StorageError,
    StreamBusyError,
)
from expvault.schema import Schema
from expvault.storage import files
from expvault.storage.chunks import ChunkCache, WindowGather, small_leaf_chunks
from expvault.storage.files import SegmentName
from expvault.storage.lease import FENCE_KEY, Fences, Lease, segment_valid
from expvault.storage.location import NO_VALUE, KvLocation, Location

logger = logging.getLogger(__name__)

# flashbax stores the committed length as int32.
MAX_STREAM_STEPS = 2**31 - 1
# Time chunks moved into the arrays per transaction: at most 16, or as many as make 16 MiB when
# chunks are small. A transaction holds its data several times over (the log's arrays,
# tensorstore's chunk buffers, their encoded form) until it commits.
MATERIALIZE_CHUNKS = 16
MATERIALIZE_MAX_BYTES = 16 << 20
# What the materializer waits for before a transaction: 8 time chunks and 4 MiB of steps, unless
# the log's memory budget is pressed or the oldest chunk waited `MATERIALIZE_AFTER_S`. Each OCDBT
# commit has a fixed cost (a few ms) that grows with the database (its B-tree's depth), so fewer,
# larger commits keep the cost of an append flat as the stream grows, small steps included.
MATERIALIZE_MIN_CHUNKS = 8
MATERIALIZE_MIN_BYTES = 4 << 20
MATERIALIZE_AFTER_S = 1.0
# Bytes of appends one group commit takes (at least one append): the group is copied into one
# log segment, so it is held twice while it commits.
GROUP_COMMIT_BYTES = 16 << 20

# Streams with running writer threads. They are closed (committed, flushed) at interpreter exit:
# a daemon thread inside tensorstore while the interpreter tears down aborts the process.
_OPEN_WRITERS: weakref.WeakSet[Stream] = weakref.WeakSet()


@atexit.register
def _close_writers() -> None:
    for stream in list(_OPEN_WRITERS):
        stream.close()


class _Writing(Protocol):
    """The right to write a stream: a local `flock`, or a lease on a shared store."""

    epoch: int
    fences: Fences

    def check(self) -> None: ...

    def release(self) -> None: ...


class _Unshared:
    """Writing where no other process can (memory): the Store's one object per stream suffices."""

    epoch = 0
    fences: Fences = ()

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


class LogBudget:
    """Bytes of committed but not materialized steps that the streams of a store keep in memory.

    A committer waits before a log write while its bytes would take the total past
    `limit_bytes`, until materializers give bytes back. A stream holding less than one time chunk
    always commits (its materializer waits for a whole chunk, so waiting could not end), and so
    does one whose arrays cannot be written (the append's own error then tells the writer): the
    memory is at most `limit_bytes` plus one chunk and one group commit per writing stream.

    Args:
        limit_bytes: the bound; None: unbounded.
    """

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        self._waiting = 0  # committers waiting for bytes
        self._changed = threading.Condition(threading.Lock())

    def acquire(self, n: int, may_pass: Callable[[], bool]) -> None:
        """Waits until `n` bytes fit or `may_pass()` is true, then takes them."""
        with self._changed:
            while (
                self.limit_bytes is not None
                and self.used_bytes + n > self.limit_bytes
                and not may_pass()
            ):
                self._waiting += 1
                try:
                    self._changed.wait(timeout=1.0)  # may_pass may change without a release
                finally:
                    self._waiting -= 1
            self.used_bytes += n
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def pressed(self) -> bool:
        """Whether a committer waits for bytes, or more than half of the bound is taken."""
        with self._changed:
            return self.limit_bytes is not None and (
                self._waiting > 0 or 2 * self.used_bytes > self.limit_bytes
            )

    def release(self, n: int) -> None:
        """Gives `n` bytes back and wakes the waiting committers."""
        if n <= 0:
            return
        with self._changed:
            self.used_bytes -= n
            self._changed.notify_all()


@dataclass
class _Pending:
    start: int
    arrays: list[np.ndarray[Any, Any]]
    future: Future[int] = field(default_factory=Future)


class Stream:
    """A stream of one vault: append with explicit offsets, read committed data.

    Safe for one writer and many concurrent readers (threads). Readers only ever see committed
    (durable) steps. Create streams with `Store.open_stream`.
    """

    def __init__(
        self,
        *,
        vault_name: str,
        vault_uid: str,
        location: Location,
        schema: Schema,
        metadata: dict[str, Any],
        arrays: Sequence[ts.TensorStore],
        index: ts.TensorStore,
        flush_steps: int,
        log_budget: LogBudget | None = None,
        lease_s: float = 10.0,
        owner: str | None = None,
        poll_interval_s: float = 0.2,
        chunk_cache: ChunkCache | None = None,
    ) -> None:
        self.vault_name = vault_name
        self.vault_uid = vault_uid
        self.key = f"{vault_name}/{vault_uid}"
        self._location = location
        self._lease_s = lease_s
        self._owner = owner
        self._poll_interval_s = poll_interval_s
        self.schema = schema
        self.metadata = metadata
        self._arrays = list(arrays)
        self._index = index
        self._flush_steps = flush_steps
        # Windows of small leaves are cut out of whole chunks kept in `chunk_cache`: per leaf,
        # its (rows, steps) per stored chunk, or None where tensorstore's indexed read is used.
        self._chunk_cache = chunk_cache
        self._cache_token = ChunkCache.token()
        self._small_chunks = [
            small_leaf_chunks(leaf.step_bytes, array.chunk_layout.read_chunk.shape or (1, 1))
            if chunk_cache is not None and chunk_cache.max_bytes
            else None
            for leaf, array in zip(schema.leaves, self._arrays, strict=True)
        ]
        chunk_bytes = max(1, flush_steps * schema.step_bytes)
        # Steps per transaction of the materializer: at least, and at most (whole chunks).
        self._batch_steps = flush_steps * max(
            MATERIALIZE_MIN_CHUNKS, -(-MATERIALIZE_MIN_BYTES // chunk_bytes)
        )
        self._max_batch_steps = flush_steps * max(
            MATERIALIZE_CHUNKS, MATERIALIZE_MAX_BYTES // chunk_bytes
        )
        self._log_budget = log_budget or LogBudget(None)
        self._log_bytes = 0  # bytes of `_segments` taken of `_log_budget` (writer only)
        self._lock = threading.Lock()
        self._has_pending = threading.Condition(self._lock)
        self._has_chunks = threading.Condition(self._lock)
        self._materializing = threading.Lock()  # one materialization at a time
        self._starting = threading.Lock()  # one writer start
        self._pending: deque[_Pending] = deque()
        self._listeners: list[Callable[[int], None]] = []
        self._threads: list[threading.Thread] = []
        self._writing: _Writing | None = None
        self._lost: str | None = None  # why this process lost the right to write, if it did
        self._ending = False  # `end_writing` is winding the writer threads down
        self._fence_kv: ts.KvStore | None = None  # the OCDBT database, for the fence key
        self._fence_generation = b""
        self._closed = False
        self._materialized = 0
        self._segments: list[files.Segment] = []
        self._loaded: dict[SegmentName, files.Segment] = {}  # segments read, by name
        self._length = 0
        self._refreshed = 0.0  # when a reader last loaded the stored state (monotonic)
        self._poller: threading.Thread | None = None
        self._materialize_failing = False  # log a storage outage once, not at every retry
        self._load(writer=False)

    @property
    def path(self) -> Path:
        """The stream's directory (a local location only)."""
        return self._location.local_path(self.key)

    @property
    def where(self) -> str:
        """The stream's directory or URL, for messages."""
        return self._location.describe(self.key)

    # -- recovery ---------------------------------------------------------------------------

    def _fences(self) -> Fences:
        """The takeover fences readers apply to the log (shared stores only)."""
        if self._writing is not None:
            return self._writing.fences
        if isinstance(self._location, KvLocation) and self._location.shared:
            return Lease.read_fences(self._location, self.key)
        return ()

    def _chain(
        self, materialized: int, fences: Fences, names: Sequence[SegmentName]
    ) -> list[SegmentName]:
        """Of the log segments `names`, those that continue the arrays' `materialized` steps."""
        chain: list[SegmentName] = []
        end = materialized
        for name in sorted(names, key=lambda n: (n.start, n.stop, n.epoch)):
            if name.stop <= end or not segment_valid(name.epoch, name.stop, fences):
                continue
            if name.start > end:
                # Cannot happen with sequential durable writes; keep it for inspection.
                logger.error("stream %s: log segment %s leaves a gap", self.where, name.name)
                continue
            chain.append(name)
            end = name.stop
        return chain

    def _stored_length(self, fences: Fences) -> int:
        """The committed length as stored now (index and log names; reads no segment)."""
        materialized = int(self._index.read().result()[0])
        chain = self._chain(materialized, fences, self._location.segments(self.key))
        return chain[-1].stop if chain else materialized

    def _load(self, *, writer: bool) -> None:
        """Loads the committed state: `vault_index`, then the log segments that continue it.

        A reader's view is a snapshot, renewed by `refresh`; a writer reloads when it takes the
        right to write (the state may have moved on meanwhile) and only then cleans up: segments
        already materialized or fenced off, and temporary files a crash left behind.
        """
        dtypes = [leaf.dtype for leaf in self.schema.leaves]
        shapes = [(self.schema.batch_size, *leaf.step_shape) for leaf in self.schema.leaves]
        fences = self._fences()
        for attempt in range(3):
            materialized = int(self._index.read().result()[0])
            names = self._location.segments(self.key)
            chain = self._chain(materialized, fences, names)
            segments: list[files.Segment] = []
            loaded: dict[SegmentName, files.Segment] = {}
            end = materialized
            try:
                for name in chain:
                    segment = self._loaded.get(name)
                    if segment is None:
                        data = self._location.read_segment(self.key, name)
                        segment = files.decode_segment(
                            data, f"{self.where}/{files.WAL_DIR}/{name.name}", dtypes, shapes
                        )
                    loaded[name] = segment
                    if name.start < end:  # overlaps what is loaded: keep only its new tail
                        segment = files.Segment(
                            end, tuple(a[:, end - name.start :] for a in segment.arrays)
                        )
                    segments.append(segment)
                    end = name.stop
            except FileNotFoundError:
                # Another process materialized and deleted it meanwhile: read the index again.
                if attempt == 2:
                    raise
                continue
            break
        if writer:
            for name in names:
                if name not in loaded:  # materialized, a duplicate, or fenced off
                    self._location.remove_segment(self.key, name)
            self._location.remove_temporary(self.key)
        with self._lock:
            self._materialized, self._segments, self._length = materialized, segments, end
            self._loaded = loaded
        self._refreshed = time.monotonic()
        if segments and writer:
            logger.info(
                "stream %s/%s: %d committed steps are in the write-ahead log",
                self.vault_name,
                self.vault_uid,
                end - materialized,
            )

    def refresh(self, max_age_s: float = 0.0) -> int:
        """Loads what other processes committed since the last look (readers only).

        A no-op in the writing process, and when the last look is younger than `max_age_s`.

        Returns:
            The committed length.
        """
        stale = self._writing is None and time.monotonic() - self._refreshed >= max_age_s
        # Not while this object starts writing (that loads the state itself, and may wait for a
        # lease): then the view stays as it is for now.
        if stale and self._starting.acquire(blocking=False):
            try:
                if self._writing is None:
                    before = self.length
                    self._load(writer=False)
                    if self.length > before:
                        self._notify(self.length)
            finally:
                self._starting.release()
        return self.length

    def _notify(self, length: int) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(length)
            except Exception:
                logger.exception("commit listener failed")

    def _ensure_poller(self) -> None:
        """Starts the thread that looks for other processes' commits, unless it runs."""
        with self._lock:
            if self._poller is not None or self._closed or not self._listeners:
                return
            poller = self._poller = threading.Thread(
                target=self._poll_loop, name=f"expvault-poll-{self.key}", daemon=True
            )
        poller.start()

    def _poll_loop(self) -> None:
        """Refreshes a reader while it has listeners: new steps other processes commit."""
        while True:
            with self._lock:
                if self._closed or not self._listeners:
                    self._poller = None
                    return
            try:
                self.refresh()
            except Exception as e:  # the store is unreachable for now: keep following
                logger.warning("stream %s: cannot look for new steps: %s", self.where, e)
            time.sleep(self._poll_interval_s)

    # -- state --------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """The committed length: steps `[0, length)` are durable."""
        with self._lock:
            return self._length

    @property
    def materialized(self) -> int:
        """Steps in the zarr arrays, readable by flashbax (the stored `vault_index`)."""
        with self._lock:
            return self._materialized

    def bytes_on_disk(self) -> int:
        """Bytes this stream occupies on disk (arrays, log, metadata); 0 on object stores."""
        return self._location.bytes_used(self.key)

    def on_commit(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Calls `callback(new_length)` after each commit, from the committer thread.

        In a process that does not write the stream, a thread looks for steps other processes
        commit every `poll_interval_s` while there are listeners, and calls them from there.

        Returns:
            A function that unsubscribes.
        """
        with self._lock:
            self._listeners.append(callback)
        if self._writing is None:
            self._ensure_poller()

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    # -- appends ------------------------------------------------------------------------------

    def submit(self, start: int, arrays: Sequence[np.ndarray[Any, Any]]) -> Future[int]:
        """Queues an append of steps `[start, start + n)`; it is committed with others waiting.

        A retry of steps already committed is acknowledged without writing; an overlap appends
        only the new tail; a start past the committed length fails with `OffsetGapError`.

        Args:
            start: the stream offset of the first step.
            arrays: one array per schema leaf, in schema order, each `(B, n, ...)`.

        Returns:
            A future of the committed length once the steps are durable.

        Raises:
            SchemaMismatchError: the arrays do not match the schema (nothing is queued).
            InvalidArgumentError: a negative start.
            StreamBusyError: another process writes this stream.
        """
        steps = self.schema.check_arrays(arrays)
        if start < 0:
            raise InvalidArgumentError(f"append start offset must be >= 0, got {start}")
        pending = _Pending(start, [np.asarray(a) for a in arrays])
        if steps == 0:
            pending.future.set_result(self.length)
            return pending.future
        while True:
            if self._lost is not None:
                raise StreamBusyError(self._lost)
            if not self._threads:
                self.begin_writing()
            with self._lock:
                if self._closed:
                    raise StorageError(f"stream {self.vault_name}/{self.vault_uid} is closed")
                if self._lost is not None:
                    raise StreamBusyError(self._lost)
                if self._threads and not self._ending:
                    self._pending.append(pending)
                    self._has_pending.notify()
                    return pending.future
            with self._starting:  # `end_writing` is giving the right up: wait, then take it again
                pass

    def begin_writing(self) -> None:
        """Makes this object the stream's writer (idempotent); `submit` does it on first use.

        Takes the right to write (the local lock, or on a shared store the stream's lease), then
        reloads the committed state, which another writer may have moved on since this object
        was opened: call it before choosing an append's offset. After a lost lease, takes it
        again.

        Raises:
            StreamBusyError: another process (or Store) is the writer.
        """
        with self._starting:
            if self._threads and self._lost is None:
                return
            if self._closed:
                raise StorageError(f"stream {self.vault_name}/{self.vault_uid} is closed")
            if self._threads:
                self._stop_writing()  # the lease was lost: wind down, then take it again
            writing = self._take_writing()
            self._writing = writing
            try:
                if isinstance(writing, Lease):
                    self._take_fence(writing.epoch)
                self._load(writer=True)
            except BaseException:
                self._writing = None
                writing.release()
                raise
            self._lost = None
            with self._lock:
                recovered = sum(_nbytes(s) for s in self._segments)
            self._log_budget.acquire(recovered, lambda: True)  # already in memory
            self._log_bytes = recovered
            threads = [
                threading.Thread(target=loop, name=f"expvault-{what}-{self.key}", daemon=True)
                for loop, what in (
                    (self._commit_loop, "commit"),
                    (self._materialize_loop, "materialize"),
                )
            ]
            for thread in threads:
                thread.start()
            with self._lock:
                self._threads = threads
            _OPEN_WRITERS.add(self)

    def end_writing(self) -> None:
        """Commits what is queued and gives up the right to write (the lock or the lease).

        Another process may then write the stream at once; this object stays a reader, and its
        next `submit` or `begin_writing` takes the right back. The steps of the partial time
        chunk stay in the log (durable); whole chunks still there are moved by the next writer.
        """
        with self._starting:
            if not self._threads or self._closed:
                return
            with self._lock:
                self._ending = True
                self._has_pending.notify_all()
                self._has_chunks.notify_all()
            try:
                self._stop_writing()
            finally:
                with self._lock:
                    self._ending = False
        logger.info("stream %s: no writer attached; gave up the right to write it", self.key)

    def _take_writing(self) -> _Writing:
        location = self._location
        if isinstance(location, KvLocation):
            if not location.shared:
                return _Unshared()
            lease = Lease(
                location, self.key, duration_s=self._lease_s, owner=self._owner, on_lost=self._lose
            )
            lease.acquire(self._stored_length)
            return lease
        return files.WriterLock(self.path)

    def _take_fence(self, epoch: int) -> None:
        """Writes this writer's epoch into the OCDBT database: older writers can commit no more."""
        if self._fence_kv is None:
            # The arrays' context: only within one context do a transaction's writes to the
            # arrays and to this key reach the same OCDBT instance and commit all or nothing.
            self._fence_kv = ts.KvStore.open(
                {"driver": "ocdbt", "base": self._location.kvstore(self.key)},
                context=self._location.context,
            ).result()
        found = self._fence_kv.read(FENCE_KEY).result()
        if found.state != "missing" and int(found.value or b"0") >= epoch:
            raise StreamBusyError(
                f"stream {self.key}: a writer of a later epoch ({found.value.decode()}) fenced "
                f"this one ({epoch}); write it through the server that holds its lease"
            )
        generation = found.stamp.generation if found.state != "missing" else NO_VALUE
        written = self._fence_kv.write(FENCE_KEY, str(epoch).encode(), if_equal=generation)
        self._fence_generation = bytes(written.result().generation)
        if not self._fence_generation:
            raise StreamBusyError(f"stream {self.key}: another writer took it meanwhile; retry")

    def _lose(self, why: str) -> None:
        """The lease is gone: fail what waits, stop committing; `begin_writing` takes it again."""
        with self._lock:
            if self._lost is not None or self._writing is None:
                return
            self._lost = why
            pending, self._pending = list(self._pending), deque()
            self._has_pending.notify_all()
            self._has_chunks.notify_all()
        for p in pending:
            if p.future.set_running_or_notify_cancel():
                p.future.set_exception(StreamBusyError(why))

    def _stop_writing(self) -> None:
        """Joins the writer threads of a lost lease and turns this object back into a reader."""
        with self._lock:
            threads, self._threads = self._threads, []
            self._has_pending.notify_all()
            self._has_chunks.notify_all()
        for thread in threads:
            thread.join()
        writing, self._writing = self._writing, None
        if writing is not None:
            # Before the lock or lease goes: the next writer may start at once.
            self._location.release_log(self.key)
            writing.release()
        with self._lock:
            held, self._log_bytes = self._log_bytes, 0
        self._log_budget.release(held)
        _OPEN_WRITERS.discard(self)
        self._ensure_poller()  # followers now learn of new steps from the store

    def append(self, start: int, arrays: Sequence[np.ndarray[Any, Any]]) -> int:
        """Appends and waits until durable; see `submit`.

        Returns:
            The committed length.
        """
        return self.submit(start, arrays).result()

    def _commit_loop(self) -> None:
        while True:
            with self._lock:
                while (
                    not self._pending
                    and not self._closed
                    and not self._ending
                    and self._lost is None
                ):
                    self._has_pending.wait()
                if not self._pending or self._lost is not None:
                    return
                taken: list[_Pending] = []
                nbytes = 0
                while self._pending and (not taken or nbytes < GROUP_COMMIT_BYTES):
                    p = self._pending.popleft()
                    taken.append(p)
                    nbytes += sum(int(a.nbytes) for a in p.arrays)
                # A future its submitter cancelled is dropped: nothing of it is written.
                batch = [p for p in taken if p.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._commit(batch)
            except Exception as e:  # a bug: fail this group, keep committing (never hang acks)
                logger.exception("stream %s/%s: commit failed", self.vault_name, self.vault_uid)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(StorageError(f"commit failed: {e!r}"))

    def _commit(self, batch: list[_Pending]) -> None:
        """Commits a group of appends with one log write; resolves their futures."""
        end = self._length  # only this thread changes _length
        accepted: list[files.Segment] = []
        outcomes: list[tuple[_Pending, ExpvaultError | None]] = []
        for p in batch:
            n = int(p.arrays[0].shape[1])
            if p.start > end:
                outcomes.append(
                    (
                        p,
                        OffsetGapError(
                            f"append starts at offset {p.start} but stream {self.vault_name}/"
                            f"{self.vault_uid} has {end} committed steps: resend from {end}",
                            expected_offset=end,
                        ),
                    )
                )
                continue
            if p.start + n > end:
                skip = end - p.start
                accepted.append(files.Segment(end, tuple(a[:, skip:] for a in p.arrays)))
                end = p.start + n
            outcomes.append((p, None))

        failure: ExpvaultError | None = None
        if end > MAX_STREAM_STEPS:
            failure = ResourceExhaustedError(
                f"stream would exceed {MAX_STREAM_STEPS} steps (flashbax's int32 vault_index)"
            )
        elif accepted:
            segment = _merge(accepted)
            nbytes = _nbytes(segment)
            self._log_budget.acquire(nbytes, self._may_pass_log_budget)
            assert self._writing is not None
            name = SegmentName(segment.start, segment.stop, self._writing.epoch)
            try:
                self._location.write_segment(self.key, name, files.encode_segment(segment))
                self._writing.check()  # still ours now: nobody else can have taken it over
            except StreamBusyError as e:
                self._log_budget.release(nbytes)
                failure = e
                self._lose(e.message)
            except (OSError, ValueError) as e:
                self._log_budget.release(nbytes)
                # Nothing of this group is acknowledged; the log and the state are as before it,
                # so the writer may retry the same appends (e.g. once disk space is freed).
                failure = self._location.error(
                    f"cannot append to stream {self.vault_name}/{self.vault_uid}", e
                )
                logger.error("%s", failure)
            else:
                with self._lock:
                    self._loaded[name] = segment
                    self._segments.append(segment)
                    self._log_bytes += nbytes
                    self._length = end
                    listeners = list(self._listeners)
                for listener in listeners:
                    try:
                        listener(end)
                    except Exception:
                        logger.exception("commit listener failed")

        for p, error in outcomes:
            if error is not None:
                p.future.set_exception(error)
            elif failure is not None:
                p.future.set_exception(failure)
            else:
                p.future.set_result(end)

        if failure is None and end - self._materialized >= self._flush_steps:
            with self._lock:
                self._has_chunks.notify()

    def _may_pass_log_budget(self) -> bool:
        """Whether to commit past the log budget: less than a chunk held, or failing arrays."""
        with self._lock:
            held_steps = self._length - self._materialized
        return held_steps < self._flush_steps or self._materialize_failing

    def _materialize_loop(self) -> None:
        ready_since: float | None = None  # when a whole chunk was first waiting
        while True:
            with self._lock:
                while not self._closed and not self._ending and self._lost is None:
                    waiting = self._length - self._materialized
                    if waiting < self._flush_steps:
                        ready_since = None
                        self._has_chunks.wait()
                        continue
                    now = time.monotonic()
                    ready_since = now if ready_since is None else ready_since
                    if (
                        waiting >= self._batch_steps
                        or now - ready_since >= MATERIALIZE_AFTER_S
                        or self._log_budget.pressed()
                    ):
                        break
                    self._has_chunks.wait(timeout=0.05)
                if self._closed or self._ending or self._lost is not None:
                    return
                stop = self._length - self._length % self._flush_steps
                stop = min(stop, self._materialized + self._max_batch_steps)
            ready_since = None
            try:
                failure = self._materialize(stop)
            except Exception as e:  # a bug: keep the thread (the steps are safe in the log)
                logger.exception(
                    "stream %s/%s: materializer failed", self.vault_name, self.vault_uid
                )
                failure = StorageError(str(e))
            if failure is not None:
                with self._lock:
                    self._has_chunks.wait(timeout=1.0)  # the storage failed: retry later

    def _materialize(self, stop: int) -> StorageError | ResourceExhaustedError | None:
        """Moves steps `[materialized, stop)` from the log into the zarr arrays, atomically.

        Returns:
            None, or the error when the storage failed: nothing changed, the steps stay in the
            log (durable, readable) and a later call retries.
        """
        with self._materializing:
            return self._materialize_locked(stop)

    def _materialize_locked(self, stop: int) -> StorageError | ResourceExhaustedError | None:
        start = self._materialized
        if stop <= start:
            return None
        with self._lock:
            segments = list(self._segments)
        data = _slice(segments, start, stop)
        try:
            txn = ts.Transaction(atomic=True)
            writes = [
                array.with_transaction(txn)[:, start:stop].write(values)
                for array, values in zip(self._arrays, data, strict=True)
            ]
            writes.append(self._index.with_transaction(txn).write(np.array([stop], np.int32)))
            fence = self._fence_kv
            if fence is not None and isinstance(self._writing, Lease):
                # Commits only while no later writer wrote its epoch: a stale writer cannot.
                epoch = str(self._writing.epoch).encode()
                fenced = fence.with_transaction(txn)
                fenced.write(FENCE_KEY, epoch, if_equal=self._fence_generation).result()
            for w in writes:
                w.result()
            txn.commit_async().result()
            if fence is not None and isinstance(self._writing, Lease):
                self._fence_generation = bytes(fence.read(FENCE_KEY).result().stamp.generation)
        except Exception as e:
            if "Generation mismatch" in str(e) and self._fence_kv is not None:
                self._lose(
                    f"stream {self.key}: another server took over writing it (its fence in the "
                    "arrays changed); this server stopped writing it"
                )
                return StorageError(str(e))
            failure = self._location.error(
                f"cannot move steps [{start}, {stop}) of stream {self.vault_name}/"
                f"{self.vault_uid} from the write-ahead log into its arrays",
                e,
            )
            log = logger.debug if self._materialize_failing else logger.error
            log("%s; retrying later (the steps stay in the log)", failure)
            self._materialize_failing = True
            return failure
        if self._materialize_failing:
            logger.info(
                "stream %s/%s: the arrays are writable again", self.vault_name, self.vault_uid
            )
            self._materialize_failing = False
        with self._lock:
            self._materialized = stop
            kept = [s for s in self._segments if s.stop > stop]
            freed = sum(_nbytes(s) for s in self._segments if s.stop <= stop)
            self._segments = kept
            self._loaded = {n: seg for n, seg in self._loaded.items() if n.stop > stop}
            freed = min(freed, self._log_bytes)  # a reader's segments were never taken
            self._log_bytes -= freed
        self._log_budget.release(freed)
        for name in self._location.segments(self.key):
            if name.stop <= stop:
                self._location.remove_segment(self.key, name)
        return None

    # -- reads --------------------------------------------------------------------------------

    def read(
        self, start: int, stop: int, leaves: Sequence[str] | None = None
    ) -> list[np.ndarray[Any, Any]]:
        """Reads committed steps `[start, stop)`.

        Args:
            start: first step (stream offset).
            stop: one past the last step; at most the committed length.
            leaves: names of the leaves to read (default all), returned in schema order.

        Returns:
            One array per selected leaf, `(B, stop - start, ...)`.

        Raises:
            InvalidArgumentError: a negative or reversed range, one past the committed length, or
                an unknown leaf name.
        """
        with self._lock:
            length, materialized, segments = self._length, self._materialized, list(self._segments)
        if not 0 <= start <= stop <= length:
            raise InvalidArgumentError(
                f"read range [{start}, {stop}) is invalid for stream {self.vault_name}/"
                f"{self.vault_uid} of {length} committed steps: need 0 <= start <= stop <= {length}"
            )
        picked = self.schema.leaf_indices(leaves)
        from_arrays = (start, min(stop, materialized))
        futures = (
            [self._arrays[i][:, from_arrays[0] : from_arrays[1]].read() for i in picked]
            if from_arrays[1] > from_arrays[0]
            else []
        )
        try:
            head = [f.result() for f in futures]
        except Exception as e:
            raise self._read_error(start, stop, e) from e
        tail = (
            _slice(segments, max(start, materialized), stop, picked)
            if stop > max(start, materialized)
            else []
        )
        if head and tail:
            return [np.concatenate([h, t], axis=1) for h, t in zip(head, tail, strict=True)]
        if head:
            return head
        if tail:
            return tail
        return [
            np.empty(
                (self.schema.batch_size, 0, *self.schema.leaves[i].step_shape),
                self.schema.leaves[i].dtype,
            )
            for i in picked
        ]

    def read_windows(
        self,
        windows: Sequence[tuple[int, int]],
        length: int,
        leaves: Sequence[str] | None = None,
    ) -> list[np.ndarray[Any, Any]]:
        """Reads windows of `length` committed steps of single batch rows, all reads at once.

        Args:
            windows: `(row, start)` pairs: batch row `row`, steps `[start, start + length)`.
            length: steps per window, >= 1.
            leaves: names of the leaves to read (default all), returned in schema order.

        Returns:
            One array per selected leaf, `(len(windows), length, ...)`, windows in order.

        Raises:
            InvalidArgumentError: a row outside `[0, B)`, or a window outside the committed steps.
        """
        with self._lock:
            committed, materialized, segments = (
                self._length,
                self._materialized,
                list(self._segments),
            )
        picked = self.schema.leaf_indices(leaves)
        for row, start in windows:
            if not (0 <= row < self.schema.batch_size and 0 <= start <= committed - length):
                raise InvalidArgumentError(
                    f"window of row {row}, steps [{start}, {start + length}) is outside stream "
                    f"{self.vault_name}/{self.vault_uid}: B={self.schema.batch_size}, "
                    f"{committed} committed steps"
                )
        out = [
            np.empty(
                (len(windows), length, *self.schema.leaves[i].step_shape),
                self.schema.leaves[i].dtype,
            )
            for i in picked
        ]
        # (output leaf, where in it, read future); tensorstore runs the reads concurrently.
        pending: list[tuple[np.ndarray[Any, Any], Any, Any]] = []
        gathers: list[tuple[int, WindowGather]] = []  # small leaves: (output leaf, windows)
        inside = [w for w, (_, start) in enumerate(windows) if start + length <= materialized]
        if inside:
            # Windows wholly in the arrays: one vectorized gather per leaf instead of a read per
            # window and leaf (Python indexing and futures cost more than the copy here), or
            # for small leaves slices of whole chunks, kept in the chunk cache (see `chunks`).
            rows = np.array([windows[w][0] for w in inside], np.int64)[:, None]
            starts = np.array([windows[w][1] for w in inside], np.int64)[:, None]
            steps = starts + np.arange(length, dtype=np.int64)
            where: Any = slice(None) if len(inside) == len(windows) else inside
            inside_windows = [windows[w] for w in inside]
            for k, i in enumerate(picked):
                shape = self._small_chunks[i]
                if shape is None or self._chunk_cache is None:
                    pending.append((out[k], where, self._arrays[i].vindex[rows, steps].read()))
                    continue
                gather = WindowGather(
                    self._chunk_cache,
                    (self._cache_token, i),
                    shape,
                    inside_windows,
                    length,
                    self.schema.batch_size,
                    materialized,
                    self._arrays[i],
                )
                gathers.append((k, gather))
        for w, (row, start) in enumerate(windows):
            stop, mid = start + length, min(start + length, materialized)
            if stop <= materialized:
                continue  # gathered above
            if mid > start:  # the materialized head of a window that ends in the log
                pending += [
                    (out[k], (w, slice(0, mid - start)), self._arrays[i][row, start:mid].read())
                    for k, i in enumerate(picked)
                ]
            for seg in segments:  # the part still in the log
                lo, hi = max(start, materialized, seg.start), min(stop, seg.stop)
                if lo < hi:
                    for k, i in enumerate(picked):
                        out[k][w, lo - start : hi - start] = seg.arrays[i][
                            row, lo - seg.start : hi - seg.start
                        ]
        try:
            for array, index, future in pending:
                array[index] = future.result()
            for k, gather in gathers:
                if len(inside) == len(windows):
                    gather.into(out[k])
                else:  # a fancy-indexed part of `out[k]` is a copy: fill one, then place it
                    part = np.empty((len(inside), *out[k].shape[1:]), out[k].dtype)
                    gather.into(part)
                    out[k][inside] = part
        except Exception as e:
            raise self._read_error(0, committed, e) from e
        return out

    def _read_error(self, start: int, stop: int, error: Exception) -> StorageError:
        return StorageError(
            f"cannot read steps [{start}, {stop}) of stream {self.vault_name}/{self.vault_uid}: "
            f"its stored data under {self.where} is damaged or unreadable ({error}); restore the "
            "stream from a backup, or move its directory out of the root to serve the others"
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Waits for queued appends, then writes every committed step into the zarr arrays.

        Afterwards flashbax's `Vault` (in any process) reads the whole stream. The partial last
        time chunk is written now and once more when it fills up, so flush at the end of work
        rather than after every append.

        Raises:
            ResourceExhaustedError: the disk is full; the steps stay durable in the log.
            StorageError: the arrays cannot be written; the steps stay durable in the log.
        """
        self._drain()
        failure = self._materialize(self.length)
        if failure is not None:
            raise failure

    def _drain(self) -> None:
        with self._lock:
            pending = [p.future for p in self._pending]
        for f in pending:
            with contextlib.suppress(ExpvaultError, CancelledError):  # its submitter knows
                f.result()

    def close(self) -> None:
        """Commits queued appends, flushes, and stops the committer (idempotent)."""
        with self._starting:
            with self._lock:
                if self._closed:
                    return
            self._drain()
            with self._lock:
                self._closed = True
                self._has_pending.notify_all()
                self._has_chunks.notify_all()
                threads = self._threads
            for thread in threads:
                thread.join()
            if threads and self._lost is None:
                self._materialize(self._length)  # on failure the steps stay in the log (logged)
            self._stop_writing()  # releases the lock or lease, and the log's memory


def _nbytes(segment: files.Segment) -> int:
    return sum(int(a.nbytes) for a in segment.arrays)


def _merge(segments: list[files.Segment]) -> files.Segment:
    if len(segments) == 1:
        return segments[0]
    return files.Segment(
        segments[0].start,
        tuple(
            np.concatenate(parts, axis=1)
            for parts in zip(*(s.arrays for s in segments), strict=True)
        ),
    )


def _slice(
    segments: Sequence[files.Segment], start: int, stop: int, picked: Sequence[int] | None = None
) -> list[np.ndarray[Any, Any]]:
    """Returns steps `[start, stop)` of the chosen leaves from contiguous log segments."""
    indices = range(len(segments[0].arrays)) if picked is None else picked
    parts: list[list[np.ndarray[Any, Any]]] = [[] for _ in indices]
    for seg in segments:
        lo, hi = max(start, seg.start), min(stop, seg.stop)
        if lo >= hi:
            continue
        for out, i in zip(parts, indices, strict=True):
            out.append(seg.arrays[i][:, lo - seg.start : hi - seg.start])
    return [p[0] if len(p) == 1 else np.concatenate(p, axis=1) for p in parts]
