"""The server's configured limits, and the checks that keep bad structures off the disk.

Every limit is a `ServerConfig` field with a flag and an `EXPVAULT_*` variable; a request over one
ends RESOURCE_EXHAUSTED with a message naming the limit and the flag that raises it, and an
`ErrorInfo` carrying `limit` (the setting's name) and `limit_value`.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import tensorstore as ts

from expvault.errors import InvalidArgumentError, ResourceExhaustedError
from expvault.schema import Schema
from expvault.storage import default_chunk_steps, resolve_compression
from expvault.v1 import vault_pb2
from expvault_server.config import ServerConfig

__all__ = [
    "check_sample",
    "check_step_bytes",
    "check_structure",
    "message_room",
    "over_limit",
    "probe_storage",
]

# zarr arrays have at most 32 dimensions; two of them are B and T.
MAX_STEP_RANK: Final = 30
# Declared time axis of the probe arrays (as large as the store's: nothing is allocated).
_PROBE_TIME_AXIS: Final = 1 << 40


def over_limit(what: str, limit: str, value: int, flag: str) -> ResourceExhaustedError:
    """The error of a request over a configured limit.

    Args:
        what: what the request asked for, e.g. "the structure has 2000 leaves".
        limit: the `ServerConfig` field, e.g. "max_leaves".
        value: the limit's value.
        flag: the flag that raises it, e.g. "--max-leaves".
    """
    return ResourceExhaustedError(
        f"{what}; the server's limit {limit} is {value} (raise it with {flag} or "
        f"EXPVAULT_{flag.lstrip('-').replace('-', '_').upper()})",
        metadata={"limit": limit, "limit_value": str(value)},
    )


def check_structure(config: ServerConfig, structure: vault_pb2.Structure) -> None:
    """Cheap checks of a `Structure` message, before a schema is built from it.

    Raises:
        ResourceExhaustedError: more leaves than `max_leaves`.
        InvalidArgumentError: a leaf with a zero dimension or more than 30 dimensions.
    """
    if len(structure.leaves) > config.max_leaves:
        raise over_limit(
            f"the structure has {len(structure.leaves)} leaves",
            "max_leaves",
            config.max_leaves,
            "--max-leaves",
        )
    for leaf in structure.leaves:
        if len(leaf.step_shape) > MAX_STEP_RANK:
            raise InvalidArgumentError(
                f"leaf {leaf.name!r} has {len(leaf.step_shape)} step dimensions; at most "
                f"{MAX_STEP_RANK} (zarr's 32 less B and T)"
            )
        if 0 in leaf.step_shape:
            raise InvalidArgumentError(
                f"leaf {leaf.name!r} has step shape {list(leaf.step_shape)}; every dimension "
                "must be >= 1 (a leaf of no elements cannot be stored)"
            )


def message_room(config: ServerConfig, num_leaves: int) -> int:
    """Leaf bytes one message may carry: `max_message_bytes` less its framing.

    A message's framing (field tags and lengths, offsets, a stream name of up to 200 characters)
    takes less than 512 bytes plus 16 per leaf.
    """
    return config.max_message_bytes - 512 - 16 * num_leaves


def check_step_bytes(config: ServerConfig, schema: Schema, vault_name: str) -> None:
    """Refuses a vault whose one time step (all leaves, all B rows) is over the step limit.

    Raises:
        ResourceExhaustedError: `schema.step_bytes` is over `max_step_bytes`, or one step does
            not fit in one message of `max_message_bytes`.
    """
    what = (
        f"one time step of vault {vault_name!r} holds {schema.step_bytes} bytes "
        f"(B={schema.batch_size} rows of all leaves)"
    )
    if schema.step_bytes > config.max_step_bytes:
        raise over_limit(what, "max_step_bytes", config.max_step_bytes, "--max-step-bytes")
    if schema.step_bytes > message_room(config, len(schema.leaves)):
        raise over_limit(
            f"{what}, more than one message carries",
            "max_message_bytes",
            config.max_message_bytes,
            "--max-message-bytes",
        )


def check_sample(config: ServerConfig, batch_size: int) -> None:
    """Refuses a Sample call asking for more windows than `max_sample_batch`.

    Raises:
        ResourceExhaustedError: `batch_size` is over the limit.
    """
    if batch_size > config.max_sample_batch:
        raise over_limit(
            f"Sample asks for {batch_size} windows",
            "max_sample_batch",
            config.max_sample_batch,
            "--max-sample-batch",
        )


def probe_storage(schema: Schema, compression: Any) -> None:
    """Creates in-memory arrays like the vault's streams will have, to refuse what cannot be stored.

    Without it a vault with, say, an unknown compressor or a dtype tensorstore lacks would be
    created and every stream of it would then fail. Runs in a worker thread (a few ms).

    Raises:
        InvalidArgumentError: the compressor or a leaf's dtype or shape cannot be stored.
    """
    compressor = resolve_compression(compression)
    chunk_steps = default_chunk_steps(schema)
    try:
        _memory_array(np.dtype("uint8"), [schema.batch_size, chunk_steps], compressor)
    except ValueError as e:
        raise InvalidArgumentError(f"compression {compressor} cannot be used: {e}") from e
    for leaf in schema.leaves:
        try:
            _memory_array(leaf.dtype, [schema.batch_size, chunk_steps, *leaf.step_shape], None)
        except ValueError as e:
            raise InvalidArgumentError(
                f"leaf {leaf.name!r} ({leaf.dtype} {list(leaf.step_shape)}) cannot be stored: {e}"
            ) from e


def _memory_array(dtype: np.dtype[Any], chunks: list[int], compressor: Any) -> None:
    ts.open(
        {
            "driver": "zarr",
            "kvstore": {"driver": "memory"},
            "metadata": {"compressor": compressor, "chunks": chunks},
        },
        create=True,
        dtype=dtype.name,
        shape=[chunks[0], _PROBE_TIME_AXIS, *chunks[2:]],
    ).result()
