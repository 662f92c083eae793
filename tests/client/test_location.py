"""Storage locations other than a local directory, and leases between servers sharing one store.

Two `Store`s with their own tensorstore contexts over one key-value store behave like two server
processes: they share nothing but the store. tensorstore's `file` kvstore driver stands in for an
object store here (it has the same conditional writes); tests/s3 run the same against SeaweedFS.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorstore as ts

import expvault
from expvault.errors import InvalidArgumentError, StreamBusyError
from expvault.schema import Schema
from expvault.storage import Store
from expvault.storage.lease import Lease, segment_valid
from expvault.storage.location import FileLocation, KvLocation, SegmentName, open_location

B = 4
SCHEMA = Schema.from_experience({"obs": np.zeros((B, 1, 3), np.float32)})
LEASE_S = 1.0


def steps(start: int, stop: int) -> list[np.ndarray[Any, Any]]:
    """Steps `[start, stop)`: each value is its step number."""
    t = np.arange(start, stop, dtype=np.float32)
    return [np.broadcast_to(t[None, :, None], (B, stop - start, 3)).copy()]


def values(arrays: list[np.ndarray[Any, Any]]) -> list[int]:
    return [int(v) for v in arrays[0][0, :, 0]]


def _pause_renewals(store: Store, vault: str, uid: str) -> None:
    """Makes `store`'s lease of a stream lapse as if its process had frozen or died."""
    lease = store.open_stream(vault, uid)._writing
    assert isinstance(lease, Lease)
    lease._stop.set()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Makes Stores over one shared key-value store, each as if in its own server process."""
    made: list[Store] = []

    def make() -> Store:
        location = KvLocation(
            {"driver": "file", "path": f"{tmp_path}/store/"}, "kv-file://store", ts.Context()
        )
        store = Store(location, lease_s=LEASE_S, poll_interval_s=0.05)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_locations_are_parsed_from_paths_urls_and_specs(tmp_path: Path) -> None:
    context = ts.Context()
    assert isinstance(open_location(str(tmp_path / "a"), context), FileLocation)
    assert isinstance(open_location(f"file://{tmp_path}/b", context), FileLocation)
    assert (tmp_path / "b").is_dir()
    memory = open_location("memory://", context)
    assert isinstance(memory, KvLocation)
    assert not memory.shared
    spec = open_location(json.dumps({"driver": "memory", "path": "x"}), context)
    assert isinstance(spec, KvLocation)
    assert spec.kvstore("v/u")["path"] == "x/v/u/"
    gcs = open_location("gs://bucket/vaults", context)  # opening makes no request yet
    assert isinstance(gcs, KvLocation)
    assert gcs.kvstore("v/u") == {"driver": "gcs", "bucket": "bucket", "path": "vaults/v/u/"}
    s3 = open_location("s3://bucket/vaults", context, s3_endpoint="http://127.0.0.1:1")
    assert isinstance(s3, KvLocation)
    assert s3.kvstore("v")["endpoint"] == "http://127.0.0.1:1"
    assert s3.kvstore("v")["aws_region"] == "us-east-1"
    with pytest.raises(InvalidArgumentError, match="s3://BUCKET/PREFIX"):
        open_location("ftp://host/dir", context)
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        open_location("{not json", context)


def test_a_memory_store_keeps_vaults_like_a_directory() -> None:
    store = Store("memory://")
    try:
        store.create_vault("v", SCHEMA, chunk_steps=16)
        stream = store.open_stream("v", "u", create=True)
        assert stream.append(0, steps(0, 40)) == 40
        stream.flush()
        assert stream.materialized == 40
        assert values(stream.read(0, 40)) == list(range(40))
        assert store.list_vaults() == ["v"]
        assert store.list_streams("v") == ["u"]
        info = store.get_vault("v")
        assert [(s.vault_uid, s.length) for s in info.streams] == [("u", 40)]
        store.delete_vault("v")
        assert store.list_vaults() == []
    finally:
        store.close()


def test_the_in_process_vault_takes_a_url() -> None:
    structure = {"obs": np.zeros((B, 1, 3), np.float32)}
    vault = expvault.Vault("v", structure, rel_dir="memory://", vault_uid="u")
    assert vault.path == "memory://v/u"
    assert vault.vault_index == 0


def test_a_second_server_cannot_write_a_stream_whose_lease_is_renewed(
    shared: Callable[[], Store],
) -> None:
    first, second = shared(), shared()
    first.create_vault("v", SCHEMA, chunk_steps=16)
    assert first.open_stream("v", "u", create=True).append(0, steps(0, 10)) == 10
    began = time.monotonic()
    with pytest.raises(StreamBusyError, match=first.owner):
        second.open_stream("v", "u").append(10, steps(10, 12))
    assert time.monotonic() - began < LEASE_S * 2  # it saw a renewal, and said so
    assert first.open_stream("v", "u").append(10, steps(10, 20)) == 20


def test_a_dead_servers_stream_is_taken_over_after_its_lease_and_resumed(
    shared: Callable[[], Store],
) -> None:
    first, second = shared(), shared()
    first.create_vault("v", SCHEMA, chunk_steps=16)
    stream = first.open_stream("v", "u", create=True)
    assert stream.append(0, steps(0, 20)) == 20  # a chunk in the arrays, the rest in the log
    _pause_renewals(first, "v", "u")
    began = time.monotonic()
    taken = second.open_stream("v", "u")
    taken.begin_writing()
    assert time.monotonic() - began >= LEASE_S * 0.9  # waited for the lease to expire
    assert taken.length == 20
    assert taken.append(20, steps(20, 40)) == 40
    assert values(taken.read(0, 40)) == list(range(40))


def test_a_writer_that_lost_its_lease_is_fenced_off(shared: Callable[[], Store]) -> None:
    first, second = shared(), shared()
    first.create_vault("v", SCHEMA, chunk_steps=16)
    stale = first.open_stream("v", "u", create=True)
    assert stale.append(0, steps(0, 10)) == 10
    _pause_renewals(first, "v", "u")
    taken = second.open_stream("v", "u")
    taken.begin_writing()
    assert taken.append(10, steps(10, 12)) == 12

    # Its next append reaches the store but is never acknowledged, and nobody sees it.
    with pytest.raises(StreamBusyError, match="lease"):
        stale.submit(10, [-np.ones((B, 6, 3), np.float32)]).result()
    epochs = {n.epoch for n in first.location.segments("v/u")}
    assert epochs == {1, 2}  # the stale segment is there, fenced by epoch 2's base
    # Nor can it move steps into the arrays: the fence in the OCDBT database changed.
    assert stale._materialize(10) is not None
    assert taken.append(12, steps(12, 33)) == 33
    taken.flush()
    reader = shared().open_stream("v", "u")
    assert reader.length == 33
    assert values(reader.read(0, 33)) == list(range(33))
    assert int(taken._index.read().result()[0]) == 33


def test_a_closed_writer_hands_its_lease_back_at_once(shared: Callable[[], Store]) -> None:
    first, second = shared(), shared()
    first.create_vault("v", SCHEMA, chunk_steps=16)
    assert first.open_stream("v", "u", create=True).append(0, steps(0, 5)) == 5
    first.close()
    began = time.monotonic()
    assert second.open_stream("v", "u").append(5, steps(5, 9)) == 9
    assert time.monotonic() - began < LEASE_S / 2


def test_readers_on_another_server_see_new_commits(shared: Callable[[], Store]) -> None:
    writer, reader = shared(), shared()
    writer.create_vault("v", SCHEMA, chunk_steps=16)
    stream = writer.open_stream("v", "u", create=True)
    stream.append(0, steps(0, 5))
    seen = reader.open_stream("v", "u")
    assert seen.length == 5
    lengths: list[int] = []
    arrived = threading.Event()

    def on_commit(length: int) -> None:
        lengths.append(length)
        if length >= 40:
            arrived.set()

    unsubscribe = seen.on_commit(on_commit)
    stream.append(5, steps(5, 40))  # across a chunk: arrays and log both move
    assert arrived.wait(10), lengths
    unsubscribe()
    assert values(seen.read(0, 40)) == list(range(40))
    time.sleep(0.1)
    stream.append(40, steps(40, 41))
    time.sleep(0.1)
    assert reader.open_stream("v", "u").length == 41  # open_stream refreshes a stale view


def test_segments_past_a_later_epochs_base_are_not_valid() -> None:
    fences = ((2, 100), (3, 150))
    assert segment_valid(1, 100, fences)
    assert not segment_valid(1, 101, fences)
    assert segment_valid(2, 150, fences)
    assert not segment_valid(2, 151, fences)
    assert segment_valid(3, 10**6, fences)
    assert SegmentName.parse(SegmentName(5, 9, 3).name) == SegmentName(5, 9, 3)
    assert SegmentName.parse(SegmentName(5, 9, 0).name) == SegmentName(5, 9, 0)
    assert SegmentName(5, 9, 0).name == f"{5:020d}-{9:020d}.seg"  # a local directory's names


def test_a_writer_gives_its_stream_up_and_takes_it_back(shared: Callable[[], Store]) -> None:
    first, second = shared(), shared()
    first.create_vault("v", SCHEMA, chunk_steps=16)
    stream = first.open_stream("v", "u", create=True)
    assert stream.append(0, steps(0, 5)) == 5
    stream.end_writing()  # what a server does once no writer was attached for a while
    began = time.monotonic()
    assert second.open_stream("v", "u").append(5, steps(5, 9)) == 9
    assert time.monotonic() - began < LEASE_S / 2  # handed back: no waiting for expiry
    second.open_stream("v", "u").end_writing()
    assert stream.append(9, steps(9, 12)) == 12  # takes it back, after what the other wrote
    assert values(stream.read(0, 12)) == list(range(12))
