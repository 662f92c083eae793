"""What `VaultReader` hands a learner: followed steps with a resumable position, prefetched samples.

`Follow` wraps the generator behind `VaultReader.follow` and keeps, per stream, the offset after
the last steps it yielded: save `follow.positions` with the learner's checkpoint and pass it back
as `follow(positions=...)` to continue exactly where it stopped. `SampleIterator` draws batches on
a background thread and keeps a few ready; it stops when closed, when its reader closes, or when
it is garbage (e.g. after `break`ing out of a loop over it).
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
    """What a prefetching thread shares with its iterator: the ready batches, the call in flight.

    It never refers to the iterator, so an abandoned iterator is collected and its finalizer
    stops the thread.
    """

    def __init__(self, capacity: int) -> None:
        self._cond = threading.Condition()
        self._ready: deque[Any] = deque()
        self._capacity = capacity
        self._call: grpc.Call | None = None
        self.stopped = False

    def track(self, call: grpc.Call | None) -> None:
        """Remembers the call in flight so `stop` can cancel it (None: no call in flight)."""
        with self._cond:
            self._call = call
            if call is not None and self.stopped:
                call.cancel()

    def put(self, item: Any) -> bool:
        """Waits for room and adds a batch; False once stopped."""
        with self._cond:
            while len(self._ready) >= self._capacity and not self.stopped:
                self._cond.wait()
            if self.stopped:
                return False
            self._ready.append(item)
            self._cond.notify_all()
            return True

    def get(self) -> Any:
        """Waits for the next batch; `_STOPPED` once stopped."""
        with self._cond:
            while not self._ready and not self.stopped:
                self._cond.wait()
            if self.stopped:
                return _STOPPED
            item = self._ready.popleft()
            self._cond.notify_all()
            return item

    def stop(self) -> None:
        """Stops the thread and wakes a waiting `get` (idempotent).

        Cancels the call in flight and drops the ready batches.
        """
        with self._cond:
            self.stopped = True
            self._ready.clear()
            if self._call is not None:
                self._call.cancel()
            self._cond.notify_all()


def _produce(state: Prefetch, draw: Callable[[Prefetch], Any]) -> None:
    """The prefetching thread: draws batches until stopped; a failure ends it."""
    while not state.stopped:
        try:
            item = draw(state)
        except BaseException as error:
            if state.stopped:
                return  # cancelled by stop(): not a failure
            item = _Failure(error)
        if not state.put(item) or isinstance(item, _Failure):
            return


class SampleIterator(Generic[T]):
    """Batches drawn on a background thread, up to `prefetch` of them kept ready.

    Created by `VaultReader.sample_iter`. Endless: stop it with `close()`, a `with` block, or by
    closing its reader; an iterator left behind (`break` out of a `for` loop) stops once it is
    garbage. A failure of a draw (e.g. the server stayed away) is raised by `next()`, after the
    batches drawn before it.

    Args:
        draw: draws one batch; gets the prefetch state to report its call in flight.
        prefetch: batches kept ready (>= 1).
        name: the thread's name.
    """

    def __init__(self, draw: Callable[[Prefetch], T], *, prefetch: int, name: str) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise InvalidArgumentError(f"prefetch must be an int >= 1, got {prefetch!r}")
        self._state = Prefetch(prefetch)
        self._closed = False
        self._thread = threading.Thread(
            target=_produce, args=(self._state, draw), name=name, daemon=True
        )
        self._finalizer = weakref.finalize(self, self._state.stop)
        self._thread.start()

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
        """Stops the background thread and drops the batches it prepared (idempotent).

        Args:
            timeout_s: how long to wait for the thread to end.
        """
        self._closed = True
        self._finalizer()
        self._thread.join(timeout_s)

    def __enter__(self) -> SampleIterator[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
