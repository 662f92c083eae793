"""What `VaultReader` hands a learner: followed steps with a resumable position, prefetched samples.

`Follow` wraps the generator behind `VaultReader.follow` and keeps, per stream, the offset after
the last steps it yielded: save `follow.positions` with the learner's checkpoint and pass it back
as `follow(positions=...)` to continue exactly where it stopped. `SampleIterator` draws batches on
background threads (a few calls in flight, delivered in order) and keeps a few ready; it stops
when closed, when its reader closes, or when it is garbage (e.g. after `break`ing out of a loop
over it).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

import grpc
import jax

from expvault.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

__all__ = ["Follow", "Followed", "Prefetch", "SampleIterator", "check_positions"]

T = TypeVar("T")


class Followed(NamedTuple):
    """Steps `[start, start + num_steps)` of one stream, as `VaultReader.follow` yields them.

    Attributes:
        vault_uid: the stream.
        start: stream offset of the first step.
        experience: the experience pytree, numpy leaves `(B, num_steps, ...)` (None for leaves
            not read).
    """

    vault_uid: str
    start: int
    experience: Any

    @property
    def num_steps(self) -> int:
        """Number of time steps (0 when no leaf was read)."""
        leaves = jax.tree_util.tree_leaves(self.experience)
        return int(leaves[0].shape[1]) if leaves else 0

    @property
    def stop(self) -> int:
        """Stream offset one past the last step: where this stream continues."""
        return self.start + self.num_steps


def check_positions(positions: Mapping[str, int] | None) -> dict[str, int]:
    """Validates saved follow positions (`{vault_uid: offset}`) and returns a copy.

    Raises:
        InvalidArgumentError: a position that is not an int >= 0, or an empty stream name.
    """
    checked: dict[str, int] = {}
    for uid, offset in (positions or {}).items():
        if not isinstance(uid, str) or not uid:
            raise InvalidArgumentError(f"positions keys must be stream names, got {uid!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgumentError(
                f"positions[{uid!r}] must be a step offset >= 0, got {offset!r}"
            )
        checked[uid] = offset
    return checked


class Follow(Iterator[Followed]):
    """An endless iterator over committed steps (`VaultReader.follow`) that knows where it is.

    Iterate it (`for item in follow:`), and stop it with `close()` or a `with` block. The
    position after everything it yielded is `positions`.

    Args:
        run: starts the underlying generator; it updates the dict it is given, per stream, to
            the offset after each item before yielding the item.
        positions: where to start, per stream (already checked).
    """

    def __init__(
        self,
        run: Callable[[dict[str, int]], Iterator[Followed]],
        positions: dict[str, int],
    ) -> None:
        self._positions = positions
        self._items = run(positions)

    @property
    def positions(self) -> dict[str, int]:
        """Per stream, the offset after the last steps yielded: `{vault_uid: offset}`.

        Plain ints, ready for a checkpoint (e.g. JSON). Streams not yielded yet are absent: a
        resumed follow starts them at its `start`. Passing this to `follow(positions=...)`
        continues with the next step of every stream, none repeated or skipped.
        """
        return dict(self._positions)

    def __iter__(self) -> Follow:
        return self

    def __next__(self) -> Followed:
        return next(self._items)

    def close(self) -> None:
        """Ends the follow call (idempotent).

        Call it from the thread that iterates; to stop a follow iterating on another thread,
        close its `VaultReader` (the iteration then raises).
        """
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Follow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Failure(NamedTuple):
    error: BaseException


_STOPPED = object()


class Prefetch:
    """What the prefetching threads share with their iterator: the batches, the calls in flight.

    Draws are numbered (tickets) in the order the iterator hands them out; with several threads
    drawing at once, a batch that comes back early waits for those before it. At most
    `capacity + workers` batches are drawn ahead of the iterator (ready or in flight), one in
    flight per thread. It never refers to the iterator, so an abandoned iterator is collected
    and its finalizer stops the threads.
    """

    def __init__(self, capacity: int, workers: int = 1) -> None:
        self._cond = threading.Condition()
        self._ready: deque[Any] = deque()
        self._early: dict[int, Any] = {}  # batches back before those of lower tickets
        self._capacity = capacity
        self._workers = workers
        self._issued = 0  # tickets handed to drawing threads
        self._consumed = 0  # batches handed to the iterator
        self._calls: dict[int, grpc.Call] = {}  # by drawing thread
        self._failed = False  # a draw failed: no new tickets
        self.stopped = False

    def track(self, call: grpc.Call | None) -> None:
        """Remembers this thread's call in flight so `stop` can cancel it (None: none)."""
        me = threading.get_ident()
        with self._cond:
            if call is None:
                self._calls.pop(me, None)
                return
            self._calls[me] = call
            if self.stopped:
                call.cancel()

    def take(self) -> int | None:
        """Waits until another batch may be drawn; its ticket, or None once stopped or failed."""
        with self._cond:
            while (
                self._issued - self._consumed >= self._capacity + self._workers
                and not self.stopped
                and not self._failed
            ):
                self._cond.wait()
            if self.stopped or self._failed:
                return None
            self._issued += 1
            return self._issued - 1

    def put(self, ticket: int, item: Any) -> None:
        """Adds the batch of `ticket` (or its failure), after those of lower tickets."""
        with self._cond:
            if self.stopped:
                return
            self._failed = self._failed or isinstance(item, _Failure)
            self._early[ticket] = item
            while self._consumed + len(self._ready) in self._early:
                self._ready.append(self._early.pop(self._consumed + len(self._ready)))
            self._cond.notify_all()

    def get(self) -> Any:
        """Waits for the next batch; `_STOPPED` once stopped."""
        with self._cond:
            while not self._ready and not self.stopped:
                self._cond.wait()
            if self.stopped:
                return _STOPPED
            item = self._ready.popleft()
            self._consumed += 1
            self._cond.notify_all()
            return item

    def stop(self) -> None:
        """Stops the threads and wakes a waiting `get` (idempotent).

        Cancels the calls in flight and drops the batches drawn.
        """
        with self._cond:
            self.stopped = True
            self._ready.clear()
            self._early.clear()
            for call in self._calls.values():
                call.cancel()
            self._cond.notify_all()


def _produce(state: Prefetch, draw: Callable[[Prefetch, int], Any]) -> None:
    """A prefetching thread: draws batches until stopped; a failure ends the drawing."""
    while (ticket := state.take()) is not None:
        try:
            item = draw(state, ticket)
        except BaseException as error:
            if state.stopped:
                return  # cancelled by stop(): not a failure
            item = _Failure(error)
        state.put(ticket, item)


class SampleIterator(Generic[T]):
    """Batches drawn on background threads: `prefetch` kept ready besides the draws in flight.

    Created by `VaultReader.sample_iter`. Endless: stop it with `close()`, a `with` block, or by
    closing its reader; an iterator left behind (`break` out of a `for` loop) stops once it is
    garbage. Batches come in the order they were drawn, whichever call returns first. A failure
    of a draw (e.g. the server stayed away) is raised by `next()`, after the batches drawn
    before it.

    Args:
        draw: draws batch number `ticket` (0, 1, ...); gets the prefetch state to report its
            call in flight.
        prefetch: batches kept ready (>= 1).
        name: the threads' name.
        workers: draws in flight at once (>= 1), each on a thread of its own.
    """

    def __init__(
        self,
        draw: Callable[[Prefetch, int], T],
        *,
        prefetch: int,
        name: str,
        workers: int = 1,
    ) -> None:
        for what, value in (("prefetch", prefetch), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{what} must be an int >= 1, got {value!r}")
        self._state = Prefetch(prefetch, workers)
        self._closed = False
        self._threads = [
            threading.Thread(target=_produce, args=(self._state, draw), name=name, daemon=True)
            for _ in range(workers)
        ]
        self._finalizer = weakref.finalize(self, self._state.stop)
        for thread in self._threads:
            thread.start()

    def __iter__(self) -> SampleIterator[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        item = self._state.get()
        if item is _STOPPED:
            self._closed = True
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        result: T = item
        return result

    def close(self, timeout_s: float | None = 10.0) -> None:
        """Stops the background threads and drops the batches they drew (idempotent).

        Args:
            timeout_s: how long to wait for each thread to end.
        """
        self._closed = True
        self._finalizer()
        for thread in self._threads:
            thread.join(timeout_s)

    def __enter__(self) -> SampleIterator[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
