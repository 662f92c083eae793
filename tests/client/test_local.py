"""expvault.Vault: flashbax's Vault API in-process, without flashbax's silent losses."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flashbax as fbx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flashbax.buffers.trajectory_buffer import TrajectoryBufferState
from flashbax.vault import Vault as FlashbaxVault

from expvault import (
    DataLossError,
    InvalidArgumentError,
    InvalidNameError,
    NotFoundError,
    OffsetGapError,
    SchemaMismatchError,
    Vault,
    counted,
)


class FbxTransition(NamedTuple):
    obs: Any


TX = FbxTransition(obs=jnp.zeros((2,)))


def _flat(max_length: int = 5) -> Any:
    return fbx.make_flat_buffer(max_length=max_length, min_length=1, sample_batch_size=1)


def _step(i: int) -> FbxTransition:
    return FbxTransition(obs=i * jnp.ones(2))


def _obs_steps(vault: Any) -> list[float]:
    """The stored steps of a single-row `obs` vault, one number per step."""
    experience = vault.read().experience
    obs = np.asarray(experience["obs"] if isinstance(experience, dict) else experience.obs)
    assert obs.shape[0] == 1
    assert (obs[..., 0] == obs[..., 1]).all()
    return obs[0, :, 0].tolist()


# -- the seed's two failure cases ---------------------------------------------------------------


def test_the_first_write_of_a_full_buffer_stores_the_whole_buffer(tmp_path: Path) -> None:
    buffer = _flat()
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(TX)
    for i in range(5):
        state = add(state, _step(i))
    assert bool(state.is_full)
    assert int(state.current_index) == 0

    vault = Vault("full", state.experience, rel_dir=str(tmp_path / "ev"), vault_uid="x")
    assert vault.write(state) == 5
    assert vault.vault_index == 5
    assert vault.read().experience.obs.shape == (1, 5, 2)
    assert _obs_steps(vault) == [0, 1, 2, 3, 4]
    vault.close()

    # flashbax 0.1.3 stores nothing here (the seed: shape (1, 0, 2)).
    theirs = FlashbaxVault("full", state.experience, rel_dir=str(tmp_path / "fbx"), vault_uid="x")
    assert theirs.write(state) == 0
    assert theirs.read().experience.obs.shape == (1, 0, 2)


def test_overwritten_steps_raise_data_loss_naming_the_range(tmp_path: Path) -> None:
    buffer = _flat()
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(TX)
    vault = Vault("loss", state.experience, rel_dir=str(tmp_path / "ev"), vault_uid="x")
    theirs = FlashbaxVault("loss", state.experience, rel_dir=str(tmp_path / "fbx"), vault_uid="x")
    for i in range(1, 10):
        state = add(state, _step(i))
        if i == 2:
            assert vault.write(state) == 2
            assert theirs.write(state) == 2
    # 9 steps into a 5-step ring written after steps 2 and 9: the steps 3 and 4 (stream offsets
    # 2 and 3) were overwritten before they were written.
    with pytest.raises(DataLossError, match=r"\[2, 4\)") as info:
        vault.write(state)
    assert (info.value.lost_start, info.value.lost_stop) == (2, 4)
    assert "lower bound" in str(info.value)  # plain flashbax states only give a lower bound
    assert vault.vault_index == 2  # nothing was stored
    # The next write stores the steps still in the ring.
    assert vault.write(state) == 5
    assert vault.write(state) == 0
    assert _obs_steps(vault) == [1, 2, 5, 6, 7, 8, 9]
    vault.close()

    # flashbax silently stores [1, 2, 8, 9].
    theirs.write(state)
    assert np.asarray(theirs.read().experience.obs)[0, :, 0].tolist() == [1, 2, 8, 9]


def test_counted_buffers_detect_loss_exactly(tmp_path: Path) -> None:
    buffer = counted(_flat())
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(TX)
    vault = Vault("counted", state.experience, rel_dir=str(tmp_path), vault_uid="x")
    for i in range(1, 10):
        state = add(state, _step(i))
        if i == 2:
            assert vault.write(state) == 2
    with pytest.raises(DataLossError, match=r"\[2, 4\)") as info:
        vault.write(state)
    assert (info.value.lost_start, info.value.lost_stop) == (2, 4)
    assert "lower bound" not in str(info.value)
    assert vault.write(state) == 5
    # Exactly one more lap of the ring: the ring position is where it was, but the counter
    # knows five steps arrived.
    for i in range(10, 15):
        state = add(state, _step(i))
    assert vault.write(state) == 5
    # Seven steps into a five-step ring: exactly two lost, named by the stream offsets they
    # would have had (12 steps are stored: the first loss left no hole in the stream).
    for i in range(15, 22):
        state = add(state, _step(i))
    with pytest.raises(DataLossError, match=r"\[12, 14\)") as info:
        vault.write(state)
    assert (info.value.lost_start, info.value.lost_stop) == (12, 14)
    assert vault.write(state) == 5
    assert _obs_steps(vault) == [1, 2, *range(5, 15), *range(17, 22)]
    vault.close()


def test_plain_states_cannot_see_a_whole_lap(tmp_path: Path) -> None:
    """Documents the limit of flashbax's index arithmetic that `counted` removes."""
    buffer = _flat()
    state = buffer.init(TX)
    vault = Vault("lap", state.experience, rel_dir=str(tmp_path), vault_uid="x")
    for i in range(5):
        state = buffer.add(state, _step(i))
    assert vault.write(state) == 5
    for i in range(5, 10):
        state = buffer.add(state, _step(i))
    assert vault.write(state) == 0  # five new steps look like none
    vault.close()


# -- buffers of every kind, wrapping, under jit with donation -----------------------------------


class _Kind(NamedTuple):
    name: str
    buffer: Callable[[], Any]
    item: dict[str, Any]
    batch: Callable[[int, int], tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]]


def _data(start: int, rows: int, steps: int) -> dict[str, np.ndarray[Any, Any]]:
    ids = np.arange(start, start + rows * steps, dtype=np.int32).reshape(steps, rows).T
    return {
        "id": ids,
        "obs": np.stack([ids * 0.5, -ids * 1.0, ids * 0.25], axis=-1).astype(np.float32),
        "done": ids % 3 == 0,
    }


def _flat_batch(start: int, k: int) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    d = _data(start, 1, 1)
    return {key: jnp.asarray(v[0, 0]) for key, v in d.items()}, d


def _item_batch(start: int, k: int) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    d = _data(start, 1, k)
    return {key: jnp.asarray(v[0]) for key, v in d.items()}, d


def _trajectory_batch(start: int, k: int) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    d = _data(start, 2, k)
    return {key: jnp.asarray(v) for key, v in d.items()}, d


ITEM = {"id": jnp.int32(0), "obs": jnp.zeros(3, jnp.float32), "done": jnp.bool_(False)}
KINDS = [
    _Kind("flat", lambda: _flat(max_length=7), ITEM, _flat_batch),
    _Kind(
        "item",
        lambda: fbx.make_item_buffer(
            max_length=7, min_length=1, sample_batch_size=1, add_batches=True
        ),
        ITEM,
        _item_batch,
    ),
    _Kind(
        "trajectory",
        lambda: fbx.make_trajectory_buffer(
            add_batch_size=2,
            sample_batch_size=1,
            sample_sequence_length=1,
            period=1,
            min_length_time_axis=1,
            max_length_time_axis=7,
        ),
        ITEM,
        _trajectory_batch,
    ),
]


@pytest.mark.parametrize("with_counter", [False, True], ids=["plain", "counted"])
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_wrapping_writes_store_every_step_in_order(
    tmp_path: Path, kind: _Kind, with_counter: bool
) -> None:
    buffer = counted(kind.buffer()) if with_counter else kind.buffer()
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(kind.item)
    vault = Vault(kind.name, state.experience, rel_dir=str(tmp_path), vault_uid="x")
    rng = np.random.default_rng(0)
    added: list[dict[str, np.ndarray[Any, Any]]] = []
    next_id, unwritten, written = 0, 0, 0
    # Write before the 7-step ring overwrites unwritten steps; without a counter, also before
    # a whole lap (7 new steps look like none, as in flashbax: "write at least every T - 1").
    limit = 7 if with_counter else 6
    for _ in range(40):
        k = 1 if kind.name == "flat" else int(rng.integers(1, 4))
        if unwritten + k > limit:
            written += vault.write(state)
            unwritten = 0
        batch, data = kind.batch(next_id, k)
        previous = state
        state = add(state, batch)
        assert previous.experience["obs"].is_deleted()  # donated
        added.append(data)
        next_id += data["id"].size
        unwritten += k
        if rng.random() < 0.3:
            written += vault.write(state)
            unwritten = 0
    written += vault.write(state)
    want = {key: np.concatenate([d[key] for d in added], axis=1) for key in ITEM}
    assert written == want["id"].shape[1] == vault.vault_index
    got = vault.read().experience
    assert set(got) == set(ITEM)
    for key in ITEM:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(np.asarray(got[key]), want[key])
    vault.close()


# -- reads --------------------------------------------------------------------------------------


@pytest.fixture
def twenty(tmp_path: Path) -> Any:
    """A vault of 20 steps, obs == step number, half in the arrays and half in the log."""
    state = TrajectoryBufferState(
        experience=FbxTransition(obs=jnp.repeat(jnp.arange(20.0)[None, :, None], 2, axis=2)),
        current_index=jnp.array(0),
        is_full=jnp.array(True),
    )
    vault = Vault("r", state.experience, rel_dir=str(tmp_path), vault_uid="x", chunk_steps=8)
    assert vault.write(state) == 20
    yield vault
    vault.close()


def test_read_timesteps_and_percentiles(twenty: Vault) -> None:
    def steps(**kwargs: Any) -> list[float]:
        obs = np.asarray(twenty.read(**kwargs).experience.obs)
        return obs[0, :, 0].tolist()

    assert steps() == list(range(20))
    assert steps(timesteps=3) == [17, 18, 19]
    assert steps(timesteps=20) == list(range(20))
    assert steps(timesteps=100) == list(range(20))
    assert steps(timesteps=0) == []
    assert steps(percentiles=(25, 75)) == list(range(5, 15))
    assert steps(percentiles=(0, 100)) == list(range(20))
    assert steps(percentiles=(90, 100)) == [18, 19]
    assert steps(percentiles=(50, 50)) == []
    result = twenty.read(timesteps=2)
    assert isinstance(result, TrajectoryBufferState)
    assert isinstance(result.experience, FbxTransition)
    assert result.experience.obs.shape == (1, 2, 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timesteps": -1},
        {"percentiles": (60, 40)},
        {"percentiles": (-5, 10)},
        {"percentiles": (0, 101)},
    ],
)
def test_bad_read_arguments_are_refused(twenty: Vault, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        twenty.read(**kwargs)


# -- opening, reopening, structures -------------------------------------------------------------


def _filled(n: int, ring: int = 10) -> TrajectoryBufferState:
    buffer = _flat(max_length=ring)
    state = buffer.init(TX)
    for i in range(n):
        state = buffer.add(state, _step(i))
    return state


def test_reopen_by_uid_with_and_without_structure(tmp_path: Path) -> None:
    state = _filled(7)
    with Vault("re", state.experience, rel_dir=str(tmp_path), vault_uid="u") as vault:
        assert vault.write(state) == 7
    as_dict = Vault("re", rel_dir=str(tmp_path), vault_uid="u")
    try:
        assert as_dict.vault_index == 7
        experience = as_dict.read().experience
        assert isinstance(experience, dict)
        assert list(experience) == ["obs"]
        assert np.asarray(experience["obs"])[0, :, 0].tolist() == list(range(7))
    finally:
        as_dict.close()
    typed = Vault("re", TX._replace(obs=jnp.zeros((1, 3, 2))), rel_dir=str(tmp_path), vault_uid="u")
    try:
        assert isinstance(typed.read().experience, FbxTransition)
        # A new writer (a fresh buffer) continues after the stored steps.
        assert typed.write(_filled(3)) == 3
        assert _obs_steps(typed) == [*range(7), 0, 1, 2]
    finally:
        typed.close()


@pytest.mark.parametrize(
    ("structure", "message"),
    [
        (FbxTransition(obs=jnp.zeros((1, 5, 2), jnp.int32)), r"dtype int32, the vault has float32"),
        (FbxTransition(obs=jnp.zeros((1, 5, 3))), r"per-step shape \(3,\)"),
        (FbxTransition(obs=jnp.zeros((2, 5, 2))), "batch size B is 2, the vault has 1"),
        ({"obs": jnp.zeros((1, 5, 2)), "r": jnp.zeros((1, 5))}, r"unknown leaves \['r\.'\]"),
        ({"action": jnp.zeros((1, 5, 2))}, r"missing leaves \['obs\.'\]"),
    ],
)
def test_structure_mismatch_on_reopen(tmp_path: Path, structure: Any, message: str) -> None:
    state = _filled(3)
    with Vault("mm", state.experience, rel_dir=str(tmp_path), vault_uid="u") as vault:
        vault.write(state)
    metadata = (tmp_path / "mm" / "u" / "metadata.json").read_bytes()
    with pytest.raises(SchemaMismatchError, match=message):
        Vault("mm", structure, rel_dir=str(tmp_path), vault_uid="u")
    assert (tmp_path / "mm" / "u" / "metadata.json").read_bytes() == metadata
    with Vault("mm", rel_dir=str(tmp_path), vault_uid="u") as vault:
        assert vault.vault_index == 3


def test_opening_a_missing_vault_without_structure(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no experience_structure"):
        Vault("missing", rel_dir=str(tmp_path), vault_uid="u")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "a\x00b", "z" * 300])
def test_invalid_names_create_nothing(tmp_path: Path, name: str) -> None:
    rel_dir = tmp_path / "vaults"
    with pytest.raises(InvalidNameError):
        Vault(name, TX._replace(obs=jnp.zeros((1, 5, 2))), rel_dir=str(rel_dir), vault_uid="u")
    if name:  # as in flashbax, an empty vault_uid means the default (the current time)
        with pytest.raises(InvalidNameError):
            Vault("ok", TX._replace(obs=jnp.zeros((1, 5, 2))), rel_dir=str(rel_dir), vault_uid=name)
    assert list(tmp_path.iterdir()) == []


def test_default_uid_metadata_and_compression(tmp_path: Path) -> None:
    state = _filled(4)
    vault = Vault(
        "meta",
        state.experience,
        rel_dir=str(tmp_path),
        compression="gzip",
        metadata={"env": "cartpole", "seed": 7},
    )
    try:
        uid = Path(vault.path).name
        assert re.fullmatch(r"\d{14}", uid)  # flashbax's YYYYmmddHHMMSS
        assert vault.write(state) == 4
    finally:
        vault.close()
    metadata = json.loads((tmp_path / "meta" / uid / "metadata.json").read_text())
    assert (metadata["env"], metadata["seed"]) == ("cartpole", 7)  # top level, as flashbax
    with Vault("meta", rel_dir=str(tmp_path), vault_uid=uid, compression="none") as again:
        assert _obs_steps(again) == [0, 1, 2, 3]


# -- explicit intervals and destinations --------------------------------------------------------


def test_explicit_source_interval_of_a_full_buffer(tmp_path: Path) -> None:
    state = _filled(5, ring=5)
    with Vault("si", state.experience, rel_dir=str(tmp_path), vault_uid="u") as vault:
        assert vault.write(state, source_interval=(0, 5)) == 5
        assert vault.write(state) == 0  # as flashbax: the state counts as written
        assert _obs_steps(vault) == [0, 1, 2, 3, 4]


def test_explicit_wrapping_source_interval(tmp_path: Path) -> None:
    state = _filled(7, ring=5)  # ring holds [5, 6, 2, 3, 4], next index 2
    with Vault("wrap", state.experience, rel_dir=str(tmp_path), vault_uid="u") as vault:
        assert vault.write(state, source_interval=(3, 2)) == 4  # positions 3, 4, 0, 1
        assert vault.write(state, source_interval=(1, 3)) == 2  # positions 1, 2
        assert vault.write(state, source_interval=(4, 4)) == 0
        assert _obs_steps(vault) == [3, 4, 5, 6, 6, 2]


@pytest.mark.parametrize("interval", [(0, 6), (-1, 2), (6, 1), (0, 1, 2), ("a", 2)])
def test_bad_source_intervals_write_nothing(tmp_path: Path, interval: Any) -> None:
    state = _filled(5, ring=5)
    with Vault("bad", state.experience, rel_dir=str(tmp_path), vault_uid="u") as vault:
        with pytest.raises(InvalidArgumentError):
            vault.write(state, source_interval=interval)
        assert vault.vault_index == 0
        assert vault.write(state) == 5  # the writer did not move


def test_dest_start_overlap_duplicate_and_gap(tmp_path: Path) -> None:
    state = _filled(5, ring=5)
    with Vault("dest", state.experience, rel_dir=str(tmp_path), vault_uid="u") as vault:
        assert vault.write(state) == 5
        # Exactly once: a rewrite of stored steps stores nothing new ...
        assert vault.write(state, source_interval=(0, 5), dest_start=0) == 0
        # ... an overlap stores only the tail ...
        assert vault.write(state, source_interval=(0, 5), dest_start=2) == 2
        assert vault.vault_index == 7
        assert _obs_steps(vault) == [0, 1, 2, 3, 4, 3, 4]
        # ... and a gap is refused, naming where to continue.
        with pytest.raises(OffsetGapError) as info:
            vault.write(state, source_interval=(0, 5), dest_start=9)
        assert info.value.expected_offset == 7
        with pytest.raises(InvalidArgumentError, match="dest_start"):
            vault.write(state, source_interval=(0, 5), dest_start=-1)
        assert vault.vault_index == 7
        assert vault.write(state, source_interval=(0, 1), dest_start=7) == 1
        assert _obs_steps(vault) == [0, 1, 2, 3, 4, 3, 4, 0]


def test_a_state_of_another_structure_writes_nothing(tmp_path: Path) -> None:
    state = _filled(3)
    with Vault("x", state.experience, rel_dir=str(tmp_path), vault_uid="u") as vault:
        other = fbx.make_flat_buffer(max_length=10, min_length=1, sample_batch_size=1)
        wrong = other.add(other.init({"obs": jnp.zeros(2, jnp.int32)}), {"obs": jnp.ones(2, int)})
        with pytest.raises(SchemaMismatchError, match="dtype int32, the vault has float32"):
            vault.write(wrong)
        with pytest.raises(InvalidArgumentError, match="buffer state"):
            vault.write(state.experience)
        assert vault.vault_index == 0
        assert vault.write(state) == 3


def test_a_vault_opened_before_another_wrote_does_not_overwrite(tmp_path: Path) -> None:
    """Two Vault objects on one uid, used one after the other, must not lose steps.

    The second object loaded the committed length (0) when opened; it must not write there.
    """
    state = _filled(6)
    first = Vault("two", state.experience, rel_dir=str(tmp_path), vault_uid="u")
    second = Vault("two", rel_dir=str(tmp_path), vault_uid="u")
    assert first.write(state) == 6
    first.close()
    second.write(_filled(2))
    second.close()
    with Vault("two", rel_dir=str(tmp_path), vault_uid="u") as check:
        assert check.vault_index == 8
        assert np.asarray(check.read().experience["obs"])[0, :, 0].tolist() == [*range(6), 0, 1]


def test_data_loss_names_stream_offsets_after_reopening(tmp_path: Path) -> None:
    buffer = counted(_flat())
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(TX)
    for i in range(3):
        state = add(state, _step(i))
    with Vault("reopen", state.experience, rel_dir=str(tmp_path), vault_uid="x") as vault:
        assert vault.write(state) == 3
    state = buffer.init(TX)  # a new actor appends to the same stream
    for i in range(7):
        state = add(state, _step(i))
    with Vault("reopen", state.experience, rel_dir=str(tmp_path), vault_uid="x") as vault:
        with pytest.raises(DataLossError, match=r"\[3, 5\)"):
            vault.write(state)
        assert vault.write(state) == 5
        assert vault.vault_index == 8


@pytest.mark.parametrize("interval", [None, (1.5, 2), (True, 2), (1,), "ab"])
def test_malformed_source_intervals_are_refused(tmp_path: Path, interval: object) -> None:
    state = _filled(3)
    with Vault("bad", state.experience, rel_dir=str(tmp_path), vault_uid="x") as vault:
        with pytest.raises(InvalidArgumentError, match="source_interval"):
            vault.write(state, source_interval=interval)  # type: ignore[arg-type]
        assert vault.vault_index == 0


def test_a_root_path_with_url_characters_works(tmp_path: Path) -> None:
    state = _filled(3)
    root = tmp_path / "my vaults #1?"
    with Vault("v", state.experience, rel_dir=str(root), vault_uid="u") as vault:
        assert vault.write(state) == 3
    with Vault("v", rel_dir=str(root), vault_uid="u") as vault:
        assert vault.vault_index == 3
