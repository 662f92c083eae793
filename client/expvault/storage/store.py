"""The root of many vaults: `<root>/<vault_name>/<vault_uid>/` is a flashbax-format stream.

The root is a `Location`: a local directory, or an object store (`s3://`, `gs://`, `memory://`)
that several servers may share (see `location.py` and `lease.py`).

A vault has one experience structure, recorded in `<root>/<vault_name>/vault.json`; each stream
directory holds flashbax's `metadata.json` and one OCDBT database with a zarr array per leaf and
`vault_index`. Vaults written by flashbax (no `vault.json`) are served as they are.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorstore as ts

from expvault.errors import (
    AlreadyExistsError,
    ExpvaultError,
    InvalidArgumentError,
    InvalidNameError,
    NotFoundError,
    StorageError,
)
from expvault.schema import Schema
from expvault.storage import files
from expvault.storage.chunks import ChunkCache
from expvault.storage.lease import DEFAULT_LEASE_S
from expvault.storage.location import KvLocation, Location, open_location
from expvault.storage.stream import LogBudget, Stream

logger = logging.getLogger(__name__)

VAULT_FILE = "vault.json"
METADATA_FILE = "metadata.json"
FLASHBAX_VERSION = 1.2  # the flashbax on-disk format version expvault writes
TIME_AXIS_MAX_LENGTH = int(10e12)  # flashbax's declared time axis; the real length is vault_index
_FLASHBAX_KEYS = ("version", "structure_shape", "structure_dtype")
_EXPVAULT_KEY = "expvault"
_TARGET_CHUNK_BYTES = 1 << 20
# A stored chunk holds one time chunk of as few batch rows as make it at least this big: a window
# of one row (a sample) then decodes little besides itself (32 windows of 64 steps from a 1 GB
# vault: ~2.3 instead of ~8.5 ms), and small leaves keep chunks of the whole batch.
_MIN_CHUNK_BYTES = 64 << 10
_OCDBT_CONFIG = {"max_decoded_node_bytes": 65536}  # keeps per-commit cost flat as data grows
_OCDBT_MANIFEST = "manifest.ocdbt"

COMPRESSION_PRESETS: dict[str, dict[str, Any] | None] = {
    "lz4": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1},
    "zstd": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 1},
    "gzip": {"id": "gzip", "level": 5},
    "none": None,
}
DEFAULT_COMPRESSION = "lz4"


def resolve_compression(compression: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Returns the zarr v2 `compressor` for a preset name or a compressor dict.

    Args:
        compression: None (the default, blosc lz4), a preset (`"lz4"`, `"zstd"`, `"gzip"`,
            `"none"`), or a zarr compressor dict as flashbax takes (`{"id": "gzip", "level": 5}`).

    Raises:
        InvalidArgumentError: an unknown preset or a dict without `"id"`.
    """
    if compression is None:
        compression = DEFAULT_COMPRESSION
    if isinstance(compression, str):
        if compression not in COMPRESSION_PRESETS:
            raise InvalidArgumentError(
                f"unknown compression {compression!r}; use one of {sorted(COMPRESSION_PRESETS)} "
                "or a zarr compressor dict"
            )
        preset = COMPRESSION_PRESETS[compression]
        return None if preset is None else dict(preset)
    if not isinstance(compression, Mapping) or "id" not in compression:
        raise InvalidArgumentError(
            f"compression {compression!r} must be a preset name or a zarr compressor dict with 'id'"
        )
    return dict(compression)


def default_chunk_steps(schema: Schema) -> int:
    """Steps per time chunk: a power of two giving about 1 MiB for the largest leaf (16..65536)."""
    widest = max(schema.batch_size * leaf.step_bytes for leaf in schema.leaves) or 1
    steps = 2 ** int(math.log2(max(1, _TARGET_CHUNK_BYTES // widest)))
    return int(min(max(steps, 16), 65536))


def _chunk_rows(batch_size: int, chunk_steps: int, row_step_bytes: int) -> int:
    """Batch rows per stored chunk of a leaf: the fewest (power of two, <= B) of 64 KiB or more."""
    rows = -(-_MIN_CHUNK_BYTES // max(1, chunk_steps * row_step_bytes))
    return min(batch_size, 1 << (rows - 1).bit_length())


@dataclass(frozen=True)
class StreamInfo:
    """A stream's name, committed length (steps) and bytes on disk."""

    vault_uid: str
    length: int
    bytes_on_disk: int


@dataclass(frozen=True)
class VaultInfo:
    """A vault: its structure, user metadata, storage settings and streams.

    `damaged` lists the streams that cannot be opened, `(vault_uid, what is wrong)`; they are
    not in `streams`, and the others stay readable and writable.
    """

    vault_name: str
    schema: Schema
    metadata: dict[str, Any]
    compression: dict[str, Any] | None
    chunk_steps: int
    streams: tuple[StreamInfo, ...]
    damaged: tuple[tuple[str, str], ...] = ()

    def damage_report(self) -> str:
        """What is wrong with the damaged streams, and what to do; "" when none is."""
        if not self.damaged:
            return ""
        problems = "; ".join(f"stream {uid!r}: {what}" for uid, what in self.damaged)
        return (
            f"vault {self.vault_name!r} has {len(self.damaged)} damaged stream(s): {problems}. "
            "Restore them from a backup, or move their directories out of the root; the other "
            f"{len(self.streams)} stream(s) are served as usual"
        )


class Store:
    """All vaults under one root; opens each stream once and shares it.

    Args:
        root: where the vaults live: a directory (created when missing), `file://DIR`,
            `memory://`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`, or a tensorstore kvstore
            spec (see `open_location`), or a `Location` (its context then holds the cache).
        cache_bytes: tensorstore's chunk cache for reads, shared by all streams.
        small_chunk_cache_bytes: whole decoded chunks of small leaves (at most 64 bytes per row
            and step: rewards, actions, flags) that `Stream.read_windows` (sampling) cuts
            windows out of, shared by all streams; 0 reads them with tensorstore's indexed read.
        max_log_bytes: bytes of committed steps all streams together keep in memory until they
            are moved into the arrays; writers wait beyond it (see `LogBudget`). None: no bound.
        lease_s: on a shared object store, how long a writer's lease of a stream lasts without
            renewal: how long another server waits to take over a stream of a dead one.
        poll_interval_s: how often a stream another process writes is looked at for new steps
            while someone follows it.
        s3_endpoint, s3_region: for `s3://` roots (default from the AWS environment variables).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | dict[str, Any] | Location,
        *,
        cache_bytes: int = 256 << 20,
        small_chunk_cache_bytes: int = 32 << 20,
        max_log_bytes: int | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        poll_interval_s: float = 0.2,
        s3_endpoint: str | None = None,
        s3_region: str | None = None,
    ) -> None:
        if isinstance(root, Location):
            self.location: Location = root
        else:
            context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
            self.location = open_location(
                root, context, s3_endpoint=s3_endpoint, s3_region=s3_region
            )
        self._context = self.location.context
        self.url = self.location.url
        self.lease_s = lease_s
        # This store's name in the leases it takes: a stream it does not write in memory is free
        # for it to take back (after its own crash, or a lost lease).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.poll_interval_s = poll_interval_s
        self.log_budget = LogBudget(max_log_bytes)
        self.chunk_cache = ChunkCache(small_chunk_cache_bytes)
        self._lock = threading.RLock()
        self._streams: dict[tuple[str, str], Stream] = {}

    @property
    def root(self) -> Path:
        """The root directory (a local location only; `url` names any)."""
        return self.location.local_path()

    # -- vaults -------------------------------------------------------------------------------

    def create_vault(
        self,
        vault_name: str,
        schema: Schema,
        *,
        compression: str | Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_steps: int | None = None,
    ) -> tuple[VaultInfo, bool]:
        """Creates a vault, or returns the existing one when its structure is the same.

        Args:
            vault_name: the vault's name (letters, digits, `.`, `_`, `-`).
            schema: the experience structure.
            compression: see `resolve_compression`.
            metadata: user metadata, JSON-serialisable (other values are stored as `str`).
            chunk_steps: time steps per stored chunk; default `default_chunk_steps(schema)`.

        Returns:
            The vault and whether it was created now.

        Raises:
            AlreadyExistsError: a vault of that name has another structure.
            InvalidNameError, InvalidArgumentError: bad name, compression or chunk size.
        """
        files.check_name("vault_name", vault_name)
        compressor = resolve_compression(compression)
        steps = default_chunk_steps(schema) if chunk_steps is None else int(chunk_steps)
        if not 1 <= steps <= 1 << 24:
            raise InvalidArgumentError(f"chunk_steps must be in [1, 2**24], got {chunk_steps}")
        with self._lock:
            try:
                existing = self.get_vault(vault_name)
            except NotFoundError:
                existing = None
            if existing is not None:
                mismatch = existing.schema.describe_mismatch(schema)
                if mismatch:
                    raise AlreadyExistsError(
                        f"vault {vault_name!r} exists with another experience structure "
                        f"({mismatch}); use another vault_name"
                    )
                return existing, False
            shape, dtype = schema.to_metadata()
            document = {
                "format": 1,
                "structure_shape": shape,
                "structure_dtype": dtype,
                "compression": compressor,
                "chunk_steps": steps,
                "metadata": _jsonable(metadata),
            }
            try:
                self.location.make_dir(vault_name)
                if not self.location.write_json(
                    f"{vault_name}/{VAULT_FILE}", document, create_only=True
                ):
                    # Another server created it meanwhile: compare with that one.
                    return self.create_vault(
                        vault_name,
                        schema,
                        compression=compression,
                        metadata=metadata,
                        chunk_steps=chunk_steps,
                    )
            except (OSError, ValueError) as e:
                raise self.location.error(f"cannot create vault {vault_name!r}", e) from e
            logger.info("created vault %s", vault_name)
            return self.get_vault(vault_name), True

    def get_vault(self, vault_name: str, *, with_sizes: bool = True) -> VaultInfo:
        """Returns a vault's description.

        Raises:
            NotFoundError: no such vault.
        """
        files.check_name("vault_name", vault_name)
        where = self.location
        uids = self.list_streams(vault_name)
        if where.exists(f"{vault_name}/{VAULT_FILE}"):
            doc = where.read_json(f"{vault_name}/{VAULT_FILE}")
            try:
                schema = Schema.from_metadata(doc["structure_shape"], doc["structure_dtype"])
                compression, chunk_steps = doc.get("compression"), int(doc["chunk_steps"])
                user = dict(doc.get("metadata") or {})
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise StorageError(
                    f"{where.describe(f'{vault_name}/{VAULT_FILE}')} is malformed "
                    f"({type(e).__name__}: {e}); restore it from a backup (it records the "
                    "vault's structure)"
                ) from e
        elif described := [u for u in uids if where.exists(f"{vault_name}/{u}/{METADATA_FILE}")]:
            # A vault flashbax wrote: its first stream describes it.
            meta_key = f"{vault_name}/{described[0]}/{METADATA_FILE}"
            meta = where.read_json(meta_key)
            try:
                schema = Schema.from_metadata(meta["structure_shape"], meta["structure_dtype"])
            except (KeyError, TypeError, ValueError) as e:
                raise StorageError(
                    f"{where.describe(meta_key)} is malformed ({type(e).__name__}: {e})"
                ) from e
            user = {k: v for k, v in meta.items() if k not in (*_FLASHBAX_KEYS, _EXPVAULT_KEY)}
            compression, chunk_steps = None, 0
        elif uids:
            raise StorageError(
                f"vault {vault_name!r} at {where.describe(vault_name)} has neither {VAULT_FILE} "
                "nor a stream with "
                f"{METADATA_FILE}: its structure is lost; restore them from a backup"
            )
        else:
            raise NotFoundError(f"vault {vault_name!r} not found")
        streams = []
        damaged = []
        for uid in uids:
            try:
                stream = self.open_stream(vault_name, uid)
                size = stream.bytes_on_disk() if with_sizes else 0
            except ExpvaultError as e:
                logger.warning("vault %s: stream %s cannot be opened: %s", vault_name, uid, e)
                damaged.append((uid, e.message))
                continue
            streams.append(StreamInfo(uid, stream.length, size))
        return VaultInfo(
            vault_name, schema, user, compression, chunk_steps, tuple(streams), tuple(damaged)
        )

    def list_vaults(self) -> list[str]:
        """Returns the names of the vaults under the root, sorted."""
        names = []
        for entry in self.location.list_children(""):
            if entry.startswith("."):
                continue
            with contextlib.suppress(InvalidNameError):
                files.check_name("vault_name", entry)
                if self.location.exists(f"{entry}/{VAULT_FILE}") or self.list_streams(entry):
                    names.append(entry)
        return names

    def list_streams(self, vault_name: str) -> list[str]:
        """Returns the uids of a vault's streams, sorted (empty when the vault has none).

        A stream directory that lost its `metadata.json` but holds data is listed too, so that
        opening it reports the damage instead of the stream vanishing.
        """
        files.check_name("vault_name", vault_name)
        return [
            e
            for e in self.location.list_children(vault_name)
            if not e.startswith(".")
            and any(
                self.location.exists(f"{vault_name}/{e}/{name}")
                for name in (METADATA_FILE, _OCDBT_MANIFEST)
            )
        ]

    def delete_vault(self, vault_name: str) -> None:
        """Deletes a vault and all its streams.

        Raises:
            NotFoundError: no such vault.
        """
        self.get_vault(vault_name, with_sizes=False)
        with self._lock:
            for key in [k for k in self._streams if k[0] == vault_name]:
                self._streams.pop(key).close()
            try:
                self.location.delete_tree(vault_name)
            except OSError as e:
                raise self.location.error(f"cannot delete vault {vault_name!r}", e) from e
        logger.info("deleted vault %s", vault_name)

    # -- streams ------------------------------------------------------------------------------

    def open_stream(self, vault_name: str, vault_uid: str, *, create: bool = False) -> Stream:
        """Opens (or with `create`, creates) a stream; the same object for every caller.

        Raises:
            NotFoundError: no such vault, or no such stream and not `create`.
            InvalidNameError: a bad name.
            StorageError: the stream's files are damaged.
        """
        files.check_name("vault_name", vault_name)
        files.check_name("vault_uid", vault_uid)
        key = (vault_name, vault_uid)
        with self._lock:
            cached = self._streams.get(key)
        if cached is not None:
            cached.refresh(self.poll_interval_s)  # steps other processes committed meanwhile
            return cached
        with self._lock:
            if key in self._streams:
                return self._streams[key]
            where = self.location
            stream_key = f"{vault_name}/{vault_uid}"
            if not where.exists(f"{stream_key}/{METADATA_FILE}"):
                # On an object store a crash mid-creation leaves arrays without metadata.json:
                # creating again completes it. Elsewhere that is damage to report.
                half_created = isinstance(where, KvLocation) and create
                if where.exists(f"{stream_key}/{_OCDBT_MANIFEST}") and not half_created:
                    raise StorageError(
                        f"stream {stream_key} has data but its {METADATA_FILE} is missing "
                        f"({where.describe(f'{stream_key}/{METADATA_FILE}')}); restore it "
                        f"from a backup, or move {where.describe(stream_key)} out of the root"
                    )
                if not create:
                    raise NotFoundError(f"stream {vault_name}/{vault_uid} not found")
                self._create_stream(vault_name, vault_uid)
            stream = self._open(vault_name, vault_uid)
            self._streams[key] = stream
            return stream

    def _create_stream(self, vault_name: str, vault_uid: str) -> None:
        """Creates a stream of an existing vault, atomically (built aside, then renamed)."""
        vault = self.get_vault(vault_name, with_sizes=False)
        if not vault.chunk_steps:
            raise InvalidArgumentError(
                f"vault {vault_name!r} was written by flashbax and has no expvault settings; "
                "create new streams in a vault created by expvault"
            )
        shape, dtype = vault.schema.to_metadata()
        metadata = {
            **vault.metadata,  # flashbax keeps user metadata at the top level
            "version": FLASHBAX_VERSION,
            "structure_shape": shape,
            "structure_dtype": dtype,
            _EXPVAULT_KEY: {"chunk_steps": vault.chunk_steps, "compression": vault.compression},
        }
        batch = vault.schema.batch_size
        again = isinstance(self.location, KvLocation)  # completes a crashed creation in place

        def build(key: str) -> None:
            base = self.location.kvstore(key)
            for leaf in vault.schema.leaves:
                ts.open(
                    _spec(
                        base,
                        leaf.name,
                        create=True,
                        metadata={
                            "compressor": vault.compression,
                            "chunks": [
                                _chunk_rows(batch, vault.chunk_steps, leaf.step_bytes),
                                vault.chunk_steps,
                                *leaf.step_shape,
                            ],
                        },
                    ),
                    create=True,
                    open=again,
                    dtype=leaf.dtype.name,
                    shape=(batch, TIME_AXIS_MAX_LENGTH, *leaf.step_shape),
                    context=self._context,
                ).result()
            index = ts.open(
                _spec(base, "vault_index", create=True, metadata={"chunks": [1]}),
                create=True,
                open=again,
                dtype=ts.int32,
                shape=(1,),
                context=self._context,
            ).result()
            index.write(0).result()
            # Last: the stream exists once its metadata does (first creator wins).
            self.location.write_json(f"{key}/{METADATA_FILE}", metadata, create_only=True)

        try:
            self.location.create_stream(f"{vault_name}/{vault_uid}", build)
        except (OSError, ValueError) as e:  # tensorstore's errors, a full disk included
            raise self.location.error(f"cannot create stream {vault_name}/{vault_uid}", e) from e
        logger.info("created stream %s/%s", vault_name, vault_uid)

    def _open(self, vault_name: str, vault_uid: str) -> Stream:
        key = f"{vault_name}/{vault_uid}"
        base = self.location.kvstore(key)
        meta = self.location.read_json(f"{key}/{METADATA_FILE}")
        try:
            version = float(meta["version"])
            schema = Schema.from_metadata(meta["structure_shape"], meta["structure_dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(
                f"metadata.json of {vault_name}/{vault_uid} is malformed: {e}"
            ) from e
        if version // 1 != FLASHBAX_VERSION // 1:
            raise StorageError(
                f"stream {vault_name}/{vault_uid} has format version {version}; "
                f"expvault reads version {int(FLASHBAX_VERSION)}.x"
            )
        try:
            arrays = [
                ts.open(_spec(base, leaf.name), context=self._context).result()
                for leaf in schema.leaves
            ]
            index = ts.open(_spec(base, "vault_index"), context=self._context).result()
        except ValueError as e:
            raise StorageError(
                f"cannot open the arrays of stream {key} under {self.location.describe(key)}: {e}"
            ) from e
        for leaf, array in zip(schema.leaves, arrays, strict=True):
            expected = (schema.batch_size, *leaf.step_shape)
            got = (array.shape[0], *array.shape[2:])
            if got != expected or array.dtype.numpy_dtype != leaf.dtype:
                raise StorageError(
                    f"array {leaf.name!r} of {vault_name}/{vault_uid} is {array.dtype} "
                    f"{array.shape}, metadata.json says {leaf.dtype} {expected}"
                )
        flush_steps = max(_time_chunk(a) for a in arrays)
        user = {k: v for k, v in meta.items() if k not in (*_FLASHBAX_KEYS, _EXPVAULT_KEY)}
        try:
            return Stream(
                vault_name=vault_name,
                vault_uid=vault_uid,
                location=self.location,
                schema=schema,
                metadata=user,
                arrays=arrays,
                index=index,
                flush_steps=flush_steps,
                log_budget=self.log_budget,
                lease_s=self.lease_s,
                owner=self.owner,
                poll_interval_s=self.poll_interval_s,
                chunk_cache=self.chunk_cache,
            )
        except (OSError, ValueError) as e:  # the index or the log cannot be read
            raise StorageError(
                f"cannot load the committed state of stream {key} under "
                f"{self.location.describe(key)}: {e}"
            ) from e

    def close(self) -> None:
        """Commits and flushes every open stream and forgets them."""
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.close()


def _spec(
    base: dict[str, Any], name: str, *, create: bool = False, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The tensorstore spec of array `name` in the OCDBT database on the kvstore `base`."""
    kvstore: dict[str, Any] = {"driver": "ocdbt", "base": base, "path": name}
    if create:
        kvstore["config"] = _OCDBT_CONFIG
    spec: dict[str, Any] = {"driver": "zarr", "kvstore": kvstore}
    if metadata is not None:
        spec["metadata"] = metadata
    return spec


def _time_chunk(array: Any) -> int:
    """Steps per stored chunk along the time axis of a `(B, T, ...)` array."""
    shape: Any = array.chunk_layout.read_chunk.shape
    return int(shape[1] or 1)


def _jsonable(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Returns user metadata as JSON: flashbax stores values that JSON cannot as `str`; so do we."""

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        if isinstance(value, bool | str | int | float | type(None)):
            return value
        return str(value)

    out = convert(dict(metadata or {}))
    reserved = sorted(set(out) & {*_FLASHBAX_KEYS, _EXPVAULT_KEY})
    if reserved:
        raise InvalidArgumentError(f"metadata keys {reserved} are reserved; rename them")
    return dict(out)


__all__ = [
    "COMPRESSION_PRESETS",
    "Store",
    "StreamInfo",
    "VaultInfo",
    "default_chunk_steps",
    "resolve_compression",
]
