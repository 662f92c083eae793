"""RemoteVault and VaultReader against a real in-process server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import jax
import numpy as np
import pytest

from conftest import (
    BATCH,
    RING,
    Actor,
    ServerThread,
    Step,
    assert_experience,
    experience,
    structure,
)
from expvault import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    OffsetGapError,
    RemoteVault,
    ResourceExhaustedError,
    StreamBusyError,
    VaultReader,
)


def test_remote_exports() -> None:
    import expvault.remote

    assert expvault.remote.__all__ == [
        "Follow",
        "Followed",
        "RemoteVault",
        "SampleIterator",
        "VaultReader",
    ]
    for name in expvault.remote.__all__:
        assert getattr(expvault.remote, name).__module__.startswith("expvault.")


def test_write_then_read_round_trips(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        assert vault.vault_index == 0
        written = 0
        for n in (5, 7, 3, 12, 1):
            written += vault.write(actor.add(n))
        assert written == 28
        assert vault.flush() == 28
        assert vault.vault_index == 28
        state = vault.read()
        assert isinstance(state.experience, Step)
        assert_experience(state.experience, 0, 28)
        assert_experience(vault.read(timesteps=4).experience, 24, 28)
        assert_experience(vault.read(percentiles=(25, 50)).experience, 7, 14)
    # Reopened without a structure: nested dicts, same data, and the index continues.
    with RemoteVault(server.target, "v", vault_uid="a") as again:
        assert again.vault_index == 28
        assert_experience(again.read().experience, 0, 28)


def test_reopened_writer_continues_at_the_committed_length(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        vault.write(actor.add(6))
    second = Actor()
    second.steps = 6  # the actor carries on where the stream stopped
    with RemoteVault(server.target, "v", second.state.experience, vault_uid="a") as vault:
        vault.write(second.add(4))
        assert vault.flush() == 10
        assert_experience(vault.read().experience, 0, 10)


def test_big_deltas_are_split_into_many_messages(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(
        server.target, "v", actor.state.experience, vault_uid="a", message_bytes=64
    ) as vault:
        vault.write(actor.add(RING))
        assert vault.flush() == RING
        assert_experience(vault.read().experience, 0, RING)


def test_wrong_structure_is_refused(server: ServerThread) -> None:
    with RemoteVault(server.target, "v", structure(), vault_uid="a"):
        pass
    other = {"obs": np.zeros((BATCH, 4, 9), np.float32)}
    with pytest.raises(AlreadyExistsError, match="another experience structure"):
        RemoteVault(server.target, "v", other)
    with pytest.raises(NotFoundError, match="not found") as info:
        RemoteVault(server.target, "missing")
    assert isinstance(info.value.__cause__, grpc.RpcError)  # chained, the server's message kept
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_errors_of_background_writes_surface_on_flush(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        vault.write(actor.add(3))
        vault.write(actor.add(3), dest_start=100, wait=False)  # a gap: refused by the server
        with pytest.raises(OffsetGapError, match="resend from 3") as info:
            vault.flush()
        assert info.value.expected_offset == 3
        with pytest.raises(OffsetGapError):
            vault.write(actor.add(1))
    with VaultReader(server.target, "v") as reader:
        assert reader.streams() == {"a": 3}


def test_write_waits_for_the_ack_and_raises_server_errors_itself(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        assert vault.write(actor.add(3)) == 3
        assert vault.committed_index == 3  # acknowledged before write returned
        with pytest.raises(OffsetGapError, match="resend from 3"):
            vault.write(actor.add(3), dest_start=100)


def test_a_full_queue_raises_when_asked_not_to_block(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(
        server.target,
        "v",
        actor.state.experience,
        vault_uid="a",
        max_pending_bytes=1,
        block_when_full=False,
    ) as vault:
        vault.write(actor.add(3), wait=False)  # an empty queue always takes one write

        def keep_writing() -> None:
            for _ in range(100):  # until one write finds the previous one unacknowledged
                vault.write(actor.add(1), wait=False)

        with pytest.raises(ResourceExhaustedError, match="max_pending_bytes"):
            keep_writing()
        vault.flush()
        assert vault.committed_index == vault.vault_index


def test_one_writer_per_stream(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as first:
        first.write(actor.add(2))
        first.flush()
        second = RemoteVault(server.target, "v", actor.state.experience, vault_uid="a")
        second.write(actor.add(2), wait=False)
        with pytest.raises(StreamBusyError, match="one writer at a time"):
            second.flush()
        second.close()  # the failure was raised once already
    # Once the first writer closed, the stream is free again.
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as third:
        assert third.vault_index == 2


def test_concurrent_writers_on_separate_streams(server: ServerThread) -> None:
    writers, deltas = 6, [3, 9, 16, 1, 5, 11, 7]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            actor = Actor()
            with RemoteVault(server.target, "v", actor.state.experience, vault_uid=f"w{i}") as v:
                for n in deltas:
                    v.write(actor.add(n))
        except BaseException as e:
            errors.append(e)

    RemoteVault(server.target, "v", structure(), vault_uid="w0").close()
    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    total = sum(deltas)
    with VaultReader(server.target, "v", structure()) as reader:
        assert reader.streams() == {f"w{i}": total for i in range(writers)}
        for i in range(writers):
            assert_experience(reader.read(vault_uid=f"w{i}"), 0, total)


def test_reader_follows_every_stream_while_writers_append(server: ServerThread) -> None:
    writers, per_writer = 3, 40
    RemoteVault(server.target, "v", structure(), vault_uid="w0").close()
    received: dict[str, list[tuple[int, Any]]] = {}
    done = threading.Event()

    def follow() -> None:
        count = 0
        with VaultReader(server.target, "v", structure()) as reader:
            for uid, start, exp in reader.follow():
                received.setdefault(uid, []).append((start, exp))
                count += exp.obs.shape[1]
                if count >= writers * per_writer:
                    break
        done.set()

    follower = threading.Thread(target=follow)
    follower.start()

    def write(i: int) -> None:
        actor = Actor()
        with RemoteVault(server.target, "v", actor.state.experience, vault_uid=f"w{i}") as v:
            for n in (1, 4, 2, 8, 5, 3, 9, 8):
                v.write(actor.add(n))
                v.flush()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert done.wait(60)
    follower.join(5)
    assert sorted(received) == [f"w{i}" for i in range(writers)]
    for deltas in received.values():
        position = 0
        for start, exp in deltas:
            assert start == position  # nothing missed, nothing repeated
            n = exp.obs.shape[1]
            assert_experience(exp, start, start + n)
            position += n
        assert position == per_writer


def test_follow_one_stream_from_an_offset(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        vault.write(actor.add(10))
        vault.flush()
        with VaultReader(server.target, "v", structure(), vault_uid="a") as reader:
            follow = reader.follow(start=4)
            uid, start, exp = next(follow)
            assert (uid, start) == ("a", 4)
            assert_experience(exp, 4, 10)
            vault.write(actor.add(3))
            uid, start, exp = next(follow)
            assert (uid, start) == ("a", 10)
            assert_experience(exp, 10, 13)
            follow.close()


def test_reader_reads_ranges_and_leaf_subsets(server: ServerThread) -> None:
    actor = Actor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        vault.write(actor.add(12))
    with VaultReader(server.target, "v", structure()) as reader:
        assert_experience(reader.read(), 0, 12)  # the only stream
        assert_experience(reader.read(3, 9), 3, 9)
        part = reader.read(2, 5, leaves=["obs"])
        assert part.action is None
        assert part.reward is None
        np.testing.assert_array_equal(part.obs, experience(2, 5).obs)
        state = reader.read_state(0, 4)
        assert isinstance(state.experience.obs, jax.Array)
        assert_experience(state.experience, 0, 4)
        assert reader.read(5, 5).obs.shape == (BATCH, 0, 3)
        with pytest.raises(InvalidArgumentError, match=r"past the 12 committed steps"):
            reader.read(0, 13)
        with pytest.raises(InvalidArgumentError, match="0 <= start <= stop"):
            reader.read(5, 2)
        with pytest.raises(InvalidArgumentError, match="unknown leaves"):
            reader.read(leaves=["nope"])
        with pytest.raises(NotFoundError):
            reader.read(vault_uid="nope")


def test_sample_draws_reproducible_windows(server: ServerThread) -> None:
    for uid, n in (("a", 30), ("b", 5)):
        actor = Actor()
        with RemoteVault(server.target, "v", actor.state.experience, vault_uid=uid) as vault:
            for _ in range(n // 5):
                vault.write(actor.add(5))
    with VaultReader(server.target, "v", structure()) as reader:
        first = reader.sample(32, 6, seed=7)
        again = reader.sample(32, 6, seed=7)
        assert first.experience.obs.shape == (32, 6, 3)
        leaves = zip(
            jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again), strict=True
        )
        for a, b in leaves:
            np.testing.assert_array_equal(a, b)
        # Every window is 6 consecutive steps of one row: codes step by BATCH.
        codes = first.experience.obs[..., 0] / 10
        np.testing.assert_array_equal(np.diff(codes, axis=1), BATCH)
        with pytest.raises(InvalidArgumentError, match="no stream has 31 committed steps"):
            reader.sample(2, 31)
        with pytest.raises(InvalidArgumentError, match="must be >= 1"):
            reader.sample(0, 3)


def test_writes_reach_flashbax(make_server: Callable[..., ServerThread], tmp_path: Any) -> None:
    server = make_server()
    actor = Actor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        vault.write(actor.add(9))
    server.stop()  # closes the store: everything is materialized for flashbax
    from flashbax.vault import Vault as FlashbaxVault

    read = FlashbaxVault("v", rel_dir=str(tmp_path / "vaults"), vault_uid="a").read()
    assert_experience(read.experience, 0, 9)
