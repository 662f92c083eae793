"""The wire contract: generated code is current, and the codec round-trips schemas and arrays."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from expvault import codec
from expvault.errors import InvalidArgumentError, SchemaMismatchError
from expvault.schema import Schema
from expvault.v1 import vault_pb2

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "client" / "expvault" / "v1"


def test_generated_code_is_current(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = generate.generate(tmp_path)
    fresh = {p.name: p.read_text() for p in written}
    committed = {p.name: p.read_text() for p in GENERATED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "run: python proto/generate.py"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} is stale: run python proto/generate.py"


def test_every_rpc_documents_its_messages() -> None:
    text = (REPO / "proto" / "expvault" / "v1" / "vault.proto").read_text()
    service = vault_pb2.DESCRIPTOR.services_by_name["VaultService"]
    for method in service.methods:
        before = text[: text.index(f"rpc {method.name}(")].rstrip().splitlines()[-1]
        assert before.strip().startswith("//"), f"{method.name} has no comment"
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


class Nested(NamedTuple):
    obs: Any
    extras: Any


def _experience() -> Nested:
    return Nested(
        obs=np.zeros((2, 8, 3, 4), np.uint8),
        extras={"reward": np.zeros((2, 8), np.float32), "mask": np.zeros((2, 8, 2), jnp.bfloat16)},
    )


def test_schema_round_trips_through_the_wire() -> None:
    schema = Schema.from_experience(_experience())
    message = codec.schema_to_proto(schema)
    assert [leaf.name for leaf in message.leaves] == ["obs.", "extras.mask.", "extras.reward."]
    assert message.leaves[1].dtype == "bfloat16"
    assert list(message.leaves[0].step_shape) == [3, 4]
    assert list(message.leaves[1].key_path) == ["extras", "mask"]
    assert message.batch_size == 2
    assert message.buffer_length == 8
    as_dict = codec.schema_from_proto(message)
    assert as_dict.describe_mismatch(schema) == ""
    typed = codec.schema_from_proto(message, _experience())
    assert [leaf.name for leaf in typed.leaves] == [leaf.name for leaf in schema.leaves]
    assert typed.treedef == schema.treedef


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.ClearField("leaves"), "no leaves"),
        (lambda s: setattr(s, "batch_size", 0), "batch_size >= 1"),
        (lambda s: s.leaves[0].ClearField("key_path"), "empty key_path"),
        (lambda s: setattr(s.leaves[0], "name", "x."), "does not match its key_path"),
        (lambda s: s.leaves[0].step_shape.append(-1), "negative dimension"),
        (lambda s: setattr(s.leaves[0], "dtype", "object"), "unsupported dtype"),
        (lambda s: s.leaves.append(s.leaves[0]), "appears twice"),
    ],
)
def test_malformed_structures_say_what_is_wrong(mutate: Any, message: str) -> None:
    structure = codec.schema_to_proto(Schema.from_experience(_experience()))
    mutate(structure)
    with pytest.raises(InvalidArgumentError, match=message):
        codec.schema_from_proto(structure)


def test_target_with_other_leaves_is_a_schema_mismatch() -> None:
    structure = codec.schema_to_proto(Schema.from_experience(_experience()))
    with pytest.raises(SchemaMismatchError, match="missing leaves"):
        codec.schema_from_proto(structure, {"obs": np.zeros((2, 8, 3, 4), np.uint8)})


def test_arrays_round_trip_as_little_endian_bytes() -> None:
    schema = Schema.from_experience(_experience())
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 255, (2, 5, 3, 4), dtype=np.uint8),
        rng.normal(size=(2, 5, 2)).astype(jnp.bfloat16),
        rng.normal(size=(2, 5)).astype(">f4"),  # big-endian input is converted
    ]
    blobs = codec.encode_arrays(arrays)
    assert [len(b) for b in blobs] == [2 * 5 * 12, 2 * 5 * 2 * 2, 2 * 5 * 4]
    assert blobs[2] == arrays[2].astype("<f4").tobytes()
    decoded = codec.decode_arrays(schema.leaves, 2, 5, blobs)
    for got, want in zip(decoded, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable  # a view of the message's bytes, not a copy


def test_decode_names_the_leaf_and_the_byte_counts() -> None:
    schema = Schema.from_experience(_experience())
    blobs = [*codec.encode_arrays([np.zeros((2, 1, 3, 4), np.uint8)] * 1), b"", b""]
    with pytest.raises(
        SchemaMismatchError, match=r"leaf 'extras.mask.' carries 0 bytes, expected 8"
    ):
        codec.decode_arrays(schema.leaves, 2, 1, blobs)
    with pytest.raises(SchemaMismatchError, match="carries 1 leaves, expected 3"):
        codec.decode_arrays(schema.leaves, 2, 1, blobs[:1])


@pytest.mark.parametrize("message_bytes", [1, 100, 1000, 10**6])
def test_split_steps_tiles_the_delta(message_bytes: int) -> None:
    arrays = [np.arange(2 * 37 * 3, dtype=np.int32).reshape(2, 37, 3), np.ones((2, 37), np.bool_)]
    parts = list(codec.split_steps(10, arrays, message_bytes))
    assert parts[0][0] == 10
    assert sum(n for _, n, _ in parts) == 37
    for (start, n, _), (nxt, _, _) in itertools.pairwise(parts):
        assert start + n == nxt
    step_bytes = 2 * (12 + 1)
    assert all(n == max(1, message_bytes // step_bytes) for _, n, _ in parts[:-1])
    leaves = [np.concatenate([np.frombuffer(p[2][i], a.dtype).reshape(2, p[1], *a.shape[2:])
                              for p in parts], axis=1) for i, a in enumerate(arrays)]  # fmt: skip
    for got, want in zip(leaves, arrays, strict=True):
        np.testing.assert_array_equal(got, want)
