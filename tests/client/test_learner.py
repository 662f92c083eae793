"""The learner side of VaultReader: resumable follows, samples, prefetching, whole-vault reads."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import flashbax as fbx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BATCH, OBS, Actor, ServerThread, assert_experience, structure
from expvault import InvalidArgumentError, NotFoundError, RemoteVault, VaultReader
from expvault._learner import Prefetch
from expvault.remote import Follow, Followed, SampleIterator


def _write(server: ServerThread, uid: str, deltas: list[int], first_step: int = 0) -> Actor:
    """Writes `deltas` to stream `uid`; its steps are `experience(first_step, ...)`."""
    actor = Actor()
    actor.steps = first_step
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid=uid) as vault:
        for n in deltas:
            vault.write(actor.add(n))
    return actor


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def _sample_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("expvault-sample-")]


# -- follow: positions to save and resume ----------------------------------------------------------


def test_follow_positions_resume_exactly_where_the_learner_stopped(server: ServerThread) -> None:
    _write(server, "a", [5, 3, 4])
    _write(server, "b", [6], first_step=1000)
    with VaultReader(server.target, "v", structure()) as reader:
        with reader.follow() as follow:
            assert isinstance(follow, Follow)
            assert follow.positions == {}
            while follow.positions != {"a": 12, "b": 6}:
                item = next(follow)
                assert isinstance(item, Followed)
                assert item.start == follow.positions.get(item.vault_uid, 0) - item.num_steps
                assert item.num_steps == item.experience.obs.shape[1]
                first = 0 if item.vault_uid == "a" else 1000
                assert_experience(item.experience, first + item.start, first + item.stop)
                assert follow.positions[item.vault_uid] == item.stop
            saved = json.loads(json.dumps(follow.positions))  # what a checkpoint keeps
        assert saved == {"a": 12, "b": 6}
        _write(server, "a", [2, 7], first_step=12)  # a new writer continues stream a
        with reader.follow(positions=saved) as resumed:
            uid, start, exp = next(resumed)
            assert (uid, start) == ("a", 12)  # nothing repeated, nothing skipped
            assert_experience(exp, 12, 12 + exp.obs.shape[1])
            position = start + exp.obs.shape[1]
            while position < 21:
                uid, start, exp = next(resumed)
                assert (uid, start) == ("a", position)
                position += exp.obs.shape[1]
            assert resumed.positions == {"a": 21, "b": 6}
        # One stream resumes from its own saved position; the others' do not apply.
        with reader.follow(vault_uid="b", positions={"a": 3, "b": 2}) as one:
            assert next(one).start == 2
            assert one.positions == {"b": 6}


def test_follow_validates_positions(server: ServerThread) -> None:
    _write(server, "a", [2])
    with VaultReader(server.target, "v", structure()) as reader:
        for bad in ({"a": -1}, {"a": 1.5}, {"a": True}, {"": 3}):
            with pytest.raises(InvalidArgumentError, match="positions"):
                reader.follow(positions=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="start"):
            reader.follow(start=-2)


def test_follow_is_exactly_once_across_a_server_restart_and_a_learner_restart(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server()
    port = server.port
    received: list[tuple[int, int]] = []
    checkpoint: dict[str, Any] = {}
    stop_after = [0]  # the learner returns after receiving this step
    errors: list[BaseException] = []

    def learner() -> None:
        try:
            reader = VaultReader(server.target, "v", structure(), reconnect_timeout_s=30)
            with reader, reader.follow("a", positions=checkpoint.get("positions")) as follow:
                for _, start, exp in follow:
                    n = exp.obs.shape[1]
                    assert_experience(exp, start, start + n)
                    received.append((start, start + n))
                    checkpoint["positions"] = follow.positions
                    if start + n >= stop_after[0]:
                        return
        except BaseException as e:
            errors.append(e)

    actor = Actor()
    vault = RemoteVault(server.target, "v", structure(), vault_uid="a", reconnect_timeout_s=30)
    stop_after[0] = 30
    thread = threading.Thread(target=learner)
    thread.start()
    for _ in range(5):
        vault.write(actor.add(3))
    _wait_for(lambda: bool(received) and received[-1][1] == 15)
    server.stop()  # the learner and the writer both reconnect to the restarted server
    server = make_server(listen=f"127.0.0.1:{port}")
    for _ in range(5):
        vault.write(actor.add(3), wait=False)
    assert vault.flush() == 30
    thread.join(30)
    assert not errors, errors
    assert checkpoint["positions"] == {"a": 30}
    # Meanwhile the actor wrote on; a restarted learner resumes from its checkpoint.
    for _ in range(2):
        vault.write(actor.add(4))
    vault.close()
    stop_after[0] = 38
    thread = threading.Thread(target=learner)
    thread.start()
    thread.join(30)
    assert not errors, errors
    starts = [start for start, _ in received]
    stops = [stop for _, stop in received]
    assert starts[0] == 0
    assert stops[-1] == 38
    assert starts[1:] == stops[:-1]  # contiguous: every step once, in order


# -- sample: windows within one stream, a leading batch axis -------------------------------------


def test_sample_windows_never_cross_a_stream_boundary(server: ServerThread) -> None:
    _write(server, "a", [7, 5])  # steps 0..11
    _write(server, "b", [4], first_step=1000)  # steps 1000..1003, adjacent in sort order
    _write(server, "c", [9], first_step=5000)
    with VaultReader(server.target, "v", structure()) as reader:
        batch = reader.sample(512, 4, seed=3)
        obs = batch.experience.obs
        assert obs.shape == (512, 4, *OBS)
        steps = obs[..., 0] // (10 * BATCH)  # the stream offset of each step (see `experience`)
        np.testing.assert_array_equal(np.diff(steps, axis=1), 1)  # consecutive steps
        firsts = steps[:, 0]
        assert {int(s) // 1000 for s in firsts} == {0, 1, 5}  # all three streams drawn
        in_stream = ((firsts >= 0) & (firsts + 4 <= 12)) | ((firsts >= 1000) & (firsts + 4 <= 1004))
        in_stream |= (firsts >= 5000) & (firsts + 4 <= 5009)
        assert in_stream.all()
        # A leading batch axis, ready for a jitted update.
        total = jax.jit(lambda e: e.obs.sum() + e.reward.sum())(batch.experience)
        assert np.isclose(float(total), obs.sum() + batch.experience.reward.sum(), rtol=1e-5)
        only_b = reader.sample(16, 4, vault_uids=["b"], leaves=["reward"]).experience
        assert only_b.obs is None
        assert only_b.reward.shape == (16, 4)
        np.testing.assert_array_equal(
            only_b.reward // (0.5 * BATCH), np.tile(range(1000, 1004), (16, 1))
        )


# -- sample_iter: prefetched batches -------------------------------------------------------------


def test_sample_iter_prefetches_reproducible_batches(server: ServerThread) -> None:
    _write(server, "a", [16, 16])
    with VaultReader(server.target, "v", structure()) as reader:
        with reader.sample_iter(8, 5, prefetch=2, seed=11) as batches:
            first = [next(batches) for _ in range(3)]
        with reader.sample_iter(8, 5, prefetch=3, seed=11) as batches:
            again = [next(batches) for _ in range(3)]
        assert not _sample_threads()
        for a, b in zip(first, again, strict=True):
            assert a.experience.obs.shape == (8, 5, *OBS)
            np.testing.assert_array_equal(a.experience.obs, b.experience.obs)
        assert not np.array_equal(first[0].experience.obs, first[1].experience.obs)
        on_device = next(iter(reader.sample_iter(4, 2, device=jax.devices()[0])))
        assert isinstance(on_device.experience.obs, jax.Array)
        gc.collect()


def test_prefetched_batches_come_in_ticket_order_and_within_bounds() -> None:
    state = Prefetch(capacity=1, workers=2)
    tickets = [state.take() for _ in range(3)]  # 1 ready + 2 in flight
    assert tickets == [0, 1, 2]
    taken: list[int | None] = []
    blocked = threading.Thread(target=lambda: taken.append(state.take()))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # a fourth would exceed what may be ready or in flight
    state.put(2, "c")
    state.put(0, "a")
    assert state.get() == "a"  # frees room: the fourth ticket is issued
    blocked.join(5)
    assert taken == [3]
    state.put(1, "b")
    assert [state.get(), state.get()] == ["b", "c"]
    state.stop()
    assert state.take() is None


def test_sample_iter_batches_keep_their_order_whatever_the_workers(server: ServerThread) -> None:
    """Several calls in flight may come back in any order; batch i is still the i-th draw."""
    _write(server, "a", [16, 16, 16])
    with VaultReader(server.target, "v", structure()) as reader:
        with reader.sample_iter(8, 5, prefetch=1, workers=1, seed=7) as batches:
            one = [next(batches) for _ in range(12)]
        with reader.sample_iter(8, 5, prefetch=2, workers=4, seed=7) as batches:
            four = [next(batches) for _ in range(12)]
        for a, b in zip(one, four, strict=True):
            np.testing.assert_array_equal(a.experience.obs, b.experience.obs)
        with pytest.raises(InvalidArgumentError, match="workers"):
            reader.sample_iter(8, 5, workers=0)
    assert not _sample_threads()


def test_sample_iter_stops_on_close_break_and_reader_close(server: ServerThread) -> None:
    _write(server, "a", [8])
    with VaultReader(server.target, "v", structure()) as reader:
        iterator = reader.sample_iter(4, 2)
        assert isinstance(iterator, SampleIterator)
        next(iterator)
        iterator.close()
        assert not _sample_threads()
        with pytest.raises(StopIteration):
            next(iterator)

        for count, _ in enumerate(reader.sample_iter(4, 2, prefetch=1)):
            if count == 2:
                break
        gc.collect()  # an abandoned iterator stops once it is garbage
        _wait_for(lambda: not _sample_threads(), timeout_s=10)

        waiting = reader.sample_iter(4, 2)
        next(waiting)
    _wait_for(lambda: not _sample_threads(), timeout_s=10)  # closing the reader stops it
    with pytest.raises(StopIteration):
        next(waiting)


def test_sample_iter_raises_what_sample_would(server: ServerThread) -> None:
    _write(server, "a", [3])
    with VaultReader(server.target, "v", structure()) as reader:
        with pytest.raises(InvalidArgumentError, match="prefetch"):
            reader.sample_iter(4, 2, prefetch=0)
        batches = reader.sample_iter(4, 9)
        with pytest.raises(InvalidArgumentError, match="no stream has 9 committed steps"):
            next(batches)
        with pytest.raises(StopIteration):
            next(batches)
        assert not _sample_threads()


# -- whole vaults for offline training ------------------------------------------------------------


def test_read_vault_puts_streams_side_by_side_on_the_batch_axis(server: ServerThread) -> None:
    _write(server, "b", [6, 4], first_step=100)
    _write(server, "a", [10])
    with VaultReader(server.target, "v", structure()) as reader:
        state = reader.read_vault()
        obs = state.experience.obs
        assert isinstance(obs, jax.Array)
        assert obs.shape == (2 * BATCH, 10, *OBS)
        # Rows [0, B) are stream "a", rows [B, 2B) stream "b" (sorted by name).
        assert_experience(jax.tree.map(lambda x: x[:BATCH], state.experience), 0, 10)
        assert_experience(jax.tree.map(lambda x: x[BATCH:], state.experience), 100, 110)
        swapped = reader.read_vault(["b", "a"], leaves=["obs"])
        assert swapped.experience.action is None
        np.testing.assert_array_equal(swapped.experience.obs[:BATCH], obs[BATCH:])
        # It feeds a flashbax buffer of S * B rows as it is.
        buffer = fbx.make_trajectory_buffer(
            add_batch_size=2 * BATCH,
            max_length_time_axis=10,
            min_length_time_axis=4,
            sample_batch_size=8,
            sample_sequence_length=4,
            period=1,
        )
        assert buffer.can_sample(state)
        sample = jax.jit(buffer.sample)(state, jax.random.PRNGKey(0))
        assert sample.experience.obs.shape == (8, 4, *OBS)


def test_read_vault_refuses_or_truncates_unequal_streams(server: ServerThread) -> None:
    _write(server, "a", [10])
    _write(server, "b", [7], first_step=100)
    with VaultReader(server.target, "v", structure()) as reader:
        with pytest.raises(InvalidArgumentError, match=r"different lengths .*truncate=True"):
            reader.read_vault()
        state = reader.read_vault(truncate=True)
        assert state.experience.obs.shape == (2 * BATCH, 7, *OBS)
        assert_experience(jax.tree.map(lambda x: x[:BATCH], state.experience), 0, 7)
        assert_experience(jax.tree.map(lambda x: x[BATCH:], state.experience), 100, 107)
        per_stream = reader.read_streams()
        assert list(per_stream) == ["a", "b"]
        assert_experience(per_stream["a"].experience, 0, 10)
        assert_experience(per_stream["b"].experience, 100, 107)
        assert isinstance(per_stream["b"].experience.obs, jnp.ndarray)
        with pytest.raises(NotFoundError, match=r"no streams \['c'\]"):
            reader.read_vault(["a", "c"])
        with pytest.raises(InvalidArgumentError, match="sequence of names"):
            reader.read_streams("a")


def test_read_vault_of_a_vault_without_streams(server: ServerThread) -> None:
    with RemoteVault(server.target, "v", structure()):
        pass
    with VaultReader(server.target, "v", structure()) as reader:
        with pytest.raises(InvalidArgumentError, match="no streams"):
            reader.read_vault()
        assert reader.read_streams() == {}
