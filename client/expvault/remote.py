"""`RemoteVault` (flashbax's Vault API over gRPC) and `VaultReader` (reads, follows, samples).

Writes are pipelined by a background sender over one Append stream and survive server restarts
(see `expvault._sender`); reads stream committed data in ~1 MiB messages and return numpy pytrees
or flashbax buffer states. Every failed call raises the `expvault.errors` class the server named.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import jax.numpy as jnp
import numpy as np
from flashbax.buffers.trajectory_buffer import TrajectoryBufferSample, TrajectoryBufferState

from expvault import codec
from expvault._rpc import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Backoff,
    channel_options,
    error_from_rpc,
    is_retryable,
)
from expvault._sender import Sender
from expvault.errors import ExpvaultError, InvalidArgumentError, StorageError
from expvault.schema import Schema
from expvault.v1 import vault_pb2, vault_pb2_grpc
from expvault.writer import DeltaWriter

logger = logging.getLogger(__name__)

__all__ = ["RemoteVault", "VaultReader"]

_Response = TypeVar("_Response")


def _default_uid() -> str:
    # flashbax names streams by timestamp; a suffix keeps actors started in the same second apart.
    return f"{datetime.datetime.now().strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _leaf_name(name: str) -> str:
    """Accepts `"obs"` for the stored name `"obs."`."""
    return name if name.endswith(".") else name + "."


class _Client:
    """A channel and stub with the error mapping and retries readers and writers share."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        timeout_s: float,
        reconnect_timeout_s: float,
        max_message_bytes: int,
    ) -> None:
        options = channel_options(max_message_bytes)
        self.channel = (
            grpc.insecure_channel(target, options=options)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=options)
        )
        self.stub = vault_pb2_grpc.VaultServiceStub(self.channel)
        self.target = target
        self.timeout_s = timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s

    def call(
        self, method: Callable[..., _Response], request: Any, *, retry: bool = True
    ) -> _Response:
        """Runs a unary call; retries it while the server is unreachable (idempotent calls only).

        Raises:
            ExpvaultError: the class the server named, with its message.
        """
        backoff = Backoff(self.reconnect_timeout_s)
        while True:
            try:
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as rpc_error:
                delay = backoff.next_delay() if retry and is_retryable(rpc_error) else None
                if delay is None:
                    raise error_from_rpc(rpc_error) from rpc_error
                logger.debug("call to %s failed (%s); retrying", self.target, rpc_error.code())
                time.sleep(delay)

    def get_vault(self, vault_name: str) -> vault_pb2.VaultInfo:
        request = vault_pb2.GetVaultRequest(vault_name=vault_name)
        return self.call(self.stub.GetVault, request).vault

    def close(self) -> None:
        self.channel.close()


class _Decoder:
    """Turns wire messages of a vault into pytrees of a user's structure."""

    def __init__(self, structure: vault_pb2.Structure, experience_structure: Any) -> None:
        self.wire = codec.schema_from_proto(structure)
        self.user = codec.schema_from_proto(structure, experience_structure)
        self.wire_names = [leaf.name for leaf in self.wire.leaves]

    def selected(self, leaves: Sequence[str] | None) -> list[str]:
        """Wire-ordered names of the selected leaves (all when `leaves` is None)."""
        if leaves is None:
            return list(self.wire_names)
        names = {_leaf_name(n) for n in leaves}
        return [n for n in self.wire_names if n in names]

    def decode(
        self, names: Sequence[str], num_steps: int, blobs: Sequence[bytes], rows: int | None = None
    ) -> list[np.ndarray[Any, Any]]:
        specs = [self.wire.leaves[self.wire_names.index(n)] for n in names]
        batch = self.wire.batch_size if rows is None else rows
        return codec.decode_arrays(specs, batch, num_steps, blobs)

    def tree(self, names: Sequence[str], arrays: Sequence[Any]) -> Any:
        """The user's pytree from wire-ordered arrays; leaves not in `names` are None."""
        by_name = dict(zip(names, arrays, strict=True))
        return self.user.unflatten([by_name.get(leaf.name) for leaf in self.user.leaves])


def _read_request(
    vault_name: str,
    vault_uid: str,
    *,
    start: int = 0,
    stop: int | None = None,
    last_steps: int | None = None,
    percentiles: tuple[int, int] | None = None,
    leaves: Sequence[str] = (),
    follow: bool = False,
    start_offsets: Mapping[str, int] | None = None,
) -> vault_pb2.ReadRequest:
    request = vault_pb2.ReadRequest(
        vault_name=vault_name,
        vault_uid=vault_uid,
        leaves=list(leaves),
        follow=follow,
        start_offsets=dict(start_offsets or {}),
    )
    if last_steps is not None:
        request.last_steps = last_steps
    elif percentiles is not None:
        request.percentiles.low, request.percentiles.high = percentiles
    else:
        request.range.start = start
        if stop is not None:
            request.range.stop = stop
    return request


def _read_streams(
    client: _Client,
    request: vault_pb2.ReadRequest,
    experience_structure: Any,
    names: Sequence[str] | None,
) -> tuple[_Decoder, dict[str, tuple[int, list[np.ndarray[Any, Any]]]]]:
    """Runs a (non-follow) Read; returns the decoder and per stream `(start, wire arrays)`."""
    decoder: _Decoder | None = None
    selected: list[str] = []
    pieces: dict[str, tuple[int, list[list[np.ndarray[Any, Any]]]]] = {}
    try:
        for message in client.stub.Read(request):
            if decoder is None:
                decoder = _Decoder(message.structure, experience_structure)
                selected = decoder.selected(names)
                continue
            start, parts = pieces.setdefault(message.vault_uid, (message.start, []))
            if message.num_steps:
                parts.append(decoder.decode(selected, message.num_steps, list(message.leaves)))
    except grpc.RpcError as rpc_error:
        raise error_from_rpc(rpc_error) from rpc_error
    if decoder is None:
        raise StorageError("the server ended a Read without its structure")
    out = {}
    for uid, (start, parts) in pieces.items():
        if not parts:
            empty = decoder.decode(selected, 0, [b""] * len(selected))
            out[uid] = (start, [np.array(a) for a in empty])
        elif len(parts) == 1:
            out[uid] = (start, parts[0])
        else:
            out[uid] = (start, [np.concatenate(leaf, axis=1) for leaf in zip(*parts, strict=True)])
    return decoder, out


class RemoteVault:
    """flashbax's `Vault` over gRPC: `write` buffer states, `read` them back.

    A drop-in for `flashbax.vault.Vault` (and `expvault.Vault`) given a server `target` instead
    of `rel_dir`. `write` takes the new steps of a buffer state off the device and queues them;
    a background sender pipelines them to the server and resends after reconnects, so a server
    restart neither loses nor duplicates a step. `flush()` waits until everything written is
    durable; `read` flushes first.

    Args:
        target: the server, `HOST:PORT`.
        vault_name: the vault; created from `experience_structure` when missing.
        experience_structure: the buffer's experience (pytree, leaves `(B, T, ...)`); None to
            open an existing vault (read back as nested dicts).
        vault_uid: this writer's stream; default a new timestamped name.
        compression: when creating the vault: a preset (`"lz4"`, `"zstd"`, `"gzip"`, `"none"`)
            or a zarr compressor dict; None for the server's default.
        metadata: when creating the vault: JSON-serialisable user metadata.
        timeout_s: deadline of each unary call.
        reconnect_timeout_s: how long to keep reconnecting after the server went away.
        max_pending_bytes: unacknowledged bytes above which `write` blocks (backpressure).
        block_when_full: when `max_pending_bytes` are unacknowledged, `write` waits (True) or
            raises `ResourceExhaustedError` at once (False).
        message_bytes: payload per Append message (deltas are split along time).
        max_message_bytes: the channel's message limit (the server's must be as large).
        credentials: TLS credentials; None for a plaintext channel.

    Raises:
        NotFoundError: the vault does not exist and no `experience_structure` was given.
        AlreadyExistsError: it exists with another structure.
        SchemaMismatchError: `experience_structure` differs from the vault's.
        UnavailableError: the server cannot be reached.
    """

    def __init__(
        self,
        target: str,
        vault_name: str,
        experience_structure: Any = None,
        vault_uid: str | None = None,
        compression: str | Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = 30.0,
        reconnect_timeout_s: float = 60.0,
        max_pending_bytes: int = 256 << 20,
        block_when_full: bool = True,
        message_bytes: int = codec.DEFAULT_MESSAGE_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._client = _Client(
            target,
            credentials=credentials,
            timeout_s=timeout_s,
            reconnect_timeout_s=reconnect_timeout_s,
            max_message_bytes=max_message_bytes,
        )
        try:
            if experience_structure is not None:
                request = vault_pb2.CreateVaultRequest(
                    vault_name=vault_name,
                    structure=codec.schema_to_proto(Schema.from_experience(experience_structure)),
                    metadata_json=codec.to_json(metadata),
                    compression_json=codec.to_json(compression),
                )
                info = self._client.call(self._client.stub.CreateVault, request).vault
            else:
                info = self._client.get_vault(vault_name)
            self._decoder = _Decoder(info.structure, experience_structure)
        except BaseException:
            self._client.close()
            raise
        self.vault_name = vault_name
        self.vault_uid = vault_uid or _default_uid()
        self._experience_structure = experience_structure
        self._initial_length = next(
            (s.length for s in info.streams if s.vault_uid == self.vault_uid), 0
        )
        user = self._decoder.user
        self._to_wire = [
            [leaf.name for leaf in user.leaves].index(name) for name in self._decoder.wire_names
        ]
        self._writer = DeltaWriter(user)
        self._max_pending_bytes = max_pending_bytes
        self._block_when_full = block_when_full
        self._message_bytes = message_bytes
        self._sender: Sender | None = None
        self._closed = False

    @property
    def schema(self) -> Schema:
        """The vault's experience structure, in this vault's pytree form."""
        return self._decoder.user

    @property
    def vault_index(self) -> int:
        """Steps in this stream once everything written is acknowledged (flashbax's name)."""
        return (
            self._initial_length if self._writer.next_offset is None else self._writer.next_offset
        )

    @property
    def committed_index(self) -> int:
        """Steps of this stream the server acknowledged as durable so far."""
        if self._sender is None:
            return self._initial_length
        return max(self._initial_length, self._sender.committed)

    def write(
        self,
        state: Any,
        source_interval: tuple[int, int] = (0, 0),
        dest_start: int | None = None,
        *,
        wait: bool = True,
    ) -> int:
        """Writes the new steps of a buffer state to the server (flashbax's `write`).

        Only the new steps are gathered on the device and copied to the host, in one transfer,
        before this returns (so the state may be donated right after). With `wait=True` it
        returns once the server acknowledged them as durable; with `wait=False` it queues them
        for the background sender and returns at once (`flush()` waits for durability, and a
        failure in the background is raised by the next call).

        Args:
            state: a flashbax `TrajectoryBufferState` (experience leaves `(B, T, ...)`), or an
                `expvault.counted` one for exact overrun detection.
            source_interval: `(0, 0)` for the steps added since the last write, else the ring
                interval `[a, b)` to store (wrapping when `b < a`), as in flashbax.
            dest_start: the stream offset to write at; default right after the previous write.
            wait: wait for the acknowledgement (default) or only queue.

        Returns:
            The number of time steps written (queued, with `wait=False`).

        Raises:
            DataLossError: the ring overwrote steps before they were written (naming the range);
                nothing is queued and the next `write` sends the steps still in the ring.
            SchemaMismatchError: the state does not match the vault's structure.
            ResourceExhaustedError: the queue is full and `block_when_full` is False.
            ExpvaultError: an earlier write failed on the server (e.g. `OffsetGapError`).
        """
        self._check_open()
        if self._sender is not None:
            self._sender.put([])  # raises an earlier failure before planning more
        planned = self._writer.plan(
            state, source_interval, dest_start, committed=self._initial_length
        )
        if planned is None:
            if wait:
                self.flush()
            return 0
        wire = [planned.arrays[i] for i in self._to_wire]
        parts = list(codec.split_steps(planned.start, wire, self._message_bytes))
        sender = self._ensure_sender()
        sender.put(parts, block=self._block_when_full)
        self._writer.advance(planned)
        if wait:
            sender.flush()
        return planned.num_steps

    def _ensure_sender(self) -> Sender:
        if self._sender is None:
            self._sender = Sender(
                self._client.stub,
                self.vault_name,
                self.vault_uid,
                self._decoder.wire_names,
                max_pending_bytes=self._max_pending_bytes,
                reconnect_timeout_s=self._client.reconnect_timeout_s,
            )
        return self._sender

    def flush(self, timeout_s: float | None = None) -> int:
        """Waits until every write is durable on the server.

        Returns:
            The committed length of this stream.

        Raises:
            ExpvaultError: a write failed (the server's error, or `UnavailableError` after
                `reconnect_timeout_s` without a server, or after `timeout_s`).
        """
        if self._sender is None:
            return self._initial_length
        return self._sender.flush(timeout_s)

    def read(
        self,
        timesteps: int | None = None,
        percentiles: tuple[int, int] | None = None,
    ) -> TrajectoryBufferState[Any]:
        """Reads this stream back (flashbax's `read`), after flushing pending writes.

        Args:
            timesteps: read the last `timesteps` steps.
            percentiles: else read `[length * lo / 100, length * hi / 100)`.

        Returns:
            A `TrajectoryBufferState` whose experience leaves are jax arrays `(B, T, ...)`.

        Raises:
            InvalidArgumentError: bad `timesteps` or `percentiles`.
        """
        self._check_open()
        self.flush()
        if self._sender is None and self.vault_index == 0 and not self._stream_exists():
            arrays = self._decoder.decode(
                self._decoder.wire_names, 0, [b""] * len(self._decoder.wire_names)
            )
        else:
            request = _read_request(
                self.vault_name, self.vault_uid, last_steps=timesteps, percentiles=percentiles
            )
            _, streams = _read_streams(self._client, request, self._experience_structure, None)
            arrays = streams[self.vault_uid][1]
        tree = self._decoder.tree(self._decoder.wire_names, [jnp.asarray(a) for a in arrays])
        return TrajectoryBufferState(
            experience=tree,
            current_index=jnp.array(0, dtype=int),
            is_full=jnp.array(True, dtype=bool),
        )

    def _stream_exists(self) -> bool:
        info = self._client.get_vault(self.vault_name)
        return any(s.vault_uid == self.vault_uid for s in info.streams)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError(f"RemoteVault {self.vault_name}/{self.vault_uid} is closed")

    def close(self, timeout_s: float | None = None) -> None:
        """Flushes, ends the Append stream and closes the channel (idempotent).

        Raises:
            ExpvaultError: a write failed; the vault is closed anyway.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._sender is not None:
                self._sender.close(timeout_s)
        finally:
            self._client.close()

    def __enter__(self) -> RemoteVault:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: stop without raising a second error over the first.
        try:
            self.close(timeout_s=self._client.timeout_s)
        except ExpvaultError as error:
            logger.warning("closing %s/%s: %s", self.vault_name, self.vault_uid, error)


class VaultReader:
    """Reads a vault for learners: ranges, following new steps, random windows.

    Args:
        target: the server, `HOST:PORT`.
        vault_name: the vault.
        experience_structure: optional pytree whose structure results take (matched by leaf
            name); default nested dicts.
        vault_uid: the stream `read` and `follow` use by default.
        timeout_s: deadline of each unary call.
        reconnect_timeout_s: how long `follow` and unary calls keep retrying an absent server.
        max_message_bytes: the channel's message limit.
        credentials: TLS credentials; None for a plaintext channel.

    Raises:
        NotFoundError: no such vault.
        SchemaMismatchError: `experience_structure` differs from the vault's.
    """

    def __init__(
        self,
        target: str,
        vault_name: str,
        experience_structure: Any = None,
        *,
        vault_uid: str | None = None,
        timeout_s: float = 30.0,
        reconnect_timeout_s: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._client = _Client(
            target,
            credentials=credentials,
            timeout_s=timeout_s,
            reconnect_timeout_s=reconnect_timeout_s,
            max_message_bytes=max_message_bytes,
        )
        try:
            info = self._client.get_vault(vault_name)
            self._decoder = _Decoder(info.structure, experience_structure)
        except BaseException:
            self._client.close()
            raise
        self.vault_name = vault_name
        self.vault_uid = vault_uid
        self._experience_structure = experience_structure

    @property
    def schema(self) -> Schema:
        """The vault's experience structure, in this reader's pytree form."""
        return self._decoder.user

    def streams(self) -> dict[str, int]:
        """Every stream of the vault and its committed length in steps."""
        return {s.vault_uid: s.length for s in self._client.get_vault(self.vault_name).streams}

    def _uid(self, vault_uid: str | None) -> str:
        uid = vault_uid or self.vault_uid
        if uid:
            return uid
        uids = sorted(self.streams())
        if len(uids) != 1:
            raise InvalidArgumentError(
                f"vault {self.vault_name!r} has streams {uids}; name one with vault_uid"
            )
        return uids[0]

    def read(
        self,
        start: int = 0,
        stop: int | None = None,
        vault_uid: str | None = None,
        leaves: Sequence[str] | None = None,
    ) -> Any:
        """Reads committed steps `[start, stop)` of one stream.

        Args:
            start: first step.
            stop: one past the last step; default the committed length.
            vault_uid: the stream; default the reader's, or the vault's only stream.
            leaves: leaf names (`"obs"` or `"obs."`) to read; default all. Others are None.

        Returns:
            The experience pytree, numpy leaves `(B, stop - start, ...)`.

        Raises:
            InvalidArgumentError: a negative, reversed or uncommitted range, or unknown leaves.
            NotFoundError: no such stream.
        """
        uid = self._uid(vault_uid)
        names = self._decoder.selected(leaves)
        request = _read_request(
            self.vault_name,
            uid,
            start=start,
            stop=stop,
            leaves=[_leaf_name(n) for n in leaves] if leaves is not None else (),
        )
        _, streams = _read_streams(self._client, request, self._experience_structure, leaves)
        return self._decoder.tree(names, streams[uid][1])

    def read_state(
        self,
        start: int = 0,
        stop: int | None = None,
        vault_uid: str | None = None,
    ) -> TrajectoryBufferState[Any]:
        """Like `read`, as a flashbax `TrajectoryBufferState` (jax leaves `(B, T, ...)`)."""
        tree = self.read(start, stop, vault_uid)
        return TrajectoryBufferState(
            experience=_to_jax(tree),
            current_index=jnp.array(0, dtype=int),
            is_full=jnp.array(True, dtype=bool),
        )

    def follow(
        self,
        vault_uid: str | None = None,
        start: int = 0,
        *,
        leaves: Sequence[str] | None = None,
        all_streams: bool | None = None,
    ) -> Iterator[tuple[str, int, Any]]:
        """Iterates over committed steps from `start`, then new ones as they commit; endless.

        Reconnects after a server restart and resumes where it stopped: no step is missed or
        repeated. Stop by breaking out of the loop (or closing the iterator).

        Args:
            vault_uid: the stream; default the reader's. Without either, every stream of the
                vault, including streams created while following.
            start: first step of each stream.
            leaves: leaf names to read; default all.
            all_streams: force following every stream (default: when no uid is known).

        Yields:
            `(vault_uid, start, experience)`: steps `[start, start + T)` of that stream, the
            experience a pytree with numpy leaves `(B, T, ...)`.

        Raises:
            ExpvaultError: the server refused (e.g. `NotFoundError`), or stayed away longer than
                `reconnect_timeout_s`.
        """
        uid = "" if all_streams else (vault_uid or self.vault_uid or "")
        names = self._decoder.selected(leaves)
        positions: dict[str, int] = {}
        backoff = Backoff(self._client.reconnect_timeout_s)
        backoff_fresh = True
        while True:
            request = _read_request(
                self.vault_name,
                uid,
                start=start,
                leaves=[_leaf_name(n) for n in leaves] if leaves is not None else (),
                follow=True,
                start_offsets=positions,
            )
            call = self._client.stub.Read(request)
            try:
                for message in call:
                    backoff.reset()
                    backoff_fresh = True
                    if not message.vault_uid or not message.num_steps:
                        continue
                    position = positions.get(message.vault_uid, start)
                    stop = message.start + message.num_steps
                    if stop <= position:
                        continue  # already yielded before a reconnect
                    if message.start > position:
                        raise StorageError(
                            f"stream {message.vault_uid} skipped from {position} to {message.start}"
                        )
                    arrays = self._decoder.decode(names, message.num_steps, list(message.leaves))
                    skip = position - message.start
                    if skip:
                        arrays = [a[:, skip:] for a in arrays]
                    positions[message.vault_uid] = stop
                    yield message.vault_uid, position, self._decoder.tree(names, arrays)
                return  # only a bounded follow ends; ours never do
            except grpc.RpcError as rpc_error:
                delay = backoff.next_delay() if is_retryable(rpc_error) else None
                if delay is None:
                    raise error_from_rpc(rpc_error) from rpc_error
                # One warning per outage; the retries behind it at DEBUG.
                log = logger.warning if backoff_fresh else logger.debug
                backoff_fresh = False
                log(
                    "following %s lost the server (%s); resuming in %.2f s",
                    self.vault_name,
                    rpc_error.code().name,
                    delay,
                )
                time.sleep(delay)
            finally:
                call.cancel()

    def sample(
        self,
        batch_size: int,
        sequence_length: int,
        seed: int | None = None,
        *,
        vault_uids: Sequence[str] = (),
        leaves: Sequence[str] | None = None,
    ) -> TrajectoryBufferSample[Any]:
        """Draws `batch_size` uniform random windows of `sequence_length` consecutive steps.

        Each window is one batch row of one stream; windows are drawn among all streams (or
        `vault_uids`) with replacement. The same `seed` on the same data gives the same windows.

        Returns:
            A flashbax `TrajectoryBufferSample`; experience leaves numpy
            `(batch_size, sequence_length, ...)`.

        Raises:
            InvalidArgumentError: sizes < 1, unknown leaves, or no stream long enough.
        """
        request = vault_pb2.SampleRequest(
            vault_name=self.vault_name,
            batch_size=batch_size,
            sequence_length=sequence_length,
            leaves=[_leaf_name(n) for n in leaves] if leaves is not None else [],
            vault_uids=list(vault_uids),
        )
        if seed is not None:
            request.seed = seed
        names = self._decoder.selected(leaves)
        parts: list[list[np.ndarray[Any, Any]]] = []
        backoff = Backoff(self._client.reconnect_timeout_s)
        while True:
            try:
                for message in self._client.stub.Sample(request):
                    rows = len(message.starts)
                    parts.append(
                        self._decoder.decode(names, sequence_length, list(message.leaves), rows)
                    )
                break
            except grpc.RpcError as rpc_error:
                delay = backoff.next_delay() if is_retryable(rpc_error) else None
                if delay is None:
                    raise error_from_rpc(rpc_error) from rpc_error
                parts.clear()
                time.sleep(delay)
        arrays = [
            leaf[0] if len(leaf) == 1 else np.concatenate(leaf) for leaf in zip(*parts, strict=True)
        ]
        return TrajectoryBufferSample(experience=self._decoder.tree(names, arrays))

    def close(self) -> None:
        """Closes the channel."""
        self._client.close()

    def __enter__(self) -> VaultReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_jax(tree: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(jnp.asarray, tree)
