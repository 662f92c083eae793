"""`RemoteVault` (flashbax's Vault API over gRPC) and `VaultReader` (reads, follows, samples).

Writes take only the new steps off the device and are pipelined by a background sender over one
Append stream; they survive server restarts (see `expvault._sender`). `VaultReader` (in
`expvault._reader`) streams committed data in ~1 MiB messages as numpy pytrees or flashbax buffer
states; a learner follows new steps with a position it can save and resume (`Follow`), draws
prefetched samples (`SampleIterator`) and reads whole vaults for offline training. Every failed
call raises the `expvault.errors` class the server named.
"""

from __future__ import annotations

import datetime
import functools
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
import jax.numpy as jnp
import numpy as np
from flashbax.buffers.trajectory_buffer import TrajectoryBufferState

from expvault import codec
from expvault._client import Client, Decoder, full_state, read_request, read_streams
from expvault._learner import Follow, Followed, SampleIterator
from expvault._reader import VaultReader
from expvault._rpc import DEFAULT_MAX_MESSAGE_BYTES
from expvault._sender import Outgoing, Sender
from expvault.errors import ExpvaultError, InvalidArgumentError
from expvault.schema import Schema
from expvault.v1 import vault_pb2
from expvault.writer import DeltaWriter, PlannedTransfer

logger = logging.getLogger(__name__)

__all__ = ["Follow", "Followed", "RemoteVault", "SampleIterator", "VaultReader"]


def _default_uid() -> str:
    # flashbax names streams by timestamp; a suffix keeps actors started in the same second apart.
    return f"{datetime.datetime.now().strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"


class RemoteVault:
    """flashbax's `Vault` over gRPC: `write` buffer states, `read` them back.

    A drop-in for `flashbax.vault.Vault` (and `expvault.Vault`) given a server `target` instead
    of `rel_dir`. `write` takes the new steps of a buffer state off the device and queues them;
    a background sender pipelines them to the server and resends after reconnects, so a server
    restart neither loses nor duplicates a step. `flush()` waits until everything written is
    durable; `read` flushes first.

    With several servers sharing one store (`target="host1:50051,host2:50051"`), the stream
    goes to the server it prefers by rendezvous hashing of `(vault_name, vault_uid)`: every
    client picks the same one, and streams spread evenly. When that server is unreachable the
    writer fails over to the next in the stream's order and resumes from the committed offset
    there; the caller sees no error. It returns to the preferred server only when a later
    reconnect finds it back.

    Args:
        target: the server, `HOST:PORT`, or several servers over one store as
            `"host1:50051,host2:50051"` (every client must spell them alike; the order does
            not matter).
        vault_name: the vault; created from `experience_structure` when missing.
        experience_structure: the buffer's experience (pytree, leaves `(B, T, ...)`); None to
            open an existing vault (read back as nested dicts).
        vault_uid: this writer's stream; default a new timestamped name.
        compression: when creating the vault: a preset (`"lz4"`, `"zstd"`, `"gzip"`, `"none"`)
            or a zarr compressor dict; None for the server's default.
        metadata: when creating the vault: JSON-serialisable user metadata.
        timeout_s: deadline of each unary call; with several servers, also how long a server
            may take to open the stream before the writer tries the next.
        reconnect_timeout_s: how long to keep reconnecting (to any server) after the server
            went away.
        max_pending_bytes: written but unacknowledged payload bytes (including steps still on
            their way from the device) above which `write` blocks (backpressure).
        block_when_full: when `max_pending_bytes` are unacknowledged, `write` waits (True) or
            raises `ResourceExhaustedError` at once (False).
        message_bytes: payload per Append message (deltas are split along time).
        max_message_bytes: the channel's message limit (the server's must be as large).
        credentials: TLS credentials, e.g. `expvault.tls_credentials(ca="ca.pem")`; None for a
            plaintext channel.
        token: bearer token sent with every call, for servers started with `--token-file`
            (needs scope `write` to write, `read` to read); None for none.

    Raises:
        InvalidArgumentError: a bad `target` list (an empty entry, a server twice) or token.
        NotFoundError: the vault does not exist and no `experience_structure` was given.
        AlreadyExistsError: it exists with another structure.
        SchemaMismatchError: `experience_structure` differs from the vault's.
        UnavailableError: the server cannot be reached.
        UnauthenticatedError: the server needs a token (`token=`) and got none or a bad one.
        PermissionDeniedError: the token lacks the `write` scope.
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
        token: str | None = None,
    ) -> None:
        self._client = Client(
            target,
            credentials=credentials,
            token=token,
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
                info = self._client.call(
                    lambda s: s.stub.CreateVault, request, vault_name=vault_name
                ).vault
            else:
                info = self._client.get_vault(vault_name)
            self._decoder = Decoder(info.structure, experience_structure)
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
    def servers(self) -> list[str]:
        """The servers of `target` in the order this stream prefers them, best first."""
        return self._client.pool.preference(self.vault_name, self.vault_uid)

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

        Reads the state's ring position (a few scalars) and dispatches a gather of only the new
        steps on the device; the background sender copies them to the host (one transfer),
        encodes and sends them. The state may be donated (`jax.jit(buffer.add,
        donate_argnums=0)`) as soon as this returns: JAX runs the donating computation after
        the pending gather. With `wait=True` it returns once the server acknowledged the steps
        as durable; with `wait=False` it returns at once (`flush()` waits for durability, and a
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
            ResourceExhaustedError: `max_pending_bytes` are unacknowledged and
                `block_when_full` is False; nothing is queued and the next `write` sends these
                steps too.
            ExpvaultError: an earlier write failed (e.g. `OffsetGapError` from the server).
        """
        self._check_open()
        if self._sender is not None:
            self._sender.check()  # an earlier failure, before planning more
        planned = self._writer.plan_transfer(
            state, source_interval, dest_start, committed=self._initial_length
        )
        if planned is None:
            if wait:
                self.flush()
            return 0
        sender = self._ensure_sender()
        sender.put(
            Outgoing(
                planned.start,
                planned.num_steps,
                planned.nbytes,
                functools.partial(self._wire_arrays, planned),
            ),
            block=self._block_when_full,
        )
        self._writer.advance(planned)
        if wait:
            sender.flush()
        return planned.num_steps

    def _wire_arrays(self, planned: PlannedTransfer) -> list[np.ndarray[Any, Any]]:
        """The planned steps on the host, in wire order (on the sender's preparing thread)."""
        arrays = planned.result()
        return [arrays[i] for i in self._to_wire]

    def _ensure_sender(self) -> Sender:
        if self._sender is None:
            self._sender = Sender(
                self._client.pool,
                self.vault_name,
                self.vault_uid,
                self._decoder.wire_names,
                max_pending_bytes=self._max_pending_bytes,
                reconnect_timeout_s=self._client.reconnect_timeout_s,
                message_bytes=self._message_bytes,
                start_offset=self._initial_length,
                # With other servers to try, one that does not answer is left for them.
                open_timeout_s=self._client.timeout_s if len(self._client.targets) > 1 else None,
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
            request = read_request(
                self.vault_name, self.vault_uid, last_steps=timesteps, percentiles=percentiles
            )
            _, streams = read_streams(self._client, request, self._experience_structure, None)
            arrays = streams[self.vault_uid][1]
        return full_state(
            self._decoder.tree(self._decoder.wire_names, [jnp.asarray(a) for a in arrays])
        )

    def _stream_exists(self) -> bool:
        info = self._client.get_vault(self.vault_name)
        return any(s.vault_uid == self.vault_uid for s in info.streams)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError(f"RemoteVault {self.vault_name}/{self.vault_uid} is closed")

    def close(self, timeout_s: float | None = None) -> None:
        """Flushes, ends the Append stream and closes the channels (idempotent).

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
