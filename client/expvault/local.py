"""`expvault.Vault`: flashbax's `Vault` API, in-process, with expvault's guarantees.

A drop-in for `flashbax.vault.Vault`: same constructor, `write`, `read` and `vault_index`, same
files on disk. Where flashbax loses data quietly, this raises instead (see the README).
"""

from __future__ import annotations

import logging
import os
import weakref
from datetime import datetime
from typing import Any

import jax.numpy as jnp
from flashbax.buffers.trajectory_buffer import TrajectoryBufferState

from expvault.errors import InvalidArgumentError, NotFoundError, SchemaMismatchError
from expvault.schema import Schema
from expvault.storage import Store, Stream
from expvault.storage.files import check_name
from expvault.writer import DeltaWriter

logger = logging.getLogger(__name__)

__all__ = ["Vault", "read_interval"]


def read_interval(
    length: int, timesteps: int | None = None, percentiles: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Turns flashbax's `read` arguments as a range `[start, stop)` of a stream of `length` steps.

    Args:
        length: the committed length.
        timesteps: read the last `timesteps` steps (all of them when fewer are stored).
        percentiles: read `[length * lo / 100, length * hi / 100)`, `0 <= lo <= hi <= 100`.

    Raises:
        InvalidArgumentError: negative `timesteps`, or percentiles out of order or range.
    """
    if timesteps is not None:
        if isinstance(timesteps, bool) or int(timesteps) < 0:
            raise InvalidArgumentError(f"timesteps must be >= 0, got {timesteps!r}")
        return max(0, length - int(timesteps)), length
    if percentiles is not None:
        lo, hi = percentiles
        if not 0 <= lo <= hi <= 100:
            raise InvalidArgumentError(
                f"percentiles {tuple(percentiles)} must satisfy 0 <= lo <= hi <= 100"
            )
        return int(length * (lo / 100)), int(length * (hi / 100))
    return 0, length


class Vault:
    """A vault stream on local disk, written from a flashbax buffer state.

    Args:
        vault_name: the vault's name; the stream lives in `<cwd>/<rel_dir>/<vault_name>/<uid>`.
        experience_structure: the buffer's `experience` pytree, leaves `(B, T, ...)`; needed to
            create a vault, optional to open one (then `read` returns a nested dict).
        rel_dir: the directory of all vaults, relative to the working directory or absolute.
        vault_uid: the stream's name; default: the current time, `YYYYmmddHHMMSS`, as flashbax.
        compression: for a new vault: None (blosc lz4), `"lz4"`, `"zstd"`, `"gzip"`, `"none"`,
            or a zarr compressor dict (`{"id": "gzip", "level": 5}`). Ignored when it exists.
        metadata: user metadata stored with a new vault (JSON values; others become `str`).
        chunk_steps: for a new vault, steps per stored time chunk (default: about 1 MiB).

    Raises:
        NotFoundError: the stream does not exist and no `experience_structure` was given.
        SchemaMismatchError: `experience_structure` differs from the stored one.
        InvalidNameError: `vault_name` or `vault_uid` could escape the vault directory.
    """

    def __init__(
        self,
        vault_name: str,
        experience_structure: Any = None,
        rel_dir: str | os.PathLike[str] = "vaults",
        vault_uid: str | None = None,
        compression: str | dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        chunk_steps: int | None = None,
    ) -> None:
        uid = vault_uid if vault_uid else datetime.now().strftime("%Y%m%d%H%M%S")
        check_name("vault_name", vault_name)
        check_name("vault_uid", uid)
        location = str(rel_dir)
        if "://" not in location and not location.lstrip().startswith("{"):
            location = os.path.join(os.getcwd(), location)  # flashbax's rel_dir: under the cwd
        self._store = Store(location)
        try:
            self._stream = self._open(
                vault_name, uid, experience_structure, compression, metadata, chunk_steps
            )
        except BaseException:
            self._store.close()
            raise
        self._schema = (
            self._stream.schema
            if experience_structure is None
            else Schema.from_metadata(
                *self._stream.schema.to_metadata(), target=experience_structure
            )
        )
        self._writer = DeltaWriter(self._stream.schema)
        self._finalizer = weakref.finalize(self, self._store.close)

    def _open(
        self,
        vault_name: str,
        uid: str,
        experience_structure: Any,
        compression: str | dict[str, Any] | None,
        metadata: dict[str, Any] | None,
        chunk_steps: int | None,
    ) -> Stream:
        try:
            stream = self._store.open_stream(vault_name, uid)
        except NotFoundError:
            if experience_structure is None:
                raise NotFoundError(
                    f"vault {vault_name}/{uid} does not exist under {self._store.url} and no "
                    "experience_structure was provided to create it"
                ) from None
            schema = Schema.from_experience(experience_structure)
            self._store.create_vault(
                vault_name,
                schema,
                compression=compression,
                metadata=metadata,
                chunk_steps=chunk_steps,
            )
            stream = self._store.open_stream(vault_name, uid, create=True)
            logger.info("new vault created at %s", stream.where)
            return stream
        logger.info("loading vault found at %s", stream.where)
        if experience_structure is not None:
            mismatch = stream.schema.describe_mismatch(Schema.from_experience(experience_structure))
            if mismatch:
                raise SchemaMismatchError(
                    f"experience_structure does not match vault {vault_name}/{uid}: {mismatch}"
                )
        if compression is not None:
            logger.info("compression is ignored: vault %s/%s exists", vault_name, uid)
        return stream

    @property
    def vault_index(self) -> int:
        """The committed length in steps (flashbax's name)."""
        return self._stream.length

    @property
    def path(self) -> str:
        """The stream's directory, or its URL on an object store."""
        return self._stream.where

    def write(
        self,
        fbx_state: Any,
        source_interval: tuple[int, int] = (0, 0),
        dest_start: int | None = None,
    ) -> int:
        """Writes the buffer state's new steps; durable when it returns.

        Args:
            fbx_state: a flashbax `TrajectoryBufferState` (or an `expvault.counted` state).
            source_interval: `(0, 0)`: every step added since the last write (the first write
                of a full buffer stores all of it); `(a, b)`: that ring interval (wraps if b < a).
            dest_start: stream offset of the first step; default: where the last write ended.
                Steps already stored are skipped; an offset past the end is refused.

        Returns:
            The number of steps newly stored.

        Raises:
            DataLossError: the ring overwrote steps before they were written (nothing is
                stored; the next `write` stores the steps still in the ring).
            SchemaMismatchError: the state does not match the vault.
            OffsetGapError: `dest_start` is past the stored length.
        """
        self._stream.begin_writing()  # the committed length is final only for the writer
        planned = self._writer.plan(
            fbx_state, source_interval, dest_start, committed=self._stream.length
        )
        if planned is None:
            return 0
        before = self._stream.length
        after = self._stream.append(planned.start, planned.arrays)
        self._writer.advance(planned)
        return max(0, after - max(before, planned.start))

    def read(
        self,
        timesteps: int | None = None,
        percentiles: tuple[int, int] | None = None,
    ) -> TrajectoryBufferState:
        """Reads stored steps as a flashbax buffer state (leaves `(B, t, ...)` jax arrays).

        Args:
            timesteps: the last `timesteps` steps (all when fewer are stored).
            percentiles: `(lo, hi)`, the range `[N * lo / 100, N * hi / 100)` of N stored steps.

        Raises:
            InvalidArgumentError: negative timesteps or bad percentiles.
        """
        start, stop = read_interval(self._stream.length, timesteps, percentiles)
        arrays = self._stream.read(start, stop)
        by_name = {leaf.name: a for leaf, a in zip(self._stream.schema.leaves, arrays, strict=True)}
        experience = self._schema.unflatten(
            [jnp.asarray(by_name[leaf.name]) for leaf in self._schema.leaves]
        )
        return TrajectoryBufferState(
            experience=experience,
            current_index=jnp.array(0, dtype=int),
            is_full=jnp.array(True, dtype=bool),
        )

    def flush(self) -> None:
        """Stores the partial last time chunk in the arrays, so flashbax can read everything."""
        self._stream.flush()

    def close(self) -> None:
        """Flushes and releases the stream (also done when the object is collected)."""
        self._finalizer()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
