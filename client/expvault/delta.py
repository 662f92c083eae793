"""Which steps of a ring buffer are new since the last write, and getting only those off the device.

A flashbax trajectory buffer state holds `experience` (pytree, leaves `(B, T, ...)`, `T` the ring
length in time steps), `current_index` (the ring position the next step goes to) and `is_full`. A
writer keeps a `Cursor` (where it stopped); `plan_delta` turns the cursor and a newer state's
position into a `Delta` (the ring intervals holding the new steps, in time order) and the next
cursor, or raises `DataLossError` when the ring overwrote steps before they were sent.
`gather_delta` then copies exactly those steps to the host in one device-to-host transfer.

Counting is exact when the state carries a step counter (`expvault.counted.counted` adds one);
with plain flashbax states it falls back to flashbax's index arithmetic, whose limits are spelled
out in `plan_delta`.

Intended use by a writer (what `expvault.Vault.write` does)::

    delta, next_cursor = plan_state(cursor, state, allow_loss=resync_pending)
    arrays = gather_delta(state.experience, delta)   # host numpy, (B, delta.n, ...) per leaf
    send(arrays, start=delta.start)
    cursor, resync_pending = next_cursor, False

When `plan_state` raises `DataLossError` nothing was sent and the cursor is unchanged; the writer
sets `resync_pending = True` and re-raises. The caller catches it, logs the lost range
(`e.lost_start`, `e.lost_stop`) and calls `write(state)` again, which sends the steps still in the
ring, starting `delta.lost` steps past the old cursor.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from expvault.errors import DataLossError, InvalidArgumentError

__all__ = [
    "Cursor",
    "Delta",
    "RingPosition",
    "delta_for_interval",
    "delta_nbytes",
    "gather_delta",
    "plan_delta",
    "plan_state",
    "read_position",
    "ring_length_of",
    "split_transfer",
    "transfer_delta",
]

# The step counter is an int32 that wraps; differences are taken modulo 2**32.
_COUNTER_MODULUS = 1 << 32
_COUNTER_HALF = 1 << 31

HostArray = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Cursor:
    """Where a writer stopped in a buffer: every step before `steps` has been sent.

    `Cursor()` is the cursor of a writer that has sent nothing yet.

    Attributes:
        steps: steps the buffer had received when last written, counted since the writer started
            (equivalently the stream offset of the next step to send).
        index: ring position of the next unsent step (`steps % T` when the buffer started empty).
        full: the buffer's `is_full` as last seen.
        counted: the buffer's own `steps_added` counter as last seen (modulo 2**32), when the
            state carries one; None otherwise.
    """

    steps: int = 0
    index: int = 0
    full: bool = False
    counted: int | None = None


@dataclass(frozen=True)
class Delta:
    """The new steps of a buffer: where they go in the stream and where they lie in the ring.

    Attributes:
        start: stream offset (steps since the writer started) of the first step of the delta.
        pieces: ring intervals `[lo, hi)` to gather, in time order: none when there is nothing
            new, two when the new steps wrap around the end of the ring.
        lost: steps overwritten before they were sent and skipped by this delta (only non-zero
            when planned with `allow_loss=True`); the lost range is `[start - lost, start)`.
    """

    start: int
    pieces: tuple[tuple[int, int], ...] = ()
    lost: int = 0

    @property
    def n(self) -> int:
        """Number of time steps in the delta."""
        return sum(hi - lo for lo, hi in self.pieces)

    @property
    def stop(self) -> int:
        """Stream offset one past the last step of the delta."""
        return self.start + self.n


class RingPosition(NamedTuple):
    """Where a buffer state stands, read from the device in one transfer.

    Attributes:
        current_index: ring position the next added step will be written to, in `[0, T)`.
        is_full: whether the ring has wrapped at least once.
        ring_length: `T`, the length of the experience leaves' time axis.
        steps_added: the exact number of steps ever added (modulo 2**32), or None for states
            without a step counter.
    """

    current_index: int
    is_full: bool
    ring_length: int
    steps_added: int | None


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be an int, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        try:
            return int(np.asarray(value).item())
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"{what} must be an int, got {value!r}") from e


def _check_ring(ring_length: int) -> int:
    ring = _as_int(ring_length, "ring_length")
    if ring < 1:
        raise InvalidArgumentError(
            f"ring_length (the buffer's time axis T) must be >= 1, got {ring}"
        )
    return ring


def _check_position(value: Any, ring: int, what: str) -> int:
    index = _as_int(value, what)
    if not 0 <= index < ring:
        raise InvalidArgumentError(
            f"{what} {index} is outside the ring [0, {ring}): pass the state of a buffer whose "
            f"time axis has length {ring}"
        )
    return index


def _ring_pieces(lo: int, n: int, ring: int) -> tuple[tuple[int, int], ...]:
    """The ring intervals of `n` consecutive steps starting at ring position `lo`."""
    if n == 0:
        return ()
    if lo + n <= ring:
        return ((lo, lo + n),)
    return ((lo, ring), (0, lo + n - ring))


def _data_loss(start: int, lost: int, ring: int, *, exact: bool) -> DataLossError:
    stop = start + lost
    bound = ""
    if not exact:
        bound = (
            " (at least: without a step counter only a lower bound is known; wrap the buffer "
            "with expvault.counted.counted for exact detection)"
        )
    return DataLossError(
        f"the buffer overwrote {lost} unsent steps, stream offsets [{start}, {stop}){bound}, "
        f"before they were written: its ring holds {ring} steps, so write at least every {ring} "
        "steps (or use a longer buffer). Nothing was sent; writing again continues from the "
        "oldest step still in the ring.",
        lost_start=start,
        lost_stop=stop,
    )


def plan_delta(
    cursor: Cursor,
    *,
    current_index: int,
    is_full: bool,
    ring_length: int,
    steps_added: int | None = None,
    allow_loss: bool = False,
) -> tuple[Delta, Cursor]:
    """Plans the write of the steps a buffer received since `cursor`.

    With `steps_added` (the exact count of steps the buffer ever received, as carried by a
    `counted` buffer), the number of new steps is `steps_added - cursor.counted` (0 for a fresh
    cursor), exact whatever happened in between; the counter may wrap modulo 2**32, which is
    handled as long as fewer than 2**31 steps pass between two writes.

    Without it (plain flashbax states) the count comes from the ring positions alone, like
    flashbax's Vault, and has these limits:

    - was not full, is full: at least `(T - cursor.index) + current_index` steps were added; the
      excess over `T` is reported as lost. Every further wrap of the ring is invisible, so the
      loss is a lower bound and may go unnoticed once the buffer received `2T` or more steps.
    - was full, is full: `(current_index - cursor.index) mod T` steps were added. A whole number
      of wraps (exactly `T`, `2T`, ... new steps) is indistinguishable from no step at all: it
      is reported as nothing new and those steps are skipped without an error.

    Unlike flashbax's Vault, a fresh cursor and a full buffer at `current_index == 0` plan the
    whole ring `[0, T)` (flashbax wrote nothing), and a fresh cursor and a full buffer at
    `current_index = c > 0` report the (at least) `c` lost steps.

    Args:
        cursor: where the writer stopped; `Cursor()` for a writer that has sent nothing.
        current_index: the state's `current_index`, in `[0, T)`.
        is_full: the state's `is_full`.
        ring_length: `T`, the length of the experience leaves' time axis, in steps.
        steps_added: the state's step counter (see `expvault.counted.steps_added_of`), or None.
        allow_loss: instead of raising `DataLossError`, return the delta of the steps still in
            the ring (the oldest surviving one first) with `start` past the lost steps. Use it to
            continue after a `DataLossError` was raised and reported.

    Returns:
        `(delta, next_cursor)`: the steps to send, and the cursor to keep once they are sent.

    Raises:
        DataLossError: the ring overwrote unsent steps; `lost_start`/`lost_stop` name them in
            stream offsets. Raised before anything is planned, so nothing need be undone.
        InvalidArgumentError: positions outside the ring, or a state older than the one the
            cursor last saw (the buffer went backwards), or one that does not continue it.
    """
    ring = _check_ring(ring_length)
    index = _check_position(current_index, ring, "current_index")
    full = bool(is_full)
    _check_position(cursor.index, ring, "cursor.index")
    counter = None if steps_added is None else _as_int(steps_added, "steps_added")
    if counter is not None and counter < 0:
        raise InvalidArgumentError(f"steps_added must be >= 0, got {counter}")
    # A counter is only comparable with a counter seen before (or with 0 for a fresh writer);
    # a writer that saw plain states before uses the ring positions once more.
    if counter is not None and (cursor.counted is not None or cursor == Cursor()):
        return _plan_counted(cursor, index, full, ring, counter, allow_loss)
    return _plan_positions(cursor, index, full, ring, counter, allow_loss)


def _plan_counted(
    cursor: Cursor, index: int, full: bool, ring: int, counter: int, allow_loss: bool
) -> tuple[Delta, Cursor]:
    new = (counter - (cursor.counted or 0)) % _COUNTER_MODULUS
    if cursor.counted is not None and new >= _COUNTER_HALF:
        raise InvalidArgumentError(
            f"the state's steps_added ({counter}) is behind the one last written "
            f"({cursor.counted}): the buffer went backwards; pass a newer state"
        )
    next_cursor = Cursor(cursor.steps + new, index, full, counter % _COUNTER_MODULUS)
    if new > ring:
        lost = new - ring
        if not allow_loss:
            raise _data_loss(cursor.steps, lost, ring, exact=True)
        return Delta(cursor.steps + lost, _ring_pieces(index, ring, ring), lost), next_cursor
    if (cursor.index + new) % ring != index:
        raise InvalidArgumentError(
            f"the state's current_index {index} is not where {new} new steps after ring "
            f"position {cursor.index} end ({(cursor.index + new) % ring}): the state does not "
            "continue the one last written (another buffer, or a changed step counter)"
        )
    return Delta(cursor.steps, _ring_pieces(cursor.index, new, ring)), next_cursor


def _plan_positions(
    cursor: Cursor, index: int, full: bool, ring: int, counter: int | None, allow_loss: bool
) -> tuple[Delta, Cursor]:
    if cursor.full and not full:
        raise InvalidArgumentError(
            "the buffer was full when last written and is not full now: the buffer went "
            "backwards (or this is another buffer); pass a newer state"
        )
    if not full:
        new = index - cursor.index
        if new < 0:
            raise InvalidArgumentError(
                f"current_index {index} is behind the last written position {cursor.index}: "
                "the buffer went backwards; pass a newer state"
            )
    elif not cursor.full:
        # The ring filled since the last write: at least the rest of the first lap plus the
        # start of the next one arrived; any further laps are invisible here.
        new = ring - cursor.index + index
    else:
        # Whole laps are invisible here: exactly T steps looks like none (see the docstring).
        new = (index - cursor.index) % ring
    next_cursor = Cursor(
        cursor.steps + new,
        index,
        full,
        None if counter is None else counter % _COUNTER_MODULUS,
    )
    if new > ring:
        lost = new - ring
        if not allow_loss:
            raise _data_loss(cursor.steps, lost, ring, exact=False)
        return Delta(cursor.steps + lost, _ring_pieces(index, ring, ring), lost), next_cursor
    return Delta(cursor.steps, _ring_pieces(cursor.index, new, ring)), next_cursor


def delta_for_interval(
    cursor: Cursor, source_interval: tuple[int, int], *, ring_length: int
) -> Delta:
    """The delta of an explicit ring interval, flashbax's `source_interval=(a, b)`.

    `[a, b)` is read in ring order and wraps around the end of the ring when `b < a`:
    `(a, b)` then means `[a, T)` followed by `[0, b)`. `a == b` is empty. `(0, 0)` is not an
    interval: in flashbax it means "what is new", which `plan_delta` plans.

    The cursor is only used for `start` (`cursor.steps`) and is not advanced: flashbax's Vault
    marks the whole state as received after an explicit write; to do the same, keep the cursor
    of `plan_delta(cursor, ..., allow_loss=True)` for that state.

    Args:
        cursor: the writer's cursor; its `steps` becomes the delta's `start`.
        source_interval: `(a, b)` ring positions with `0 <= a, b <= T`.
        ring_length: `T`, the length of the experience leaves' time axis, in steps.

    Returns:
        The delta, with 0, 1 or 2 pieces.

    Raises:
        InvalidArgumentError: `(0, 0)`, or a bound outside `[0, T]`.
    """
    ring = _check_ring(ring_length)
    try:
        a_raw, b_raw = source_interval
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"source_interval must be a pair (a, b) of ring positions, got {source_interval!r}"
        ) from e
    a = _as_int(a_raw, "source_interval[0]")
    b = _as_int(b_raw, "source_interval[1]")
    if (a, b) == (0, 0):
        raise InvalidArgumentError(
            "source_interval (0, 0) means 'the new steps': plan it with plan_delta"
        )
    if not (0 <= a <= ring and 0 <= b <= ring):
        raise InvalidArgumentError(
            f"source_interval {(a, b)} must lie within the ring: use 0 <= a, b <= {ring} "
            f"(the buffer's time axis); b < a wraps around the end"
        )
    pieces: tuple[tuple[int, int], ...]
    if a <= b:
        pieces = ((a, b),) if a < b else ()
    else:
        pieces = tuple(p for p in ((a, ring), (0, b)) if p[0] < p[1])
    return Delta(cursor.steps, pieces)


def ring_length_of(experience: Any) -> int:
    """Returns `T`, the common time axis length of the experience leaves `(B, T, ...)`.

    Raises:
        InvalidArgumentError: no leaves, a leaf with fewer than two axes, or differing `T`.
    """
    leaves = jax.tree_util.tree_leaves(experience)
    if not leaves:
        raise InvalidArgumentError("the experience has no leaves")
    lengths = set()
    for leaf in leaves:
        shape = tuple(np.shape(leaf))
        if len(shape) < 2:
            raise InvalidArgumentError(
                f"an experience leaf has shape {shape}; buffer leaves are shaped (B, T, ...) "
                "(index a vmapped state down to one buffer first)"
            )
        lengths.add(int(shape[1]))
    if len(lengths) != 1:
        raise InvalidArgumentError(f"experience leaves disagree on the time axis T: {lengths}")
    return lengths.pop()


def read_position(state: Any) -> RingPosition:
    """Reads a buffer state's position with one small device-to-host transfer.

    Args:
        state: a flashbax `TrajectoryBufferState` (or a `counted` one) of one buffer.

    Returns:
        The state's position.

    Raises:
        InvalidArgumentError: the state is batched (e.g. vmapped) or malformed.
    """
    counter = getattr(state, "steps_added", None)
    scalars = jax.device_get((state.current_index, state.is_full, counter))
    for value, name in zip(scalars, ("current_index", "is_full", "steps_added"), strict=True):
        if value is not None and np.ndim(value) != 0:
            raise InvalidArgumentError(
                f"the state's {name} has shape {np.shape(value)}: pass the state of one buffer "
                "(index a vmapped state first, e.g. jax.tree.map(lambda x: x[i], state))"
            )
    return RingPosition(
        current_index=int(scalars[0]),
        is_full=bool(scalars[1]),
        ring_length=ring_length_of(state.experience),
        steps_added=None if scalars[2] is None else int(scalars[2]) % _COUNTER_MODULUS,
    )


def plan_state(cursor: Cursor, state: Any, *, allow_loss: bool = False) -> tuple[Delta, Cursor]:
    """`plan_delta` for a buffer state: reads its position and plans the new steps.

    Args:
        cursor: where the writer stopped.
        state: a flashbax `TrajectoryBufferState` of one buffer, counted or not.
        allow_loss: see `plan_delta`.

    Returns:
        `(delta, next_cursor)`, as `plan_delta`.

    Raises:
        DataLossError: see `plan_delta`.
        InvalidArgumentError: see `plan_delta` and `read_position`.
    """
    position = read_position(state)
    return plan_delta(
        cursor,
        current_index=position.current_index,
        is_full=position.is_full,
        ring_length=position.ring_length,
        steps_added=position.steps_added,
        allow_loss=allow_loss,
    )


# ---------------------------------------------------------------------------------------------
# Gathering


def _check_pieces(delta: Delta, ring: int) -> int:
    """Checks the pieces are consecutive ring intervals and returns the first ring position."""
    pieces = delta.pieces
    if len(pieces) > 2 or any(not 0 <= lo < hi <= ring for lo, hi in pieces):
        raise InvalidArgumentError(
            f"delta pieces {pieces} are not 1 or 2 non-empty intervals within the ring [0, {ring})"
        )
    if len(pieces) == 2 and (pieces[0][1] != ring or pieces[1][0] != 0):
        raise InvalidArgumentError(
            f"delta pieces {pieces} do not wrap around the ring end: expected (lo, {ring}), (0, hi)"
        )
    return pieces[0][0] if pieces else 0


def _host_dtype(dtype: Any) -> np.dtype[Any]:
    host: np.dtype[Any] = np.dtype(dtype)
    if jax.dtypes.itemsize_bits(host) < 8:
        raise InvalidArgumentError(
            f"dtype {host} packs several values per byte and cannot be gathered; store it as int8"
        )
    if host.byteorder == ">":
        host = host.newbyteorder("<")
    return host


def _layout(leaves: Sequence[Any], n: int) -> tuple[list[np.dtype[Any]], list[tuple[int, ...]]]:
    dtypes = [_host_dtype(leaf.dtype) for leaf in leaves]
    shapes = [(int(leaf.shape[0]), n, *map(int, leaf.shape[2:])) for leaf in leaves]
    return dtypes, shapes


def _transfer_order(dtypes: Sequence[np.dtype[Any]]) -> tuple[int, ...]:
    # Widest items first: every itemsize is a power of two, so each leaf then starts at a
    # multiple of its own itemsize and the host views are aligned without any padding.
    return tuple(sorted(range(len(dtypes)), key=lambda i: -dtypes[i].itemsize))


def delta_nbytes(experience: Any, n: int) -> int:
    """Bytes of `n` steps of every leaf of `experience` (leaves `(B, T, ...)`)."""
    leaves = jax.tree_util.tree_leaves(experience)
    dtypes, shapes = _layout(leaves, n)
    return sum(math.prod(s) * d.itemsize for d, s in zip(dtypes, shapes, strict=True))


def _to_bytes(x: jax.Array) -> jax.Array:
    """The little-endian bytes of `x`, flat, as uint8."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    elif jnp.issubdtype(x.dtype, jnp.complexfloating):
        # A complex is its real then its imaginary part in memory.
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1)


@functools.partial(jax.jit, static_argnames=("n", "order"))
def _gather_bytes(leaves: list[jax.Array], lo: jax.Array, *, n: int, order: tuple[int, ...]) -> Any:
    # `n` is static (it fixes the output shape); `lo` is traced, so writes of the same size
    # starting anywhere in the ring reuse one compiled function. jit caches one per leaf
    # shapes/dtypes, `n` and `order`.
    ring = leaves[0].shape[1]
    positions = (lo + jnp.arange(n, dtype=jnp.int32)) % ring
    parts = [
        _to_bytes(jnp.take(leaves[i], positions, axis=1, mode="clip", unique_indices=True))
        for i in order
    ]
    return jnp.concatenate(parts)


def transfer_delta(experience: Any, delta: Delta) -> HostArray:
    """Gathers the delta's steps on the device and copies them to the host in one transfer.

    Args:
        experience: pytree of device arrays, leaves `(B, T, ...)`.
        delta: the steps to gather (from `plan_delta` or `delta_for_interval`).

    Returns:
        One flat uint8 host array: the little-endian, C-order bytes of every leaf's `(B, n, ...)`
        slice, widest dtype first (see `split_transfer`). Its `nbytes` is exactly
        `delta_nbytes(experience, delta.n)`. The transfer has completed when this returns, so
        the caller may donate the state right away.

    Raises:
        InvalidArgumentError: pieces outside the ring, or a sub-byte dtype.
    """
    leaves = jax.tree_util.tree_leaves(experience)
    ring = ring_length_of(experience)
    lo = _check_pieces(delta, ring)
    dtypes, _ = _layout(leaves, delta.n)
    if delta.n == 0:
        return np.zeros(0, np.uint8)
    flat = _gather_bytes(list(leaves), np.int32(lo), n=delta.n, order=_transfer_order(dtypes))
    # device_get blocks until the bytes are on the host: nothing still reads the state after.
    return np.asarray(jax.device_get(flat))


def split_transfer(flat: HostArray, experience: Any, n: int) -> list[HostArray]:
    """Splits the bytes of `transfer_delta` into per-leaf arrays, without copying.

    Args:
        flat: the uint8 array `transfer_delta(experience, delta)` returned.
        experience: the same experience pytree (only leaf shapes and dtypes are used).
        n: `delta.n`.

    Returns:
        One read-only view of `flat` per leaf, `(B, n, ...)`, in `jax.tree` leaf order.

    Raises:
        InvalidArgumentError: `flat` does not hold exactly those leaves.
    """
    leaves = jax.tree_util.tree_leaves(experience)
    dtypes, shapes = _layout(leaves, n)
    sizes = [math.prod(s) * d.itemsize for d, s in zip(dtypes, shapes, strict=True)]
    if flat.dtype != np.uint8 or flat.ndim != 1 or flat.nbytes != sum(sizes):
        raise InvalidArgumentError(
            f"expected {sum(sizes)} flat uint8 bytes for {n} steps, got {flat.dtype} {flat.shape}"
        )
    out: list[HostArray | None] = [None] * len(leaves)
    offset = 0
    for i in _transfer_order(dtypes):
        out[i] = flat[offset : offset + sizes[i]].view(dtypes[i]).reshape(shapes[i])
        offset += sizes[i]
    return [array for array in out if array is not None]


def gather_delta(experience: Any, delta: Delta) -> list[HostArray]:
    """Returns the delta's steps of every leaf as host numpy arrays.

    Device arrays are gathered on the device and moved in one transfer (`transfer_delta`); the
    result is on the host when this returns, so the caller may donate the state right after
    (`jax.jit(buffer.add, donate_argnums=0)`). Host (numpy) experience is sliced on the host.

    Args:
        experience: pytree, leaves `(B, T, ...)`: all numpy arrays, or jax arrays.
        delta: the steps to gather.

    Returns:
        One array per leaf, `(B, delta.n, ...)`, little-endian, in `jax.tree` leaf order. For
        device input they are read-only views of one host buffer.

    Raises:
        InvalidArgumentError: pieces outside the ring, or a sub-byte dtype.
    """
    leaves = jax.tree_util.tree_leaves(experience)
    if leaves and all(isinstance(leaf, np.ndarray) for leaf in leaves):
        ring = ring_length_of(experience)
        lo = _check_pieces(delta, ring)
        positions = (lo + np.arange(delta.n)) % ring
        return [
            np.take(leaf, positions, axis=1).astype(_host_dtype(leaf.dtype), copy=False)
            for leaf in leaves
        ]
    return split_transfer(transfer_delta(experience, delta), experience, delta.n)
