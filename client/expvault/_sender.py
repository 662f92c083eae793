"""The background sender of `RemoteVault`: one Append stream, pipelined, resent after reconnects.

Chunks wait in `pending` until acknowledged. A connection sends them in order without waiting for
acks; the server acknowledges each chunk, in order, once durable. When the stream breaks
(server restart, network), the sender reconnects with backoff and resends every unacknowledged
chunk from its offset: the server acknowledges steps it already has without writing them again,
so nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from expvault._rpc import Backoff, error_from_rpc, is_retryable
from expvault.errors import (
    ExpvaultError,
    ResourceExhaustedError,
    StorageError,
    StreamBusyError,
    UnavailableError,
)
from expvault.v1 import vault_pb2, vault_pb2_grpc

logger = logging.getLogger(__name__)

__all__ = ["Chunk", "Sender"]


@dataclass(frozen=True)
class Chunk:
    """Steps `[start, start + num_steps)` ready for the wire (leaf bytes in wire order)."""

    seq: int
    start: int
    num_steps: int
    leaves: Sequence[bytes]

    @property
    def stop(self) -> int:
        """Stream offset one past the last step."""
        return self.start + self.num_steps

    @property
    def nbytes(self) -> int:
        """Payload bytes."""
        return sum(len(b) for b in self.leaves)


class _Connection:
    """One Append call; `dead` tells its request generator to stop."""

    def __init__(self) -> None:
        self.opened = False
        self.dead = False
        self.next_seq = 0


class Sender:
    """Sends chunks of one stream from a background thread; see the module docstring.

    Args:
        stub: the service stub (its channel has raised message limits).
        vault_name: the vault.
        vault_uid: the stream.
        leaf_names: the leaf names in wire order, checked against the server's open response.
        max_pending_bytes: unacknowledged bytes above which `put` blocks (backpressure).
        reconnect_timeout_s: how long to keep reconnecting before failing.
    """

    def __init__(
        self,
        stub: vault_pb2_grpc.VaultServiceStub,
        vault_name: str,
        vault_uid: str,
        leaf_names: Sequence[str],
        *,
        max_pending_bytes: int,
        reconnect_timeout_s: float,
    ) -> None:
        self._stub = stub
        self._vault_name = vault_name
        self._vault_uid = vault_uid
        self._leaf_names = list(leaf_names)
        self._max_pending_bytes = max_pending_bytes
        self._reconnect_timeout_s = reconnect_timeout_s
        self._cond = threading.Condition()
        self._pending: deque[Chunk] = deque()
        self._pending_bytes = 0
        self._next_seq = 0
        self._committed = -1
        self._error: ExpvaultError | None = None
        self._reported = False
        self._failures = 0  # failed connection attempts since the last open
        self._closing = False
        self._call: grpc.Call | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"expvault-sender-{vault_name}/{vault_uid}", daemon=True
        )
        self._thread.start()

    # -- caller side ----------------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """The committed offset last acknowledged by the server (-1 before the first)."""
        with self._cond:
            return self._committed

    def put(self, parts: Sequence[tuple[int, int, list[bytes]]], *, block: bool = True) -> None:
        """Queues `(start, num_steps, leaf bytes)` parts; blocks while too much is unacknowledged.

        Args:
            parts: the chunks, in stream order.
            block: wait while the queue is full; when False raise `ResourceExhaustedError`.

        Raises:
            ExpvaultError: the sender failed earlier (the error the server or transport gave).
            ResourceExhaustedError: the queue is full and not `block`.
        """
        size = sum(len(b) for _, _, leaves in parts for b in leaves)
        with self._cond:
            if not parts:
                self._raise_error()
                return
            while (
                self._error is None
                and self._pending_bytes > 0
                and self._pending_bytes + size > self._max_pending_bytes
            ):
                if not block:
                    raise ResourceExhaustedError(
                        f"{self._pending_bytes} bytes of {self._vault_name}/{self._vault_uid} are "
                        f"unacknowledged (max_pending_bytes={self._max_pending_bytes}); flush(), "
                        "write less often, or raise max_pending_bytes"
                    )
                self._cond.wait()
            self._raise_error()
            for start, num_steps, leaves in parts:
                self._pending.append(Chunk(self._next_seq, start, num_steps, leaves))
                self._next_seq += 1
            self._pending_bytes += size
            self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> int:
        """Waits until every queued chunk is acknowledged.

        Returns:
            The committed offset.

        Raises:
            ExpvaultError: the sender failed.
            UnavailableError: `timeout_s` passed first.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise UnavailableError(
                        f"{len(self._pending)} chunks of {self._vault_name}/{self._vault_uid} "
                        f"are still unacknowledged after {timeout_s} s"
                    )
                self._cond.wait(remaining)
            self._raise_error()
            return self._committed

    def close(self, timeout_s: float | None = None) -> None:
        """Flushes, ends the Append call, and stops the thread.

        Raises:
            ExpvaultError: the sender failed and the failure was not raised before (the thread
                is stopped anyway).
        """
        try:
            with self._cond:
                reported = self._reported
            try:
                self.flush(timeout_s)
            except ExpvaultError:
                if not reported:  # raise a failure once, not again on close
                    raise
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
                if self._error is not None and self._call is not None:
                    self._call.cancel()
            self._thread.join(timeout=timeout_s)

    def _raise_error(self) -> None:
        if self._error is not None:
            self._reported = True
            raise self._error

    # -- sender thread --------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(self._reconnect_timeout_s)
        while True:
            connection = _Connection()
            try:
                self._connect(connection, backoff)
                return  # ended OK: the client closed and everything is acknowledged
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                cause: BaseException = rpc_error
                # A second writer refused: after a break the server may still hold our old call
                # until its accepted appends finish, so "busy" is transient once we had a stream.
                retry = is_retryable(rpc_error) or (
                    isinstance(error, StreamBusyError) and self._committed >= 0
                )
            except ExpvaultError as expvault_error:
                error, cause = expvault_error, expvault_error
                retry = isinstance(error, UnavailableError)
            finally:
                with self._cond:
                    connection.dead = True
                    self._call = None
                    self._cond.notify_all()
            delay = backoff.next_delay() if retry else None
            if delay is None:
                if retry:
                    error = UnavailableError(
                        f"cannot reach the server to write {self._vault_name}/{self._vault_uid} "
                        f"for {self._reconnect_timeout_s} s: {error.message}"
                    )
                error.__cause__ = cause
                logger.warning(
                    "writer of %s/%s failed: %s", self._vault_name, self._vault_uid, error
                )
                with self._cond:
                    self._error = error
                    self._cond.notify_all()
                return
            # One warning per outage; the retries behind it at DEBUG.
            log = logger.warning if self._failures == 0 else logger.debug
            self._failures += 1
            log(
                "writer of %s/%s lost its stream (%s: %s); reconnecting in %.2f s",
                self._vault_name,
                self._vault_uid,
                error.code.name,
                error.message,
                delay,
            )
            wake_at = time.monotonic() + delay
            with self._cond:
                while not (self._closing and not self._pending):
                    remaining = wake_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)  # writers notify often: sleep out the delay
                else:
                    return

    def _connect(self, connection: _Connection, backoff: Backoff) -> None:
        responses = self._stub.Append(self._requests(connection))
        with self._cond:
            self._call = responses
        opened = next(responses)
        names = [leaf.name for leaf in opened.structure.leaves]
        if names != self._leaf_names:
            raise StorageError(
                f"the server's leaf order {names} differs from {self._leaf_names}; reopen the vault"
            )
        with self._cond:
            self._ack_through(opened.committed_offset)
            connection.next_seq = self._pending[0].seq if self._pending else self._next_seq
            connection.opened = True
            self._cond.notify_all()
        logger.debug(
            "writer of %s/%s opened at %d",
            self._vault_name,
            self._vault_uid,
            opened.committed_offset,
        )
        backoff.reset()
        if self._failures:
            logger.info(
                "writer of %s/%s reconnected after %d attempts; resuming from offset %d",
                self._vault_name,
                self._vault_uid,
                self._failures,
                opened.committed_offset,
            )
            self._failures = 0
        for ack in responses:
            with self._cond:
                if self._pending and self._pending[0].stop == ack.chunk_stop:
                    chunk = self._pending.popleft()
                    self._pending_bytes -= chunk.nbytes
                self._ack_through(ack.committed_offset)
                self._cond.notify_all()
        with self._cond:
            if not self._closing or self._pending:
                raise UnavailableError("the server ended the Append stream early")

    def _ack_through(self, committed: int) -> None:
        """Drops the leading chunks that `committed` covers (call holding the lock)."""
        self._committed = max(self._committed, committed)
        while self._pending and self._pending[0].stop <= committed:
            chunk = self._pending.popleft()
            self._pending_bytes -= chunk.nbytes

    def _requests(self, connection: _Connection) -> Iterator[vault_pb2.AppendRequest]:
        """The request stream of one connection (consumed by a gRPC thread)."""
        yield vault_pb2.AppendRequest(
            open=vault_pb2.AppendOpen(
                vault_name=self._vault_name, vault_uid=self._vault_uid, create=True
            )
        )
        while True:
            with self._cond:
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
                        if self._closing:
                            return  # half-close: the server acknowledges the rest and ends
                    self._cond.wait()
            yield vault_pb2.AppendRequest(
                chunk=vault_pb2.AppendChunk(
                    start=chunk.start, num_steps=chunk.num_steps, leaves=chunk.leaves
                )
            )
