"""counted(): a step counter in flashbax buffer states, under jit, scan and vmap."""

from __future__ import annotations

from typing import Any

import flashbax as fbx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flashbax.buffers.trajectory_buffer import TrajectoryBufferState

from expvault.counted import CountedBufferState, counted, steps_added_of
from expvault.delta import Cursor, plan_delta
from expvault.errors import InvalidArgumentError

TIMESTEP = {"obs": jnp.zeros(3), "reward": jnp.float32(0), "done": jnp.bool_(False)}


def _batch(*prefix: int, fill: float = 1.0) -> dict[str, jax.Array]:
    return {
        "obs": jnp.full((*prefix, 3), fill),
        "reward": jnp.full(prefix, fill),
        "done": jnp.ones(prefix, bool),
    }


def _trajectory_buffer(batch: int = 2, length: int = 16) -> Any:
    return fbx.make_trajectory_buffer(
        add_batch_size=batch,
        sample_batch_size=4,
        sample_sequence_length=2,
        period=1,
        min_length_time_axis=2,
        max_length_time_axis=length,
    )


def test_trajectory_buffer_counts_time_steps_under_jit_with_donation() -> None:
    buffer = counted(_trajectory_buffer())
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(TIMESTEP)
    assert isinstance(state, CountedBufferState)
    assert steps_added_of(state) == 0
    total = 0
    for t in (3, 1, 16, 5):
        previous = state
        state = add(state, _batch(2, t))
        total += t
        assert previous.experience["obs"].is_deleted()  # donation took effect
        assert type(state) is CountedBufferState
        assert steps_added_of(state) == total
        assert int(state.current_index) == total % 16
    assert bool(state.is_full)


def test_sampling_still_works() -> None:
    buffer = counted(_trajectory_buffer())
    state = buffer.init(TIMESTEP)
    assert not bool(buffer.can_sample(state))
    state = buffer.add(state, _batch(2, 4, fill=2.0))
    assert bool(buffer.can_sample(state))
    sample = jax.jit(buffer.sample)(state, jax.random.key(0))
    assert sample.experience["obs"].shape == (4, 2, 3)
    np.testing.assert_array_equal(sample.experience["obs"], 2.0)


def test_scan_then_one_host_look() -> None:
    buffer = counted(_trajectory_buffer(length=8))

    def step(state: Any, k: jax.Array) -> tuple[Any, None]:
        return buffer.add(state, _batch(2, 3, fill=1.0) | {"reward": jnp.full((2, 3), k)}), None

    run = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(5.0))[0], donate_argnums=0)
    state = run(buffer.init(TIMESTEP))
    assert steps_added_of(state) == 15
    # The counter sees the 15 steps that the ring positions (index 7, full) cannot tell apart
    # from 7: 7 of them were overwritten.
    assert (int(state.current_index), bool(state.is_full)) == (7, True)
    delta, _ = plan_delta(
        Cursor(),
        current_index=7,
        is_full=True,
        ring_length=8,
        steps_added=steps_added_of(state),
        allow_loss=True,
    )
    assert (delta.start, delta.lost) == (7, 7)


def test_vmap_over_agents() -> None:
    agents = 3
    buffer = counted(_trajectory_buffer(length=8))
    states = jax.vmap(buffer.init)(jax.tree.map(lambda x: jnp.stack([x] * agents), TIMESTEP))
    add = jax.jit(jax.vmap(buffer.add), donate_argnums=0)
    for t in (2, 5):
        states = add(states, _batch(agents, 2, t))
    assert states.steps_added.shape == (agents,)
    np.testing.assert_array_equal(states.steps_added, [7, 7, 7])
    with pytest.raises(InvalidArgumentError, match="one buffer"):
        steps_added_of(states)
    assert steps_added_of(jax.tree.map(lambda x: x[2], states)) == 7
    samples = jax.vmap(buffer.sample)(states, jax.random.split(jax.random.key(1), agents))
    assert samples.experience["obs"].shape == (agents, 4, 2, 3)


@pytest.mark.parametrize(
    ("kwargs", "batch_prefix", "steps_per_add"),
    [
        ({}, (), 1),  # single transitions
        ({"add_batch_size": 4}, (4,), 1),  # a batch of transitions: one ring position
        ({"add_batch_size": 4, "add_sequences": True}, (4, 3), 3),
        ({"add_sequences": True}, (5,), 5),
    ],
)
def test_flat_buffer(
    kwargs: dict[str, Any], batch_prefix: tuple[int, ...], steps_per_add: int
) -> None:
    buffer = counted(
        fbx.make_flat_buffer(max_length=32, min_length=8, sample_batch_size=2, **kwargs)
    )
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(TIMESTEP)
    length = state.experience["obs"].shape[1]
    for _ in range(3):
        state = add(state, _batch(*batch_prefix))
    assert steps_added_of(state) == 3 * steps_per_add
    assert int(state.current_index) == (3 * steps_per_add) % length
    sample = buffer.sample(state, jax.random.key(0))
    assert sample.experience.first["obs"].shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "batch_prefix", "steps_per_add"),
    [
        ({}, (), 1),
        ({"add_batches": True}, (4,), 4),
        ({"add_sequences": True}, (3,), 3),
        ({"add_batches": True, "add_sequences": True}, (2, 3), 6),
    ],
)
def test_item_buffer(
    kwargs: dict[str, Any], batch_prefix: tuple[int, ...], steps_per_add: int
) -> None:
    buffer = counted(
        fbx.make_item_buffer(max_length=20, min_length=1, sample_batch_size=2, **kwargs)
    )
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(TIMESTEP)
    for _ in range(3):
        state = add(state, _batch(*batch_prefix))
    assert steps_added_of(state) == 3 * steps_per_add
    assert int(state.current_index) == (3 * steps_per_add) % 20
    assert buffer.sample(state, jax.random.key(0)).experience["obs"].shape == (2, 3)


def test_counter_wraps_like_uint32() -> None:
    buffer = counted(_trajectory_buffer(length=8))
    state = buffer.init(TIMESTEP).replace(steps_added=jnp.int32(2**31 - 1))
    before = steps_added_of(state)
    state = buffer.add(state, _batch(2, 3))
    after = steps_added_of(state)
    assert (before, after) == (2**31 - 1, 2**31 + 2)
    state = state.replace(steps_added=jnp.int32(-1))  # 2**32 - 1 as uint32
    state = buffer.add(state, _batch(2, 2))
    assert steps_added_of(state) == 1
    delta, _ = plan_delta(
        Cursor(steps=3, index=3, counted=2**32 - 1),
        current_index=5,
        is_full=False,
        ring_length=8,
        steps_added=steps_added_of(state),
    )
    assert delta.pieces == ((3, 5),)


def test_plain_states_have_no_counter() -> None:
    state = _trajectory_buffer().init(TIMESTEP)
    assert type(state) is TrajectoryBufferState
    assert steps_added_of(state) is None


def test_unsupported_buffers_and_states_are_refused() -> None:
    prioritised = fbx.make_prioritised_trajectory_buffer(
        add_batch_size=2,
        sample_batch_size=2,
        sample_sequence_length=2,
        period=1,
        min_length_time_axis=2,
        max_length_time_axis=8,
    )
    with pytest.raises(InvalidArgumentError, match="prioritised"):
        counted(prioritised).init(TIMESTEP)
    with pytest.raises(InvalidArgumentError, match="already counted"):
        counted(counted(_trajectory_buffer())).init(TIMESTEP)
    plain = _trajectory_buffer().init(TIMESTEP)
    with pytest.raises(InvalidArgumentError, match="counted buffer's init"):
        counted(_trajectory_buffer()).add(plain, _batch(2, 1))
    empty = counted(_trajectory_buffer())
    with pytest.raises(InvalidArgumentError, match="non-empty leaf"):
        empty.add(empty.init({"x": jnp.zeros(0)}), {"x": jnp.zeros((2, 1, 0))})
