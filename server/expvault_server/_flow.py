"""asyncio plumbing of the servicer: byte budgets, storage futures, commit watches, leases."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections import deque
from collections.abc import Collection

from expvault.errors import StreamBusyError
from expvault.storage import Stream

logger = logging.getLogger(__name__)

__all__ = ["ByteBudget", "CommitWatch", "Holding", "WriterLeases", "bridge"]


class ByteBudget:
    """Bytes in flight, bounded: `acquire` waits while taking `n` would pass `limit_bytes`.

    A request larger than the whole limit is admitted when nothing else is in flight, so one
    oversize (but allowed) message cannot deadlock a call. `peak_bytes` is the most ever taken.

    Args:
        limit_bytes: the bound.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _fits(self, n: int) -> bool:
        return self.used_bytes == 0 or self.used_bytes + n <= self.limit_bytes

    async def acquire(self, n: int) -> None:
        """Waits until `n` bytes fit, then takes them."""
        while not self._fits(n):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def try_acquire(self, n: int) -> bool:
        """Takes `n` bytes if they fit now (and nobody waits before); never waits."""
        if self._waiters or not self._fits(n):
            return False
        self.used_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return True

    def release(self, n: int) -> None:
        """Gives `n` bytes back and wakes the waiters (call from the event loop)."""
        self.used_bytes -= n
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class Holding:
    """The bytes one call holds of a shared `ByteBudget`; `close` gives back what is left.

    A call takes bytes as it reads data and gives them back as it hands the data on; whatever
    it still holds when it ends (queued, read ahead, cancelled) goes back at `close`. With
    `limit_bytes`, the call holds at most that much (one request larger than it is admitted when
    the call holds nothing), so a call whose client stops reading keeps its share, not the
    whole budget: other calls go on.

    Args:
        budget: the budget shared by every call.
        limit_bytes: the most this call may hold; None for no bound of its own.
    """

    def __init__(self, budget: ByteBudget, limit_bytes: int | None = None) -> None:
        self._budget = budget
        self._own = None if limit_bytes is None else ByteBudget(limit_bytes)
        self.held_bytes = 0
        self._closed = False

    async def acquire(self, n: int) -> None:
        """Waits until `n` bytes fit in this call's share and in the budget, then holds them.

        Raises:
            asyncio.CancelledError: the holding was closed (its call ended) meanwhile.
        """
        if self._own is not None:
            await self._own.acquire(n)
        try:
            await self._budget.acquire(n)
        except BaseException:
            if self._own is not None:
                self._own.release(n)
            raise
        self.held_bytes += n
        if self._closed:
            self.release(n)
            raise asyncio.CancelledError

    def try_acquire(self, n: int) -> bool:
        """Holds `n` bytes if they fit now; never waits (False once closed)."""
        if self._closed:
            return False
        if self._own is not None and not self._own.try_acquire(n):
            return False
        if not self._budget.try_acquire(n):
            if self._own is not None:
                self._own.release(n)
            return False
        self.held_bytes += n
        return True

    def release(self, n: int) -> None:
        """Gives back `n` of the held bytes (fewer if fewer are held)."""
        n = min(n, self.held_bytes)
        if n > 0:
            self.held_bytes -= n
            self._budget.release(n)
            if self._own is not None:
                self._own.release(n)

    def close(self) -> None:
        """Gives back every byte still held; later requests are refused."""
        self._closed = True
        self.release(self.held_bytes)


def bridge(
    future: concurrent.futures.Future[int], loop: asyncio.AbstractEventLoop
) -> asyncio.Future[int]:
    """An asyncio future that follows a storage future.

    Unlike `asyncio.wrap_future`, cancelling the result never cancels the storage future: an
    append the storage accepted always completes, whoever stopped waiting for it.
    """
    result: asyncio.Future[int] = loop.create_future()

    def copy(done: concurrent.futures.Future[int]) -> None:
        if result.done():
            return
        error = done.exception()
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(done.result())

    def on_done(done: concurrent.futures.Future[int]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(copy, done)

    future.add_done_callback(on_done)
    return result


class CommitWatch:
    """Wakes an asyncio task when a stream commits new steps (no polling).

    Use as a context manager; subscribe before reading `stream.length` so no commit is missed.
    """

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._unsubscribe = stream.on_commit(self._on_commit)

    def _on_commit(self, _length: int) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self._loop.call_soon_threadsafe(self._event.set)

    def wake(self) -> None:
        """Wakes the waiter without a commit (shutdown); call from the event loop."""
        self._event.set()

    async def wait_past(self, offset: int) -> None:
        """Returns once the committed length exceeds `offset`, or `wake` was called."""
        self._event.clear()
        if self._stream.length <= offset:
            # Set by a commit after the clear above, or by `wake` (the caller checks why).
            await self._event.wait()

    def close(self) -> None:
        """Unsubscribes."""
        self._unsubscribe()

    def __enter__(self) -> CommitWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriterLeases:
    """One Append call per stream at a time, held until its accepted appends completed."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], object] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def claim(self, vault_name: str, vault_uid: str) -> object:
        """Takes the lease of a stream.

        Returns:
            A token to pass to `release`.

        Raises:
            StreamBusyError: another Append call holds it.
        """
        key = (vault_name, vault_uid)
        if key in self._held:
            raise StreamBusyError(
                f"stream {vault_name}/{vault_uid} has a writer already; a stream has one writer "
                "at a time (close the other writer, or use another vault_uid)"
            )
        token = object()
        self._held[key] = token
        return token

    def writers_of(self, vault_name: str) -> list[str]:
        """The uids of the streams of a vault that have a writer now."""
        return sorted(uid for name, uid in self._held if name == vault_name)

    def release(
        self,
        vault_name: str,
        vault_uid: str,
        token: object,
        after: Collection[asyncio.Future[int]],
    ) -> None:
        """Releases a lease once the futures in `after` are done (at once when none are pending).

        Waiting for them keeps the committed offset a new writer is told from moving under it.
        """
        key = (vault_name, vault_uid)
        pending = [f for f in after if not f.done()]

        def drop() -> None:
            if self._held.get(key) is token:
                del self._held[key]

        if not pending:
            drop()
            return

        async def later() -> None:
            try:
                await asyncio.wait(pending)
            finally:
                drop()

        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
