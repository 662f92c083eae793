"""RemoteVault writes: non-blocking, donated buffers, the bounded queue, the wire encoding."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flashbax as fbx
import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BATCH, RING, ServerThread, assert_experience, experience, structure
from expvault import (
    ExpvaultError,
    RemoteVault,
    ResourceExhaustedError,
    SchemaMismatchError,
    StreamBusyError,
    VaultReader,
    codec,
    counted,
)
from expvault._rpc import channel_options
from expvault._sender import Outgoing, Sender
from expvault.v1 import vault_pb2


class DonatingActor:
    """A flashbax trajectory buffer stepped by `jax.jit(buffer.add, donate_argnums=0)`."""

    def __init__(self, *, use_counter: bool = False) -> None:
        buffer = fbx.make_trajectory_buffer(
            add_batch_size=BATCH,
            max_length_time_axis=RING,
            min_length_time_axis=1,
            sample_batch_size=1,
            sample_sequence_length=1,
            period=1,
        )
        self.buffer = counted(buffer) if use_counter else buffer
        first = jax.tree_util.tree_map(lambda x: jnp.asarray(x[0, 0]), experience(0, 1))
        self.state = self.buffer.init(first)
        self.steps = 0
        self._add = jax.jit(self.buffer.add, donate_argnums=0)

    def add(self, n: int) -> Any:
        batch = jax.tree_util.tree_map(jnp.asarray, experience(self.steps, self.steps + n))
        self.state = self._add(self.state, batch)
        self.steps += n
        return self.state


@pytest.mark.parametrize("use_counter", [False, True])
def test_non_blocking_writes_of_a_donated_buffer_arrive_exactly(
    server: ServerThread, use_counter: bool
) -> None:
    actor = DonatingActor(use_counter=use_counter)
    rng = np.random.default_rng(0)
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        written = 0
        for _ in range(40):
            state = actor.add(int(rng.integers(1, RING // 2)))
            written += vault.write(state, wait=False)
            donated = state
            actor.add(int(rng.integers(1, 3)))  # donates `state` while its steps may be in flight
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated.experience))
            written += vault.write(actor.state, wait=False)
        assert written == actor.steps
        assert vault.vault_index == actor.steps
        assert vault.flush() == actor.steps
        assert vault.committed_index == actor.steps
        assert_experience(vault.read().experience, 0, actor.steps)


def test_write_returns_the_steps_queued_and_a_flush_makes_them_durable(
    server: ServerThread,
) -> None:
    actor = DonatingActor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        assert vault.write(actor.state, wait=False) == 0  # nothing new
        assert vault.write(actor.add(RING), wait=False) == RING  # a full ring, wrapped: all of it
        assert vault.write(actor.add(5), wait=False) == 5
        assert vault.write(actor.add(RING - 1)) == RING - 1  # waits for the ack of all three
        assert vault.committed_index == 2 * RING + 4
    with VaultReader(server.target, "v", structure()) as reader:
        assert_experience(reader.read(vault_uid="a"), 0, 2 * RING + 4)


def test_a_mismatched_state_is_refused_every_time(server: ServerThread) -> None:
    actor = DonatingActor()
    wrong = actor.state.replace(
        experience=actor.state.experience._replace(
            action=actor.state.experience.action.astype(jnp.float32)
        )
    )
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        vault.write(actor.add(3), wait=False)
        for _ in range(2):  # the structure check is cached for good structures only
            with pytest.raises(SchemaMismatchError, match=r"'action\.' has dtype float32"):
                vault.write(wrong, wait=False)
        assert vault.write(actor.add(2)) == 2
        assert vault.committed_index == 5


# -- the sender on its own: a fetch that the test controls ----------------------------------------


def _outgoing(start: int, n: int, fetch: Callable[[], Sequence[np.ndarray]] | None = None) -> Any:
    step = experience(start, start + n)
    arrays = [step.action, step.obs, step.reward]  # the server's leaf order: sorted by name
    nbytes = sum(a.nbytes for a in arrays)
    return Outgoing(start, n, nbytes, fetch or (lambda: arrays))


@pytest.fixture
def sender_for(server: ServerThread) -> Any:
    RemoteVault(server.target, "v", structure(), vault_uid="a").close()
    channel = grpc.insecure_channel(server.target, options=channel_options())
    senders: list[Sender] = []

    def make(**options: Any) -> Sender:
        settings: dict[str, Any] = {"max_pending_bytes": 1 << 20, "reconnect_timeout_s": 5.0}
        settings.update(options)
        sender = Sender(channel, "v", "a", ["action.", "obs.", "reward."], **settings)
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        with contextlib.suppress(ExpvaultError):  # a failure the test raised already
            sender.close(timeout_s=10)
    channel.close()


def test_steps_still_on_their_way_from_the_device_count_against_the_queue(
    sender_for: Any,
) -> None:
    one_delta = _outgoing(0, 4).nbytes
    sender = sender_for(max_pending_bytes=one_delta + 1)
    arrived = threading.Event()
    first = _outgoing(0, 4)
    sender.put(_outgoing(0, 4, lambda: (arrived.wait(10), first.fetch())[1]))
    # Nothing was encoded or sent yet, and the queue is full all the same.
    with pytest.raises(ResourceExhaustedError, match="max_pending_bytes"):
        sender.put(_outgoing(4, 4), block=False)
    queued = threading.Event()

    def put_blocking() -> None:
        sender.put(_outgoing(4, 4))  # blocks until the first delta is acknowledged
        queued.set()

    thread = threading.Thread(target=put_blocking)
    thread.start()
    assert not queued.wait(0.2)
    arrived.set()
    thread.join(10)
    assert queued.is_set()
    assert sender.flush() == 8


def test_a_failed_device_copy_surfaces_on_the_next_call(sender_for: Any) -> None:
    sender = sender_for()
    sender.put(_outgoing(0, 3))
    assert sender.flush() == 3

    def broken() -> Sequence[np.ndarray]:
        raise RuntimeError("device lost")

    sender.put(_outgoing(3, 2, broken))
    with pytest.raises(ExpvaultError, match=r"steps \[3, 5\) of v/a .* device lost") as info:
        sender.flush()
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ExpvaultError, match="device lost"):
        sender.check()
    with pytest.raises(ExpvaultError, match="device lost"):
        sender.put(_outgoing(5, 1))
    assert sender.committed == 3


def test_write_raises_a_background_failure(server: ServerThread) -> None:
    actor = DonatingActor()
    with RemoteVault(server.target, "v", actor.state.experience, vault_uid="a") as vault:
        vault.write(actor.add(2), dest_start=50, wait=False)  # a gap: refused in the background
        deadline = time.monotonic() + 10
        with pytest.raises(ExpvaultError, match="resend from 0"):  # noqa: PT012
            while time.monotonic() < deadline:
                vault.write(actor.add(1), wait=False)
                time.sleep(0.01)


# -- the wire encoding ---------------------------------------------------------------------------


def _awkward_leaves() -> list[np.ndarray[Any, Any]]:
    """Leaves `(3, 10, ...)` of every kind the wire encoding must handle."""
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((3, 10, 4)).astype(np.float32),
        rng.random((3, 10)) < 0.5,
        np.zeros((3, 10, 0), np.int16),
        rng.standard_normal((3, 10, 2)).astype(">f8"),  # big-endian input is converted
        rng.standard_normal((3, 10)).astype(jnp.bfloat16),
        rng.standard_normal((3, 20, 4)).astype(np.float32)[:, ::2],  # not contiguous
    ]


@pytest.mark.parametrize("message_bytes", [1, 50, 200, 1 << 20])
@pytest.mark.parametrize("start", [0, 7, 1 << 40])
def test_encoded_chunks_are_the_append_requests_protobuf_builds(
    message_bytes: int, start: int
) -> None:
    arrays = _awkward_leaves()
    chunks = list(codec.append_chunks(start, arrays, message_bytes))
    parts = list(codec.split_steps(start, arrays, message_bytes))
    assert len(chunks) == len(parts)
    for chunk, (part_start, n, leaves) in zip(chunks, parts, strict=True):
        want = vault_pb2.AppendRequest(
            chunk=vault_pb2.AppendChunk(start=part_start, num_steps=n, leaves=leaves)
        )
        assert chunk.request == want.SerializeToString()
        assert vault_pb2.AppendRequest.FromString(chunk.request) == want
        assert (chunk.start, chunk.num_steps) == (part_start, n)
        assert chunk.nbytes == sum(len(leaf) for leaf in leaves)
    assert codec.serialize_append_request(chunks[0].request) is chunks[0].request
    opened = vault_pb2.AppendRequest(open=vault_pb2.AppendOpen(vault_name="v"))
    assert codec.serialize_append_request(opened) == opened.SerializeToString()


@pytest.mark.parametrize(
    "steps", [slice(None), slice(0, 10), slice(3, 7), slice(9, 10), slice(4, 4)]
)
def test_responses_with_leaves_parse_as_the_messages_protobuf_builds(steps: slice) -> None:
    arrays = [a[:, steps] for a in _awkward_leaves()]  # a part of the steps: strided rows
    read = vault_pb2.ReadResponse(vault_uid="s", start=5, num_steps=4, committed_offset=9)
    got = vault_pb2.ReadResponse.FromString(codec.with_leaves(read, arrays))
    read.leaves.extend(codec.encode_arrays(arrays))
    assert got == read
    sample = vault_pb2.SampleResponse(first=2, vault_uids=["a", "b", "a"], starts=[1, 2, 3])
    got_sample = vault_pb2.SampleResponse.FromString(codec.with_leaves(sample, arrays))
    sample.leaves.extend(codec.encode_arrays(arrays))
    assert got_sample == sample
    # the server's serializer passes serialized responses through and serializes messages
    assert codec.serialize_response(b"raw") == b"raw"
    assert codec.serialize_response(read) == read.SerializeToString()


def test_non_blocking_writes_queue_while_the_server_is_away(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server()
    port = server.port
    actor = DonatingActor()
    vault = RemoteVault(
        server.target, "v", actor.state.experience, vault_uid="a", reconnect_timeout_s=30
    )
    assert vault.write(actor.add(4)) == 4
    server.stop()
    for _ in range(6):  # no server to acknowledge them: queued all the same
        assert vault.write(actor.add(3), wait=False) == 3
    assert vault.committed_index == 4
    assert vault.vault_index == 22
    server = make_server(listen=f"127.0.0.1:{port}")
    assert vault.flush() == 22
    assert_experience(vault.read().experience, 0, 22)
    vault.close()


def test_a_writer_refuses_to_resume_over_steps_another_writer_appended(
    server: ServerThread,
) -> None:
    """A second writer of a stream opened before the first one's last steps committed must not
    treat its own new steps as resends of those (the server acks duplicates without writing)."""
    first = DonatingActor()
    with RemoteVault(server.target, "v", first.state.experience, vault_uid="a") as vault:
        vault.write(first.add(4))
        late = RemoteVault(server.target, "v", vault_uid="a")  # reads length 4; opens lazily
        vault.write(first.add(3))
    second = DonatingActor()
    with late, pytest.raises(StreamBusyError, match=r"holds 7 steps.*started from 4"):
        late.write(second.add(2))
    with VaultReader(server.target, "v", structure()) as reader:
        assert_experience(reader.read(vault_uid="a"), 0, 7)
