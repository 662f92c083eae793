"""plan_delta against a reference ring buffer; gather_delta against numpy; both on flashbax."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flashbax as fbx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expvault.counted import counted
from expvault.delta import (
    Cursor,
    Delta,
    Layout,
    _gather_bytes,
    delta_for_interval,
    delta_nbytes,
    gather_delta,
    plan_delta,
    plan_state,
    read_position,
    ring_length_of,
    split_transfer,
    start_transfer,
    transfer_delta,
)
from expvault.errors import DataLossError, InvalidArgumentError


class Ring:
    """Reference model of a ring buffer: slot contents are the stream offsets of the steps."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.slots: list[int | None] = [None] * length
        self.added = 0

    def add(self, k: int) -> None:
        for _ in range(k):
            self.slots[self.added % self.length] = self.added
            self.added += 1

    @property
    def current_index(self) -> int:
        return self.added % self.length

    @property
    def is_full(self) -> bool:
        return self.added >= self.length

    def read(self, delta: Delta) -> list[int | None]:
        return [self.slots[i] for lo, hi in delta.pieces for i in range(lo, hi)]


def _plan(
    cursor: Cursor, ring: Ring, counter: int | None = None, *, allow_loss: bool = False
) -> tuple[Delta, Cursor]:
    return plan_delta(
        cursor,
        current_index=ring.current_index,
        is_full=ring.is_full,
        ring_length=ring.length,
        steps_added=counter,
        allow_loss=allow_loss,
    )


def _plan_or_loss(
    cursor: Cursor, ring: Ring, counter: int | None = None
) -> tuple[Delta, Cursor, DataLossError | None]:
    """Plans; on DataLossError, plans again allowing the loss and returns the error too."""
    try:
        return (*_plan(cursor, ring, counter), None)
    except DataLossError as e:
        return (*_plan(cursor, ring, counter, allow_loss=True), e)


# Operations: a non-negative int adds that many steps (flashbax allows up to T per add), None
# writes.
def _ops(max_add: int) -> st.SearchStrategy[list[int | None]]:
    return st.lists(st.one_of(st.integers(0, max_add), st.none()), max_size=40)


@st.composite
def _ring_and_ops(draw: st.DrawFn) -> tuple[int, list[int | None]]:
    length = draw(st.integers(1, 8))
    return length, draw(_ops(length))


# ---------------------------------------------------------------------------------------------
# plan_delta: properties


@settings(max_examples=300, deadline=None)
@given(
    _ring_and_ops(),
    st.sampled_from([0, (1 << 32) - 5, (1 << 31) - 3]),
)
def test_counted_plan_is_exact(ring_and_ops: tuple[int, list[int | None]], base: int) -> None:
    length, ops = ring_and_ops
    ring = Ring(length)
    # A counter that starts at `base` (mod 2**32) exercises its wrap-around.
    cursor = Cursor(counted=base) if base else Cursor()
    sent = 0
    for op in [*ops, None]:
        if op is not None:
            ring.add(op)
            continue
        counter = (base + ring.added) % (1 << 32)
        new = ring.added - sent
        delta, following, loss = _plan_or_loss(cursor, ring, counter)
        # Raised exactly when the ring overwrote unsent steps, naming exactly those.
        assert (loss is not None) == (new > length)
        if loss is not None:
            assert (loss.lost_start, loss.lost_stop) == (sent, ring.added - length)
            assert f"[{sent}, {ring.added - length})" in loss.message
            assert delta.lost == new - length
            sent = ring.added - length
        assert delta.lost == max(0, new - length)
        assert delta.start == sent
        assert ring.read(delta) == list(range(sent, ring.added))
        assert following.steps == delta.stop == ring.added
        assert following.counted == counter
        sent, cursor = ring.added, following


@settings(max_examples=300, deadline=None)
@given(_ring_and_ops())
def test_index_fallback_within_its_documented_limits(
    ring_and_ops: tuple[int, list[int | None]],
) -> None:
    length, ops = ring_and_ops
    ring = Ring(length)
    cursor = Cursor()
    sent = 0  # true stream offset of the next unsent step
    for op in [*ops, None]:
        if op is not None:
            ring.add(op)
            continue
        new = ring.added - sent
        # What the positions alone determine: fewer than T new steps, or a ring that was not
        # full at the last write and has not received 2T steps in all.
        exact = new < length or (not cursor.full and ring.added < 2 * length)
        behind = sent - cursor.steps  # steps the fallback missed in earlier, invisible laps
        delta, following, loss = _plan_or_loss(cursor, ring)
        if loss is not None:
            assert new > length  # never a false alarm
            assert loss.lost_start == cursor.steps
            assert delta.lost == loss.lost_stop - loss.lost_start
            if exact:
                lost = (loss.lost_start + behind, loss.lost_stop + behind)
                assert lost == (sent, ring.added - length)
            else:
                assert delta.lost <= new - length  # a lower bound
        else:
            assert delta.lost == 0
        seen = delta.n + delta.lost
        if exact:
            assert seen == new
            assert delta.start + behind == sent + delta.lost
        else:
            # An overwrite or a whole lap really happened; what is seen is congruent and less.
            assert new >= length
            assert seen % length == new % length
            assert seen <= new
        # Whatever was planned is the newest steps, in order.
        assert ring.read(delta) == list(range(ring.added - delta.n, ring.added))
        assert following.steps == cursor.steps + seen
        sent, cursor = ring.added, following


# ---------------------------------------------------------------------------------------------
# plan_delta: cases


def test_first_write_of_a_full_buffer_is_the_whole_ring() -> None:
    # flashbax's Vault writes nothing here (interval (0, 0)); expvault writes [0, T).
    delta, cursor = plan_delta(Cursor(), current_index=0, is_full=True, ring_length=10)
    assert delta == Delta(0, ((0, 10),))
    assert cursor == Cursor(10, 0, True)
    delta, _ = plan_delta(Cursor(), current_index=0, is_full=True, ring_length=10, steps_added=10)
    assert delta == Delta(0, ((0, 10),))


def test_first_write_of_a_wrapped_buffer_reports_the_loss() -> None:
    with pytest.raises(DataLossError) as info:
        plan_delta(Cursor(), current_index=3, is_full=True, ring_length=10)
    error = info.value
    assert (error.lost_start, error.lost_stop) == (0, 3)
    assert error.metadata == {"lost_start": "0", "lost_stop": "3"}
    for needed in ("[0, 3)", "holds 10 steps", "at least every 10 steps", "longer buffer"):
        assert needed in error.message
    assert "lower bound" in error.message  # no counter: says so and names the fix
    delta, cursor = plan_delta(
        Cursor(), current_index=3, is_full=True, ring_length=10, allow_loss=True
    )
    assert delta == Delta(3, ((3, 10), (0, 3)), lost=3)
    assert cursor == Cursor(13, 3, True)


def test_counter_sees_a_whole_lap_that_positions_cannot() -> None:
    cursor = Cursor(steps=14, index=4, full=True, counted=14)
    delta, _ = plan_delta(cursor, current_index=4, is_full=True, ring_length=10, steps_added=24)
    assert delta == Delta(14, ((4, 10), (0, 4)))
    with pytest.raises(DataLossError) as info:
        plan_delta(cursor, current_index=4, is_full=True, ring_length=10, steps_added=25 + 9)
    assert (info.value.lost_start, info.value.lost_stop) == (14, 24)
    assert "lower bound" not in info.value.message
    # The documented limit of the fallback: the same lap looks like nothing new.
    plain = Cursor(steps=14, index=4, full=True)
    delta, _ = plan_delta(plain, current_index=4, is_full=True, ring_length=10)
    assert delta.n == 0


def test_counter_wraps_modulo_2_to_the_32() -> None:
    cursor = Cursor(steps=7, index=7 % 5, full=True, counted=(1 << 32) - 2)
    delta, following = plan_delta(
        cursor, current_index=(7 + 3) % 5, is_full=True, ring_length=5, steps_added=1
    )
    assert delta == Delta(7, ((2, 5),))
    assert following.counted == 1


@pytest.mark.parametrize(
    ("cursor", "position", "message"),
    [
        (Cursor(5, 5, False), {"current_index": 3, "is_full": False}, "went backwards"),
        (Cursor(15, 5, True), {"current_index": 7, "is_full": False}, "went backwards"),
        (
            Cursor(15, 5, True, counted=15),
            {"current_index": 3, "is_full": True, "steps_added": 13},
            "went backwards",
        ),
        (
            Cursor(15, 5, True, counted=15),
            {"current_index": 4, "is_full": True, "steps_added": 17},
            "does not continue",
        ),
        (Cursor(), {"current_index": 10, "is_full": False}, r"outside the ring \[0, 10\)"),
        (Cursor(), {"current_index": -1, "is_full": False}, "outside the ring"),
        (Cursor(), {"current_index": 0, "is_full": False, "steps_added": -1}, ">= 0"),
        (Cursor(), {"current_index": True, "is_full": False}, "must be an int"),
    ],
)
def test_invalid_positions_say_what_to_fix(
    cursor: Cursor, position: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        plan_delta(cursor, ring_length=10, **position)


def test_ring_length_must_be_positive() -> None:
    with pytest.raises(InvalidArgumentError, match="must be >= 1"):
        plan_delta(Cursor(), current_index=0, is_full=False, ring_length=0)


def test_a_counter_appearing_midway_is_used_from_the_next_write() -> None:
    ring = Ring(6)
    ring.add(6)
    ring.add(2)
    delta, cursor = _plan(Cursor(), ring, allow_loss=True)  # plain state
    assert cursor.counted is None
    ring.add(6)  # a whole lap of a full ring: the positions cannot see it, so a counter
    # arriving now cannot either
    delta, cursor = _plan(cursor, ring, ring.added)
    assert delta.n == 0
    assert cursor.counted == 14
    ring.add(6)
    delta, cursor = _plan(cursor, ring, ring.added)
    assert ring.read(delta) == list(range(14, 20))


def test_numpy_and_jax_scalars_are_accepted() -> None:
    delta, _ = plan_delta(
        Cursor(),
        current_index=np.int32(3),
        is_full=np.bool_(False),
        ring_length=jnp.asarray(8),
        steps_added=jnp.asarray(3, jnp.int32),
    )
    assert delta == Delta(0, ((0, 3),))


# ---------------------------------------------------------------------------------------------
# delta_for_interval


@pytest.mark.parametrize(
    ("interval", "pieces"),
    [
        ((2, 5), ((2, 5),)),
        ((0, 8), ((0, 8),)),
        ((6, 2), ((6, 8), (0, 2))),
        ((6, 0), ((6, 8),)),
        ((8, 3), ((0, 3),)),
        ((3, 3), ()),
        ((8, 8), ()),
    ],
)
def test_interval_pieces(interval: tuple[int, int], pieces: tuple[tuple[int, int], ...]) -> None:
    delta = delta_for_interval(Cursor(steps=11), interval, ring_length=8)
    assert delta == Delta(11, pieces)


@pytest.mark.parametrize(
    ("interval", "message"),
    [
        ((0, 0), "plan it with plan_delta"),
        ((-1, 3), r"0 <= a, b <= 8"),
        ((2, 9), r"0 <= a, b <= 8"),
        ((1, 2, 3), "pair"),
    ],
)
def test_interval_validation(interval: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        delta_for_interval(Cursor(), interval, ring_length=8)


# ---------------------------------------------------------------------------------------------
# gather_delta


class Step(NamedTuple):
    obs: Any
    done: Any
    extra: Any


def _experience(batch: int, length: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    shape = (batch, length)
    return {
        "f32": rng.standard_normal((*shape, 3)).astype(np.float32),
        "bool": rng.random(shape) < 0.5,
        "u8": rng.integers(0, 255, (*shape, 2), dtype=np.uint8),
        "bf16": rng.standard_normal((*shape, 2, 2)).astype(jnp.bfloat16),
        "f8": rng.standard_normal(shape).astype(jnp.float8_e4m3fn),
        "c64": (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64),
        "nested": Step(
            obs=rng.integers(-100, 100, (*shape, 1), dtype=np.int32),
            done=rng.integers(-5, 5, shape, dtype=np.int8),
            extra=rng.standard_normal((*shape, 0)).astype(np.float16),
        ),
    }


def _expected(experience: Any, delta: Delta) -> list[np.ndarray]:
    positions = [i for lo, hi in delta.pieces for i in range(lo, hi)]
    return [
        np.asarray(leaf)[:, np.asarray(positions, dtype=np.intp)]
        for leaf in jax.tree.leaves(experience)
    ]


def _assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert g.shape == w.shape
        assert g.tobytes() == w.tobytes()  # bit for bit (NaNs included)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([1, 5]),
    st.data(),
)
def test_gather_matches_numpy(length: int, data: st.DataObject) -> None:
    lo = data.draw(st.integers(0, length - 1))
    n = data.draw(st.integers(0, length))
    pieces = tuple((a, b) for a, b in ((lo, min(lo + n, length)), (0, lo + n - length)) if a < b)
    delta = Delta(0, pieces)
    host = _experience(2, length, seed=lo * 7 + n)
    device = jax.tree.map(jnp.asarray, host)
    want = _expected(host, delta)
    _assert_same(gather_delta(device, delta), want)
    _assert_same(gather_delta(host, delta), want)


def test_one_transfer_of_exactly_the_delta() -> None:
    host = _experience(3, 16)
    device = jax.tree.map(jnp.asarray, host)
    delta = Delta(40, ((13, 16), (0, 2)))
    flat = transfer_delta(device, delta)
    arrays = split_transfer(flat, device, delta.n)
    assert flat.dtype == np.uint8
    assert flat.nbytes == delta_nbytes(device, delta.n) == sum(a.nbytes for a in arrays)
    whole = sum(leaf.nbytes for leaf in jax.tree.leaves(device))
    assert flat.nbytes == whole * delta.n // 16 < whole
    for array in arrays:
        assert np.shares_memory(array, flat) or array.nbytes == 0  # views, not copies
        assert array.flags.aligned
    _assert_same(arrays, _expected(host, delta))
    _assert_same(gather_delta(device, delta), _expected(host, delta))


def _accelerator_layout(experience: Any) -> Layout:
    """The layout of leaves on an accelerator: one flat byte transfer (forced here on CPU)."""
    return dataclasses.replace(Layout.of(experience), on_host_memory=False)


def test_differing_starts_reuse_one_compiled_gather() -> None:
    device = {"x": jnp.arange(2 * 11 * 3, dtype=jnp.float32).reshape(2, 11, 3)}
    layout = _accelerator_layout(device)  # the jitted gather of device-resident buffers
    start_transfer(device, Delta(0, ((0, 4),)), layout).result()
    compiled = _gather_bytes._cache_size()
    for lo in range(1, 11):
        pieces = ((lo, lo + 4),) if lo + 4 <= 11 else ((lo, 11), (0, lo + 4 - 11))
        got = start_transfer(device, Delta(0, pieces), layout).result()
        _assert_same(got, _expected(device, Delta(0, pieces)))
    assert _gather_bytes._cache_size() == compiled


def test_empty_delta_and_scalar_steps() -> None:
    device = {"r": jnp.arange(6.0).reshape(2, 3), "d": jnp.zeros((2, 3), bool)}
    empty = gather_delta(device, Delta(5))
    assert [a.shape for a in empty] == [(2, 0), (2, 0)]
    assert [a.dtype for a in empty] == [np.bool_, np.float32]  # jax.tree leaf order: d, r
    assert transfer_delta(device, Delta(5)).nbytes == 0
    got = gather_delta(device, Delta(5, ((2, 3), (0, 1))))
    np.testing.assert_array_equal(got[1], [[2.0, 0.0], [5.0, 3.0]])


def test_gather_then_donate_keeps_the_host_copy() -> None:
    buffer = fbx.make_trajectory_buffer(
        add_batch_size=2,
        sample_batch_size=2,
        sample_sequence_length=2,
        period=1,
        min_length_time_axis=2,
        max_length_time_axis=8,
    )
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init({"x": jnp.zeros(3)})
    state = add(state, {"x": jnp.ones((2, 5, 3))})
    delta, _ = plan_state(Cursor(), state)
    (got,) = gather_delta(state.experience, delta)
    before = got.copy()
    donated = state
    state = add(state, {"x": jnp.full((2, 6, 3), 7.0)})
    assert donated.experience["x"].is_deleted()
    np.testing.assert_array_equal(got, before)
    np.testing.assert_array_equal(got, np.ones((2, 5, 3)))


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (Delta(0, ((3, 9),)), "within the ring"),
        (Delta(0, ((3, 5), (0, 2))), "wrap around"),
        (Delta(0, ((2, 2),)), "non-empty"),
    ],
)
def test_gather_rejects_bad_pieces(delta: Delta, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        gather_delta({"x": jnp.zeros((1, 8))}, delta)


def test_sub_byte_dtypes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="int8"):
        gather_delta({"x": jnp.zeros((1, 4), jnp.int4)}, Delta(0, ((0, 1),)))


def test_split_checks_the_byte_count() -> None:
    with pytest.raises(InvalidArgumentError, match="expected 8 flat uint8 bytes"):
        split_transfer(np.zeros(7, np.uint8), {"x": jnp.zeros((1, 4, 2))}, 1)


def test_ring_length_of_checks_leaves() -> None:
    assert ring_length_of({"a": jnp.zeros((2, 7, 3)), "b": np.zeros((2, 7))}) == 7
    with pytest.raises(InvalidArgumentError, match="disagree"):
        ring_length_of({"a": jnp.zeros((2, 7)), "b": jnp.zeros((2, 6))})
    with pytest.raises(InvalidArgumentError, match=r"\(B, T, \.\.\.\)"):
        ring_length_of({"a": jnp.zeros(7)})
    with pytest.raises(InvalidArgumentError, match="no leaves"):
        ring_length_of({})


# ---------------------------------------------------------------------------------------------
# On flashbax buffers, end to end


def _buffer(length: int) -> Any:
    return fbx.make_trajectory_buffer(
        add_batch_size=2,
        sample_batch_size=2,
        sample_sequence_length=1,
        period=1,
        min_length_time_axis=1,
        max_length_time_axis=length,
    )


def _steps(start: int, t: int) -> dict[str, jax.Array]:
    # Step k of row b holds k in "t" and (k + 1000 b) in "obs": data that names its offset.
    times = np.arange(start, start + t, dtype=np.int32)
    obs = np.stack([times, times + 1000]).astype(np.float32)[..., None].repeat(2, axis=-1)
    return {"t": jnp.asarray(np.stack([times, times])), "obs": jnp.asarray(obs)}


@pytest.mark.parametrize("use_counter", [True, False])
def test_streaming_a_flashbax_buffer(use_counter: bool) -> None:
    length = 8
    buffer = counted(_buffer(length)) if use_counter else _buffer(length)
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init({"t": jnp.int32(0), "obs": jnp.zeros(2)})
    rng = np.random.default_rng(1)
    cursor, added = Cursor(), 0
    stream: list[np.ndarray] = []
    for _ in range(30):
        t = int(rng.integers(1, 4))
        state = add(state, _steps(added, t))
        added += t
        if rng.random() < 0.4 or added - cursor.steps >= 5:  # never T=8 steps behind
            delta, cursor = plan_state(cursor, state)
            obs, times = gather_delta(state.experience, delta)  # leaf order: obs, t
            assert delta.start == sum(len(s) for s in stream)
            np.testing.assert_array_equal(times[0], np.arange(delta.start, delta.stop))
            np.testing.assert_array_equal(obs[1, :, 0], times[1] + 1000)
            stream.append(times[0])
    delta, cursor = plan_state(cursor, state)
    stream.append(gather_delta(state.experience, delta)[1][0])
    np.testing.assert_array_equal(np.concatenate(stream), np.arange(added))
    assert cursor.steps == added


def test_overrun_on_a_counted_buffer_then_resync() -> None:
    buffer = counted(_buffer(8))
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init({"t": jnp.int32(0), "obs": jnp.zeros(2)})
    state = add(state, _steps(0, 3))
    delta, cursor = plan_state(Cursor(), state)
    assert delta == Delta(0, ((0, 3),))
    for start in range(3, 19, 4):  # 16 more steps: 8 of them overwritten before any write
        state = add(state, _steps(start, 4))
    position = read_position(state)
    assert (position.current_index, position.is_full, position.steps_added) == (3, True, 19)
    with pytest.raises(DataLossError) as info:
        plan_state(cursor, state)
    assert (info.value.lost_start, info.value.lost_stop) == (3, 11)
    delta, cursor = plan_state(cursor, state, allow_loss=True)
    assert (delta.start, delta.n, delta.lost) == (11, 8, 8)
    times = gather_delta(state.experience, delta)[1]
    np.testing.assert_array_equal(times[0], np.arange(11, 19))
    assert cursor == Cursor(19, 3, True, 19)


def test_read_position_refuses_batched_states() -> None:
    buffer = counted(_buffer(4))
    states = jax.vmap(buffer.init)({"t": jnp.zeros(3, jnp.int32), "obs": jnp.zeros((3, 2))})
    with pytest.raises(InvalidArgumentError, match="one buffer"):
        read_position(states)
    one = jax.tree.map(lambda x: x[1], states)
    assert read_position(one) == (0, False, 4, 0)


# ---------------------------------------------------------------------------------------------
# start_transfer: dispatched without waiting, safe to donate right after


@pytest.mark.parametrize("flat", [False, True])
def test_start_transfer_matches_numpy(flat: bool) -> None:
    host = _experience(3, 9, seed=4)
    device = jax.tree.map(jnp.asarray, host)
    layout = _accelerator_layout(device) if flat else Layout.of(device)
    assert Layout.of(device).on_host_memory  # jax on CPU: no transfer to make
    for delta in (Delta(0, ((2, 7),)), Delta(0, ((6, 9), (0, 4))), Delta(0, ())):
        transfer = start_transfer(device, delta, layout)
        assert transfer.num_steps == delta.n
        assert transfer.nbytes == delta_nbytes(device, delta.n)
        got = transfer.result()
        _assert_same(got, _expected(host, delta))
        assert sum(a.nbytes for a in got) == transfer.nbytes  # the delta, not the ring


@pytest.mark.parametrize("flat", [False, True])
def test_a_pending_transfer_survives_donating_the_state(flat: bool) -> None:
    # The gather is dispatched, then `add` donates and overwrites every slot it read; JAX runs
    # the donating computation after the pending gather, so the transfer holds the old steps.
    buffer = _buffer(8)
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init({"t": jnp.int32(0), "obs": jnp.zeros(2)})
    state = add(state, _steps(0, 6))
    delta, _ = plan_state(Cursor(), state)
    layout = _accelerator_layout(state.experience) if flat else None
    transfers = [start_transfer(state.experience, delta, layout)]
    donated = state
    starts = range(6, 6 + 3 * 8, 4)  # three laps of the ring, each write dispatched at once
    for start in starts:
        state = add(state, _steps(start, 4))
        lo = start % 8
        pieces = ((lo, lo + 4),) if lo + 4 <= 8 else ((lo, 8), (0, lo + 4 - 8))
        transfers.append(start_transfer(state.experience, Delta(start, pieces), layout))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated.experience))
    _obs, times = transfers[0].result()
    np.testing.assert_array_equal(times, np.stack([np.arange(6)] * 2))
    for start, transfer in zip(starts, transfers[1:], strict=True):
        np.testing.assert_array_equal(transfer.result()[1][0], np.arange(start, start + 4))


def test_host_copies_leave_the_state_donatable() -> None:
    # No host view of the ring outlives the write, so `add` still donates the ring in place.
    buffer = _buffer(8)
    add = jax.jit(buffer.add, donate_argnums=0)
    state = add(buffer.init({"t": jnp.int32(0), "obs": jnp.zeros(2)}), _steps(0, 5))
    delta, _ = plan_state(Cursor(), state)
    transfer = start_transfer(state.experience, delta)
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state.experience)]
    state = add(state, _steps(5, 2))
    assert [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state.experience)] == pointers
    np.testing.assert_array_equal(transfer.result()[1][0], np.arange(5))


def test_numpy_experience_is_copied_on_the_host() -> None:
    host = _experience(2, 6, seed=9)
    host["big_endian"] = np.arange(12, dtype=">i4").reshape(2, 6)
    delta = Delta(0, ((4, 6), (0, 3)))
    got = start_transfer(host, delta).result()
    _assert_same(got, [a.astype(a.dtype.newbyteorder("<")) for a in _expected(host, delta)])


@pytest.mark.parametrize("on_host_memory", [False, True])
def test_read_position_takes_a_known_layout(on_host_memory: bool) -> None:
    buffer = counted(_buffer(4))
    state = jax.jit(buffer.add)(buffer.init({"t": jnp.int32(0), "obs": jnp.zeros(2)}), _steps(0, 3))
    layout = dataclasses.replace(Layout.of(state.experience), on_host_memory=on_host_memory)
    assert read_position(state, layout) == (3, False, 4, 3)
    assert plan_state(Cursor(), state, layout=layout)[0] == Delta(0, ((0, 3),))
