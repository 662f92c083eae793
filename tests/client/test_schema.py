"""Schema: experience pytrees <-> leaf specs named as flashbax names them, and mismatch messages."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flashbax.vault import Vault as FlashbaxVault

from expvault.errors import InvalidArgumentError, SchemaMismatchError
from expvault.schema import LeafSpec, Schema


class Transition(NamedTuple):
    obs: Any
    action: Any
    reward: Any
    done: Any


def _transition(batch: int = 2, length: int = 5) -> Transition:
    return Transition(
        obs=jnp.zeros((batch, length, 3, 4), jnp.float32),
        action=jnp.zeros((batch, length), jnp.int32),
        reward=jnp.zeros((batch, length), jnp.float32),
        done=jnp.zeros((batch, length), jnp.bool_),
    )


def _nested(batch: int = 2, length: int = 5) -> dict[str, Any]:
    return {
        "a": {"b": jnp.zeros((batch, length, 2), jnp.float32), "c": jnp.zeros((batch, length))},
        "d": jnp.zeros((batch, length, 1, 2), jnp.int8),
    }


def _names(schema: Schema) -> list[str]:
    return [leaf.name for leaf in schema.leaves]


# -- structures and names -------------------------------------------------------------------------


def test_namedtuple_leaves_are_named_as_flashbax_names_them() -> None:
    schema = Schema.from_experience(_transition())
    assert _names(schema) == ["obs.", "action.", "reward.", "done."]
    assert schema.batch_size == 2
    assert schema.buffer_length == 5
    assert schema.leaves[0] == LeafSpec("obs.", np.dtype(np.float32), (3, 4))
    assert schema.leaves[1] == LeafSpec("action.", np.dtype(np.int32), ())
    assert schema.leaves[3].dtype == np.dtype(bool)
    assert schema.keys == (("obs",), ("action",), ("reward",), ("done",))
    # One step of every leaf and batch row: obs 12 floats, 3 scalars of 4, 4, 1 bytes, B=2.
    assert schema.leaves[0].step_bytes == 48
    assert schema.step_bytes == 2 * (48 + 4 + 4 + 1)


def test_nested_dict_leaves_get_dotted_names() -> None:
    schema = Schema.from_experience(_nested())
    assert sorted(_names(schema)) == ["a.b.", "a.c.", "d."]
    by_name = {leaf.name: leaf for leaf in schema.leaves}
    assert by_name["a.b."].step_shape == (2,)
    assert by_name["d."] == LeafSpec("d.", np.dtype(np.int8), (1, 2))


def test_sequence_elements_are_named_by_index() -> None:
    schema = Schema.from_experience({"pair": (jnp.zeros((1, 3)), jnp.zeros((1, 3), jnp.int32))})
    assert _names(schema) == ["pair.0.", "pair.1."]


def test_shape_dtype_structs_and_numpy_leaves_are_accepted() -> None:
    spec = {
        "x": jax.ShapeDtypeStruct((3, 7, 2), jnp.float16),
        "y": np.zeros((3, 7), np.uint64),
    }
    schema = Schema.from_experience(spec)
    by_name = {leaf.name: leaf for leaf in schema.leaves}
    assert by_name["x."].dtype == np.dtype(np.float16)
    assert by_name["y."].dtype == np.dtype(np.uint64)
    assert schema.batch_size == 3


def test_to_metadata_matches_what_flashbax_writes(tmp_path: Any) -> None:
    experience = {"t": _transition(), "extra": {"x": jnp.zeros((2, 5, 6), jnp.uint8)}}
    FlashbaxVault("fbx", experience, rel_dir=str(tmp_path), vault_uid="u")
    stored = json.loads((tmp_path / "fbx" / "u" / "metadata.json").read_text())
    shape, dtype = Schema.from_experience(experience).to_metadata()
    assert shape == stored["structure_shape"]
    assert dtype == stored["structure_dtype"]


@pytest.mark.parametrize("make", [_transition, _nested], ids=["namedtuple", "nested"])
def test_metadata_round_trip(make: Any) -> None:
    original = Schema.from_experience(make())
    shape, dtype = original.to_metadata()
    # What metadata.json holds must survive JSON.
    shape, dtype = json.loads(json.dumps(shape)), json.loads(json.dumps(dtype))
    as_dict = Schema.from_metadata(shape, dtype)
    assert sorted(as_dict.leaves, key=lambda leaf: leaf.name) == sorted(
        original.leaves, key=lambda leaf: leaf.name
    )
    assert (as_dict.batch_size, as_dict.buffer_length) == (2, 5)
    assert as_dict.to_metadata() == (shape, dtype)
    # With the original as target the result has the original structure and leaf order.
    typed = Schema.from_metadata(shape, dtype, target=make())
    assert typed.leaves == original.leaves
    assert typed.treedef == original.treedef


def test_a_namedtuple_written_vault_reads_as_a_dict() -> None:
    shape, dtype = Schema.from_experience(_transition()).to_metadata()
    schema = Schema.from_metadata(shape, dtype)
    arrays = [
        np.full((2, 1, *leaf.step_shape), i, leaf.dtype) for i, leaf in enumerate(schema.leaves)
    ]
    tree = schema.unflatten(arrays)
    assert isinstance(tree, dict)
    assert set(tree) == {"obs", "action", "reward", "done"}
    assert tree["obs"].shape == (2, 1, 3, 4)
    # Flattening the dict back matches leaves by name, whatever the container.
    typed = Schema.from_experience(_transition())
    as_namedtuple = Transition(**tree)
    assert [a.dtype for a in typed.flatten(as_namedtuple)] == [
        np.dtype(np.float32),
        np.dtype(np.int32),
        np.dtype(np.float32),
        np.dtype(bool),
    ]
    assert typed.flatten(tree)[0] is tree["obs"]


# -- mismatches -----------------------------------------------------------------------------------


def test_identical_structures_have_no_mismatch() -> None:
    a = Schema.from_experience(_transition())
    b = Schema.from_experience(_transition(length=99))  # T is not part of the schema
    assert a.describe_mismatch(b) == ""


def test_mismatch_names_the_batch_size() -> None:
    message = Schema.from_experience(_transition(batch=2)).describe_mismatch(
        Schema.from_experience(_transition(batch=3))
    )
    assert "batch size B is 3, the vault has 2" in message


def test_mismatch_names_dtype_and_shape() -> None:
    vault = Schema.from_experience(_transition())
    other = _transition()._replace(
        reward=jnp.zeros((2, 5), jnp.float16), obs=jnp.zeros((2, 5, 4, 3), jnp.float32)
    )
    message = vault.describe_mismatch(Schema.from_experience(other))
    assert "leaf 'reward.' has dtype float16, the vault has float32" in message
    assert "leaf 'obs.' has per-step shape (4, 3), the vault has (3, 4)" in message


def test_mismatch_names_missing_and_extra_leaves() -> None:
    vault = Schema.from_experience({"obs": jnp.zeros((1, 2)), "done": jnp.zeros((1, 2), bool)})
    other = Schema.from_experience({"obs": jnp.zeros((1, 2)), "info": jnp.zeros((1, 2))})
    message = vault.describe_mismatch(other)
    assert "missing leaves ['done.']" in message
    assert "unknown leaves ['info.']" in message


def test_from_metadata_with_a_mismatching_target_is_refused() -> None:
    shape, dtype = Schema.from_experience(_transition()).to_metadata()
    wrong = _transition()._replace(action=jnp.zeros((2, 5), jnp.int16))
    with pytest.raises(SchemaMismatchError, match=r"'action\.' has dtype int16"):
        Schema.from_metadata(shape, dtype, target=wrong)


def test_check_arrays_accepts_matching_arrays_and_returns_steps() -> None:
    schema = Schema.from_experience(_nested(batch=2))
    arrays = [np.zeros((2, 7, *leaf.step_shape), leaf.dtype) for leaf in schema.leaves]
    assert schema.check_arrays(arrays) == 7


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a[:-1], r"got 1 leaves, the vault has 2"),
        (
            lambda a: [a[0].astype(np.float64), a[1]],
            r"'x\.' has dtype float64, the vault has float32",
        ),
        (
            lambda a: [a[0][:1], a[1][:1]],
            r"'x\.' has shape \(1, 4, 3\), the vault expects \(2, T, 3\)",
        ),
        (lambda a: [a[0][..., :2], a[1]], r"'x\.' has shape \(2, 4, 2\)"),
        (lambda a: [a[0][:, :, :, None], a[1]], r"'x\.' has shape \(2, 4, 3, 1\)"),
        (lambda a: [a[0], a[1][:, :3]], r"disagree on the number of steps: \[3, 4\]"),
        (
            lambda a: [a[0], a[1][:, :, None]],
            r"'y\.' has shape \(2, 4, 1\), the vault expects \(2, T\)",
        ),
    ],
    ids=["leaf-count", "dtype", "batch", "step-shape", "rank", "steps", "scalar-rank"],
)
def test_check_arrays_refuses_mismatches(change: Any, message: str) -> None:
    schema = Schema.from_experience(
        {"x": jnp.zeros((2, 1, 3), jnp.float32), "y": jnp.zeros((2, 1), jnp.int32)}
    )
    good = [np.zeros((2, 4, 3), np.float32), np.zeros((2, 4), np.int32)]
    with pytest.raises(SchemaMismatchError, match=message):
        schema.check_arrays(change(good))


def test_flatten_refuses_other_leaf_names() -> None:
    schema = Schema.from_experience(_transition())
    with pytest.raises(SchemaMismatchError, match="do not match the vault's"):
        schema.flatten({"obs": 1, "action": 2, "reward": 3})


# -- bad structures and keys ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a/b", "", "..", ".", "a\x00b", "a\\b", "/"])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot name a stored leaf"):
        Schema.from_experience({key: jnp.zeros((1, 2))})


def test_a_too_long_leaf_name_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="longer than"):
        Schema.from_experience({"k" * 300: jnp.zeros((1, 2))})


def test_colliding_leaf_names_are_refused() -> None:
    # {"a": {"b": x}} and {"a.b": y} would both be stored as "a.b.".
    with pytest.raises(InvalidArgumentError, match="share a stored name"):
        Schema.from_experience({"a": {"b": jnp.zeros((1, 2))}, "a.b": jnp.zeros((1, 2))})


def test_structures_without_leaves_or_time_axis_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="no leaves"):
        Schema.from_experience({})
    with pytest.raises(InvalidArgumentError, match=r"shaped \(B, T, \.\.\.\)"):
        Schema.from_experience({"x": jnp.zeros((4,))})


def test_leaves_with_different_batch_sizes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"disagree on the batch size B: \[1, 2\]"):
        Schema.from_experience({"x": jnp.zeros((1, 3)), "y": jnp.zeros((2, 3))})


def test_zero_batch_and_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="batch size B must be >= 1"):
        Schema.from_experience({"x": np.zeros((0, 3))})
    with pytest.raises(InvalidArgumentError, match="unsupported dtype"):
        Schema.from_experience({"x": np.zeros((1, 3), "U4")})


def test_malformed_metadata_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="bad stored shape"):
        Schema.from_metadata({"x": "not a shape"}, {"x": "float32"})
    with pytest.raises(InvalidArgumentError, match=r"no dtype for leaf 'y\.'"):
        Schema.from_metadata({"x": "(1, 2)", "y": "(1, 2)"}, {"x": "float32"})
    with pytest.raises(InvalidArgumentError, match="unknown dtype 'floaty'"):
        Schema.from_metadata({"x": "(1, 2)"}, {"x": "floaty"})
