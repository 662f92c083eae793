"""The VaultService servicer: wire <-> storage, errors -> statuses, nothing more.

Storage calls block (tensorstore, fsync), so they run in worker threads (`asyncio.to_thread`);
appends go through `Stream.submit`, whose group commit resolves a future once durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
import numpy as np

from expvault import codec
from expvault.errors import (
    InvalidArgumentError,
    NotFoundError,
    StorageError,
    StreamBusyError,
    UnavailableError,
)
from expvault.schema import Schema
from expvault.storage import Store, Stream, VaultInfo
from expvault.storage.files import check_name
from expvault.v1 import vault_pb2, vault_pb2_grpc
from expvault_server._flow import ByteBudget, CommitWatch, Holding, WriterLeases, bridge
from expvault_server._limits import (
    check_sample,
    check_step_bytes,
    check_structure,
    message_room,
    over_limit,
    probe_storage,
)
from expvault_server._status import ErrorScope, rpc_errors
from expvault_server.config import ServerConfig

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

logger = logging.getLogger(__name__)

__all__ = ["SERVICE", "VaultServicer", "add_servicer", "vault_info_to_proto"]

# The service this module serves, as the .proto declares it.
SERVICE: Final = vault_pb2.DESCRIPTOR.services_by_name["VaultService"]

# Bytes a chunk is charged beyond its payload, so that floods of tiny chunks are bounded too.
_CHUNK_OVERHEAD_BYTES: Final = 1024
# Messages' worth of steps read from storage per worker-thread call.
_MESSAGES_PER_READ: Final = 8
# Messages buffered between stream followers and a follow-all call.
_FOLLOW_QUEUE: Final = 8

# A data message and the bytes of `max_read_buffer_bytes` it holds until it is handed to gRPC.
_Charged = tuple[vault_pb2.ReadResponse | bytes, int]

ServicerContext = grpc.aio.ServicerContext


def add_servicer(servicer: VaultServicer, server: grpc.aio.Server) -> None:
    """Registers `servicer` as `VaultService` on `server`; responses may be serialized already.

    As the generated `add_VaultServiceServicer_to_server`, except that a handler may yield
    bytes (`codec.with_leaves`): large responses are built without protobuf copying their leaves.
    """
    handlers = {}
    for method in SERVICE.methods:
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[method.client_streaming, method.server_streaming]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=getattr(vault_pb2, method.input_type.name).FromString,
            response_serializer=codec.serialize_response,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def vault_info_to_proto(info: VaultInfo) -> vault_pb2.VaultInfo:
    """The `VaultInfo` message of a vault description."""
    return vault_pb2.VaultInfo(
        vault_name=info.vault_name,
        structure=codec.schema_to_proto(info.schema),
        metadata_json=json.dumps(info.metadata, sort_keys=True, default=str),
        compression_json=json.dumps(info.compression, sort_keys=True),
        chunk_steps=info.chunk_steps,
        streams=[
            vault_pb2.StreamInfo(
                vault_uid=s.vault_uid, length=s.length, bytes_on_disk=s.bytes_on_disk
            )
            for s in info.streams
        ],
    )


class _End:
    """Marks the end of the chunks of an Append call (the client half-closed)."""


class _Stopped:
    """Marks that the server stopped reading chunks (shutdown)."""


_AppendItem = tuple[asyncio.Future[int], int] | _End | _Stopped | BaseException


class VaultServicer(vault_pb2_grpc.VaultServiceServicer):
    """Serves the vaults of one `Store`.

    Args:
        store: the storage engine; the caller closes it after the server stopped.
        config: limits (message sizes, in-flight bytes).
    """

    def __init__(self, store: Store, config: ServerConfig) -> None:
        self._store = store
        self._config = config
        self._budget = ByteBudget(config.max_inflight_bytes)
        self._read_budget = ByteBudget(config.max_read_buffer_bytes)
        self._leases = WriterLeases()
        self._closing = False
        self._chunk_readers: set[asyncio.Task[None]] = set()
        self._releases: set[asyncio.Task[None]] = set()  # writers given up when idle
        self._watches: set[CommitWatch] = set()
        self._new_streams: dict[str, set[asyncio.Event]] = {}
        self._creating = asyncio.Lock()
        self._creating_streams = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Refuses new calls, stops reading chunks, and ends followers (call on the loop).

        Append calls then acknowledge what they read and end with UNAVAILABLE; the server's
        `stop(grace)` waits for them.
        """
        self._closing = True
        for task in list(self._chunk_readers):
            task.cancel()
        for watch in list(self._watches):
            watch.wake()
        for events in self._new_streams.values():
            for event in events:
                event.set()

    def _check_open(self) -> None:
        if self._closing:
            raise UnavailableError("the server is shutting down; retry against a running server")

    def _shutdown_error(self, what: str, offset: int) -> UnavailableError:
        return UnavailableError(
            f"the server is shutting down; {what} resumes from offset {offset} on reconnect"
        )

    # -- vaults ---------------------------------------------------------------------------------

    @override
    async def CreateVault(
        self,
        request: vault_pb2.CreateVaultRequest,
        context: ServicerContext[vault_pb2.CreateVaultRequest, vault_pb2.CreateVaultResponse],
    ) -> vault_pb2.CreateVaultResponse:
        async with rpc_errors(context, "CreateVault"):
            self._check_open()
            check_name("vault_name", request.vault_name)
            if not request.HasField("structure"):
                raise InvalidArgumentError("CreateVault needs `structure`")
            check_structure(self._config, request.structure)
            schema = codec.schema_from_proto(request.structure)
            check_step_bytes(self._config, schema, request.vault_name)
            metadata = codec.from_json(request.metadata_json, "metadata_json")
            if metadata is not None and not isinstance(metadata, dict):
                raise InvalidArgumentError('metadata_json must be a JSON object, e.g. {"k": 1}')
            compression = codec.from_json(request.compression_json, "compression_json")
            await asyncio.to_thread(probe_storage, schema, compression)
            async with self._creating:  # the vault count cannot change between check and create
                info, created = await asyncio.to_thread(
                    self._create_vault, request.vault_name, schema, compression, metadata
                )
            logger.debug("CreateVault %s created=%s", request.vault_name, created)
            return vault_pb2.CreateVaultResponse(vault=vault_info_to_proto(info), created=created)

    def _create_vault(
        self, vault_name: str, schema: Schema, compression: Any, metadata: Any
    ) -> tuple[VaultInfo, bool]:
        """Creates a vault unless that passes `max_vaults` (blocks: worker thread)."""
        names = self._store.list_vaults()
        if vault_name not in names and len(names) >= self._config.max_vaults:
            raise over_limit(
                f"the server holds {len(names)} vaults", "max_vaults", self._config.max_vaults,
                "--max-vaults",
            )  # fmt: skip
        return self._store.create_vault(
            vault_name, schema, compression=compression, metadata=metadata
        )

    @override
    async def GetVault(
        self,
        request: vault_pb2.GetVaultRequest,
        context: ServicerContext[vault_pb2.GetVaultRequest, vault_pb2.GetVaultResponse],
    ) -> vault_pb2.GetVaultResponse:
        async with rpc_errors(context, "GetVault"):
            self._check_open()
            info = await asyncio.to_thread(self._store.get_vault, request.vault_name)
            if info.damaged:  # say what is wrong (`expvault info`); the healthy streams serve on
                raise StorageError(info.damage_report())
            logger.debug("GetVault %s", request.vault_name)
            return vault_pb2.GetVaultResponse(vault=vault_info_to_proto(info))

    @override
    async def ListVaults(
        self,
        request: vault_pb2.ListVaultsRequest,
        context: ServicerContext[vault_pb2.ListVaultsRequest, vault_pb2.ListVaultsResponse],
    ) -> vault_pb2.ListVaultsResponse:
        async with rpc_errors(context, "ListVaults"):
            self._check_open()
            names = await asyncio.to_thread(self._store.list_vaults)
            logger.debug("ListVaults: %d vaults", len(names))
            return vault_pb2.ListVaultsResponse(vault_names=names)

    @override
    async def DeleteVault(
        self,
        request: vault_pb2.DeleteVaultRequest,
        context: ServicerContext[vault_pb2.DeleteVaultRequest, vault_pb2.DeleteVaultResponse],
    ) -> vault_pb2.DeleteVaultResponse:
        async with rpc_errors(context, "DeleteVault"):
            self._check_open()
            writers = self._leases.writers_of(request.vault_name)
            if writers:
                raise StreamBusyError(
                    f"vault {request.vault_name!r} has writers on streams {writers}; close them "
                    "before deleting it"
                )
            await asyncio.to_thread(self._store.delete_vault, request.vault_name)
            return vault_pb2.DeleteVaultResponse()

    # -- appends --------------------------------------------------------------------------------

    @override
    async def Append(
        self,
        request_iterator: AsyncIterator[vault_pb2.AppendRequest],
        context: ServicerContext[vault_pb2.AppendRequest, vault_pb2.AppendResponse],
    ) -> AsyncIterator[vault_pb2.AppendResponse]:
        async with rpc_errors(context, "Append") as scope:
            self._check_open()
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("kind") != "open":
                raise InvalidArgumentError(
                    "the first Append message must be `open` (vault_name, vault_uid)"
                )
            vault_name, vault_uid = first.open.vault_name, first.open.vault_uid
            create = first.open.create
            check_name("vault_name", vault_name)
            check_name("vault_uid", vault_uid)
            stream = await asyncio.to_thread(self._open_for_append, vault_name, vault_uid, create)
            token = self._leases.claim(vault_name, vault_uid)
            outstanding: set[asyncio.Future[int]] = set()
            reader: asyncio.Task[None] | None = None
            try:
                # Become the stream's writer before telling the client where to resume.
                await asyncio.to_thread(stream.begin_writing)
                scope.committed = _length_of(stream)
                if create:
                    self._notify_new_stream(vault_name)
                logger.info(
                    "writer %s attached to %s/%s at offset %d",
                    scope.peer,
                    vault_name,
                    vault_uid,
                    stream.length,
                )
                yield vault_pb2.AppendResponse(
                    committed_offset=stream.length,
                    structure=codec.schema_to_proto(stream.schema),
                )
                queue: asyncio.Queue[_AppendItem] = asyncio.Queue()
                reader = asyncio.get_running_loop().create_task(
                    self._read_chunks(request_iterator, stream, queue, outstanding)
                )
                self._chunk_readers.add(reader)
                reader.add_done_callback(self._chunk_readers.discard)
                while True:
                    item = await queue.get()
                    if isinstance(item, _End):
                        break
                    if isinstance(item, _Stopped):
                        raise self._shutdown_error(
                            f"stream {vault_name}/{vault_uid}", stream.length
                        )
                    if isinstance(item, BaseException):
                        raise item
                    future, chunk_stop = item
                    # shield: a cancelled call must not cancel an append storage accepted.
                    committed = await asyncio.shield(future)
                    yield vault_pb2.AppendResponse(
                        committed_offset=committed, chunk_stop=chunk_stop
                    )
            finally:
                if reader is not None:
                    reader.cancel()
                self._leases.release(vault_name, vault_uid, token, outstanding)
                self._release_when_idle(vault_name, vault_uid, stream)
                logger.info(
                    "writer %s detached from %s/%s at offset %d",
                    scope.peer,
                    vault_name,
                    vault_uid,
                    stream.length,
                )

    def _release_when_idle(self, vault_name: str, vault_uid: str, stream: Stream) -> None:
        """Gives up the right to write a stream once no writer attached for `writer_idle_s`.

        Another server can then take it over at once: a client that lost its way to this
        server (but not this server its life) fails over without waiting for it to exit.
        """
        loop = asyncio.get_running_loop()

        def check() -> None:
            if self._closing or vault_uid in self._leases.writers_of(vault_name):
                return  # a writer is attached again, or shutdown closes the stream anyway
            task = loop.create_task(asyncio.to_thread(stream.end_writing))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

        loop.call_later(self._config.writer_idle_s, check)

    def _open_for_append(self, vault_name: str, vault_uid: str, create: bool) -> Stream:
        """Opens (or creates) a stream to append to, within the limits (blocks: worker thread).

        A new stream is checked before it is created, so a refused one leaves nothing behind.
        """
        if create and vault_uid not in self._store.list_streams(vault_name):
            with self._creating_streams:  # the stream count cannot change under the check
                vault = self._store.get_vault(vault_name, with_sizes=False)
                check_step_bytes(self._config, vault.schema, vault_name)
                limit = self._config.max_streams_per_vault
                uids = self._store.list_streams(vault_name)
                if vault_uid not in uids and len(uids) >= limit:
                    raise over_limit(
                        f"vault {vault_name!r} has {len(uids)} streams",
                        "max_streams_per_vault",
                        limit,
                        "--max-streams-per-vault",
                    )
                stream = self._store.open_stream(vault_name, vault_uid, create=True)
        else:
            stream = self._store.open_stream(vault_name, vault_uid, create=create)
        check_step_bytes(self._config, stream.schema, vault_name)
        return stream

    async def _read_chunks(
        self,
        requests: AsyncIterator[vault_pb2.AppendRequest],
        stream: Stream,
        queue: asyncio.Queue[_AppendItem],
        outstanding: set[asyncio.Future[int]],
    ) -> None:
        """Reads chunks, checks them, submits them in order; puts (future, stop) on `queue`.

        Waits before each read while the call's or the server's in-flight bytes are over their
        limits, so a slow disk slows the writers instead of growing memory.
        """
        loop = asyncio.get_running_loop()
        call_budget = ByteBudget(self._config.max_inflight_bytes_per_stream)
        schema = stream.schema
        try:
            async for request in requests:
                if request.WhichOneof("kind") != "chunk":
                    raise InvalidArgumentError("after `open`, Append takes only `chunk` messages")
                chunk = request.chunk
                blobs = list(chunk.leaves)  # every access to a bytes field copies: read once
                if chunk.start < 0 or chunk.num_steps < 1:
                    raise InvalidArgumentError(
                        f"chunk needs start >= 0 and num_steps >= 1, got start {chunk.start} "
                        f"and num_steps {chunk.num_steps}"
                    )
                arrays = codec.decode_arrays(
                    schema.leaves, schema.batch_size, chunk.num_steps, blobs
                )
                nbytes = sum(len(b) for b in blobs) + _CHUNK_OVERHEAD_BYTES
                await call_budget.acquire(nbytes)
                try:
                    await self._budget.acquire(nbytes)
                except BaseException:
                    call_budget.release(nbytes)
                    raise
                try:
                    future = bridge(stream.submit(chunk.start, arrays), loop)
                except BaseException:
                    call_budget.release(nbytes)
                    self._budget.release(nbytes)
                    raise
                future.add_done_callback(_releaser(nbytes, call_budget, self._budget))
                outstanding.add(future)
                future.add_done_callback(outstanding.discard)
                queue.put_nowait((future, chunk.start + chunk.num_steps))
            queue.put_nowait(_End())
        except asyncio.CancelledError:
            queue.put_nowait(_Stopped())
            raise
        except Exception as error:  # handed to the call, which turns it into its status
            queue.put_nowait(error)

    # -- reads ----------------------------------------------------------------------------------

    @override
    async def Read(  # type: ignore[override]  # it may yield serialized bytes (add_servicer)
        self,
        request: vault_pb2.ReadRequest,
        context: ServicerContext[vault_pb2.ReadRequest, vault_pb2.ReadResponse],
    ) -> AsyncIterator[vault_pb2.ReadResponse | bytes]:
        async with rpc_errors(context, "Read") as scope:
            self._check_open()
            vault = await asyncio.to_thread(
                self._store.get_vault, request.vault_name, with_sizes=False
            )
            schema = vault.schema
            picked = codec.leaf_indices(schema, list(request.leaves))
            names = [schema.leaves[i].name for i in picked]
            selection = request.WhichOneof("selection")
            if request.follow and selection not in (None, "range"):
                raise InvalidArgumentError("follow takes a `range` (or nothing), not " + selection)
            _check_selection(request)
            step_bytes = schema.batch_size * sum(schema.leaves[i].step_bytes for i in picked)
            per_message = codec.steps_per_message(step_bytes, self._config.message_bytes)
            # A call holds at most the block it sends and the one it reads ahead, so a client
            # that stops reading (a paused follower) cannot take every reader's budget.
            share = 2 * _MESSAGES_PER_READ * per_message * step_bytes
            plan = _ReadPlan(names, per_message, step_bytes, Holding(self._read_budget, share))
            logger.debug(
                "Read %s/%s %s follow=%s",
                request.vault_name,
                request.vault_uid or "*",
                selection,
                request.follow,
            )
            yield vault_pb2.ReadResponse(structure=codec.schema_to_proto(schema))
            try:
                async with contextlib.aclosing(
                    self._read_messages(request, vault, plan, scope)
                ) as messages:
                    async for message in messages:
                        yield message
            finally:
                plan.holding.close()  # what was read ahead or queued and not sent

    async def _read_messages(
        self, request: vault_pb2.ReadRequest, vault: VaultInfo, plan: _ReadPlan, scope: ErrorScope
    ) -> AsyncGenerator[vault_pb2.ReadResponse | bytes, None]:
        """The data messages of a Read call; each one's bytes go back to the budget once sent."""
        charged: AsyncGenerator[_Charged, None]
        if request.vault_uid or not request.follow:
            charged = self._read_streams(request, vault, plan, scope)
        else:
            charged = self._follow_all(vault, request, plan)
        async with contextlib.aclosing(charged):
            async for message, nbytes in charged:
                yield message  # resumed once gRPC took it
                plan.holding.release(nbytes)

    async def _read_streams(
        self, request: vault_pb2.ReadRequest, vault: VaultInfo, plan: _ReadPlan, scope: ErrorScope
    ) -> AsyncGenerator[_Charged, None]:
        """The messages of a Read of one stream, or of every stream without follow."""
        uids = [request.vault_uid] if request.vault_uid else [s.vault_uid for s in vault.streams]
        for uid in uids:
            if request.follow:
                stream = await self._open_when_created(vault, uid)
            else:
                stream = await self._open_for_read(vault, uid)
            scope.committed = _length_of(stream)
            if request.follow:
                start = request.start_offsets.get(uid, request.range.start)
                stop = request.range.stop if request.range.HasField("stop") else None
                async for item in self._follow(stream, start, stop, plan):
                    yield item
                continue
            start, stop = _resolve(request, uid, stream.length)
            empty = True
            async for item in self._read_range(stream, start, stop, plan):
                empty = False
                yield item
            if empty:
                yield (
                    vault_pb2.ReadResponse(
                        vault_uid=uid, start=start, committed_offset=stream.length
                    ),
                    0,
                )

    async def _open_for_read(self, vault: VaultInfo, vault_uid: str) -> Stream:
        return await asyncio.to_thread(self._open_checked, vault, vault_uid)

    def _open_checked(self, vault: VaultInfo, vault_uid: str) -> Stream:
        """Opens a stream of `vault` to read, checking its leaves against the vault's (blocks)."""
        stream = self._store.open_stream(vault.vault_name, vault_uid)
        if [leaf.name for leaf in stream.schema.leaves] != [
            leaf.name for leaf in vault.schema.leaves
        ]:
            raise StorageError(
                f"stream {vault.vault_name}/{vault_uid} has another structure than its vault "
                f"({vault.schema.describe_mismatch(stream.schema) or 'leaf order differs'})"
            )
        return stream

    async def _open_when_created(self, vault: VaultInfo, vault_uid: str) -> Stream:
        """Opens a stream to follow, waiting for a writer to create it when it does not exist."""
        event = asyncio.Event()
        waiting = self._new_streams.setdefault(vault.vault_name, set())
        waiting.add(event)
        try:
            while True:
                event.clear()
                try:
                    return await self._open_for_read(vault, vault_uid)
                except NotFoundError:
                    if self._closing:
                        raise self._shutdown_error(
                            f"following {vault.vault_name}/{vault_uid}", 0
                        ) from None
                await event.wait()
        finally:
            waiting.discard(event)

    async def _read_range(
        self, stream: Stream, start: int, stop: int, plan: _ReadPlan
    ) -> AsyncIterator[_Charged]:
        """Messages covering committed steps `[start, stop)` of a stream, in order.

        Each block of steps is read once its bytes are held of `max_read_buffer_bytes` (waiting
        for them); the next block is read ahead while this one is sent when its bytes fit at
        once. Each message is yielded with its bytes, which the consumer gives back.
        """
        block = plan.per_message * _MESSAGES_PER_READ
        loop = asyncio.get_running_loop()

        def size(lo: int) -> int:
            return (min(stop, lo + block) - lo) * plan.step_bytes

        def read(lo: int) -> asyncio.Future[list[tuple[bytes, int]]]:
            future = loop.run_in_executor(
                None,
                _read_messages,
                stream,
                lo,
                min(stop, lo + block),
                plan.names,
                plan.per_message,
            )
            future.add_done_callback(_retrieve)  # a prefetch the call no longer needs
            return future

        starts = list(range(start, stop, block))
        if not starts:
            return
        await plan.holding.acquire(size(starts[0]))
        ahead = [(read(starts[0]), size(starts[0]))]
        try:
            for following in [*starts[1:], None]:
                future, _ = ahead.pop()
                messages = await future
                if following is not None and plan.holding.try_acquire(size(following)):
                    ahead.append((read(following), size(following)))
                for message, num_steps in messages:
                    yield message, num_steps * plan.step_bytes
                if following is not None and not ahead:  # it did not fit: read it now
                    await plan.holding.acquire(size(following))
                    ahead.append((read(following), size(following)))
        finally:
            for future, nbytes in ahead:
                future.cancel()
                plan.holding.release(nbytes)

    async def _follow(
        self, stream: Stream, start: int, stop: int | None, plan: _ReadPlan
    ) -> AsyncIterator[_Charged]:
        """Committed steps from `start`, then new ones as they commit, until `stop` (or forever)."""
        if start < 0 or (stop is not None and stop < start):
            raise InvalidArgumentError(f"follow range [{start}, {stop}) needs 0 <= start <= stop")
        with CommitWatch(stream) as watch:
            self._watches.add(watch)
            try:
                position = start
                while stop is None or position < stop:
                    length = stream.length
                    if length > position:
                        end = length if stop is None else min(length, stop)
                        async for item in self._read_range(stream, position, end, plan):
                            yield item
                        position = end
                        continue
                    if self._closing:
                        raise self._shutdown_error(
                            f"following {stream.vault_name}/{stream.vault_uid}", position
                        )
                    await watch.wait_past(position)
            finally:
                self._watches.discard(watch)

    async def _follow_all(
        self,
        vault: VaultInfo,
        request: vault_pb2.ReadRequest,
        plan: _ReadPlan,
    ) -> AsyncGenerator[_Charged, None]:
        """Follows every stream of a vault, including streams created meanwhile, until cancelled.

        Queued messages keep their bytes of `max_read_buffer_bytes` until they are sent.
        """
        out: asyncio.Queue[_Charged | BaseException] = asyncio.Queue(_FOLLOW_QUEUE)
        stop = request.range.stop if request.range.HasField("stop") else None
        tasks: dict[str, asyncio.Task[None]] = {}
        new_streams = asyncio.Event()
        self._new_streams.setdefault(vault.vault_name, set()).add(new_streams)

        async def follow_one(uid: str) -> None:
            try:
                stream = await self._open_for_read(vault, uid)
                start = request.start_offsets.get(uid, request.range.start)
                async for item in self._follow(stream, start, stop, plan):
                    await out.put(item)
            except asyncio.CancelledError:
                raise
            except BaseException as error:
                await out.put(error)

        async def watch_streams() -> None:
            while True:
                new_streams.clear()
                uids = await asyncio.to_thread(self._store.list_streams, vault.vault_name)
                for uid in uids:
                    if uid not in tasks:
                        tasks[uid] = asyncio.get_running_loop().create_task(follow_one(uid))
                if self._closing:
                    await out.put(self._shutdown_error(f"following {vault.vault_name}", 0))
                    return
                await new_streams.wait()

        watcher = asyncio.get_running_loop().create_task(watch_streams())
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            watcher.cancel()
            for task in tasks.values():
                task.cancel()
            self._new_streams[vault.vault_name].discard(new_streams)

    def _notify_new_stream(self, vault_name: str) -> None:
        for event in self._new_streams.get(vault_name, ()):
            event.set()

    # -- samples --------------------------------------------------------------------------------

    @override
    async def Sample(  # type: ignore[override]  # it yields serialized bytes (add_servicer)
        self,
        request: vault_pb2.SampleRequest,
        context: ServicerContext[vault_pb2.SampleRequest, vault_pb2.SampleResponse],
    ) -> AsyncIterator[bytes]:
        async with rpc_errors(context, "Sample"):
            self._check_open()
            if request.batch_size < 1 or request.sequence_length < 1:
                raise InvalidArgumentError(
                    f"batch_size and sequence_length must be >= 1, got {request.batch_size} and "
                    f"{request.sequence_length}"
                )
            check_sample(self._config, request.batch_size)
            logger.debug(
                "Sample %s %dx%d", request.vault_name, request.batch_size, request.sequence_length
            )
            # One worker-thread call finds the streams, draws and reads the first message: a
            # batch is a few milliseconds, and each hop to a thread and back costs ~0.1 ms.
            plan, message = await asyncio.to_thread(self._plan_sample, request)
            yield message
            for lo in range(plan.per_message, len(plan.windows), plan.per_message):
                yield await asyncio.to_thread(plan.message, lo)

    def _plan_sample(self, request: vault_pb2.SampleRequest) -> tuple[_SamplePlan, bytes]:
        """Draws a Sample call's windows and reads its first message (blocks: worker thread)."""
        vault = self._store.get_vault(request.vault_name, with_sizes=False)
        schema = vault.schema
        picked = codec.leaf_indices(schema, list(request.leaves))
        # Each stream once: a request naming one stream a million times opens it once.
        uids = list(dict.fromkeys(request.vault_uids)) or [s.vault_uid for s in vault.streams]
        streams = [self._open_checked(vault, uid) for uid in uids]
        seed = request.seed if request.HasField("seed") else None
        windows = _draw_windows(schema, streams, request.batch_size, request.sequence_length, seed)
        row_bytes = request.sequence_length * sum(schema.leaves[i].step_bytes for i in picked)
        if row_bytes > message_room(self._config, len(picked)):
            raise InvalidArgumentError(
                f"one window of {request.sequence_length} steps holds {row_bytes} bytes, more "
                f"than a message carries (max_message_bytes {self._config.max_message_bytes}); "
                "lower sequence_length or select fewer leaves"
            )
        plan = _SamplePlan(
            streams=streams,
            windows=windows,
            sequence_length=request.sequence_length,
            names=[schema.leaves[i].name for i in picked],
            per_message=max(1, self._config.message_bytes // max(1, row_bytes)),
        )
        return plan, plan.message(0, codec.schema_to_proto(schema))


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a future's exception retrieved (its caller went away or reports it otherwise)."""
    if not future.cancelled():
        future.exception()


def _releaser(nbytes: int, *budgets: ByteBudget) -> Callable[[asyncio.Future[int]], None]:
    def release(future: asyncio.Future[int]) -> None:
        for budget in budgets:
            budget.release(nbytes)
        if not future.cancelled():
            future.exception()  # retrieved: the call reports it, or it ended before

    return release


def _check_selection(request: vault_pb2.ReadRequest) -> None:
    """Refuses negative or reversed ranges and bad percentiles before anything is read."""
    selection = request.WhichOneof("selection")
    if selection == "range":
        r = request.range
        if r.start < 0 or (r.HasField("stop") and r.stop < r.start):
            raise InvalidArgumentError(
                f"read range [{r.start}, {r.stop if r.HasField('stop') else 'end'}) needs "
                "0 <= start <= stop"
            )
    elif selection == "last_steps" and request.last_steps < 0:
        raise InvalidArgumentError(f"last_steps must be >= 0, got {request.last_steps}")
    elif selection == "percentiles":
        p = request.percentiles
        if not 0 <= p.low < p.high <= 100:
            raise InvalidArgumentError(
                f"percentiles ({p.low}, {p.high}) need 0 <= low < high <= 100"
            )
    for uid, offset in request.start_offsets.items():
        if offset < 0:
            raise InvalidArgumentError(f"start_offsets[{uid!r}] must be >= 0, got {offset}")


def _length_of(stream: Stream) -> Callable[[], int]:
    return lambda: stream.length


def _resolve(request: vault_pb2.ReadRequest, vault_uid: str, length: int) -> tuple[int, int]:
    """The `[start, stop)` a read selects in a stream of `length` committed steps."""
    selection = request.WhichOneof("selection")
    if selection == "range":
        stop = request.range.stop if request.range.HasField("stop") else length
        start = request.start_offsets.get(vault_uid, request.range.start)
        if stop > length or start > stop:
            raise InvalidArgumentError(
                f"read range [{start}, {stop}) is past the {length} committed steps; read "
                f"within [0, {length}) or use follow"
            )
        return start, stop
    if selection == "last_steps":
        return max(0, length - request.last_steps), length
    if selection == "percentiles":
        p = request.percentiles
        return int(length * (p.low / 100)), int(length * (p.high / 100))
    return 0, length


def _read_messages(
    stream: Stream, start: int, stop: int, names: Sequence[str], per_message: int
) -> list[tuple[bytes, int]]:
    """Reads `[start, stop)` as serialized messages of `per_message` steps (worker thread).

    Returns each message with its number of steps. Each message's steps are read on their own,
    into arrays small enough for the allocator to reuse its memory (a block of messages read at
    once is mapped afresh, and zero-filled, for every block), and copied once, into the message.
    """
    committed = stream.length
    messages = []
    for lo in range(start, stop, per_message):
        hi = min(stop, lo + per_message)
        arrays = stream.read(lo, hi, list(names))
        head = vault_pb2.ReadResponse(
            vault_uid=stream.vault_uid, start=lo, num_steps=hi - lo, committed_offset=committed
        )
        messages.append((codec.with_leaves(head, arrays), hi - lo))
    return messages


@dataclass(frozen=True)
class _ReadPlan:
    """How a Read call reads: leaves, steps per message, bytes per step, its budget share."""

    names: Sequence[str]
    per_message: int
    step_bytes: int
    holding: Holding


_Window = tuple[int, int, int]  # (stream index, batch row, start offset)


@dataclass(frozen=True)
class _SamplePlan:
    """The windows a Sample call drew, and how they split into messages."""

    streams: Sequence[Stream]
    windows: Sequence[_Window]
    sequence_length: int
    names: Sequence[str]
    per_message: int

    def message(self, first: int, structure: vault_pb2.Structure | None = None) -> bytes:
        """The message of windows `[first, first + per_message)`, serialized (worker thread)."""
        group = self.windows[first : first + self.per_message]
        return _sample_message(
            self.streams, group, first, self.sequence_length, self.names, structure
        )


def _draw_windows(
    schema: Schema,
    streams: Sequence[Stream],
    batch_size: int,
    sequence_length: int,
    seed: int | None,
) -> list[_Window]:
    """Draws windows uniformly among all `(stream, row, start)` with `start + L <= length`."""
    starts_per_row = np.array([max(0, s.length - sequence_length + 1) for s in streams], np.int64)
    counts = starts_per_row * schema.batch_size
    total = int(counts.sum())
    if total == 0:
        longest = max((s.length for s in streams), default=0)
        raise InvalidArgumentError(
            f"no stream has {sequence_length} committed steps to sample from (longest: "
            f"{longest}); append more or lower sequence_length"
        )
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, total, size=batch_size)
    ends = np.cumsum(counts)
    which = np.searchsorted(ends, drawn, side="right")
    within = drawn - (ends[which] - counts[which])
    rows, starts = np.divmod(within, starts_per_row[which])
    return [(int(w), int(r), int(s)) for w, r, s in zip(which, rows, starts, strict=True)]


def _sample_message(
    streams: Sequence[Stream],
    windows: Sequence[_Window],
    first: int,
    sequence_length: int,
    names: Sequence[str],
    structure: vault_pb2.Structure | None,
) -> bytes:
    """Reads the windows (one batched read per stream) and stacks them into one message.

    Runs in a worker thread. The first message of a call carries the vault's `structure`.
    """
    by_stream: dict[int, list[int]] = {}
    for position, (which, _, _) in enumerate(windows):
        by_stream.setdefault(which, []).append(position)
    leaves: list[np.ndarray[Any, Any]] = []
    for which, positions in by_stream.items():
        parts = streams[which].read_windows(
            [(windows[p][1], windows[p][2]) for p in positions], sequence_length, list(names)
        )
        if not leaves:
            leaves = [np.empty((len(windows), *part.shape[1:]), part.dtype) for part in parts]
        for leaf, part in zip(leaves, parts, strict=True):
            leaf[positions] = part
    head = vault_pb2.SampleResponse(
        first=first,
        vault_uids=[streams[i].vault_uid for i, _, _ in windows],
        batch_rows=[r for _, r, _ in windows],
        starts=[s for _, _, s in windows],
        structure=structure,
    )
    return codec.with_leaves(head, leaves)
