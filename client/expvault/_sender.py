"""The background sender of `RemoteVault`: one Append stream, pipelined, resent after reconnects.

A write hands the sender an `Outgoing` delta whose steps may still be on their way from the
device. A preparing thread waits for them to reach the host, encodes them into serialized Append
chunks (the leaf bytes copied once, straight into the requests) and queues the chunks in
`pending`, where they wait until acknowledged. A connection sends them in order without waiting
for acks; the server acknowledges each chunk, in order, once durable. When the stream breaks
(server restart, network), the sender reconnects with backoff and resends every unacknowledged
chunk from its offset: the server acknowledges steps it already has without writing them again,
so nothing is lost or duplicated.

With several servers over one store (`ChannelPool`), each (re)connect walks the servers in the
stream's preference order and stays with the first that opens the stream: when the preferred
server is unreachable the sender fails over to the next and resumes from the committed offset
that server reports. It returns to the preferred server only when that stream breaks in turn
(no flapping). A `StreamBusyError` after a failover (the old server's lease or lock is still
held) is retried with backoff like an unreachable server.

The queue is bounded in payload bytes: deltas not yet on the host count as much as encoded
chunks, from `put` until their acknowledgement.

A failure that may pass (the server's disk is full, or the server stayed away longer than
`reconnect_timeout_s`) is raised once by the next call (`put`, `flush`, `check`); the queued
steps stay queued, and the sender tries again after that, so an actor that catches the error and
writes or flushes later loses nothing. Other failures (a refused offset, a schema mismatch) are
final: every later call raises them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from expvault import codec
from expvault._rpc import ChannelPool, Failover, error_from_rpc, is_retryable, method_path
from expvault.errors import (
    ExpvaultError,
    ResourceExhaustedError,
    StorageError,
    StreamBusyError,
    UnavailableError,
)
from expvault.v1 import vault_pb2

logger = logging.getLogger(__name__)

__all__ = ["APPEND_METHOD", "Chunk", "Outgoing", "Sender"]

# Failures that may pass: a full disk on the server (or another capacity limit), a server away
# for longer than `reconnect_timeout_s`.
_MAY_PASS = (ResourceExhaustedError, UnavailableError)

APPEND_METHOD = method_path("Append")


@dataclass(frozen=True)
class Outgoing:
    """A delta handed to the sender: steps `[start, start + num_steps)` of the stream.

    Attributes:
        start: stream offset of the first step.
        num_steps: number of time steps.
        nbytes: payload bytes, all leaves (what the queue bound counts).
        fetch: returns the steps as host arrays `(B, num_steps, ...)`, one per leaf in wire
            order, waiting for them to arrive from the device; called once, on the sender's
            preparing thread.
    """

    start: int
    num_steps: int
    nbytes: int
    fetch: Callable[[], Sequence[np.ndarray[Any, Any]]]

    @property
    def stop(self) -> int:
        """Stream offset one past the last step."""
        return self.start + self.num_steps


@dataclass(frozen=True)
class Chunk:
    """Steps `[start, start + num_steps)` ready for the wire: a serialized `AppendRequest`."""

    seq: int
    start: int
    num_steps: int
    nbytes: int
    request: bytes

    @property
    def stop(self) -> int:
        """Stream offset one past the last step."""
        return self.start + self.num_steps


class _Connection:
    """One Append call to `target`; `dead` tells its request generator to stop."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.answered = False  # the open response arrived
        self.expired = False  # no open response within the open timeout: cancelled
        self.opened = False
        self.dead = False
        self.next_seq = 0


class Sender:
    """Sends the deltas of one stream from background threads; see the module docstring.

    Args:
        channel: the channel (with raised message limits), or the channels of several servers
            sharing one store.
        vault_name: the vault.
        vault_uid: the stream.
        leaf_names: the leaf names in wire order, checked against the server's open response.
        max_pending_bytes: unacknowledged payload bytes above which `put` blocks (backpressure).
        reconnect_timeout_s: how long to keep reconnecting before failing.
        message_bytes: payload per Append message (deltas are split along time).
        start_offset: the stream's length when this writer read it; a first open that finds
            more steps fails with `StreamBusyError` (another writer appended in between).
        open_timeout_s: a server that neither opens the stream nor fails within this many
            seconds counts as unreachable; None waits as long as gRPC does.
    """

    def __init__(
        self,
        channel: grpc.Channel | ChannelPool,
        vault_name: str,
        vault_uid: str,
        leaf_names: Sequence[str],
        *,
        max_pending_bytes: int,
        reconnect_timeout_s: float,
        message_bytes: int = codec.DEFAULT_MESSAGE_BYTES,
        start_offset: int = 0,
        open_timeout_s: float | None = None,
    ) -> None:
        if isinstance(channel, ChannelPool):
            self._channel_of: Callable[[str], grpc.Channel] = channel.channel
            self._order = channel.preference(vault_name, vault_uid)
        else:
            self._channel_of = lambda _: channel
            self._order = ["the server"]
        self._appends: dict[str, Any] = {}  # per server: the Append multi-callable
        self._open_timeout_s = open_timeout_s
        self._vault_name = vault_name
        self._vault_uid = vault_uid
        self._leaf_names = list(leaf_names)
        self._max_pending_bytes = max_pending_bytes
        self._reconnect_timeout_s = reconnect_timeout_s
        self._message_bytes = message_bytes
        self._start_offset = start_offset
        self._lock = threading.Lock()
        # One lock, three conditions, so a write wakes only the thread that has work from it.
        self._cond = threading.Condition(self._lock)  # acks, failures, closing: callers, _run
        self._outgoing = threading.Condition(self._lock)  # new deltas: the preparing thread
        self._chunks = threading.Condition(self._lock)  # new chunks: the request generator
        self._deferred: deque[Outgoing] = deque()  # handed over, not yet encoded
        self._pending: deque[Chunk] = deque()  # encoded, not yet acknowledged
        self._pending_bytes = 0  # payload of both queues
        self._next_seq = 0
        self._committed = -1
        self._error: ExpvaultError | None = None
        self._reported = False
        self._notice: ExpvaultError | None = None  # a failure that may pass, raised once
        self._paused = False  # since a notice was raised: the sender waits for the next call
        self._failures = 0  # failed connection attempts since the last open
        self._closing = False
        self._call: grpc.Call | None = None
        name = f"{vault_name}/{vault_uid}"
        self._preparer = threading.Thread(
            target=self._prepare, name=f"expvault-prepare-{name}", daemon=True
        )
        self._thread = threading.Thread(target=self._run, name=f"expvault-send-{name}", daemon=True)
        self._preparer.start()
        self._thread.start()

    # -- caller side ----------------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """The committed offset last acknowledged by the server (-1 before the first)."""
        with self._lock:
            return self._committed

    def check(self) -> None:
        """Raises the error the sender failed with, if any.

        Raises:
            ExpvaultError: the error the server or transport gave, or a failed device copy.
        """
        with self._lock:
            self._raise_error()

    def put(self, outgoing: Outgoing, *, block: bool = True) -> None:
        """Queues a delta; blocks while too much is unacknowledged.

        An empty queue always takes a delta, however large.

        Args:
            outgoing: the delta, whose steps may still be on their way from the device.
            block: wait while the queue is full; when False raise `ResourceExhaustedError`.

        Raises:
            ExpvaultError: the sender failed earlier (the error the server or transport gave).
            ResourceExhaustedError: the queue is full and not `block`.
        """
        with self._lock:
            if self._notice is None:
                self._resume()  # after a raised notice, this call sends the queue again
            while (
                self._error is None
                and self._notice is None
                and self._pending_bytes > 0
                and self._pending_bytes + outgoing.nbytes > self._max_pending_bytes
            ):
                if not block:
                    raise ResourceExhaustedError(
                        f"{self._pending_bytes} bytes of {self._vault_name}/{self._vault_uid} are "
                        f"unacknowledged (max_pending_bytes={self._max_pending_bytes}); flush(), "
                        "write less often, or raise max_pending_bytes"
                    )
                self._cond.wait()
            self._raise_error()
            self._deferred.append(outgoing)
            self._pending_bytes += outgoing.nbytes
            self._outgoing.notify()

    def flush(self, timeout_s: float | None = None) -> int:
        """Waits until every queued delta is acknowledged.

        Returns:
            The committed offset.

        Raises:
            ExpvaultError: the sender failed.
            UnavailableError: `timeout_s` passed first.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            if self._notice is None:
                self._resume()
            while not self._idle() and self._error is None and self._notice is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise UnavailableError(
                        f"{self._pending_bytes} bytes of {self._vault_name}/{self._vault_uid} "
                        f"are still unacknowledged after {timeout_s} s"
                    )
                self._cond.wait(remaining)
            self._raise_error()
            return self._committed

    def close(self, timeout_s: float | None = None) -> None:
        """Flushes, ends the Append call, and stops the threads.

        Raises:
            ExpvaultError: the sender failed and the failure was not raised before (the threads
                are stopped anyway).
        """
        try:
            with self._lock:
                reported = self._reported
            try:
                self.flush(timeout_s)
            except ExpvaultError:
                if not reported:  # raise a failure once, not again on close
                    raise
        finally:
            with self._lock:
                self._closing = True
                self._notify_all()
                if self._error is not None and self._call is not None:
                    self._call.cancel()
            self._thread.join(timeout=timeout_s)
            self._preparer.join(timeout=timeout_s)

    def _idle(self) -> bool:
        return not self._pending and not self._deferred

    def _notify_all(self) -> None:
        self._cond.notify_all()
        self._outgoing.notify_all()
        self._chunks.notify_all()

    def _raise_error(self) -> None:
        """Raises the final error, or once a failure that may pass (call holding the lock)."""
        if self._error is not None:
            self._reported = True
            raise self._error
        if self._notice is not None:
            notice, self._notice = self._notice, None
            self._paused = True  # until the next put or flush: retrying now would fail again
            raise notice

    def _resume(self) -> None:
        """Lets a sender paused by a raised notice try again (call holding the lock)."""
        if self._paused:
            self._paused = False
            self._cond.notify_all()

    def _pause(self, error: ExpvaultError) -> bool:
        """Hands a failure that may pass to the caller; waits until raised and called again.

        Returns:
            True to try again; False when the sender is closing (the failure becomes final).
        """
        with self._lock:
            logger.warning(
                "writer of %s/%s: %s; the queued steps are kept and sent again after the next call",
                self._vault_name,
                self._vault_uid,
                error.message,
            )
            self._notice = error
            self._notify_all()
            while (self._notice is not None or self._paused) and not self._closing:
                self._cond.wait()
            if not self._closing:
                return True
            reported, self._notice = self._notice is None, None
            self._fail(error)
            self._reported = self._reported or reported
            return False

    def _fail(self, error: ExpvaultError) -> None:
        """Records the sender's final error (the first one wins); call holding the lock."""
        if self._error is None:
            logger.warning("writer of %s/%s failed: %s", self._vault_name, self._vault_uid, error)
            self._error = error
        if self._call is not None:
            self._call.cancel()
        self._notify_all()

    # -- preparing thread -----------------------------------------------------------------------

    def _prepare(self) -> None:
        """Moves deltas from the device to encoded chunks, in order, until closed or failed."""
        while True:
            with self._lock:
                while not self._deferred and not self._closing and self._error is None:
                    self._outgoing.wait()
                if not self._deferred or self._error is not None:
                    return
                outgoing = self._deferred[0]  # stays counted as queued while being encoded
            try:
                arrays = outgoing.fetch()
                chunks = list(codec.append_chunks(outgoing.start, arrays, self._message_bytes))
            except Exception as e:  # a device or encoding failure: surfaces on the next call
                error = ExpvaultError(
                    f"copying steps [{outgoing.start}, {outgoing.stop}) of "
                    f"{self._vault_name}/{self._vault_uid} to the host failed: {e}"
                )
                error.__cause__ = e
                with self._lock:
                    self._fail(error)
                return
            with self._lock:
                self._deferred.popleft()
                for chunk in chunks:
                    self._pending.append(
                        Chunk(
                            self._next_seq,
                            chunk.start,
                            chunk.num_steps,
                            chunk.nbytes,
                            chunk.request,
                        )
                    )
                    self._next_seq += 1
                self._chunks.notify_all()
            del outgoing, arrays, chunks  # release the device and host copies while idle

    # -- sending thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._send()
        except Exception as e:  # a bug or a closed channel: fail loudly, never die silently
            error = UnavailableError(
                f"the writer of {self._vault_name}/{self._vault_uid} stopped: {e!r}"
            )
            error.__cause__ = e
            with self._lock:
                self._fail(error)

    def _send(self) -> None:
        """Connects, sends and reconnects until closed (everything acknowledged) or failed."""
        failover = Failover(self._order, self._reconnect_timeout_s)
        last_errors: dict[str, str] = {}  # per server, why it failed since the last open
        while True:
            connection = _Connection(failover.target)
            try:
                self._connect(connection, failover)
                return  # ended OK: the client closed and everything is acknowledged
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                cause: BaseException = rpc_error
                # A second writer refused: after a break the server may still hold our old call
                # until its accepted appends finish, and after a failover the old server's lock
                # or lease may not be released yet, so "busy" is transient once we had a stream.
                retry = is_retryable(rpc_error) or (
                    isinstance(error, StreamBusyError) and self._committed >= 0
                )
                if connection.expired and rpc_error.code() == grpc.StatusCode.CANCELLED:
                    error = UnavailableError(
                        f"{connection.target} did not open {self._vault_name}/{self._vault_uid} "
                        f"within {self._open_timeout_s} s"
                    )
                    retry = True
            except ExpvaultError as expvault_error:
                error, cause = expvault_error, expvault_error
                retry = isinstance(error, UnavailableError)
            finally:
                with self._lock:
                    connection.dead = True
                    self._call = None
                    self._chunks.notify_all()
            with self._lock:
                if self._error is not None:
                    return  # failed elsewhere (the preparing thread); this call was cancelled
            if connection.opened:
                last_errors.clear()
            last_errors[connection.target] = f"{error.code.name}: {error.message}"
            delay = failover.next_delay() if retry else None
            if delay is None:
                if retry and len(self._order) > 1:
                    reasons = "; ".join(f"{t}: {why}" for t, why in last_errors.items())
                    error = UnavailableError(
                        f"cannot write {self._vault_name}/{self._vault_uid} on any of "
                        f"{', '.join(self._order)} for {self._reconnect_timeout_s} s ({reasons})"
                    )
                elif retry:
                    error = UnavailableError(
                        f"cannot reach the server to write {self._vault_name}/{self._vault_uid} "
                        f"for {self._reconnect_timeout_s} s: {error.message}"
                    )
                error.__cause__ = cause
                if isinstance(error, _MAY_PASS):
                    if not self._pause(error):
                        return
                    failover.restart()
                    continue
                with self._lock:
                    self._fail(error)
                return
            # One warning per outage; the retries behind it at DEBUG.
            log = logger.warning if self._failures == 0 else logger.debug
            self._failures += 1
            if len(self._order) > 1:
                log(
                    "writer of %s/%s lost its stream on %s (%s: %s); trying %s in %.2f s",
                    self._vault_name,
                    self._vault_uid,
                    connection.target,
                    error.code.name,
                    error.message,
                    failover.target,
                    delay,
                )
            else:
                log(
                    "writer of %s/%s lost its stream (%s: %s); reconnecting in %.2f s",
                    self._vault_name,
                    self._vault_uid,
                    error.code.name,
                    error.message,
                    delay,
                )
            if delay <= 0:
                continue
            wake_at = time.monotonic() + delay
            with self._lock:
                while not (self._closing and self._idle()):
                    remaining = wake_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                else:
                    return

    def _append_call(self, target: str) -> Any:
        """The Append multi-callable of a server (its channel opens on first use)."""
        append = self._appends.get(target)
        if append is None:
            append = self._appends[target] = self._channel_of(target).stream_stream(
                APPEND_METHOD,
                request_serializer=codec.serialize_append_request,
                response_deserializer=vault_pb2.AppendResponse.FromString,
            )
        return append

    def _expire(self, connection: _Connection, call: grpc.Call) -> None:
        """Cancels a call whose server did not answer the open in time (a timer thread)."""
        with self._lock:
            if connection.answered or connection.dead:
                return
            connection.expired = True
        call.cancel()

    def _open(self, connection: _Connection, responses: Any) -> vault_pb2.AppendResponse:
        """Waits for the open response, at most `open_timeout_s`."""
        if self._open_timeout_s is None:
            opened: vault_pb2.AppendResponse = next(responses)
            return opened
        timer = threading.Timer(self._open_timeout_s, self._expire, (connection, responses))
        timer.daemon = True
        timer.start()
        try:
            opened = next(responses)
            return opened
        finally:
            with self._lock:
                connection.answered = True  # an answer or a failure: the timer has no say now
            timer.cancel()

    def _connect(self, connection: _Connection, failover: Failover) -> None:
        responses: Any = self._append_call(connection.target)(self._requests(connection))
        with self._lock:
            self._call = responses
        opened = self._open(connection, responses)
        failover.answered()
        names = [leaf.name for leaf in opened.structure.leaves]
        if names != self._leaf_names:
            raise StorageError(
                f"the server's leaf order {names} differs from {self._leaf_names}; reopen the vault"
            )
        with self._lock:
            if self._committed < 0 and opened.committed_offset > self._start_offset:
                # Steps this writer did not send: acking them would drop its own as duplicates.
                raise StreamBusyError(
                    f"stream {self._vault_name}/{self._vault_uid} holds "
                    f"{opened.committed_offset} steps, but this writer started from "
                    f"{self._start_offset}: another writer appended in between; open a new "
                    "RemoteVault to resume after its steps",
                    metadata={"committed_offset": str(opened.committed_offset)},
                )
            if opened.committed_offset < self._committed:
                # Acknowledged steps are missing there: resending would leave a gap or fork.
                raise StorageError(
                    f"{connection.target} holds {opened.committed_offset} steps of "
                    f"{self._vault_name}/{self._vault_uid}, but {self._committed} were "
                    "acknowledged; every server in the target list must serve the same root"
                )
            self._ack_through(opened.committed_offset)
            connection.next_seq = self._pending[0].seq if self._pending else self._next_seq
            connection.opened = True
            self._cond.notify_all()
            self._chunks.notify_all()
        logger.debug(
            "writer of %s/%s opened on %s at %d",
            self._vault_name,
            self._vault_uid,
            connection.target,
            opened.committed_offset,
        )
        if self._failures:
            logger.info(
                "writer of %s/%s reconnected%s after %d attempts; resuming from offset %d",
                self._vault_name,
                self._vault_uid,
                "" if len(self._order) == 1 else f" to {connection.target}",
                self._failures,
                opened.committed_offset,
            )
            self._failures = 0
        for ack in responses:
            with self._lock:
                if self._pending and self._pending[0].stop == ack.chunk_stop:
                    chunk = self._pending.popleft()
                    self._pending_bytes -= chunk.nbytes
                self._ack_through(ack.committed_offset)
                self._cond.notify_all()
        with self._lock:
            if not self._closing or not self._idle():
                raise UnavailableError("the server ended the Append stream early")

    def _ack_through(self, committed: int) -> None:
        """Drops the leading chunks that `committed` covers (call holding the lock)."""
        self._committed = max(self._committed, committed)
        while self._pending and self._pending[0].stop <= committed:
            chunk = self._pending.popleft()
            self._pending_bytes -= chunk.nbytes

    def _requests(self, connection: _Connection) -> Iterator[vault_pb2.AppendRequest | bytes]:
        """The request stream of one connection (consumed by a gRPC thread)."""
        yield vault_pb2.AppendRequest(
            open=vault_pb2.AppendOpen(
                vault_name=self._vault_name, vault_uid=self._vault_uid, create=True
            )
        )
        while True:
            with self._lock:
                while True:
                    if connection.dead:
                        return
                    if connection.opened:
                        first = self._pending[0].seq if self._pending else self._next_seq
                        connection.next_seq = max(connection.next_seq, first)
                        index = connection.next_seq - first
                        if index < len(self._pending):
                            chunk = self._pending[index]
                            connection.next_seq += 1
                            break
                        if self._closing and not self._deferred:
                            return  # half-close: the server acknowledges the rest and ends
                    self._chunks.wait()
            yield chunk.request
