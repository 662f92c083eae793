"""Readers take the leaves of Read and Sample responses as views of the received bytes."""

import numpy as np
import pytest

from expvault import codec
from expvault._client import _Gathered, _read_capacity, parse_with_leaves, read_request
from expvault.errors import InvalidArgumentError, StorageError
from expvault.v1 import vault_pb2


def _response() -> vault_pb2.ReadResponse:
    message = vault_pb2.ReadResponse(
        vault_uid="actor-1",
        start=300,
        num_steps=2,
        leaves=[b"\x01\x02\x03", b"", bytes(range(256)) * 40],
        committed_offset=1 << 40,
    )
    message.structure.batch_size = 3
    return message


def test_split_bytes_field_returns_the_rest_and_views_of_the_values() -> None:
    message = _response()
    raw = message.SerializeToString()
    rest, values = codec.split_bytes_field(raw, 4)
    assert [bytes(v) for v in values] == list(message.leaves)
    assert all(v.obj is raw for v in values)  # views, not copies
    parsed = vault_pb2.ReadResponse.FromString(rest)
    assert not parsed.leaves
    parsed.leaves.extend(message.leaves)
    assert parsed == message


def test_parse_with_leaves_reads_sample_responses() -> None:
    message = vault_pb2.SampleResponse(
        first=4, vault_uids=["a", "b"], batch_rows=[0, 1], starts=[7, 9], leaves=[b"xy", b"z"]
    )
    parsed, leaves = parse_with_leaves(message.SerializeToString(), vault_pb2.SampleResponse)
    assert [bytes(v) for v in leaves] == [b"xy", b"z"]
    assert list(parsed.starts) == [7, 9]
    assert list(parsed.vault_uids) == ["a", "b"]


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_split_bytes_field_refuses_truncated_messages(cut: int) -> None:
    raw = _response().SerializeToString()
    with pytest.raises(InvalidArgumentError, match="malformed"):
        codec.split_bytes_field(raw[:-cut], 4)


def test_gathered_copies_messages_into_place_and_grows() -> None:
    gathered = _Gathered(start=10, capacity=3)
    parts = [np.arange(2 * n * 3).reshape(2, n, 3) + 100 * n for n in (2, 2, 1)]
    position = 10
    for part in parts:
        gathered.add(position, [part])
        position += part.shape[1]
    (result,) = gathered.result()
    np.testing.assert_array_equal(result, np.concatenate(parts, axis=1))
    assert result.flags.writeable
    with pytest.raises(StorageError, match="expected 15"):
        gathered.add(16, [parts[2]])


def test_read_capacity_is_bounded_by_the_request() -> None:
    assert _read_capacity(read_request("v", "s", start=5, stop=15), 5, 1000) == 10
    assert _read_capacity(read_request("v", "s", last_steps=7), 993, 1000) == 7
    assert _read_capacity(read_request("v", "s", start=5), 5, 1000) == 995
