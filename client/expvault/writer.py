"""The actor side of a write: which steps of a buffer state are new and where they go in a stream.

`expvault.Vault` and `expvault.RemoteVault` share this: both turn flashbax's
`write(state, source_interval=(0, 0), dest_start=None)` into `(stream offset, host arrays)`.
`plan_transfer` only reads the ring position (a few scalars) and dispatches the gather of the new
steps on the device, so a background thread can wait for the host copy; `plan` waits for it.
What does not change between writes (the structure check, the leaf order, the layout) is worked
out once per experience structure.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from expvault import delta as deltas
from expvault.errors import DataLossError, InvalidArgumentError, SchemaMismatchError
from expvault.schema import Schema

logger = logging.getLogger(__name__)

__all__ = ["DeltaWriter", "Planned", "PlannedTransfer"]

HostArray = np.ndarray[Any, Any]

# Structures a writer remembers; a writer sees one, a few when its buffer is rebuilt.
_MAX_STRUCTURES = 8


@dataclasses.dataclass(frozen=True)
class Planned:
    """A planned append: steps `[start, start + n)` of the stream, and the cursor after it."""

    start: int
    arrays: list[HostArray]
    cursor: deltas.Cursor

    @property
    def num_steps(self) -> int:
        """Number of time steps."""
        return int(self.arrays[0].shape[1])


@dataclasses.dataclass(frozen=True)
class PlannedTransfer:
    """A planned append whose steps are still on their way to the host.

    Attributes:
        start: stream offset of the first step.
        cursor: the writer's cursor once the append is accepted.
        transfer: the gathered steps (`expvault.delta.Transfer`).
        to_schema: for each schema leaf, the index of the state's leaf (in `jax.tree` order).
    """

    start: int
    cursor: deltas.Cursor
    transfer: deltas.Transfer
    to_schema: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        """Number of time steps."""
        return self.transfer.num_steps

    @property
    def nbytes(self) -> int:
        """Bytes of the steps, all leaves."""
        return self.transfer.nbytes

    def result(self) -> list[HostArray]:
        """Waits for the host copy; returns one array `(B, n, ...)` per leaf in schema order."""
        arrays = self.transfer.result()
        return [arrays[i] for i in self.to_schema]


@dataclasses.dataclass(frozen=True)
class _Structure:
    """What a writer keeps per experience structure: checked once, reused by every write."""

    layout: deltas.Layout
    to_schema: tuple[int, ...]


class DeltaWriter:
    """Remembers where a writer stopped in its buffer and plans the next append.

    Stream offsets continue from the writer's previous append; the first one starts at the
    stream's committed length (flashbax's `vault_index`), unless `dest_start` says otherwise.

    Args:
        schema: the stream's schema; arrays are returned in its leaf order.
    """

    def __init__(self, schema: Schema) -> None:
        self._schema = schema
        self._cursor = deltas.Cursor()
        self._resync = False
        self._structures: dict[Any, _Structure] = {}
        self.next_offset: int | None = None

    def plan(
        self,
        state: Any,
        source_interval: tuple[int, int] = (0, 0),
        dest_start: int | None = None,
        *,
        committed: int,
    ) -> Planned | None:
        """Plans the append of a buffer state's new steps without moving the writer.

        The steps are on the host when this returns. Arguments, errors: see `plan_transfer`.

        Returns:
            The plan, or None when there is nothing new.
        """
        planned = self.plan_transfer(state, source_interval, dest_start, committed=committed)
        if planned is None:
            return None
        return Planned(planned.start, planned.result(), planned.cursor)

    def plan_transfer(
        self,
        state: Any,
        source_interval: tuple[int, int] = (0, 0),
        dest_start: int | None = None,
        *,
        committed: int,
    ) -> PlannedTransfer | None:
        """Plans the append of a buffer state's new steps and starts their copy to the host.

        Reads the ring position (a few scalars, one small transfer) and dispatches the gather
        of the new steps; does not wait for them. The state may be donated once this returns.
        Does not move the writer: call `advance` once the append is accepted.

        Args:
            state: a flashbax `TrajectoryBufferState` (or `counted` state): `experience` leaves
                `(B, T, ...)`, `current_index`, `is_full`.
            source_interval: `(0, 0)` for the steps added since the last write; otherwise the
                ring interval `[a, b)` to store (wrapping when `b < a`), as in flashbax.
            dest_start: the stream offset of the first step; default: right after the
                writer's previous append (at first, the committed length).
            committed: the stream's committed length, where a new writer starts.

        Returns:
            The plan, or None when there is nothing new.

        Raises:
            DataLossError: the ring overwrote steps before they were written; nothing is planned
                and the next call plans the steps still in the ring.
            SchemaMismatchError: the state's experience does not match the vault.
            InvalidArgumentError: a bad interval, destination or state.
        """
        experience = getattr(state, "experience", None)
        if experience is None:
            raise InvalidArgumentError(
                "write() takes a flashbax buffer state with `experience`, `current_index` and "
                f"`is_full`, got {type(state).__name__}"
            )
        interval = _check_interval(source_interval)
        leaves, treedef = jax.tree_util.tree_flatten(experience)
        structure = self._structure(leaves, treedef)
        layout = structure.layout
        # Count the cursor in stream offsets, so a DataLossError names the offsets the lost
        # steps would have had in this stream.
        offset = committed if self.next_offset is None else self.next_offset
        here = dataclasses.replace(self._cursor, steps=offset)
        if interval == (0, 0):
            try:
                delta, cursor = deltas.plan_state(
                    here, state, allow_loss=self._resync, layout=layout
                )
            except DataLossError:
                self._resync = True
                raise
            if delta.lost:
                logger.warning(
                    "skipping %d steps the ring overwrote before they were written", delta.lost
                )
        else:
            delta = deltas.delta_for_interval(here, interval, ring_length=layout.ring_length)
            # As flashbax: after an explicit write the whole state counts as received.
            _, cursor = deltas.plan_state(here, state, allow_loss=True, layout=layout)
        if delta.n == 0:
            self._cursor = cursor
            return None
        if dest_start is not None and (isinstance(dest_start, bool) or int(dest_start) < 0):
            raise InvalidArgumentError(f"dest_start must be an offset >= 0, got {dest_start!r}")
        start = int(dest_start) if dest_start is not None else offset
        transfer = deltas.start_transfer(leaves, delta, layout)
        return PlannedTransfer(start, cursor, transfer, structure.to_schema)

    def advance(self, planned: Planned | PlannedTransfer | None) -> None:
        """Moves the writer past a plan once its append is accepted."""
        if planned is not None:
            self._cursor = planned.cursor
            self.next_offset = planned.start + planned.num_steps
            self._resync = False

    def _structure(self, leaves: list[Any], treedef: Any) -> _Structure:
        """Checks B, leaf names, dtypes and step shapes before anything leaves the device.

        The outcome depends only on the tree structure and the leaves' shapes, dtypes and
        placement, so it is worked out once per structure (the check costs more than the rest
        of a write's planning).
        """
        key = (
            treedef,
            tuple((leaf.shape, leaf.dtype, getattr(leaf, "sharding", None)) for leaf in leaves),
        )
        found = self._structures.get(key)
        if found is not None:
            return found
        experience = jax.tree_util.tree_unflatten(treedef, leaves)
        got = Schema.from_experience(experience)
        mismatch = self._schema.describe_mismatch(got)
        if mismatch:
            raise SchemaMismatchError(f"the buffer state does not match the vault: {mismatch}")
        indices = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
        structure = _Structure(
            layout=deltas.Layout.of(leaves),
            to_schema=tuple(int(i) for i in self._schema.flatten(indices)),
        )
        if len(self._structures) >= _MAX_STRUCTURES:
            self._structures.clear()
        self._structures[key] = structure
        return structure


def _check_interval(source_interval: Any) -> tuple[int, int]:
    """Returns flashbax's `source_interval` as two ints; refuses (never truncates) others."""
    try:
        a, b = source_interval
    except (TypeError, ValueError):
        a = b = None
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (a, b)):
        raise InvalidArgumentError(
            f"source_interval must be a pair of ring positions (a, b), got {source_interval!r}"
        )
    return int(a), int(b)
