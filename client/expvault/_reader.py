"""`VaultReader`: a learner's view of a vault over gRPC (re-exported by `expvault.remote`).

Reads ranges and whole vaults (numpy pytrees or flashbax buffer states), follows new steps as they
commit with a position a learner can save and resume (`Follow`), and draws random windows, one at a
time or prefetched on background threads (`SampleIterator`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import jax
import jax.numpy as jnp
import numpy as np
from flashbax.buffers.trajectory_buffer import TrajectoryBufferSample, TrajectoryBufferState

from expvault._client import (
    Client,
    Decoder,
    full_state,
    leaf_name,
    parse_with_leaves,
    read_request,
    read_streams,
    to_jax,
)
from expvault._learner import Follow, Followed, Prefetch, SampleIterator, check_positions
from expvault._rpc import DEFAULT_MAX_MESSAGE_BYTES, error_from_rpc, is_retryable
from expvault.errors import InvalidArgumentError, NotFoundError, StorageError
from expvault.schema import Schema
from expvault.v1 import vault_pb2

logger = logging.getLogger(__name__)

__all__ = ["VaultReader"]


class VaultReader:
    """Reads a vault for learners: ranges, whole vaults, new steps as they commit, random windows.

    `read` / `read_state` read one stream's range; `read_vault` / `read_streams` read whole
    streams as flashbax buffer states for offline training; `follow` streams new steps with a
    position to save and resume; `sample` draws random windows and `sample_iter` prefetches
    them on a background thread.

    With several servers sharing one store (`target="host1:50051,host2:50051"`), every call
    tries the servers in the order its vault (and stream) prefers, the order writers use too,
    and moves on to the next when one is unreachable; `follow` resumes at its position there.

    Args:
        target: the server, `HOST:PORT`, or several servers over one store as
            `"host1:50051,host2:50051"`.
        vault_name: the vault.
        experience_structure: optional pytree whose structure results take (matched by leaf
            name); default nested dicts.
        vault_uid: the stream `read` and `follow` use by default.
        timeout_s: deadline of each unary call.
        reconnect_timeout_s: how long `follow`, `sample` and unary calls keep retrying while
            no server answers.
        max_message_bytes: the channel's message limit.
        credentials: TLS credentials, e.g. `expvault.tls_credentials(ca="ca.pem")`; None for a
            plaintext channel.
        token: bearer token sent with every call, for servers started with `--token-file`
            (needs scope `write` to write, `read` to read); None for none.

    Raises:
        InvalidArgumentError: a bad `target` list (an empty entry, a server twice) or token.
        NotFoundError: no such vault.
        SchemaMismatchError: `experience_structure` differs from the vault's.
        UnauthenticatedError: the server needs a token (`token=`) and got none or a bad one.
        PermissionDeniedError: the token lacks the `read` scope.
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
            info = self._client.get_vault(vault_name)
            self._decoder = Decoder(info.structure, experience_structure)
        except BaseException:
            self._client.close()
            raise
        self.vault_name = vault_name
        self.vault_uid = vault_uid
        self._experience_structure = experience_structure
        self._iterators: weakref.WeakSet[SampleIterator[Any]] = weakref.WeakSet()

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
        request = read_request(
            self.vault_name,
            uid,
            start=start,
            stop=stop,
            leaves=[leaf_name(n) for n in leaves] if leaves is not None else (),
        )
        _, streams = read_streams(self._client, request, self._experience_structure, leaves)
        return self._decoder.tree(names, streams[uid][1])

    def read_state(
        self,
        start: int = 0,
        stop: int | None = None,
        vault_uid: str | None = None,
    ) -> TrajectoryBufferState[Any]:
        """Like `read`, as a flashbax `TrajectoryBufferState` (jax leaves `(B, T, ...)`)."""
        return full_state(to_jax(self.read(start, stop, vault_uid)))

    def read_streams(
        self,
        vault_uids: Sequence[str] | None = None,
        *,
        leaves: Sequence[str] | None = None,
    ) -> dict[str, TrajectoryBufferState[Any]]:
        """Reads whole streams for offline training, each as its own buffer state.

        Args:
            vault_uids: the streams; default every stream of the vault.
            leaves: leaf names to read; default all. Others are None.

        Returns:
            `{vault_uid: state}`, in `vault_uids` order (default sorted by name); each state's
            experience has jax leaves `(B, T_stream, ...)`, `T_stream` the stream's committed
            length when read.

        Raises:
            NotFoundError: an unknown stream.
            InvalidArgumentError: unknown leaves.
        """
        lengths = self._lengths(vault_uids)
        return {
            uid: self._state(*self._read_arrays(uid, 0, length, leaves))
            for uid, length in lengths.items()
        }

    def read_vault(
        self,
        vault_uids: Sequence[str] | None = None,
        *,
        truncate: bool = False,
        leaves: Sequence[str] | None = None,
    ) -> TrajectoryBufferState[Any]:
        """Reads whole streams as one flashbax buffer state, streams side by side on the batch axis.

        Ready for offline training with a flashbax trajectory buffer of `S * B` rows (e.g.
        `buffer.sample(state, key)`): batch rows `[i * B, (i + 1) * B)` are stream
        `vault_uids[i]` (default: the vault's streams sorted by name).

        Args:
            vault_uids: the streams; default every stream of the vault.
            truncate: when stream lengths differ, read the first `min(lengths)` steps of each
                instead of refusing.
            leaves: leaf names to read; default all. Others are None.

        Returns:
            A `TrajectoryBufferState` whose experience has jax leaves `(S * B, T, ...)`, `S`
            streams of `B` rows and `T` their common (or, with `truncate`, shortest) length.

        Raises:
            InvalidArgumentError: stream lengths differ and not `truncate` (the message lists
                them), no streams, or unknown leaves.
            NotFoundError: an unknown stream.
        """
        lengths = self._lengths(vault_uids)
        if not lengths:
            raise InvalidArgumentError(f"vault {self.vault_name!r} has no streams to read")
        shortest = min(lengths.values())
        if not truncate and len(set(lengths.values())) > 1:
            raise InvalidArgumentError(
                f"the streams of {self.vault_name!r} have different lengths {lengths}: pass "
                f"truncate=True to read the first {shortest} steps of each, or use "
                "read_streams() for one buffer state per stream"
            )
        parts = [self._read_arrays(uid, 0, shortest, leaves) for uid in lengths]
        names, _ = parts[0]
        arrays = [np.concatenate(leaf, axis=0) for leaf in zip(*(a for _, a in parts), strict=True)]
        return self._state(names, arrays)

    def _state(
        self, names: Sequence[str], arrays: Sequence[np.ndarray[Any, Any]]
    ) -> TrajectoryBufferState[Any]:
        return full_state(self._decoder.tree(names, [jnp.asarray(a) for a in arrays]))

    def _lengths(self, vault_uids: Sequence[str] | None) -> dict[str, int]:
        """Committed lengths of the given streams (all, sorted by name, when None)."""
        known = self.streams()
        if vault_uids is None:
            return {uid: known[uid] for uid in sorted(known)}
        if isinstance(vault_uids, str):
            raise InvalidArgumentError(
                f"vault_uids must be a sequence of names, got {vault_uids!r}"
            )
        missing = [uid for uid in vault_uids if uid not in known]
        if missing:
            raise NotFoundError(
                f"vault {self.vault_name!r} has no streams {missing}; it has {sorted(known)}"
            )
        return {uid: known[uid] for uid in vault_uids}

    def _read_arrays(
        self, vault_uid: str, start: int, stop: int, leaves: Sequence[str] | None
    ) -> tuple[list[str], list[np.ndarray[Any, Any]]]:
        """Steps `[start, stop)` of one stream: wire-ordered names and numpy arrays."""
        names = self._decoder.selected(leaves)
        request = read_request(
            self.vault_name,
            vault_uid,
            start=start,
            stop=stop,
            leaves=[leaf_name(n) for n in leaves] if leaves is not None else (),
        )
        _, streams = read_streams(self._client, request, self._experience_structure, leaves)
        return names, streams[vault_uid][1]

    def follow(
        self,
        vault_uid: str | None = None,
        start: int = 0,
        *,
        leaves: Sequence[str] | None = None,
        all_streams: bool | None = None,
        positions: Mapping[str, int] | None = None,
    ) -> Follow:
        """Iterates over committed steps from `start`, then new ones as they commit; endless.

        Each committed step is yielded exactly once and in order per stream, across reconnects
        and server restarts. A learner saves `follow.positions` (a `{vault_uid: offset}` dict
        of plain ints, e.g. in its checkpoint) and resumes with `follow(positions=saved)`: the
        next item of each stream starts at its saved offset. Stop following with
        `follow.close()` or a `with` block.

        Example:
            ```
            with reader.follow(positions=checkpoint.get("positions")) as follow:
                for uid, start, experience in follow:  # numpy leaves (B, T, ...)
                    update(experience)
                    checkpoint["positions"] = follow.positions
            ```

        Args:
            vault_uid: the stream; default the reader's. Without either, every stream of the
                vault, including streams created while following.
            start: first step of each stream not in `positions`.
            leaves: leaf names to read; default all.
            all_streams: force following every stream (default: when no uid is known).
            positions: where to resume, per stream, as `Follow.positions` returned it.

        Returns:
            A `Follow`, an iterator of `Followed(vault_uid, start, experience)` items: steps
            `[start, start + T)` of that stream, the experience a pytree with numpy leaves
            `(B, T, ...)`. Iterating raises `ExpvaultError` when the server refused (e.g.
            `NotFoundError`) or stayed away longer than `reconnect_timeout_s`.

        Raises:
            InvalidArgumentError: a negative `start` or position.
        """
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InvalidArgumentError(f"start must be a step offset >= 0, got {start!r}")
        uid = "" if all_streams else (vault_uid or self.vault_uid or "")
        resume = check_positions(positions)
        if uid:  # one stream: a saved position of another stream does not apply
            resume = {uid: resume[uid]} if uid in resume else {}
        return Follow(functools.partial(self._follow, uid, start, leaves), resume)

    def _follow(
        self,
        uid: str,
        start: int,
        leaves: Sequence[str] | None,
        positions: dict[str, int],
    ) -> Iterator[Followed]:
        """The follow generator: updates `positions` before yielding each item."""
        names = self._decoder.selected(leaves)
        failover = self._client.failover(self.vault_name, uid)
        outage = False
        while True:
            request = read_request(
                self.vault_name,
                uid,
                start=start,
                leaves=[leaf_name(n) for n in leaves] if leaves is not None else (),
                follow=True,
                start_offsets=positions,
            )
            target = failover.target
            call = self._client.stubs(target).stub.Read(request)
            try:
                for message in call:
                    failover.answered()
                    outage = False
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
                    yield Followed(message.vault_uid, position, self._decoder.tree(names, arrays))
                return  # only a bounded follow ends; ours never do
            except grpc.RpcError as rpc_error:
                delay = failover.next_delay() if is_retryable(rpc_error) else None
                if delay is None:
                    raise error_from_rpc(rpc_error) from rpc_error
                # One warning per outage; the retries behind it at DEBUG.
                log = logger.debug if outage else logger.warning
                outage = True
                log(
                    "following %s lost %s (%s); resuming on %s in %.2f s",
                    self.vault_name,
                    target,
                    rpc_error.code().name,
                    failover.target,
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

        Each window is `sequence_length` consecutive committed steps of one batch row of one
        stream: it never crosses a stream boundary. Windows are drawn uniformly among all such
        windows of all streams (or `vault_uids`), with replacement. The same `seed` on the same
        data gives the same windows.

        Args:
            batch_size: windows to draw.
            sequence_length: steps per window.
            seed: seed of the draw; None for a fresh one.
            vault_uids: the streams to draw from; default all.
            leaves: leaf names to read; default all. Others are None.

        Returns:
            A flashbax `TrajectoryBufferSample` whose experience has numpy leaves
            `(batch_size, sequence_length, ...)`, ready to feed a jitted update.

        Raises:
            InvalidArgumentError: sizes < 1, unknown leaves, or no stream long enough.
        """
        return self._sample(batch_size, sequence_length, seed, vault_uids, leaves, None)

    def _sample(
        self,
        batch_size: int,
        sequence_length: int,
        seed: int | None,
        vault_uids: Sequence[str],
        leaves: Sequence[str] | None,
        track: Callable[[grpc.Call | None], None] | None,
    ) -> TrajectoryBufferSample[Any]:
        """`sample`, reporting the call in flight to `track` (to cancel it from elsewhere)."""
        request = vault_pb2.SampleRequest(
            vault_name=self.vault_name,
            batch_size=batch_size,
            sequence_length=sequence_length,
            leaves=[leaf_name(n) for n in leaves] if leaves is not None else [],
            vault_uids=list(vault_uids),
        )
        if seed is not None:
            request.seed = seed
        names = self._decoder.selected(leaves)
        parts: list[list[np.ndarray[Any, Any]]] = []
        failover = self._client.failover(self.vault_name)
        while True:
            target = failover.target
            call = self._client.stubs(target).sample_raw(request)
            if track is not None:
                track(call)
            try:
                for raw in call:
                    message, blobs = parse_with_leaves(raw, vault_pb2.SampleResponse)
                    rows = len(message.starts)
                    parts.append(self._decoder.decode(names, sequence_length, blobs, rows))
                break
            except grpc.RpcError as rpc_error:
                delay = failover.next_delay() if is_retryable(rpc_error) else None
                if delay is None:
                    raise error_from_rpc(rpc_error) from rpc_error
                logger.debug(
                    "sampling %s on %s failed (%s); trying %s",
                    self.vault_name,
                    target,
                    rpc_error.code().name,
                    failover.target,
                )
                parts.clear()
                time.sleep(delay)
            finally:
                if track is not None:
                    track(None)
        arrays = [
            leaf[0] if len(leaf) == 1 else np.concatenate(leaf) for leaf in zip(*parts, strict=True)
        ]
        return TrajectoryBufferSample(experience=self._decoder.tree(names, arrays))

    def sample_iter(
        self,
        batch_size: int,
        sequence_length: int,
        *,
        prefetch: int = 4,
        workers: int = 2,
        seed: int | None = None,
        vault_uids: Sequence[str] = (),
        leaves: Sequence[str] | None = None,
        device: Any = None,
    ) -> SampleIterator[TrajectoryBufferSample[Any]]:
        """Endless `sample` batches, drawn on background threads with `prefetch` kept ready.

        Stop it with `close()` (or a `with` block, or `reader.close()`); an iterator abandoned
        by a `break` stops once garbage collected.

        Example:
            ```
            with reader.sample_iter(256, 16, seed=0) as batches:
                for _, batch in zip(range(num_updates), batches):
                    params = update(params, batch.experience)  # leaves (256, 16, ...)
            ```

        Args:
            batch_size: windows per batch.
            sequence_length: steps per window.
            prefetch: batches kept ready (>= 1).
            workers: `Sample` calls in flight at once (>= 1): while the server reads one batch,
                another travels; batches still come in order.
            seed: seeds a reproducible sequence of batches (batch `i` is the same on the same
                data, whatever `workers`); None for fresh draws.
            vault_uids: the streams to draw from; default all.
            leaves: leaf names to read; default all.
            device: a `jax.Device` or `jax.sharding.Sharding` to put each batch on in the
                background (its leaves become jax arrays); None keeps numpy leaves.

        Returns:
            An iterator of `TrajectoryBufferSample`s, experience leaves
            `(batch_size, sequence_length, ...)`; `next()` raises what `sample` would.

        Raises:
            InvalidArgumentError: `prefetch` or `workers` < 1.
        """
        seeds = None if seed is None else np.random.default_rng(seed)
        # Batch i's seed is the i-th of the sequence, whichever thread draws batch i.
        drawn: dict[int, int] = {}  # seeds drawn ahead of their batch, by batch number
        numbers = itertools.count()
        seeds_lock = threading.Lock()

        def seed_of(ticket: int) -> int | None:
            if seeds is None:
                return None
            with seeds_lock:
                while ticket not in drawn:
                    drawn[next(numbers)] = int(seeds.integers(0, 1 << 63))
                return drawn.pop(ticket)

        def draw(state: Prefetch, ticket: int) -> TrajectoryBufferSample[Any]:
            batch = self._sample(
                batch_size, sequence_length, seed_of(ticket), vault_uids, leaves, state.track
            )
            if device is not None:
                batch = jax.device_put(batch, device)
            return batch

        iterator: SampleIterator[TrajectoryBufferSample[Any]] = SampleIterator(
            draw, prefetch=prefetch, workers=workers, name=f"expvault-sample-{self.vault_name}"
        )
        self._iterators.add(iterator)
        return iterator

    def close(self) -> None:
        """Stops this reader's sample iterators and closes the channels (ends follows)."""
        for iterator in list(self._iterators):
            iterator.close()
        self._client.close()

    def __enter__(self) -> VaultReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
