"""Experience structures: a pytree of leaves `(B, T, ...)` <-> flat leaf specs with stable names.

A leaf is stored under the name flashbax gives it (`_path_to_ds_name` in flashbax/vault/vault.py):
each key of its path followed by a dot, so `Transition.obs` is `"obs."` and `{"a": {"b": x}}`
gives `"a.b."`. flashbax names list and tuple elements `"."` (so they collide); expvault names
them by index (`"0."`). Leaves are matched by name, not by container type, so a vault written
from a NamedTuple can be read back as a dict, as in flashbax.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from expvault.errors import InvalidArgumentError, SchemaMismatchError

__all__ = ["LeafSpec", "Schema"]

_MAX_NAME_CHARS = 255


@dataclass(frozen=True)
class LeafSpec:
    """One leaf of the experience structure.

    Attributes:
        name: the storage name, e.g. `"obs."`.
        dtype: the element type.
        step_shape: the shape of one step of one batch row, i.e. the leaf's `...` in `(B, T, ...)`.
    """

    name: str
    dtype: np.dtype[Any]
    step_shape: tuple[int, ...]

    @property
    def step_bytes(self) -> int:
        """Bytes of one step of one batch row."""
        return int(math.prod(self.step_shape)) * self.dtype.itemsize


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    raise InvalidArgumentError(f"unsupported pytree key {key!r} in the experience structure")


def _check_key(key: str) -> str:
    if not key or "/" in key or "\\" in key or "\x00" in key or key in (".", ".."):
        raise InvalidArgumentError(
            f"experience key {key!r} cannot name a stored leaf: use non-empty keys without "
            "'/', '\\' or NUL"
        )
    return key


def _leaf_name(path: Sequence[Any]) -> tuple[str, tuple[str, ...]]:
    keys = tuple(_check_key(_key_str(k)) for k in path)
    name = "".join(k + "." for k in keys)
    if len(name) > _MAX_NAME_CHARS:
        raise InvalidArgumentError(f"leaf name {name[:40]!r}... is longer than {_MAX_NAME_CHARS}")
    return name, keys


def _parse_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(jnp.dtype(name))
    # numpy raises TypeError for unknown names, ValueError or SyntaxError for malformed
    # comma or shape strings ("5l$o", "(2,"): all are the caller's mistake.
    except (TypeError, ValueError, SyntaxError) as e:
        raise InvalidArgumentError(f"unknown dtype {name[:40]!r}") from e


@dataclass(frozen=True)
class Schema:
    """The flattened experience structure of a vault.

    Attributes:
        leaves: the leaf specs, in the order of `treedef`'s leaves.
        batch_size: `B`, shared by every leaf.
        treedef: the pytree structure `unflatten` rebuilds.
        keys: each leaf's path as strings, used to write flashbax's metadata.
        buffer_length: `T` of the structure the vault was created from (informative only).
    """

    leaves: tuple[LeafSpec, ...]
    batch_size: int
    treedef: Any
    keys: tuple[tuple[str, ...], ...]
    buffer_length: int = 0

    @classmethod
    def from_experience(cls, experience: Any) -> Schema:
        """Builds a schema from an experience pytree.

        Args:
            experience: pytree whose leaves have `.shape` `(B, T, ...)` and `.dtype` (jax or
                numpy arrays, or `jax.ShapeDtypeStruct`).

        Returns:
            The schema.

        Raises:
            InvalidArgumentError: no leaves, a leaf with fewer than two axes, a bad key, or
                leaves whose batch sizes differ.
        """
        with_path, treedef = jax.tree_util.tree_flatten_with_path(experience)
        if not with_path:
            raise InvalidArgumentError("the experience structure has no leaves")
        leaves, keys = [], []
        batch_sizes = set()
        buffer_length = 0
        for path, leaf in with_path:
            name, key = _leaf_name(path)
            shape = tuple(int(d) for d in getattr(leaf, "shape", ()))
            if len(shape) < 2:
                raise InvalidArgumentError(
                    f"leaf {name!r} has shape {shape}; experience leaves are shaped (B, T, ...)"
                )
            batch_sizes.add(shape[0])
            buffer_length = shape[1]
            leaves.append(LeafSpec(name, np.dtype(leaf.dtype), shape[2:]))
            keys.append(key)
        if len(batch_sizes) != 1:
            raise InvalidArgumentError(
                f"leaves disagree on the batch size B: {sorted(batch_sizes)}"
            )
        return cls._checked(tuple(leaves), batch_sizes.pop(), treedef, tuple(keys), buffer_length)

    @classmethod
    def from_metadata(
        cls,
        structure_shape: Mapping[str, Any],
        structure_dtype: Mapping[str, Any],
        target: Any = None,
    ) -> Schema:
        """Builds a schema from flashbax's `metadata.json` entries.

        Args:
            structure_shape: nested dict whose leaves are shape strings like `"(1, 5, 2)"`.
            structure_dtype: the same nesting with dtype names like `"float32"`.
            target: optional experience pytree to give the result its structure (leaves are
                matched by name); without it the structure is the nested dict.

        Returns:
            The schema.

        Raises:
            SchemaMismatchError: `target`'s leaves differ from the stored ones.
            InvalidArgumentError: the metadata is malformed.
        """
        shapes = jax.tree_util.tree_flatten_with_path(dict(structure_shape))[0]
        dtypes = dict(
            (_leaf_name(p)[0], d)
            for p, d in jax.tree_util.tree_flatten_with_path(dict(structure_dtype))[0]
        )
        stored: dict[str, Any] = {}
        for path, shape_str in shapes:
            name, _ = _leaf_name(path)
            try:
                shape = tuple(int(d) for d in ast.literal_eval(str(shape_str)))
            except (ValueError, SyntaxError, TypeError) as e:
                raise InvalidArgumentError(f"bad stored shape {shape_str!r} for {name!r}") from e
            if name not in dtypes:
                raise InvalidArgumentError(f"stored metadata has no dtype for leaf {name!r}")
            stored[name] = jax.ShapeDtypeStruct(shape, _parse_dtype(str(dtypes[name])))  # type: ignore[no-untyped-call]
        as_dict = cls.from_experience(_nest(stored, shapes))
        if target is None:
            return as_dict
        wanted = cls.from_experience(target)
        mismatch = as_dict.describe_mismatch(wanted)
        if mismatch:
            raise SchemaMismatchError(f"experience_structure does not match the vault: {mismatch}")
        # Keep the stored batch size and buffer length, the target's structure and order.
        by_name = {leaf.name: leaf for leaf in as_dict.leaves}
        return cls._checked(
            tuple(by_name[leaf.name] for leaf in wanted.leaves),
            as_dict.batch_size,
            wanted.treedef,
            wanted.keys,
            as_dict.buffer_length,
        )

    @classmethod
    def _checked(
        cls,
        leaves: tuple[LeafSpec, ...],
        batch_size: int,
        treedef: Any,
        keys: tuple[tuple[str, ...], ...],
        buffer_length: int,
    ) -> Schema:
        names = [leaf.name for leaf in leaves]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"two leaves share a stored name: {sorted(names)}")
        if batch_size < 1:
            raise InvalidArgumentError(f"the batch size B must be >= 1, got {batch_size}")
        for leaf in leaves:
            if leaf.dtype.hasobject or leaf.dtype.kind not in "biufcV":
                raise InvalidArgumentError(f"leaf {leaf.name!r} has unsupported dtype {leaf.dtype}")
            if any(d < 0 for d in leaf.step_shape):
                raise InvalidArgumentError(f"leaf {leaf.name!r} has a negative dimension")
        return cls(leaves, batch_size, treedef, keys, buffer_length)

    @property
    def step_bytes(self) -> int:
        """Bytes of one time step across all leaves and batch rows."""
        return self.batch_size * sum(leaf.step_bytes for leaf in self.leaves)

    def to_metadata(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Returns flashbax's `(structure_shape, structure_dtype)` nested dicts."""
        shapes: dict[str, Any] = {}
        dtypes: dict[str, Any] = {}
        for leaf, key in zip(self.leaves, self.keys, strict=True):
            full = (self.batch_size, self.buffer_length, *leaf.step_shape)
            _insert(shapes, key, str(full))
            _insert(dtypes, key, jnp.dtype(leaf.dtype).name)
        return shapes, dtypes

    def describe_mismatch(self, other: Schema) -> str:
        """Says how `other` differs from this schema (B, leaf names, dtypes, step shapes).

        Returns:
            "" when the two store the same data, else a message naming every difference.
        """
        problems = []
        if self.batch_size != other.batch_size:
            problems.append(f"batch size B is {other.batch_size}, the vault has {self.batch_size}")
        mine = {leaf.name: leaf for leaf in self.leaves}
        theirs = {leaf.name: leaf for leaf in other.leaves}
        if missing := sorted(mine.keys() - theirs.keys()):
            problems.append(f"missing leaves {missing}")
        if extra := sorted(theirs.keys() - mine.keys()):
            problems.append(f"unknown leaves {extra}")
        for name in sorted(mine.keys() & theirs.keys()):
            a, b = mine[name], theirs[name]
            if a.dtype != b.dtype:
                problems.append(f"leaf {name!r} has dtype {b.dtype}, the vault has {a.dtype}")
            if a.step_shape != b.step_shape:
                problems.append(
                    f"leaf {name!r} has per-step shape {b.step_shape}, the vault has {a.step_shape}"
                )
        return "; ".join(problems)

    def check_arrays(self, arrays: Sequence[np.ndarray[Any, Any]]) -> int:
        """Checks host arrays against the schema and returns their common number of steps.

        Args:
            arrays: one array per leaf, in `leaves` order, each `(B, n, ...)`.

        Returns:
            `n`, the number of time steps.

        Raises:
            SchemaMismatchError: wrong number of leaves, dtype or shape, or differing `n`.
        """
        if len(arrays) != len(self.leaves):
            raise SchemaMismatchError(f"got {len(arrays)} leaves, the vault has {len(self.leaves)}")
        steps = set()
        for leaf, array in zip(self.leaves, arrays, strict=True):
            if array.dtype != leaf.dtype:
                raise SchemaMismatchError(
                    f"leaf {leaf.name!r} has dtype {array.dtype}, the vault has {leaf.dtype}"
                )
            if (
                array.ndim != 2 + len(leaf.step_shape)
                or array.shape[0] != self.batch_size
                or tuple(array.shape[2:]) != leaf.step_shape
            ):
                raise SchemaMismatchError(
                    f"leaf {leaf.name!r} has shape {tuple(array.shape)}, the vault expects "
                    f"({self.batch_size}, T, {', '.join(map(str, leaf.step_shape))})".replace(
                        ", )", ")"
                    )
                )
            steps.add(int(array.shape[1]))
        if len(steps) != 1:
            raise SchemaMismatchError(f"leaves disagree on the number of steps: {sorted(steps)}")
        return steps.pop()

    def leaf_indices(self, names: Sequence[str] | None) -> list[int]:
        """Returns the schema positions of the named leaves, in schema order.

        Args:
            names: leaf names (`"obs."`); None selects every leaf.

        Raises:
            InvalidArgumentError: an unknown name (the message lists the vault's leaves).
        """
        all_names = [leaf.name for leaf in self.leaves]
        if names is None:
            return list(range(len(all_names)))
        unknown = sorted(set(names) - set(all_names))
        if unknown:
            raise InvalidArgumentError(f"unknown leaves {unknown}; the vault has {all_names}")
        wanted = set(names)
        return [i for i, name in enumerate(all_names) if name in wanted]

    def flatten(self, tree: Any) -> list[Any]:
        """Returns `tree`'s leaves in schema order, matching them by name.

        Raises:
            SchemaMismatchError: the tree's leaf names differ from the schema's.
        """
        with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
        by_name = {_leaf_name(path)[0]: leaf for path, leaf in with_path}
        want = [leaf.name for leaf in self.leaves]
        if set(by_name) != set(want) or len(by_name) != len(with_path):
            raise SchemaMismatchError(
                f"experience leaves {sorted(by_name)} do not match the vault's {sorted(want)}"
            )
        return [by_name[name] for name in want]

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """Rebuilds the experience pytree from leaves in schema order."""
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))


def _insert(tree: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def _nest(by_name: Mapping[str, Any], shapes: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, _ in shapes:
        name, keys = _leaf_name(path)
        _insert(tree, keys, by_name[name])
    return tree
