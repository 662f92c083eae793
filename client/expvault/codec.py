"""Schemas and arrays <-> the wire: `Structure` messages and raw little-endian leaf bytes.

A message of `n` steps carries one `bytes` per leaf, each the C-order, little-endian bytes of a
`(B, n, *step_shape)` array, in the order of the leaves of the `Structure` the server sent for the
call. Protobuf stops at this module and at `remote.py` / `service.py`: the rest of expvault sees
`Schema` and numpy arrays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from google.protobuf.message import Message

from expvault.errors import InvalidArgumentError, SchemaMismatchError
from expvault.schema import LeafSpec, Schema
from expvault.v1 import vault_pb2

__all__ = [
    "DEFAULT_MESSAGE_BYTES",
    "MAX_JSON_DEPTH",
    "EncodedChunk",
    "append_chunks",
    "decode_arrays",
    "encode_arrays",
    "from_json",
    "leaf_indices",
    "schema_from_proto",
    "schema_to_proto",
    "serialize_append_request",
    "serialize_response",
    "split_bytes_field",
    "split_steps",
    "steps_per_message",
    "to_json",
    "with_leaves",
]

# Measured on loopback: 256 KiB-1 MiB messages move 700-800 MB/s through protobuf bytes.
DEFAULT_MESSAGE_BYTES = 1 << 20
# Deeper user metadata would overflow the stack of code that walks it (json.dumps, the store).
MAX_JSON_DEPTH = 64


def schema_to_proto(schema: Schema) -> vault_pb2.Structure:
    """Returns the `Structure` message of a schema, leaves in the schema's order."""
    leaves = [
        vault_pb2.Leaf(
            name=leaf.name,
            dtype=jax.numpy.dtype(leaf.dtype).name,
            step_shape=list(leaf.step_shape),
            key_path=list(key),
        )
        for leaf, key in zip(schema.leaves, schema.keys, strict=True)
    ]
    return vault_pb2.Structure(
        batch_size=schema.batch_size, buffer_length=schema.buffer_length, leaves=leaves
    )


def schema_from_proto(structure: vault_pb2.Structure, target: Any = None) -> Schema:
    """Builds a schema from a `Structure` message.

    Args:
        structure: the message.
        target: optional experience pytree giving the result its pytree structure and leaf
            order (leaves matched by name); without it the structure is a nested dict.

    Returns:
        The schema.

    Raises:
        InvalidArgumentError: the message is malformed (no leaves, bad dtype, negative sizes,
            a key path that does not give the leaf's name).
        SchemaMismatchError: `target`'s leaves differ from the message's.
    """
    if not structure.leaves:
        raise InvalidArgumentError("structure has no leaves; describe at least one leaf")
    if structure.batch_size < 1 or structure.buffer_length < 0:
        raise InvalidArgumentError(
            f"structure needs batch_size >= 1 and buffer_length >= 0, got "
            f"{structure.batch_size} and {structure.buffer_length}"
        )
    shapes: dict[str, Any] = {}
    dtypes: dict[str, Any] = {}
    for leaf in structure.leaves:
        key_path = tuple(leaf.key_path)
        if not key_path:
            raise InvalidArgumentError(f"leaf {leaf.name!r} has an empty key_path")
        expected_name = "".join(k + "." for k in key_path)
        if leaf.name != expected_name:
            raise InvalidArgumentError(
                f"leaf name {leaf.name!r} does not match its key_path {list(key_path)} "
                f"(expected {expected_name!r})"
            )
        if any(d < 0 for d in leaf.step_shape):
            raise InvalidArgumentError(f"leaf {leaf.name!r} has a negative dimension")
        full = (structure.batch_size, structure.buffer_length, *leaf.step_shape)
        _insert(shapes, key_path, str(tuple(int(d) for d in full)), leaf.name)
        _insert(dtypes, key_path, leaf.dtype, leaf.name)
    return Schema.from_metadata(shapes, dtypes, target)


def _insert(tree: dict[str, Any], key: tuple[str, ...], value: Any, name: str) -> None:
    for k in key[:-1]:
        child = tree.setdefault(k, {})
        if not isinstance(child, dict):
            raise InvalidArgumentError(f"leaf {name!r} is nested under another leaf")
        tree = child
    if key[-1] in tree:
        raise InvalidArgumentError(f"leaf {name!r} appears twice or contains another leaf")
    tree[key[-1]] = value


def leaf_indices(schema: Schema, names: Sequence[str]) -> list[int]:
    """The schema positions of the leaves a request names; an empty list selects every leaf.

    Raises:
        InvalidArgumentError: an unknown name (the message lists the vault's leaves).
    """
    return schema.leaf_indices(list(names) or None)


def _wire_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def encode_arrays(arrays: Sequence[np.ndarray[Any, Any]]) -> list[bytes]:
    """Returns each array's raw little-endian, C-order bytes (one copy per array)."""
    out = []
    for array in arrays:
        wire = _wire_dtype(array.dtype)
        out.append((array if wire == array.dtype else array.astype(wire)).tobytes(order="C"))
    return out


def decode_arrays(
    leaves: Sequence[LeafSpec],
    batch_size: int,
    num_steps: int,
    blobs: Sequence[bytes | memoryview],
) -> list[np.ndarray[Any, Any]]:
    """Turns wire bytes into arrays `(batch_size, num_steps, *step_shape)`, without copying.

    Args:
        leaves: the specs of the leaves the message carries, in wire order.
        batch_size: `B`.
        num_steps: the message's number of steps.
        blobs: one `bytes` per leaf; read a protobuf `repeated bytes` field once (`list(...)`),
            since every access copies.

    Returns:
        Read-only arrays viewing `blobs`.

    Raises:
        SchemaMismatchError: a wrong number of leaves, or a leaf whose byte length is not what
            its dtype, step shape, `B` and `num_steps` imply (the message names the leaf).
    """
    if len(blobs) != len(leaves):
        raise SchemaMismatchError(
            f"message carries {len(blobs)} leaves, expected {len(leaves)} "
            f"({[leaf.name for leaf in leaves]})"
        )
    if num_steps < 0:
        raise InvalidArgumentError(f"num_steps must be >= 0, got {num_steps}")
    arrays = []
    for leaf, blob in zip(leaves, blobs, strict=True):
        expected = batch_size * num_steps * leaf.step_bytes
        if len(blob) != expected:
            raise SchemaMismatchError(
                f"leaf {leaf.name!r} carries {len(blob)} bytes, expected {expected} "
                f"({batch_size} x {num_steps} steps of {leaf.dtype} {leaf.step_shape}); "
                "check its dtype and shape against the vault's structure"
            )
        array = np.frombuffer(blob, dtype=_wire_dtype(leaf.dtype))
        arrays.append(array.reshape(batch_size, num_steps, *leaf.step_shape))
    return arrays


def steps_per_message(step_bytes: int, message_bytes: int = DEFAULT_MESSAGE_BYTES) -> int:
    """Steps of `step_bytes` each (all leaves and rows) that fit a message of `message_bytes`.

    At least one step, even when one step is larger than `message_bytes`.
    """
    return max(1, message_bytes // max(1, step_bytes))


def split_steps(
    start: int,
    arrays: Sequence[np.ndarray[Any, Any]],
    message_bytes: int = DEFAULT_MESSAGE_BYTES,
) -> Iterator[tuple[int, int, list[bytes]]]:
    """Splits a delta along time into messages of about `message_bytes`.

    Args:
        start: stream offset of the delta's first step.
        arrays: one array per leaf, in wire order, each `(B, n, ...)`.
        message_bytes: target payload per message.

    Yields:
        `(start, num_steps, leaf bytes)` per message, in time order.
    """
    total = int(arrays[0].shape[1]) if arrays else 0
    step_bytes = sum(int(a.nbytes) // max(1, total) for a in arrays) if total else 0
    per_message = steps_per_message(step_bytes, message_bytes)
    for lo in range(0, total, per_message):
        hi = min(total, lo + per_message)
        yield start + lo, hi - lo, encode_arrays([a[:, lo:hi] for a in arrays])


class EncodedChunk(NamedTuple):
    """One Append chunk, serialized: steps `[start, start + num_steps)` of a stream.

    Attributes:
        start: stream offset of the first step.
        num_steps: number of time steps.
        nbytes: leaf payload bytes (what `max_pending_bytes` counts).
        request: the serialized `AppendRequest` carrying the `AppendChunk`.
    """

    start: int
    num_steps: int
    nbytes: int
    request: bytes


# Protobuf wire format of `AppendRequest{chunk: AppendChunk{start, num_steps, leaves}}`: a tag is
# (field number << 3 | wire type), 0 for a varint, 2 for length-delimited bytes.
_TAG_REQUEST_CHUNK = bytes([2 << 3 | 2])
_TAG_CHUNK_START = bytes([1 << 3 | 0])
_TAG_CHUNK_NUM_STEPS = bytes([2 << 3 | 0])
_TAG_CHUNK_LEAF = bytes([3 << 3 | 2])


def _varint(value: int) -> bytes:
    """A non-negative int as a protobuf varint (7 bits per byte, least significant first)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _leaf_bytes(array: np.ndarray[Any, Any]) -> tuple[memoryview, int, int]:
    """A leaf `(B, n, ...)` as `(its little-endian C-order bytes, B, bytes per step of a row)`.

    No copy when the array is already little-endian and C-contiguous, as gathered deltas and
    what tensorstore reads are.
    """
    wire = _wire_dtype(array.dtype)
    contiguous = np.ascontiguousarray(array if wire == array.dtype else array.astype(wire))
    rows = int(contiguous.shape[0])
    step_bytes = contiguous.itemsize * math.prod(int(d) for d in contiguous.shape[2:])
    return contiguous.reshape(-1).view(np.uint8).data, rows, step_bytes


def _leaf_fields(
    tag: bytes, leaves: Sequence[tuple[memoryview, int, int]], total: int, lo: int, hi: int
) -> tuple[list[bytes | memoryview], int]:
    """The length-delimited fields carrying steps `[lo, hi)` of each leaf, as views to join.

    Args:
        tag: the field's tag.
        leaves: `_leaf_bytes` of each leaf, all `total` steps long.
        total: the leaves' number of steps.
        lo: first step to carry.
        hi: one past the last.

    Returns:
        The parts (tags, lengths and one view per batch row, or one per leaf when it carries all
        its steps) and the leaf payload bytes.
    """
    parts: list[bytes | memoryview] = []
    nbytes = 0
    for data, rows, row_step in leaves:
        size = rows * (hi - lo) * row_step
        parts += [tag, _varint(size)]
        if lo == 0 and hi == total:
            parts.append(data)  # the whole leaf: one contiguous run
        else:  # one run per batch row
            parts.extend(
                data[(row * total + lo) * row_step : (row * total + hi) * row_step]
                for row in range(rows)
            )
        nbytes += size
    return parts, nbytes


def with_leaves(
    message: vault_pb2.ReadResponse | vault_pb2.SampleResponse,
    arrays: Sequence[np.ndarray[Any, Any]],
) -> bytes:
    """`message` serialized with `arrays` as its `leaves`, each copied once.

    Building the message with `encode_arrays` copies each leaf three times (to bytes, into the
    message, out of it when serialized); this joins the small rest of the message with views of
    the arrays. The result parses as the message with those leaves (protobuf takes fields in
    any order).

    Args:
        message: a Read or Sample response without leaves.
        arrays: one array per leaf, in wire order, each `(B, n, ...)`.
    """
    total = int(arrays[0].shape[1]) if arrays else 0
    tag = _varint(message.DESCRIPTOR.fields_by_name["leaves"].number << 3 | 2)
    parts, _ = _leaf_fields(tag, [_leaf_bytes(a) for a in arrays], total, 0, total)
    return b"".join([message.SerializeToString(), *parts])


def serialize_response(message: Message | bytes) -> bytes:
    """The response serializer of the server: messages, or what `with_leaves` serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def append_chunks(
    start: int,
    arrays: Sequence[np.ndarray[Any, Any]],
    message_bytes: int = DEFAULT_MESSAGE_BYTES,
) -> Iterator[EncodedChunk]:
    """Splits a delta along time into serialized Append chunks of about `message_bytes`.

    The leaf bytes are copied once, from the arrays straight into each request: the result
    parses as the `AppendRequest` whose chunk holds `encode_arrays` of the same steps, without
    going through protobuf objects (building one copies every leaf twice more, and took ~1 ms
    per 0.5 MB message here).

    Args:
        start: stream offset of the delta's first step.
        arrays: one array per leaf, in wire order, each `(B, n, ...)`.
        message_bytes: target payload per message.

    Yields:
        One chunk per message, in time order.
    """
    leaves = [_leaf_bytes(a) for a in arrays]
    total = int(arrays[0].shape[1]) if arrays else 0
    step_bytes = sum(rows * row_step for _, rows, row_step in leaves)
    per_message = steps_per_message(step_bytes, message_bytes)
    for lo in range(0, total, per_message):
        hi = min(total, lo + per_message)
        body: list[bytes | memoryview] = []
        if start + lo:
            body += [_TAG_CHUNK_START, _varint(start + lo)]
        body += [_TAG_CHUNK_NUM_STEPS, _varint(hi - lo)]
        fields, nbytes = _leaf_fields(_TAG_CHUNK_LEAF, leaves, total, lo, hi)
        body += fields
        length = sum(len(part) for part in body)
        request = b"".join([_TAG_REQUEST_CHUNK, _varint(length), *body])
        yield EncodedChunk(start + lo, hi - lo, nbytes, request)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `data[pos:]` and the position after it."""
    value = shift = 0
    while shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def split_bytes_field(data: bytes, field_number: int) -> tuple[bytes, list[memoryview]]:
    """Takes the values of one `repeated bytes` field out of a serialized message, uncopied.

    Parsing a message copies each `bytes` value, and reading the field copies it again; a
    reader of large Read and Sample responses instead keeps the leaves as views of the received
    bytes and parses only the small rest with protobuf.

    Args:
        data: a serialized message.
        field_number: the number of its `repeated bytes` field (e.g. `leaves`).

    Returns:
        The message without that field (parse it with `FromString`), and the field's values in
        order, as views of `data`.

    Raises:
        InvalidArgumentError: `data` is not a well-formed message.
    """
    view = memoryview(data)
    end = len(data)
    rest: list[memoryview] = []
    values: list[memoryview] = []
    pos = 0
    try:
        while pos < end:
            first = pos
            key, pos = _read_varint(data, pos)
            wire_type = key & 7
            if wire_type == 0:
                _, pos = _read_varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _read_varint(data, pos)
                pos += length
                if key >> 3 == field_number and pos <= end:
                    values.append(view[pos - length : pos])
                    continue
            else:
                raise ValueError(f"unsupported wire type {wire_type}")
            if pos > end:
                raise ValueError("a field runs past the end")
            rest.append(view[first:pos])
    except (ValueError, IndexError) as e:
        raise InvalidArgumentError(f"malformed message from the peer: {e}") from e
    return b"".join(rest), values


def serialize_append_request(request: vault_pb2.AppendRequest | bytes) -> bytes:
    """The request serializer of the Append call: messages, or chunks `append_chunks` encoded."""
    return request if isinstance(request, bytes) else request.SerializeToString()


def to_json(value: Mapping[str, Any] | str | None) -> str:
    """Serialises user metadata or a compression setting for the wire ("" for None)."""
    return "" if value is None else json.dumps(value, default=str)


def from_json(text: str, what: str) -> Any:
    """Parses a JSON field of a message ("" is None).

    Raises:
        InvalidArgumentError: the text is not JSON, or nests lists and objects more than
            `MAX_JSON_DEPTH` deep (the message names the field `what`).
    """
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidArgumentError(f"{what} is not valid JSON: {e}") from e
    except RecursionError as e:  # "[[[[..." thousands deep
        raise InvalidArgumentError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from e
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidArgumentError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest
