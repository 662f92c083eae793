"""The object store facts expvault relies on, on a real S3 gateway (SeaweedFS), then expvault on it.

Leases and fences are compare-and-swap on objects: a conditional write on a generation must be
atomic (of concurrent writers exactly one wins), create-only (`if_equal=NO_VALUE`) likewise, and a
write must be visible to the next read and list from any client. OCDBT commits must not lose one
another's updates, and an OCDBT transaction carrying a conditional write of the fence key must
commit all or nothing. A store that breaks one of these fails here, by name, rather than losing
data in the scale-out tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorstore as ts
from flashbax.vault import Vault as FlashbaxVault

from conftest import concat_time, full_buffer
from expvault import Vault
from expvault_server._seaweed import SeaweedFS

pytestmark = pytest.mark.s3
pytest_plugins = ["s3_support"]  # the seaweed and bucket fixtures

NO_VALUE = b"\x02"  # tensorstore's generation of a missing key: if_equal=NO_VALUE creates only
WRITERS = 6


def _kv(seaweed: SeaweedFS, bucket: str, path: str = "k/") -> Any:
    """A kvstore on the bucket in its own context (no shared cache: another client)."""
    return ts.KvStore.open(seaweed.kvstore_spec(bucket, path), context=ts.Context()).result()


def _ocdbt(seaweed: SeaweedFS, bucket: str, context: Any = None) -> Any:
    """The OCDBT database `db/` on the bucket, in `context` (default: a new one, another server)."""
    spec = {"driver": "ocdbt", "base": seaweed.kvstore_spec(bucket, "db/")}
    return ts.KvStore.open(spec, context=context or ts.Context()).result()


# -- compare-and-swap ---------------------------------------------------------------------------


def test_create_only_writes_have_exactly_one_winner(seaweed: SeaweedFS, bucket: str) -> None:
    clients = [_kv(seaweed, bucket) for _ in range(WRITERS)]
    for key in ("a", "b"):
        pending = [
            c.write(key, f"writer-{i}".encode(), if_equal=NO_VALUE) for i, c in enumerate(clients)
        ]
        stamps = [p.result() for p in pending]
        winners = [i for i, s in enumerate(stamps) if s.generation]
        assert len(winners) == 1, f"{key}: create-only writes that succeeded: {winners}"
        got = clients[0].read(key).result()
        assert got.value == f"writer-{winners[0]}".encode()
        assert got.stamp.generation == stamps[winners[0]].generation
        # Once it exists, create-only fails.
        assert not clients[1].write(key, b"late", if_equal=NO_VALUE).result().generation
        assert clients[2].read(key).result().value == got.value


def test_conditional_overwrites_have_exactly_one_winner(seaweed: SeaweedFS, bucket: str) -> None:
    clients = [_kv(seaweed, bucket) for _ in range(WRITERS)]
    generation = clients[0].write("lease", b"0").result().generation
    for round_ in range(1, 3):
        pending = [
            c.write("lease", f"{round_}-{i}".encode(), if_equal=generation)
            for i, c in enumerate(clients)
        ]
        stamps = [p.result() for p in pending]
        winners = [i for i, s in enumerate(stamps) if s.generation]
        assert len(winners) == 1, f"round {round_}: conditional writes that succeeded: {winners}"
        got = clients[-1].read("lease").result()
        assert got.value == f"{round_}-{winners[0]}".encode()
        assert got.stamp.generation == stamps[winners[0]].generation != generation
        # A write on the old generation (a stale holder) fails and changes nothing.
        assert not clients[0].write("lease", b"stale", if_equal=generation).result().generation
        assert clients[1].read("lease").result().value == got.value
        generation = got.stamp.generation


def test_writes_are_visible_to_the_next_read_and_list(seaweed: SeaweedFS, bucket: str) -> None:
    writer, reader = _kv(seaweed, bucket), _kv(seaweed, bucket)
    keys = [f"s/{i:03d}.seg" for i in range(40)]
    for i, key in enumerate(keys):
        writer.write(key, f"v{i}".encode()).result()
        # Read-after-write from another client, right after the write returned.
        assert reader.read(key).result().value == f"v{i}".encode()
        if i % 10 == 9:
            assert sorted(reader.list().result()) == [k.encode() for k in keys[: i + 1]]
    writer.write(keys[0], b"new").result()
    assert reader.read(keys[0]).result().value == b"new"
    writer.write(keys[1], None).result()  # delete
    assert reader.read(keys[1]).result().state == "missing"
    writer.delete_range(ts.KvStore.KeyRange("s/010", "s/020")).result()
    want = [k.encode() for k in keys if k != keys[1] and not "s/010" <= k < "s/020"]
    assert sorted(reader.list().result()) == want


# -- OCDBT on S3 ----------------------------------------------------------------------------------


def test_concurrent_ocdbt_commits_lose_nothing(seaweed: SeaweedFS, bucket: str) -> None:
    databases = [_ocdbt(seaweed, bucket) for _ in range(4)]
    for round_ in range(3):
        pending = [
            db.write(f"r{round_}/w{i}", f"{round_}.{i}".encode()) for i, db in enumerate(databases)
        ]
        for p in pending:
            p.result()
    fresh = _ocdbt(seaweed, bucket)
    got = {k.decode(): fresh.read(k).result().value for k in fresh.list().result()}
    assert got == {f"r{r}/w{i}": f"{r}.{i}".encode() for r in range(3) for i in range(4)}


def _zarr(seaweed: SeaweedFS, bucket: str, context: Any) -> Any:
    """The int32 array `arr/` (64 elements, chunks of 16) in the OCDBT database `db/`."""
    kvstore = {"driver": "ocdbt", "base": seaweed.kvstore_spec(bucket, "db/"), "path": "arr/"}
    return ts.open(
        {"driver": "zarr", "kvstore": kvstore},
        dtype=ts.int32,
        shape=[64],
        chunk_layout=ts.ChunkLayout(chunk_shape=[16]),
        create=True,
        open=True,
        context=context,
    ).result()


def _commit(db: Any, array: Any, where: slice, value: int, fence: bytes, epoch: bytes) -> None:
    """One atomic transaction: `array[where] = value` and the fence written on its generation."""
    txn = ts.Transaction(atomic=True)
    array.with_transaction(txn)[where].write(np.int32(value)).result()
    db.with_transaction(txn).write("fence", epoch, if_equal=fence).result()
    txn.commit_async().result()


def test_a_fenced_ocdbt_transaction_commits_all_or_nothing(seaweed: SeaweedFS, bucket: str) -> None:
    """A stale writer's transaction (arrays + the fence on its old generation) leaves nothing.

    The arrays and the fence key must live in one context (one OCDBT instance): opened in two
    contexts, the same transaction commits the arrays even though the fence write fails
    (measured on tensorstore 0.1.86), which is why expvault opens both in its store's context.
    """
    old_context, new_context = ts.Context(), ts.Context()
    old, new = _ocdbt(seaweed, bucket, old_context), _ocdbt(seaweed, bucket, new_context)
    old_fence = old.write("fence", b"1", if_equal=NO_VALUE).result().generation
    assert old_fence
    old_array = _zarr(seaweed, bucket, old_context)
    _commit(old, old_array, slice(0, 16), 1, old_fence, b"1")  # the holder commits

    found = new.read("fence").result()
    assert found.value == b"1"
    new_fence = new.write("fence", b"2", if_equal=found.stamp.generation).result().generation
    assert new_fence  # the new writer fenced the old one
    with pytest.raises(ValueError, match="Generation mismatch"):
        _commit(old, old_array, slice(16, 32), 2, old_fence, b"1")
    _commit(new, _zarr(seaweed, bucket, new_context), slice(16, 32), 3, new_fence, b"2")
    with pytest.raises(ValueError, match="Generation mismatch"):
        _commit(old, old_array, slice(32, 48), 4, old_fence, b"1")

    fresh = ts.Context()
    assert _ocdbt(seaweed, bucket, fresh).read("fence").result().value == b"2"
    stored = _zarr(seaweed, bucket, fresh).read().result()
    want = np.repeat(np.array([1, 3, 0, 0], np.int32), 16)  # nothing of the stale writer's
    np.testing.assert_array_equal(stored, want)


# -- expvault on S3 -------------------------------------------------------------------------------

B, T = 2, 12


def _experience(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.standard_normal((B, T, 5)).astype(np.float32),
        "action": rng.integers(-(2**31), 2**31 - 1, (B, T), dtype=np.int32),
        "done": rng.random((B, T)) < 0.2,
    }


def _assert_bytes_equal(got: Any, want: Any) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        g, w = np.asarray(got[key]), np.ascontiguousarray(want[key])
        assert (g.dtype, g.shape) == (w.dtype, w.shape), key
        assert g.tobytes() == w.tobytes(), key


def _download(seaweed: SeaweedFS, bucket: str, prefix: str, directory: Path) -> int:
    """Copies every object under `prefix` to a file of the same relative path; returns the count."""
    kv = _kv(seaweed, bucket, prefix)
    keys = kv.list().result()
    for key in keys:
        path = directory / key.decode()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(kv.read(key).result().value)
    return len(keys)


def _upload(seaweed: SeaweedFS, bucket: str, prefix: str, directory: Path) -> None:
    kv = _kv(seaweed, bucket, prefix)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        kv.write(path.relative_to(directory).as_posix(), path.read_bytes()).result()


def test_vault_on_s3_round_trips_in_flashbax_format(
    seaweed: SeaweedFS, bucket: str, tmp_path: Path
) -> None:
    parts = [_experience(seed) for seed in range(4)]
    url = f"s3://{bucket}/vaults"
    with Vault("v", parts[0], rel_dir=url, vault_uid="u", chunk_steps=8) as vault:
        for part in parts[:3]:
            assert vault.write(full_buffer(part), source_interval=(0, T)) == T
    want = concat_time(*parts[:3])
    with Vault("v", rel_dir=url, vault_uid="u") as again:  # another process would see the same
        assert again.vault_index == 3 * T
        _assert_bytes_equal(again.read().experience, want)
        assert again.write(full_buffer(parts[3]), source_interval=(0, T)) == T
    want = concat_time(want, parts[3])

    # The objects are a flashbax vault: copied to a directory, flashbax reads them.
    assert _download(seaweed, bucket, "vaults/", tmp_path / "copy") > 0
    theirs = FlashbaxVault("v", rel_dir=str(tmp_path / "copy"), vault_uid="u")
    assert theirs.vault_index == 4 * T
    _assert_bytes_equal(theirs.read().experience, want)
    metadata = json.loads((tmp_path / "copy" / "v" / "u" / "metadata.json").read_text())
    assert int(float(metadata["version"])) == 1


def test_vault_on_s3_reads_a_vault_flashbax_wrote(
    seaweed: SeaweedFS, bucket: str, tmp_path: Path
) -> None:
    parts = [_experience(seed) for seed in (7, 8)]
    theirs = FlashbaxVault("fbx", parts[0], rel_dir=str(tmp_path / "fbx"), vault_uid="u")
    for part in parts:
        assert theirs.write(full_buffer(part), source_interval=(0, T)) == T
    del theirs
    _upload(seaweed, bucket, "published/", tmp_path / "fbx")  # a dataset put on object storage
    with Vault("fbx", rel_dir=f"s3://{bucket}/published", vault_uid="u") as ours:
        assert ours.vault_index == 2 * T
        _assert_bytes_equal(ours.read().experience, concat_time(*parts))
