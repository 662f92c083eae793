"""What `RemoteVault` and `VaultReader` share: a channel with retries, decoding, Read calls.

Protobuf stops here and in `remote.py` / `_reader.py`: the rest of expvault sees `Schema`, numpy
arrays and flashbax buffer states.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import jax
import jax.numpy as jnp
import numpy as np
from flashbax.buffers.trajectory_buffer import TrajectoryBufferState

from expvault import codec
from expvault._rpc import (
    ChannelPool,
    Failover,
    channel_options,
    error_from_rpc,
    is_retryable,
    method_path,
)
from expvault.errors import StorageError
from expvault.v1 import vault_pb2, vault_pb2_grpc

logger = logging.getLogger(__name__)

__all__ = [
    "Client",
    "Decoder",
    "Stubs",
    "full_state",
    "leaf_name",
    "parse_with_leaves",
    "read_request",
    "read_streams",
    "to_jax",
]

_Response = TypeVar("_Response")


def leaf_name(name: str) -> str:
    """Accepts `"obs"` for the stored name `"obs."`."""
    return name if name.endswith(".") else name + "."


class Stubs:
    """The calls of one server's channel.

    Attributes:
        stub: the generated stub.
        read_raw: Read answering raw bytes, for `parse_with_leaves` (no copies of leaves).
        sample_raw: Sample answering raw bytes.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = vault_pb2_grpc.VaultServiceStub(channel)
        self.read_raw: grpc.UnaryStreamMultiCallable[vault_pb2.ReadRequest, bytes]
        self.read_raw = channel.unary_stream(
            method_path("Read"),
            request_serializer=vault_pb2.ReadRequest.SerializeToString,
        )
        self.sample_raw: grpc.UnaryStreamMultiCallable[vault_pb2.SampleRequest, bytes]
        self.sample_raw = channel.unary_stream(
            method_path("Sample"),
            request_serializer=vault_pb2.SampleRequest.SerializeToString,
        )


class Client:
    """Channels to one or more servers, with the error mapping and retries of readers and writers.

    `target` is `HOST:PORT` or a comma-separated list of servers that share one store. A call
    about a vault (and stream) tries the servers in the order that vault prefers
    (`expvault._rpc.preference`, the same order on every client) and moves on to the next when
    one is unreachable. Each server's channel is opened on first use, with the same options,
    credentials and token.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        timeout_s: float,
        reconnect_timeout_s: float,
        max_message_bytes: int,
        token: str | None = None,
    ) -> None:
        self.pool = ChannelPool(
            target,
            credentials=credentials,
            token=token,
            options=channel_options(max_message_bytes),
        )
        self.targets = self.pool.targets
        self.target = target
        self.timeout_s = timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self._lock = threading.Lock()
        self._stubs: dict[str, Stubs] = {}

    def stubs(self, target: str) -> Stubs:
        """The calls of one of `targets` (its channel opens on first use)."""
        with self._lock:
            stubs = self._stubs.get(target)
            if stubs is None:
                stubs = self._stubs[target] = Stubs(self.pool.channel(target))
            return stubs

    def failover(self, vault_name: str, vault_uid: str = "") -> Failover:
        """The servers a call about this vault (and stream) tries, in order, across outages."""
        return Failover(self.pool.preference(vault_name, vault_uid), self.reconnect_timeout_s)

    def moves_on(self, rpc_error: grpc.RpcError) -> bool:
        """Whether a failed call may succeed on another try (of a call safe to repeat)."""
        if is_retryable(rpc_error):
            return True
        # A server that does not answer in time: with others to try, try them.
        return (
            len(self.targets) > 1
            and isinstance(rpc_error, grpc.Call)
            and rpc_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        )

    def call(
        self,
        method: Callable[[Stubs], Callable[..., _Response]],
        request: Any,
        *,
        vault_name: str = "",
        vault_uid: str = "",
        retry: bool = True,
    ) -> _Response:
        """Runs a unary call; retries it while servers are unreachable (idempotent calls only).

        Args:
            method: picks the call from a server's `Stubs`, e.g. `lambda s: s.stub.GetVault`.
            request: the request.
            vault_name: the vault the call is about (picks the servers' order).
            vault_uid: the stream the call is about, if any.
            retry: try again (other servers, then with backoff up to `reconnect_timeout_s`)
                while unreachable.

        Raises:
            ExpvaultError: the class the server named, with its message.
        """
        failover = self.failover(vault_name, vault_uid)
        while True:
            target = failover.target
            try:
                return method(self.stubs(target))(request, timeout=self.timeout_s)
            except grpc.RpcError as rpc_error:
                delay = failover.next_delay() if retry and self.moves_on(rpc_error) else None
                if delay is None:
                    raise error_from_rpc(rpc_error) from rpc_error
                logger.debug(
                    "call to %s failed (%s); trying %s", target, rpc_error.code(), failover.target
                )
                time.sleep(delay)

    def get_vault(self, vault_name: str) -> vault_pb2.VaultInfo:
        request = vault_pb2.GetVaultRequest(vault_name=vault_name)
        return self.call(lambda s: s.stub.GetVault, request, vault_name=vault_name).vault

    def close(self) -> None:
        """Closes every server's channel (idempotent); calls in flight end."""
        self.pool.close()


_Message = TypeVar("_Message", vault_pb2.ReadResponse, vault_pb2.SampleResponse)


def parse_with_leaves(
    raw: bytes, message_type: type[_Message]
) -> tuple[_Message, list[memoryview]]:
    """Parses a raw Read or Sample response; its `leaves` come back as views of `raw`.

    The returned message has no `leaves`: protobuf would copy each leaf when parsing, and again
    on every access to the field.
    """
    number = message_type.DESCRIPTOR.fields_by_name["leaves"].number
    rest, leaves = codec.split_bytes_field(raw, number)
    return message_type.FromString(rest), leaves


class Decoder:
    """Turns wire messages of a vault into pytrees of a user's structure."""

    def __init__(self, structure: vault_pb2.Structure, experience_structure: Any) -> None:
        self.wire = codec.schema_from_proto(structure)
        self.user = codec.schema_from_proto(structure, experience_structure)
        self.wire_names = [leaf.name for leaf in self.wire.leaves]

    def selected(self, leaves: Sequence[str] | None) -> list[str]:
        """Wire-ordered names of the selected leaves (all when `leaves` is None)."""
        if leaves is None:
            return list(self.wire_names)
        names = {leaf_name(n) for n in leaves}
        return [n for n in self.wire_names if n in names]

    def decode(
        self,
        names: Sequence[str],
        num_steps: int,
        blobs: Sequence[bytes | memoryview],
        rows: int | None = None,
    ) -> list[np.ndarray[Any, Any]]:
        specs = [self.wire.leaves[self.wire_names.index(n)] for n in names]
        batch = self.wire.batch_size if rows is None else rows
        return codec.decode_arrays(specs, batch, num_steps, blobs)

    def tree(self, names: Sequence[str], arrays: Sequence[Any]) -> Any:
        """The user's pytree from wire-ordered arrays; leaves not in `names` are None."""
        by_name = dict(zip(names, arrays, strict=True))
        return self.user.unflatten([by_name.get(leaf.name) for leaf in self.user.leaves])


def read_request(
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


class _Gathered:
    """One stream's steps of a Read, copied into place as messages arrive.

    Copying each message while gRPC receives the next one (its threads run without the GIL)
    is faster than keeping the messages and concatenating them at the end, and holds the data
    once instead of twice.
    """

    def __init__(self, start: int, capacity: int) -> None:
        self.start = start
        self.capacity = capacity
        self.filled = 0
        self.arrays: list[np.ndarray[Any, Any]] = []

    def add(self, start: int, arrays: Sequence[np.ndarray[Any, Any]]) -> None:
        if start != self.start + self.filled:
            raise StorageError(
                f"the server sent steps from {start}, expected {self.start + self.filled}"
            )
        n = int(arrays[0].shape[1])
        if self.filled + n > self.capacity or not self.arrays:
            self.capacity = max(self.capacity, self.filled + n, 2 * self.capacity)
            grown = [np.empty((a.shape[0], self.capacity, *a.shape[2:]), a.dtype) for a in arrays]
            for new, old in zip(grown, self.arrays, strict=False):
                new[:, : self.filled] = old[:, : self.filled]
            self.arrays = grown
        for out, a in zip(self.arrays, arrays, strict=True):
            out[:, self.filled : self.filled + n] = a
        self.filled += n

    def result(self) -> list[np.ndarray[Any, Any]]:
        return [a[:, : self.filled] for a in self.arrays]


def _read_capacity(request: vault_pb2.ReadRequest, start: int, committed: int) -> int:
    """Steps a Read will return from `start`, at most: what it asked for and what is committed."""
    bound = committed - start  # the server resolved the read's end before this length
    selection = request.WhichOneof("selection")
    if selection == "range" and request.range.HasField("stop"):
        bound = min(bound, request.range.stop - start)
    elif selection == "last_steps":
        bound = min(bound, request.last_steps)
    return max(0, bound)


def read_streams(
    client: Client,
    request: vault_pb2.ReadRequest,
    experience_structure: Any,
    names: Sequence[str] | None,
) -> tuple[Decoder, dict[str, tuple[int, list[np.ndarray[Any, Any]]]]]:
    """Runs a (non-follow) Read; returns the decoder and per stream `(start, wire arrays)`.

    With several servers, a server that is unreachable (or breaks off) is left for the next
    one in the stream's order, which reads the whole request again; each server is tried once.
    """
    order = client.pool.preference(request.vault_name, request.vault_uid)
    for i, target in enumerate(order):
        try:
            return _read_from(client.stubs(target), request, experience_structure, names)
        except grpc.RpcError as rpc_error:
            if i + 1 == len(order) or not client.moves_on(rpc_error):
                raise error_from_rpc(rpc_error) from rpc_error
            logger.debug(
                "reading %s from %s failed (%s); reading from %s",
                request.vault_name,
                target,
                rpc_error.code().name,
                order[i + 1],
            )
    raise AssertionError("unreachable: the last server's failure is raised")


def _read_from(
    stubs: Stubs,
    request: vault_pb2.ReadRequest,
    experience_structure: Any,
    names: Sequence[str] | None,
) -> tuple[Decoder, dict[str, tuple[int, list[np.ndarray[Any, Any]]]]]:
    """`read_streams` on one server; raises `grpc.RpcError` as the call failed."""
    decoder: Decoder | None = None
    selected: list[str] = []
    pieces: dict[str, _Gathered] = {}
    for raw in stubs.read_raw(request):
        message, leaves = parse_with_leaves(raw, vault_pb2.ReadResponse)
        if decoder is None:
            decoder = Decoder(message.structure, experience_structure)
            selected = decoder.selected(names)
            continue
        gathered = pieces.get(message.vault_uid)
        if gathered is None:
            capacity = _read_capacity(request, message.start, message.committed_offset)
            gathered = pieces[message.vault_uid] = _Gathered(message.start, capacity)
        if message.num_steps:
            gathered.add(message.start, decoder.decode(selected, message.num_steps, leaves))
    if decoder is None:
        raise StorageError("the server ended a Read without its structure")
    out = {}
    for uid, gathered in pieces.items():
        if gathered.filled:
            out[uid] = (gathered.start, gathered.result())
        else:
            empty = decoder.decode(selected, 0, [b""] * len(selected))
            out[uid] = (gathered.start, [np.array(a) for a in empty])
    return decoder, out


def to_jax(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.asarray, tree)


def full_state(experience: Any) -> TrajectoryBufferState[Any]:
    """A flashbax state holding `experience` (leaves `(B, T, ...)`) as a full ring.

    The ring starts at position 0, as in what flashbax's `Vault.read` returns.
    """
    return TrajectoryBufferState(
        experience=experience,
        current_index=jnp.array(0, dtype=int),
        is_full=jnp.array(True, dtype=bool),
    )
