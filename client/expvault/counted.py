"""A step counter in the buffer state, for exact detection of steps the ring overwrote unsent.

flashbax's buffer state only knows its ring position (`current_index`, `is_full`), so a writer
cannot tell "nothing new" from "exactly one more lap of the ring". `counted(buffer)` returns the
same buffer whose state also carries `steps_added`, the number of time steps ever added::

    buffer = counted(fbx.make_trajectory_buffer(...))   # or make_flat_buffer, make_item_buffer
    state = buffer.init(timestep)
    add = jax.jit(buffer.add, donate_argnums=0)          # also fine under lax.scan and vmap
    state = add(state, batch)
    steps_added_of(state)                                # an int, read from the device

The counter is an int32 scalar array that wraps modulo 2**32 (as uint32): writers compare two
readings modulo 2**32, which is exact while fewer than 2**31 steps pass between two writes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flashbax.buffers.trajectory_buffer import TrajectoryBufferState

from expvault.errors import InvalidArgumentError

if TYPE_CHECKING:  # chex's dataclass is opaque to mypy; the standard one has its semantics.
    from dataclasses import dataclass
else:
    from chex import dataclass

__all__ = ["CountedBufferState", "counted", "steps_added_of"]

_COUNTER_MASK = (1 << 32) - 1


@dataclass(frozen=True)
class CountedBufferState(TrajectoryBufferState):  # type: ignore[misc]
    """A flashbax `TrajectoryBufferState` that also counts the time steps ever added.

    flashbax's `add`, `sample` and `can_sample` accept it as they accept their own state (its
    `add` updates states with `state.replace`, which keeps this class and this field).

    Attributes:
        steps_added: int32 scalar array, time steps ever added, modulo 2**32. One time step is
            one position of the ring (`B` rows of experience).
    """

    steps_added: jax.Array


def _time_steps(experience: Any, batch: Any) -> int:
    """Time steps one `add` of `batch` writes into a state whose experience is `experience`.

    Derived from static shapes only, the same way for every flashbax variant: the inner
    trajectory `add` writes `t` ring positions of `B` rows, so a leaf of the (possibly
    reshaped or expanded) batch holds `B * t * prod(step_shape)` elements.
    """
    for stored, added in zip(
        jax.tree_util.tree_leaves(experience), jax.tree_util.tree_leaves(batch), strict=False
    ):
        per_step = int(stored.shape[0]) * math.prod(int(d) for d in stored.shape[2:])
        if per_step == 0:
            continue
        total = math.prod(int(d) for d in np.shape(added))
        if total % per_step:
            raise InvalidArgumentError(
                f"an added leaf of shape {np.shape(added)} is not a whole number of time steps "
                f"of the buffer's leaf {tuple(stored.shape)}"
            )
        return total // per_step
    raise InvalidArgumentError(
        "every experience leaf has zero elements per step, so added steps cannot be counted: "
        "give the experience one non-empty leaf"
    )


def counted(buffer: Any) -> Any:
    """Wraps a flashbax buffer so its state counts the time steps ever added.

    Works for the `TrajectoryBuffer` of `make_trajectory_buffer` (an add of `(B, t, ...)` counts
    `t`), `make_flat_buffer` (each add counts the ring positions it writes: 1 without
    sequences) and `make_item_buffer` (one ring row: an add of `k` items counts `k`). Prioritised
    buffers, whose state has more fields, are not supported.

    Args:
        buffer: a flashbax `TrajectoryBuffer` (its `init`, `add`, `sample`, `can_sample`).

    Returns:
        The same kind of buffer: `init` returns a `CountedBufferState` with `steps_added` 0, and
        `add` bumps it by the added time steps; `sample` and `can_sample` are unchanged. All are
        pure and work under `jax.jit` (donation included), `jax.lax.scan` and `jax.vmap`.

    Raises:
        InvalidArgumentError: from `init`, when the buffer's state is not a plain
            `TrajectoryBufferState` (already counted, or prioritised); from `add`, when the
            state was not made by this buffer's `init`.
    """
    inner_init = buffer.init
    inner_add = buffer.add

    def init(experience: Any) -> CountedBufferState:
        state = inner_init(experience)
        if type(state) is not TrajectoryBufferState:
            raise InvalidArgumentError(
                f"counted() wraps buffers whose state is a plain TrajectoryBufferState; this "
                f"buffer's is {type(state).__name__} (already counted, or prioritised)"
            )
        return CountedBufferState(
            experience=state.experience,
            current_index=state.current_index,
            is_full=state.is_full,
            steps_added=jnp.zeros((), jnp.int32),
        )

    def add(state: CountedBufferState, batch: Any) -> CountedBufferState:
        if not isinstance(state, CountedBufferState):
            raise InvalidArgumentError(
                f"a counted buffer adds to a CountedBufferState, got {type(state).__name__}: "
                "make the state with the counted buffer's init"
            )
        new_state = inner_add(state, batch)
        steps = _time_steps(state.experience, batch)
        # int32 addition wraps modulo 2**32, which readers take into account.
        bumped = state.steps_added + jnp.asarray(steps, jnp.int32)
        result: CountedBufferState = new_state.replace(steps_added=bumped)
        return result

    return buffer.replace(init=init, add=add)


def steps_added_of(state: Any) -> int | None:
    """Returns the time steps a buffer state ever received, modulo 2**32, or None.

    Args:
        state: a buffer state of one buffer; `CountedBufferState` or a plain flashbax state.

    Returns:
        `steps_added` as a non-negative int below 2**32 (read from the device), or None when the
        state carries no counter.

    Raises:
        InvalidArgumentError: the counter is batched, e.g. the state of `vmap`ped buffers.
    """
    counter = getattr(state, "steps_added", None)
    if counter is None:
        return None
    value = np.asarray(jax.device_get(counter))
    if value.ndim != 0:
        raise InvalidArgumentError(
            f"steps_added has shape {value.shape}: pass the state of one buffer (index a "
            "vmapped state first, e.g. jax.tree.map(lambda x: x[i], state))"
        )
    return int(value) & _COUNTER_MASK
