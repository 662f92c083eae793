"""Which steps of a ring buffer are new since the last write, and getting only those off the device.

A flashbax trajectory buffer state holds `experience` (pytree, leaves `(B, T, ...)`, `T` the ring
length in time steps), `current_index` (the ring position the next step goes to) and `is_full`. A
writer keeps a `Cursor` (where it stopped); `plan_delta` turns the cursor and a newer state's
position into a `Delta` (the ring intervals holding the new steps, in time order) and the next
cursor, or raises `DataLossError` when the ring overwrote steps before they were sent.
`start_transfer` then gathers exactly those steps on the device and starts their copy to the
host, one transfer, without waiting (`gather_delta` waits for it).

Counting is exact when the state carries a step counter (`expvault.counted.counted` adds one);
with plain flashbax states it falls back to flashbax's index arithmetic, whose limits are spelled
out in `plan_delta`.

Intended use by a writer (what `expvault.Vault.write` does)::

    delta, next_cursor = plan_state(cursor, state, allow_loss=resync_pending)
    transfer = start_transfer(state.experience, delta)  # dispatched; the state may be donated
    send(transfer.result(), start=delta.start)  # host numpy, (B, delta.n, ...) per leaf
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
    "Layout",
    "RingPosition",
    "Transfer",
    "delta_for_interval",
    "delta_nbytes",
    "gather_delta",
    "plan_delta",
    "plan_state",
    "read_position",
    "ring_length_of",
    "split_transfer",
    "start_transfer",
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


def read_position(state: Any, layout: Layout | None = None) -> RingPosition:
    """Reads a buffer state's position: a few scalars, copied from the device side by side.

    Waits for the computation that produced the state (the ring position depends on it).

    Args:
        state: a flashbax `TrajectoryBufferState` (or a `counted` one) of one buffer.
        layout: `Layout.of(state.experience)` when the caller keeps it between writes.

    Returns:
        The state's position.

    Raises:
        InvalidArgumentError: the state is batched (e.g. vmapped) or malformed.
    """
    counter = getattr(state, "steps_added", None)
    values = (state.current_index, state.is_full, counter)
    if layout is None or not layout.on_host_memory:
        for value in values:
            if isinstance(value, jax.Array):
                value.copy_to_host_async()  # the copies overlap; np.asarray then waits for each
    # Far cheaper than jax.device_get on a tuple (2 us against 40 us on CPU).
    scalars: list[Any] = [None if value is None else np.asarray(value) for value in values]
    for value, name in zip(scalars, ("current_index", "is_full", "steps_added"), strict=True):
        if value is not None and np.ndim(value) != 0:
            raise InvalidArgumentError(
                f"the state's {name} has shape {np.shape(value)}: pass the state of one buffer "
                "(index a vmapped state first, e.g. jax.tree.map(lambda x: x[i], state))"
            )
    return RingPosition(
        current_index=int(scalars[0]),
        is_full=bool(scalars[1]),
        ring_length=ring_length_of(state.experience) if layout is None else layout.ring_length,
        steps_added=None if scalars[2] is None else int(scalars[2]) % _COUNTER_MODULUS,
    )


def plan_state(
    cursor: Cursor, state: Any, *, allow_loss: bool = False, layout: Layout | None = None
) -> tuple[Delta, Cursor]:
    """`plan_delta` for a buffer state: reads its position and plans the new steps.

    Args:
        cursor: where the writer stopped.
        state: a flashbax `TrajectoryBufferState` of one buffer, counted or not.
        allow_loss: see `plan_delta`.
        layout: `Layout.of(state.experience)` when the caller keeps it between writes.

    Returns:
        `(delta, next_cursor)`, as `plan_delta`.

    Raises:
        DataLossError: see `plan_delta`.
        InvalidArgumentError: see `plan_delta` and `read_position`.
    """
    position = read_position(state, layout)
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


@dataclass(frozen=True)
class Layout:
    """The leaves of one experience structure as deltas move them; computed once, reused.

    Attributes:
        ring_length: `T`, the leaves' time axis, in steps.
        leaf_shapes: each leaf's `(B, T, ...)`, in `jax.tree` leaf order.
        dtypes: each leaf's host dtype (little-endian), in `jax.tree` leaf order.
        order: leaf indices in the order their bytes lie in a transfer: widest dtype first, so
            every leaf starts at a multiple of its own itemsize (all are powers of two) and host
            views are aligned without padding.
        on_host_memory: every leaf lives in host memory (numpy, or jax arrays on one CPU
            device), so "copying to the host" needs no transfer.
        host_viewable: per leaf, whether numpy can view it in place (numpy, or a CPU jax array
            of a dtype DLPack and numpy share; not bfloat16 or float8).
    """

    ring_length: int
    leaf_shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[Any], ...]
    order: tuple[int, ...]
    on_host_memory: bool
    host_viewable: tuple[bool, ...]

    @classmethod
    def of(cls, experience: Any) -> Layout:
        """The layout of an experience pytree, leaves `(B, T, ...)`.

        Reads the leaves' shapes, dtypes and devices only.

        Raises:
            InvalidArgumentError: no leaves, a leaf with fewer than two axes, differing `T`, or
                a sub-byte dtype.
        """
        leaves = jax.tree_util.tree_leaves(experience)
        ring = ring_length_of(leaves)
        dtypes = tuple(_host_dtype(leaf.dtype) for leaf in leaves)
        order = tuple(sorted(range(len(dtypes)), key=lambda i: -dtypes[i].itemsize))
        in_host = [_in_host_memory(leaf) for leaf in leaves]
        return cls(
            ring_length=ring,
            leaf_shapes=tuple(tuple(int(d) for d in np.shape(leaf)) for leaf in leaves),
            dtypes=dtypes,
            order=order,
            on_host_memory=all(in_host),
            host_viewable=tuple(
                here and (isinstance(leaf, np.ndarray) or dtype.kind in "biufc")
                for here, leaf, dtype in zip(in_host, leaves, dtypes, strict=True)
            ),
        )

    def shapes(self, n: int) -> list[tuple[int, ...]]:
        """Each leaf's shape `(B, n, ...)` for a delta of `n` steps, in `jax.tree` leaf order."""
        return [(s[0], n, *s[2:]) for s in self.leaf_shapes]

    def leaf_nbytes(self, n: int) -> list[int]:
        """Bytes of `n` steps of each leaf, in `jax.tree` leaf order."""
        return [math.prod(s) * d.itemsize for s, d in zip(self.shapes(n), self.dtypes, strict=True)]

    def nbytes(self, n: int) -> int:
        """Bytes of `n` steps of every leaf."""
        return sum(self.leaf_nbytes(n))

    def split(self, flat: HostArray, n: int) -> list[HostArray]:
        """Splits the flat bytes of a transfer of `n` steps into per-leaf views (no copy).

        Returns:
            One read-only view of `flat` per leaf, `(B, n, ...)`, in `jax.tree` leaf order.

        Raises:
            InvalidArgumentError: `flat` is not exactly that many uint8 bytes.
        """
        sizes = self.leaf_nbytes(n)
        if flat.dtype != np.uint8 or flat.ndim != 1 or flat.nbytes != sum(sizes):
            raise InvalidArgumentError(
                f"expected {sum(sizes)} flat uint8 bytes for {n} steps, got {flat.dtype} "
                f"{flat.shape}"
            )
        shapes = self.shapes(n)
        out: list[HostArray | None] = [None] * len(sizes)
        offset = 0
        for i in self.order:
            out[i] = flat[offset : offset + sizes[i]].view(self.dtypes[i]).reshape(shapes[i])
            offset += sizes[i]
        return [array for array in out if array is not None]


def _in_host_memory(leaf: Any) -> bool:
    if isinstance(leaf, np.ndarray):
        return True
    devices = getattr(leaf, "devices", None)
    if devices is None:
        return False
    found = devices()
    return len(found) == 1 and next(iter(found)).platform == "cpu"


def delta_nbytes(experience: Any, n: int) -> int:
    """Bytes of `n` steps of every leaf of `experience` (leaves `(B, T, ...)`)."""
    return Layout.of(experience).nbytes(n)


def _to_bytes(x: jax.Array) -> jax.Array:
    """The little-endian bytes of `x`, flat, as uint8."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    elif jnp.issubdtype(x.dtype, jnp.complexfloating):
        # A complex is its real then its imaginary part in memory.
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1)


def _take_steps(leaf: jax.Array, lo: jax.Array, n: int) -> jax.Array:
    """Steps `lo, lo + 1, ... (mod T)` of a leaf `(B, T, ...)`: `(B, n, ...)`."""
    ring = leaf.shape[1]
    positions = (lo + jnp.arange(n, dtype=jnp.int32)) % ring
    # In bounds by construction (lo is checked to lie in [0, T) before the call).
    return leaf.at[:, positions].get(mode="promise_in_bounds", unique_indices=True)


@functools.partial(jax.jit, static_argnames=("n", "order"))
def _gather_bytes(leaves: list[jax.Array], lo: jax.Array, *, n: int, order: tuple[int, ...]) -> Any:
    # `n` is static (it fixes the output shape); `lo` is traced, so writes of the same size
    # starting anywhere in the ring reuse one compiled function. jit caches one per leaf
    # shapes/dtypes, `n` and `order`.
    return jnp.concatenate([_to_bytes(_take_steps(leaves[i], lo, n)) for i in order])


@functools.partial(jax.jit, static_argnames=("n",))
def _gather_leaves(leaves: list[jax.Array], lo: jax.Array, *, n: int) -> list[jax.Array]:
    # Leaves in host memory numpy cannot view: no transfer to save, so no packing into bytes.
    return [_take_steps(leaf, lo, n) for leaf in leaves]


class Transfer:
    """The steps of a delta gathered on the device, on their way to the host (`start_transfer`).

    Once created, it no longer reads the buffer state: JAX runs a later computation that donates
    the state (`jax.jit(buffer.add, donate_argnums=0)`) after the pending gather.

    Attributes:
        num_steps: `n`, the delta's number of time steps.
        nbytes: bytes of the delta, all leaves (exactly what reaches the host).
    """

    def __init__(
        self,
        layout: Layout,
        num_steps: int,
        *,
        flat: jax.Array | None = None,
        leaves: Sequence[Any] = (),
    ) -> None:
        self.layout = layout
        self.num_steps = num_steps
        self.nbytes = layout.nbytes(num_steps)
        self._flat = flat
        self._leaves = list(leaves)

    def result(self) -> list[HostArray]:
        """Waits for the steps to reach the host and returns them.

        Returns:
            One array per leaf, `(B, n, ...)`, little-endian, in `jax.tree` leaf order. From an
            accelerator they are read-only views of one host buffer (one transfer); from host
            memory (CPU devices, numpy) they are the copied steps themselves.
        """
        if self._flat is not None:
            # device_get blocks until the bytes are on the host (one transfer, started at once).
            flat = np.asarray(jax.device_get(self._flat))
            return self.layout.split(flat, self.num_steps)
        if self._leaves:
            return [
                np.asarray(leaf).astype(dtype, copy=False)
                for leaf, dtype in zip(self._leaves, self.layout.dtypes, strict=True)
            ]
        return [
            np.zeros(s, d) for s, d in zip(self.layout.shapes(0), self.layout.dtypes, strict=True)
        ]


def start_transfer(experience: Any, delta: Delta, layout: Layout | None = None) -> Transfer:
    """Gathers the delta's steps on the device and starts their copy to the host; no waiting.

    Accelerator leaves are gathered into one flat byte array by a jitted gather (ring positions
    taken modulo `T`, so a delta that wraps is one gather), dispatched without waiting, and its
    copy to the host starts at once: one transfer per write. Leaves already in host memory (CPU
    devices, numpy) are copied out of the ring by numpy (XLA for dtypes numpy lacks), as they
    need no transfer. In every case only the delta's steps are copied, never the whole ring, and
    the state may be donated as soon as this returns: JAX runs a computation donating the state
    after the pending gather.

    Args:
        experience: pytree, leaves `(B, T, ...)`: jax arrays, or all numpy arrays.
        delta: the steps to gather (from `plan_delta` or `delta_for_interval`).
        layout: `Layout.of(experience)`, when the caller keeps it between writes.

    Returns:
        The transfer; `result()` returns the host arrays.

    Raises:
        InvalidArgumentError: pieces outside the ring, or a sub-byte dtype.
    """
    leaves = jax.tree_util.tree_leaves(experience)
    layout = layout or Layout.of(leaves)
    lo = _check_pieces(delta, layout.ring_length)
    n = delta.n
    if n == 0:
        return Transfer(layout, 0)
    if not layout.on_host_memory:
        flat = _gather_bytes(list(leaves), np.int32(lo), n=n, order=layout.order)
        flat.copy_to_host_async()
        return Transfer(layout, n, flat=flat)
    # In host memory: numpy copies the steps out of an in-place view of the ring (measured 0.03
    # against 0.16 ms for XLA on CPU), and the view is gone before the caller can donate the state.
    ring = layout.ring_length
    arrays: list[Any] = []
    for leaf, viewable in zip(leaves, layout.host_viewable, strict=True):
        if not viewable:
            arrays.append(None)
            continue
        if not isinstance(leaf, np.ndarray):
            leaf.block_until_ready()  # DLPack hands over memory, not the pending write to it
            leaf = np.from_dlpack(leaf)
        if lo + n <= ring:
            arrays.append(leaf[:, lo : lo + n].copy())
        else:
            arrays.append(np.take(leaf, (lo + np.arange(n)) % ring, axis=1))
    rest = [i for i, array in enumerate(arrays) if array is None]
    if rest:  # dtypes numpy cannot view through DLPack (bfloat16, float8): XLA gathers them
        gathered = _gather_leaves([leaves[i] for i in rest], np.int32(lo), n=n)
        for i, array in zip(rest, gathered, strict=True):
            arrays[i] = array
    return Transfer(layout, n, leaves=arrays)


def transfer_delta(experience: Any, delta: Delta) -> HostArray:
    """Gathers the delta's steps on the device and copies them to the host in one transfer.

    Args:
        experience: pytree of device arrays, leaves `(B, T, ...)`.
        delta: the steps to gather (from `plan_delta` or `delta_for_interval`).

    Returns:
        One flat uint8 host array: the little-endian, C-order bytes of every leaf's `(B, n, ...)`
        slice, widest dtype first (see `split_transfer`). Its `nbytes` is exactly
        `delta_nbytes(experience, delta.n)`. The transfer has completed when this returns.

    Raises:
        InvalidArgumentError: pieces outside the ring, or a sub-byte dtype.
    """
    leaves = jax.tree_util.tree_leaves(experience)
    layout = Layout.of(leaves)
    lo = _check_pieces(delta, layout.ring_length)
    if delta.n == 0:
        return np.zeros(0, np.uint8)
    flat = _gather_bytes(list(leaves), np.int32(lo), n=delta.n, order=layout.order)
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
    return Layout.of(experience).split(flat, n)


def gather_delta(experience: Any, delta: Delta) -> list[HostArray]:
    """Returns the delta's steps of every leaf as host numpy arrays (`start_transfer`, waited).

    The result is on the host when this returns, and the state may be donated right after
    (`jax.jit(buffer.add, donate_argnums=0)`).

    Args:
        experience: pytree, leaves `(B, T, ...)`: all numpy arrays, or jax arrays.
        delta: the steps to gather.

    Returns:
        One array per leaf, `(B, delta.n, ...)`, little-endian, in `jax.tree` leaf order.

    Raises:
        InvalidArgumentError: pieces outside the ring, or a sub-byte dtype.
    """
    return start_transfer(experience, delta).result()
