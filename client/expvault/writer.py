"""The actor side of a write: which steps of a buffer state are new and where they go in a stream.

`expvault.Vault` and `expvault.RemoteVault` share this: both turn flashbax's
`write(state, source_interval=(0, 0), dest_start=None)` into `(stream offset, host arrays)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from expvault import delta as deltas
from expvault.errors import DataLossError, InvalidArgumentError, SchemaMismatchError
from expvault.schema import Schema

logger = logging.getLogger(__name__)

__all__ = ["DeltaWriter", "Planned"]


@dataclass(frozen=True)
class Planned:
    """A planned append: steps `[start, start + n)` of the stream, and the cursor after it."""

    start: int
    arrays: list[np.ndarray[Any, Any]]
    cursor: deltas.Cursor

    @property
    def num_steps(self) -> int:
        """Number of time steps."""
        return int(self.arrays[0].shape[1])


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
        leaves, treedef = jax.tree_util.tree_flatten(experience)
        self._check_structure(leaves, treedef)
        if tuple(source_interval) == (0, 0):
            try:
                delta, cursor = deltas.plan_state(self._cursor, state, allow_loss=self._resync)
            except DataLossError:
                self._resync = True
                raise
            if delta.lost:
                logger.warning(
                    "skipping %d steps the ring overwrote before they were written", delta.lost
                )
        else:
            ring = deltas.ring_length_of(experience)
            delta = deltas.delta_for_interval(self._cursor, source_interval, ring_length=ring)
            # As flashbax: after an explicit write the whole state counts as received.
            _, cursor = deltas.plan_state(self._cursor, state, allow_loss=True)
        if delta.n == 0:
            self._cursor = cursor
            return None
        if dest_start is not None and (isinstance(dest_start, bool) or int(dest_start) < 0):
            raise InvalidArgumentError(f"dest_start must be an offset >= 0, got {dest_start!r}")
        start = (
            int(dest_start)
            if dest_start is not None
            else committed
            if self.next_offset is None
            else self.next_offset
        )
        gathered = deltas.gather_delta(experience, delta)
        arrays = self._schema.flatten(jax.tree_util.tree_unflatten(treedef, gathered))
        return Planned(start, arrays, cursor)

    def advance(self, planned: Planned | None) -> None:
        """Moves the writer past a plan once its append is accepted."""
        if planned is not None:
            self._cursor = planned.cursor
            self.next_offset = planned.start + planned.num_steps
            self._resync = False

    def take(
        self,
        state: Any,
        source_interval: tuple[int, int] = (0, 0),
        dest_start: int | None = None,
        *,
        committed: int,
    ) -> tuple[int, list[np.ndarray[Any, Any]]] | None:
        """Plans and advances at once, for writers that retry failed appends themselves.

        Returns:
            `(stream offset, arrays in schema order)`, or None when there is nothing new.
        """
        planned = self.plan(state, source_interval, dest_start, committed=committed)
        self.advance(planned)
        return None if planned is None else (planned.start, planned.arrays)

    def _check_structure(self, leaves: list[Any], treedef: Any) -> None:
        """Checks B, leaf names, dtypes and step shapes before anything leaves the device."""
        got = Schema.from_experience(jax.tree_util.tree_unflatten(treedef, leaves))
        mismatch = self._schema.describe_mismatch(got)
        if mismatch:
            raise SchemaMismatchError(f"the buffer state does not match the vault: {mismatch}")
