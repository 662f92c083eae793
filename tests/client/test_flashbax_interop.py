"""The on-disk format is flashbax's: each reads (and expvault appends to) what the other wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
import tensorstore as ts
from flashbax.vault import Vault as FlashbaxVault

from conftest import concat_time, full_buffer
from expvault import Vault
from expvault.storage import Store


class Transition(NamedTuple):
    obs: Any
    action: Any
    reward: Any
    done: Any


B, T = 2, 12


def _transition(seed: int) -> Transition:
    rng = np.random.default_rng(seed)
    return Transition(
        obs=rng.standard_normal((B, T, 4, 3)).astype(np.float32),
        action=rng.integers(-(2**31), 2**31 - 1, (B, T), dtype=np.int32),
        reward=rng.standard_normal((B, T)).astype(np.float32),
        done=rng.random((B, T)) < 0.2,
    )


def _nested(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "obs": {
            "pixels": rng.integers(0, 256, (B, T, 5, 5), dtype=np.uint8),
            "vec": rng.standard_normal((B, T, 6)).astype(np.float16),
        },
        "action": rng.integers(-100, 100, (B, T), dtype=np.int8),
        "info": {"step": {"count": rng.integers(0, 2**32, (B, T), dtype=np.uint32)}},
    }


def _assert_trees_equal(got: Any, want: Any) -> None:
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    assert [jax.tree_util.keystr(p) for p, _ in got_leaves] == [
        jax.tree_util.keystr(p) for p, _ in want_leaves
    ]
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        g = np.asarray(g)
        assert g.dtype == w.dtype, jax.tree_util.keystr(path)
        assert g.shape == w.shape, jax.tree_util.keystr(path)
        # Bit for bit, NaNs and signed zeros included.
        assert g.tobytes() == np.ascontiguousarray(w).tobytes(), jax.tree_util.keystr(path)


def _as_dict(tree: Any) -> Any:
    if isinstance(tree, tuple) and hasattr(tree, "_asdict"):
        return {k: _as_dict(v) for k, v in tree._asdict().items()}
    if isinstance(tree, dict):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


# -- flashbax reads what expvault wrote ---------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "none", "gzip", "zstd"])
def test_flashbax_reads_a_namedtuple_vault_expvault_wrote(
    tmp_path: Path, compression: str | None
) -> None:
    parts = [_transition(seed) for seed in range(4)]
    vault = Vault(
        "nt",
        parts[0],
        rel_dir=str(tmp_path),
        vault_uid="u",
        compression=compression,
        chunk_steps=8,  # 48 steps: whole chunks and a partial last one
    )
    for part in parts:
        assert vault.write(full_buffer(part), source_interval=(0, T)) == T
    vault.close()
    want = concat_time(*parts)

    theirs = FlashbaxVault("nt", rel_dir=str(tmp_path), vault_uid="u")
    assert theirs.vault_index == 4 * T
    _assert_trees_equal(theirs.read().experience, _as_dict(want))
    typed = FlashbaxVault("nt", parts[0], rel_dir=str(tmp_path), vault_uid="u")
    result = typed.read().experience
    assert isinstance(result, Transition)
    _assert_trees_equal(result, want)
    _assert_trees_equal(typed.read(timesteps=5).experience, jax.tree.map(lambda x: x[:, -5:], want))


def test_flashbax_reads_a_nested_vault_expvault_wrote(tmp_path: Path) -> None:
    parts = [_nested(seed) for seed in range(3)]
    with Vault("nested", parts[0], rel_dir=str(tmp_path), vault_uid="u", chunk_steps=16) as vault:
        for part in parts:
            vault.write(full_buffer(part), source_interval=(0, T))
    want = concat_time(*parts)
    theirs = FlashbaxVault("nested", rel_dir=str(tmp_path), vault_uid="u")
    assert theirs.vault_index == 3 * T
    _assert_trees_equal(theirs.read().experience, want)
    typed = FlashbaxVault("nested", parts[0], rel_dir=str(tmp_path), vault_uid="u")
    _assert_trees_equal(typed.read().experience, want)


def test_wide_leaves_are_stored_in_chunks_of_few_rows_that_flashbax_reads(
    tmp_path: Path,
) -> None:
    # 64 steps per time chunk: obs rows of 64 x 1 KiB -> 1 row per chunk (>= 64 KiB), the
    # 256 B reward rows -> 256 rows, capped at B = 8: one chunk of the whole batch.
    rng = np.random.default_rng(3)
    data = {
        "obs": rng.standard_normal((8, 300, 256)).astype(np.float32),
        "reward": rng.standard_normal((8, 300)).astype(np.float32),
    }
    with Vault("wide", data, rel_dir=str(tmp_path), vault_uid="u", chunk_steps=64) as vault:
        vault.write(full_buffer(data), source_interval=(0, 300))

    def chunk(leaf: str) -> list[int]:
        kvstore = {"driver": "ocdbt", "base": f"file://{tmp_path}/wide/u", "path": leaf}
        array = ts.open({"driver": "zarr", "kvstore": kvstore}).result()
        return list(array.chunk_layout.read_chunk.shape)

    assert chunk("obs.") == [1, 64, 256]
    assert chunk("reward.") == [8, 64]
    store = Store(tmp_path)
    try:  # windows of single rows, across chunk boundaries, as Sample reads them
        windows = [(7, 0), (3, 60), (0, 236), (5, 100)]
        obs, reward = store.open_stream("wide", "u").read_windows(windows, 64)
        for k, (row, start) in enumerate(windows):
            assert obs[k].tobytes() == data["obs"][row, start : start + 64].tobytes()
            assert reward[k].tobytes() == data["reward"][row, start : start + 64].tobytes()
    finally:
        store.close()
    theirs = FlashbaxVault("wide", rel_dir=str(tmp_path), vault_uid="u")
    _assert_trees_equal(theirs.read().experience, data)


def test_flashbax_reads_everything_after_flush(tmp_path: Path) -> None:
    first, second = _transition(1), _transition(2)
    vault = Vault("flush", first, rel_dir=str(tmp_path), vault_uid="u", chunk_steps=64)
    try:
        vault.write(full_buffer(first), source_interval=(0, T))
        vault.flush()
        # The expvault writer is still open; flashbax sees the flushed steps.
        _assert_trees_equal(
            FlashbaxVault("flush", first, rel_dir=str(tmp_path), vault_uid="u").read().experience,
            first,
        )
        vault.write(full_buffer(second), source_interval=(0, T))
        vault.flush()
        _assert_trees_equal(
            FlashbaxVault("flush", first, rel_dir=str(tmp_path), vault_uid="u").read().experience,
            concat_time(first, second),
        )
    finally:
        vault.close()


def test_expvault_metadata_is_flashbax_metadata(tmp_path: Path) -> None:
    experience = _nested(0)
    with Vault("m", experience, rel_dir=str(tmp_path / "ev"), vault_uid="u", metadata={"k": 1}):
        pass
    FlashbaxVault("m", experience, rel_dir=str(tmp_path / "fbx"), vault_uid="u", metadata={"k": 1})
    ours = json.loads((tmp_path / "ev" / "m" / "u" / "metadata.json").read_text())
    theirs = json.loads((tmp_path / "fbx" / "m" / "u" / "metadata.json").read_text())
    for key in ("version", "structure_shape", "structure_dtype", "k"):
        assert ours[key] == theirs[key], key


# -- expvault reads and appends to what flashbax wrote ------------------------------------------


@pytest.mark.parametrize("make", [_transition, _nested], ids=["namedtuple", "nested"])
def test_expvault_reads_and_appends_to_a_flashbax_vault(tmp_path: Path, make: Any) -> None:
    written = [make(seed) for seed in range(3)]
    theirs = FlashbaxVault("fbx", written[0], rel_dir=str(tmp_path), vault_uid="u")  # gzip 5
    for part in written:
        assert theirs.write(full_buffer(part), source_interval=(0, T)) == T
    del theirs
    before = concat_time(*written)

    # Opened without a structure: read as flashbax would, a dict.
    with Vault("fbx", rel_dir=str(tmp_path), vault_uid="u") as ours:
        assert ours.vault_index == 3 * T
        _assert_trees_equal(ours.read().experience, _as_dict(before))

    # Opened with the structure: read back in it, then append.
    appended = [make(seed) for seed in (10, 11)]
    with Vault("fbx", written[0], rel_dir=str(tmp_path), vault_uid="u") as ours:
        _assert_trees_equal(ours.read().experience, before)
        _assert_trees_equal(
            ours.read(percentiles=(50, 100)).experience,
            jax.tree.map(lambda x: x[:, 18:], before),
        )
        # The first write of a full buffer stores all of it, after the stored steps.
        assert ours.write(full_buffer(appended[0])) == T
        assert ours.write(full_buffer(appended[1]), source_interval=(0, T)) == T
        assert ours.vault_index == 5 * T
    after = concat_time(before, *appended)

    again = FlashbaxVault("fbx", written[0], rel_dir=str(tmp_path), vault_uid="u")
    assert again.vault_index == 5 * T
    _assert_trees_equal(again.read().experience, after)
    # ... and flashbax can go on writing after expvault.
    extra = make(20)
    assert again.write(full_buffer(extra), source_interval=(0, T)) == T
    del again
    with Vault("fbx", rel_dir=str(tmp_path), vault_uid="u") as ours:
        _assert_trees_equal(ours.read().experience, _as_dict(concat_time(after, extra)))
