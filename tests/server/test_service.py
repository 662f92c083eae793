"""The servicer over the wire with raw stubs: semantics, bad input, flow control, shutdown."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from conftest import BATCH, ServerThread, assert_experience, experience, structure
from expvault import codec
from expvault.schema import Schema
from expvault.storage import Store
from expvault.v1 import vault_pb2, vault_pb2_grpc

STRUCTURE = codec.schema_to_proto(Schema.from_experience(structure()))  # NamedTuple order
WIRE = ["action.", "obs.", "reward."]  # the server's order (its stored structure)


@pytest.fixture
def stub(server: ServerThread) -> Iterator[vault_pb2_grpc.VaultServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield vault_pb2_grpc.VaultServiceStub(channel)


def _create(stub: vault_pb2_grpc.VaultServiceStub, name: str = "v", **kw: Any) -> Any:
    return stub.CreateVault(
        vault_pb2.CreateVaultRequest(vault_name=name, structure=STRUCTURE, **kw), timeout=10
    )


def _chunk(start: int, stop: int, order: Sequence[str] | None = None) -> vault_pb2.AppendRequest:
    exp = experience(start, stop)._asdict()
    names = order or WIRE
    arrays = [exp[name.rstrip(".")] for name in names]
    return vault_pb2.AppendRequest(
        chunk=vault_pb2.AppendChunk(
            start=start, num_steps=stop - start, leaves=codec.encode_arrays(arrays)
        )
    )


def _open(uid: str = "a", vault: str = "v", create: bool = True) -> vault_pb2.AppendRequest:
    return vault_pb2.AppendRequest(
        open=vault_pb2.AppendOpen(vault_name=vault, vault_uid=uid, create=create)
    )


def _append(
    stub: vault_pb2_grpc.VaultServiceStub, requests: Sequence[vault_pb2.AppendRequest]
) -> tuple[list[vault_pb2.AppendResponse], grpc.RpcError | None]:
    responses: list[vault_pb2.AppendResponse] = []
    try:
        for response in stub.Append(iter(requests), timeout=30):
            responses.append(response)
    except grpc.RpcError as e:
        return responses, e
    return responses, None


def _error_info(error: Any) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "expvault"
    return info


def _length(stub: vault_pb2_grpc.VaultServiceStub, uid: str = "a", vault: str = "v") -> int:
    info = stub.GetVault(vault_pb2.GetVaultRequest(vault_name=vault), timeout=10).vault
    return next((s.length for s in info.streams if s.vault_uid == uid), -1)


def _read(stub: vault_pb2_grpc.VaultServiceStub, **fields: Any) -> list[vault_pb2.ReadResponse]:
    return list(stub.Read(vault_pb2.ReadRequest(vault_name="v", **fields), timeout=30))


def _decode(messages: Sequence[vault_pb2.ReadResponse]) -> dict[str, np.ndarray]:
    schema = codec.schema_from_proto(messages[0].structure)
    parts: list[list[np.ndarray]] = []
    for m in messages[1:]:
        parts.append(codec.decode_arrays(schema.leaves, BATCH, m.num_steps, list(m.leaves)))
    return {
        leaf.name.rstrip("."): np.concatenate([p[i] for p in parts], axis=1)
        for i, leaf in enumerate(schema.leaves)
    }


# -- vaults --------------------------------------------------------------------------------------


def test_create_get_list_delete(stub: vault_pb2_grpc.VaultServiceStub) -> None:
    created = _create(
        stub, metadata_json=json.dumps({"env": "cartpole"}), compression_json='"zstd"'
    )
    assert created.created
    assert [leaf.name for leaf in created.vault.structure.leaves] == ["action.", "obs.", "reward."]
    assert json.loads(created.vault.metadata_json) == {"env": "cartpole"}
    assert json.loads(created.vault.compression_json)["cname"] == "zstd"
    assert not _create(stub).created  # idempotent for the same structure
    _create(stub, "w")
    names = stub.ListVaults(vault_pb2.ListVaultsRequest(), timeout=10).vault_names
    assert list(names) == ["v", "w"]
    _responses, error = _append(stub, [_open(), _chunk(0, 5)])
    assert error is None
    info = stub.GetVault(vault_pb2.GetVaultRequest(vault_name="v"), timeout=10).vault
    assert [(s.vault_uid, s.length) for s in info.streams] == [("a", 5)]
    assert info.streams[0].bytes_on_disk > 0
    assert info.structure.batch_size == BATCH
    stub.DeleteVault(vault_pb2.DeleteVaultRequest(vault_name="v"), timeout=10)
    assert list(stub.ListVaults(vault_pb2.ListVaultsRequest(), timeout=10).vault_names) == ["w"]


def test_append_acks_each_chunk_in_order_exactly_once(
    stub: vault_pb2_grpc.VaultServiceStub,
) -> None:
    _create(stub)
    responses, error = _append(
        stub, [_open(), _chunk(0, 3), _chunk(3, 8), _chunk(0, 3), _chunk(6, 10), _chunk(10, 11)]
    )
    assert error is None
    assert responses[0].committed_offset == 0
    assert [leaf.name for leaf in responses[0].structure.leaves] == ["action.", "obs.", "reward."]
    assert [r.chunk_stop for r in responses[1:]] == [3, 8, 3, 10, 11]
    committed = [r.committed_offset for r in responses[1:]]
    # Group commits may acknowledge more than the chunk; never less, never backwards.
    assert committed == sorted(committed)
    assert committed[-1] == 11
    assert all(c >= max(r.chunk_stop, 3) for c, r in zip(committed, responses[1:], strict=True))
    # A new call resumes from the committed offset.
    responses, error = _append(stub, [_open(), _chunk(11, 12)])
    assert error is None
    assert responses[0].committed_offset == 11
    assert_experience(_decode(_read(stub, vault_uid="a")), 0, 12)


def test_reads_select_ranges_last_steps_percentiles_and_leaves(
    stub: vault_pb2_grpc.VaultServiceStub,
) -> None:
    _create(stub)
    _append(stub, [_open("a"), _chunk(0, 20)])
    _append(stub, [_open("b"), _chunk(0, 4)])
    messages = _read(stub, vault_uid="a", range=vault_pb2.StepRange(start=5, stop=9))
    assert messages[0].HasField("structure")
    assert not messages[0].vault_uid
    assert [(m.start, m.num_steps, m.committed_offset) for m in messages[1:]] == [(5, 4, 20)]
    assert_experience(_decode(messages), 5, 9)
    assert_experience(_decode(_read(stub, vault_uid="a", last_steps=3)), 17, 20)
    assert_experience(
        _decode(_read(stub, vault_uid="a", percentiles=vault_pb2.Percentiles(low=50, high=100))),
        10,
        20,
    )
    only_obs = _read(stub, vault_uid="a", leaves=["obs."], last_steps=2)
    assert len(only_obs[1].leaves) == 1
    assert len(only_obs[1].leaves[0]) == BATCH * 2 * 3 * 4
    # Every stream, one after another; an empty range still names its stream.
    every = _read(stub, range=vault_pb2.StepRange(start=4))
    assert [(m.vault_uid, m.start, m.num_steps) for m in every[1:]] == [("a", 4, 16), ("b", 4, 0)]


def test_read_splits_into_messages_of_the_configured_size(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server(message_bytes=1000)
    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        _create(stub)
        _append(stub, [_open(), _chunk(0, 100)])
        messages = _read(stub, vault_uid="a")
    step_bytes = BATCH * (4 + 12 + 4)
    assert all(m.num_steps == 1000 // step_bytes for m in messages[1:-1])
    assert sum(m.num_steps for m in messages[1:]) == 100
    assert_experience(_decode(messages), 0, 100)


# -- bad input: the right status, a message that says what to fix, nothing written ---------------


def _bad_structure(**changes: Any) -> vault_pb2.Structure:
    bad = vault_pb2.Structure()
    bad.CopyFrom(STRUCTURE)
    for key, value in changes.items():
        if key == "dtype":
            bad.leaves[0].dtype = value
        else:
            setattr(bad, key, value)
    return bad


CREATE_CASES = {
    "bad name": (
        {"vault_name": "../x", "structure": STRUCTURE},
        "INVALID_ARGUMENT", "INVALID_NAME", "without '/' or '..'",
    ),
    "slash in name": (
        {"vault_name": "a/b", "structure": STRUCTURE},
        "INVALID_ARGUMENT", "INVALID_NAME", "'a/b' is not valid",
    ),
    "no structure": (
        {"vault_name": "x"}, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "needs `structure`",
    ),
    "bad dtype": (
        {"vault_name": "x", "structure": _bad_structure(dtype="float99")},
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", "unknown dtype 'float99'",
    ),
    "no batch": (
        {"vault_name": "x", "structure": _bad_structure(batch_size=0)},
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", "batch_size >= 1",
    ),
    "metadata not json": (
        {"vault_name": "x", "structure": STRUCTURE, "metadata_json": "{oops"},
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", "metadata_json is not valid JSON",
    ),
    "metadata not an object": (
        {"vault_name": "x", "structure": STRUCTURE, "metadata_json": "[1]"},
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", "must be a JSON object",
    ),
    "unknown compression": (
        {"vault_name": "x", "structure": STRUCTURE, "compression_json": '"snappy9"'},
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", "unknown compression 'snappy9'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CREATE_CASES)
def test_bad_create_vault(stub: vault_pb2_grpc.VaultServiceStub, case: str) -> None:
    fields, code, reason, message = CREATE_CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateVault(vault_pb2.CreateVaultRequest(**fields), timeout=10)
    assert info.value.code().name == code
    assert _error_info(info.value).reason == reason
    assert message in info.value.details()
    assert list(stub.ListVaults(vault_pb2.ListVaultsRequest(), timeout=10).vault_names) == []


def test_create_with_another_structure_is_already_exists(
    stub: vault_pb2_grpc.VaultServiceStub,
) -> None:
    _create(stub)
    other = _bad_structure(batch_size=3)
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateVault(vault_pb2.CreateVaultRequest(vault_name="v", structure=other), timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "batch size B is 3, the vault has 2" in info.value.details()


def test_unknown_vaults_are_not_found(stub: vault_pb2_grpc.VaultServiceStub) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: stub.GetVault(vault_pb2.GetVaultRequest(vault_name="nope"), timeout=10),
        lambda: stub.DeleteVault(vault_pb2.DeleteVaultRequest(vault_name="nope"), timeout=10),
        lambda: list(stub.Read(vault_pb2.ReadRequest(vault_name="nope"), timeout=10)),
        lambda: list(
            stub.Sample(
                vault_pb2.SampleRequest(vault_name="nope", batch_size=1, sequence_length=1),
                timeout=10,
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert _error_info(info.value).reason == "NOT_FOUND"
        assert "'nope' not found" in info.value.details()


def _wrong_bytes() -> vault_pb2.AppendRequest:
    request = _chunk(0, 2)
    request.chunk.leaves[1] = request.chunk.leaves[1][:-4]
    return request


def _wrong_leaf_count() -> vault_pb2.AppendRequest:
    request = _chunk(0, 2)
    del request.chunk.leaves[2]
    return request


APPEND_CASES = {
    "no open": ([_chunk(0, 1)], "INVALID_ARGUMENT", "INVALID_ARGUMENT", "must be `open`"),
    "empty call": ([], "INVALID_ARGUMENT", "INVALID_ARGUMENT", "must be `open`"),
    "unknown vault": (
        [_open(vault="nope")], "NOT_FOUND", "NOT_FOUND", "vault 'nope' not found",
    ),
    "unknown stream": (
        [_open(uid="nope", create=False)], "NOT_FOUND", "NOT_FOUND", "stream v/nope not found",
    ),
    "bad uid": ([_open(uid="../a")], "INVALID_ARGUMENT", "INVALID_NAME", "vault_uid '../a'"),
    "open twice": (
        [_open(), _open()], "INVALID_ARGUMENT", "INVALID_ARGUMENT", "only `chunk` messages",
    ),
    "wrong byte length": (
        [_open(), _chunk(0, 3), _wrong_bytes()], "INVALID_ARGUMENT", "SCHEMA_MISMATCH",
        "leaf 'obs.' carries 44 bytes, expected 48",
    ),
    "wrong leaf count": (
        [_open(), _wrong_leaf_count()], "INVALID_ARGUMENT", "SCHEMA_MISMATCH",
        "carries 2 leaves, expected 3",
    ),
    "gap": (
        [_open(), _chunk(0, 3), _chunk(5, 6)], "FAILED_PRECONDITION", "OFFSET_GAP",
        "resend from 3",
    ),
    "negative start": (
        [_open(), _chunk(0, 3), _chunk(-1, 1)], "INVALID_ARGUMENT", "INVALID_ARGUMENT",
        "start >= 0",
    ),
    "no steps": (
        [_open(), _chunk(0, 3), _chunk(3, 3)], "INVALID_ARGUMENT", "INVALID_ARGUMENT",
        "num_steps >= 1",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", APPEND_CASES)
def test_bad_append(stub: vault_pb2_grpc.VaultServiceStub, case: str) -> None:
    _create(stub)
    requests, code, reason, message = APPEND_CASES[case]
    responses, error = _append(stub, requests)
    assert error is not None
    assert error.code().name == code, error.details()
    info = _error_info(error)
    assert info.reason == reason
    assert message in error.details()
    # Acks arrive for the good chunks before the error; the error says where to resume.
    opened = bool(requests) and requests[0].WhichOneof("kind") == "open"
    expected = 3 if len(requests) > 2 else 0 if opened and reason not in (
        "NOT_FOUND", "INVALID_NAME"
    ) else -1  # fmt: skip
    assert _length(stub) == expected
    assert len(responses) == (0 if expected < 0 else 1 + (expected > 0))
    if expected >= 0:
        assert info.metadata["committed_offset"] == str(expected)
    if reason == "OFFSET_GAP":
        assert info.metadata["expected_offset"] == "3"
    if expected > 0:
        assert_experience(_decode(_read(stub, vault_uid="a")), 0, expected)
    # Still serving, and the stream takes the right data.
    start = max(expected, 0)
    responses, error = _append(stub, [_open(), _chunk(start, start + 2)])
    assert error is None, error
    assert responses[-1].committed_offset == start + 2


def test_oversize_messages_are_resource_exhausted(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server(max_message_bytes=4096, message_bytes=1024)
    with grpc.insecure_channel(
        server.target, options=[("grpc.max_send_message_length", 1 << 20)]
    ) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        _create(stub)
        responses, error = _append(stub, [_open(), _chunk(0, 2), _chunk(2, 300)])
        assert error is not None
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4096" in (error.details() or "")
        assert _length(stub) == 2
        responses, error = _append(stub, [_open(), _chunk(2, 4)])
        assert error is None
        assert responses[-1].committed_offset == 4


READ_CASES = {
    "negative start": ({"range": vault_pb2.StepRange(start=-1)}, "0 <= start <= stop"),
    "reversed": ({"range": vault_pb2.StepRange(start=4, stop=2)}, "0 <= start <= stop"),
    "past the end": (
        {"range": vault_pb2.StepRange(start=0, stop=11)}, "past the 10 committed steps",
    ),
    "negative last": ({"last_steps": -1}, "last_steps must be >= 0"),
    "bad percentiles": (
        {"percentiles": vault_pb2.Percentiles(low=60, high=40)}, "0 <= low < high <= 100",
    ),
    "unknown leaf": ({"leaves": ["obs"]}, "unknown leaves ['obs']"),
    "follow last": ({"last_steps": 3, "follow": True}, "follow takes a `range`"),
    "bad start offset": (
        {"follow": True, "start_offsets": {"a": -2}}, "start_offsets['a'] must be >= 0",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", READ_CASES)
def test_bad_read(stub: vault_pb2_grpc.VaultServiceStub, case: str) -> None:
    _create(stub)
    _append(stub, [_open(), _chunk(0, 10)])
    fields, message = READ_CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        _read(stub, vault_uid="a", **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0, "sequence_length": 2}, "must be >= 1"),
        ({"batch_size": 2, "sequence_length": 0}, "must be >= 1"),
        ({"batch_size": 2, "sequence_length": 11}, "no stream has 11 committed steps"),
        ({"batch_size": 2, "sequence_length": 2, "leaves": ["x."]}, "unknown leaves"),
    ],
)
def test_bad_sample(
    stub: vault_pb2_grpc.VaultServiceStub, fields: dict[str, Any], message: str
) -> None:
    _create(stub)
    _append(stub, [_open(), _chunk(0, 10)])
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Sample(vault_pb2.SampleRequest(vault_name="v", **fields), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_sample_messages_describe_their_windows(stub: vault_pb2_grpc.VaultServiceStub) -> None:
    _create(stub)
    _append(stub, [_open(), _chunk(0, 10)])
    request = vault_pb2.SampleRequest(vault_name="v", batch_size=5, sequence_length=4, seed=3)
    messages = list(stub.Sample(request, timeout=10))
    assert messages[0].HasField("structure")
    schema = codec.schema_from_proto(messages[0].structure)
    for m in messages:
        arrays = codec.decode_arrays(schema.leaves, len(m.starts), 4, list(m.leaves))
        for i, (row, start) in enumerate(zip(m.batch_rows, m.starts, strict=True)):
            want = experience(start, start + 4)
            np.testing.assert_array_equal(arrays[1][i], want.obs[row])
    assert sum(len(m.starts) for m in messages) == 5


# -- writers, flow control, shutdown -------------------------------------------------------------


def test_second_writer_is_busy_until_the_first_call_ends(
    stub: vault_pb2_grpc.VaultServiceStub,
) -> None:
    _create(stub)
    gate = threading.Event()

    def first_requests() -> Iterator[vault_pb2.AppendRequest]:
        yield _open()
        yield _chunk(0, 2)
        gate.wait(30)

    first = stub.Append(first_requests(), timeout=30)
    assert next(first).committed_offset == 0
    assert next(first).committed_offset == 2
    _, error = _append(stub, [_open(), _chunk(2, 3)])
    assert error is not None
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _error_info(error).reason == "STREAM_BUSY"
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteVault(vault_pb2.DeleteVaultRequest(vault_name="v"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has writers on streams ['a']" in info.value.details()
    _, other = _append(stub, [_open("b"), _chunk(0, 1)])  # other streams are free
    assert other is None
    first.cancel()  # a client that goes away frees its stream
    gate.set()
    deadline = time.monotonic() + 10
    while True:
        responses, error = _append(stub, [_open(), _chunk(2, 3)])
        if error is None or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert error is None
    assert responses[-1].committed_offset == 3


def test_pipelined_appends_stay_within_the_inflight_bounds(
    make_server: Callable[..., ServerThread],
) -> None:
    limit = 8 * 1024
    server = make_server(max_inflight_bytes_per_stream=limit, max_inflight_bytes=limit)
    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        _create(stub)
        chunks = [_chunk(i * 10, i * 10 + 10) for i in range(200)]  # 400 bytes each
        responses, error = _append(stub, [_open(), *chunks])
    assert error is None
    assert [r.committed_offset >= r.chunk_stop for r in responses[1:]] == [True] * 200
    assert [r.chunk_stop for r in responses[1:]] == [i * 10 + 10 for i in range(200)]
    budget = server.servicer._budget
    assert budget.used_bytes == 0
    assert 0 < budget.peak_bytes <= limit + 400 + 1024
    with grpc.insecure_channel(server.target) as channel:
        messages = _read(vault_pb2_grpc.VaultServiceStub(channel), vault_uid="a")
    assert_experience(_decode(messages), 0, 2000)


def test_shutdown_acks_what_it_read_and_flushes(make_server: Callable[..., ServerThread]) -> None:
    server = make_server()
    root = server.config.root
    gate = threading.Event()

    def requests() -> Iterator[vault_pb2.AppendRequest]:
        yield _open()
        for i in range(5):
            yield _chunk(i * 4, i * 4 + 4)
        gate.wait(30)  # the client keeps its stream open

    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        _create(stub)
        call = stub.Append(requests(), timeout=30)
        responses = [next(call) for _ in range(6)]
        assert responses[-1].committed_offset == 20
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        gate.set()
        stopper.join(30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _error_info(info.value).metadata["committed_offset"] == "20"
    assert "resumes from offset 20" in info.value.details()
    store = Store(root)
    try:
        stream = store.open_stream("v", "a")
        assert stream.length == 20
        assert stream.materialized == 20  # flushed for flashbax
    finally:
        store.close()


def test_follow_ends_unavailable_on_shutdown(make_server: Callable[..., ServerThread]) -> None:
    server = make_server()
    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        _create(stub)
        _append(stub, [_open(), _chunk(0, 3)])
        call = stub.Read(vault_pb2.ReadRequest(vault_name="v", follow=True), timeout=30)
        assert next(call).HasField("structure")
        assert next(call).num_steps == 3
        server.stop()
        with pytest.raises(grpc.RpcError) as info:
            next(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_and_reflection(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "expvault.v1.VaultService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in answer.list_services_response.service}
        assert {"expvault.v1.VaultService", "grpc.health.v1.Health"} <= names


def test_follow_one_stream_waits_for_it_and_ends_at_stop(
    stub: vault_pb2_grpc.VaultServiceStub,
) -> None:
    _create(stub)
    request = vault_pb2.ReadRequest(
        vault_name="v", vault_uid="later", follow=True, range=vault_pb2.StepRange(start=2, stop=7)
    )
    call = stub.Read(request, timeout=30)
    header = next(call)
    assert header.HasField("structure")  # sent before the stream exists
    _append(stub, [_open("later"), _chunk(0, 4)])
    first = next(call)
    assert (first.vault_uid, first.start, first.num_steps) == ("later", 2, 2)
    _append(stub, [_open("later"), _chunk(4, 9)])
    rest = list(call)  # ends OK at stop
    assert [(m.start, m.num_steps) for m in rest] == [(4, 3)]
    assert_experience(_decode([header, first, *rest]), 2, 7)


# -- configured limits ---------------------------------------------------------------------------


def _refusal(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error_info = _error_info(info.value)
    return info.value.code(), info.value.details() or "", dict(error_info.metadata)


def test_configured_limits_are_resource_exhausted(
    make_server: Callable[..., ServerThread], tmp_path: Any
) -> None:
    few_leaves = make_server(root=tmp_path / "a", max_leaves=2)
    with grpc.insecure_channel(few_leaves.target) as channel:
        code, details, meta = _refusal(lambda: _create(vault_pb2_grpc.VaultServiceStub(channel)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 leaves; the server's limit max_leaves is 2" in details
    assert "--max-leaves or EXPVAULT_MAX_LEAVES" in details
    assert meta["limit"] == "max_leaves"

    # The test structure's step is B=2 rows x (4 + 12 + 4) bytes = 40 bytes.
    limits = {
        "max_vaults": 2, "max_step_bytes": 40, "max_sample_batch": 3, "max_streams_per_vault": 2,
    }  # fmt: skip
    server = make_server(root=tmp_path / "b", max_message_bytes=8192, message_bytes=1024, **limits)
    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        assert _create(stub, "v").created
        assert _create(stub, "w").created
        assert not _create(stub, "v").created  # an existing vault counts once
        code, details, meta = _refusal(lambda: _create(stub, "x"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "holds 2 vaults; the server's limit max_vaults is 2" in details
        assert meta == {"limit": "max_vaults", "limit_value": "2"}
        stub.DeleteVault(vault_pb2.DeleteVaultRequest(vault_name="w"), timeout=10)
        wide = _bad_structure()
        wide.leaves[1].step_shape[:] = [4]  # a scalar leaf becomes (4,): 64 bytes a step
        code, details, meta = _refusal(
            lambda: stub.CreateVault(
                vault_pb2.CreateVaultRequest(vault_name="x", structure=wide), timeout=10
            )
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "holds 64 bytes" in details
        assert "max_step_bytes is 40 (raise it with --max-step-bytes" in details
        assert _append(stub, [_open(), _chunk(0, 10)])[1] is None
        assert _append(stub, [_open("b"), _chunk(0, 2)])[1] is None
        _, error = _append(stub, [_open("c"), _chunk(0, 2)])
        assert error is not None
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "vault 'v' has 2 streams; the server's limit max_streams_per_vault is 2" in (
            error.details() or ""
        )
        assert not (tmp_path / "b" / "v" / "c").exists()  # refused before anything was made
        assert _append(stub, [_open("b"), _chunk(2, 4)])[1] is None  # existing streams go on
        sample = vault_pb2.SampleRequest(vault_name="v", batch_size=4, sequence_length=2)
        code, details, meta = _refusal(lambda: list(stub.Sample(sample, timeout=10)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Sample asks for 4 windows; the server's limit max_sample_batch is 3" in details
        sample.batch_size = 3
        assert sum(len(m.starts) for m in stub.Sample(sample, timeout=10)) == 3
        assert [v for v in stub.ListVaults(vault_pb2.ListVaultsRequest()).vault_names] == ["v"]
    server.stop()

    # The same root under a lower step limit: the vault stays readable, appends are refused.
    lower = make_server(root=tmp_path / "b", max_step_bytes=32)
    with grpc.insecure_channel(lower.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        _, error = _append(stub, [_open(), _chunk(10, 12)])
        assert error is not None
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_step_bytes is 32" in (error.details() or "")
        assert_experience(_decode(_read(stub, vault_uid="a")), 0, 10)


def test_steps_and_windows_must_fit_a_message(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(max_message_bytes=4096, message_bytes=1024)
    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        big = _bad_structure()
        big.leaves[1].step_shape[:] = [1000]  # 2 rows x 4000 bytes a step
        code, details, meta = _refusal(
            lambda: stub.CreateVault(
                vault_pb2.CreateVaultRequest(vault_name="big", structure=big), timeout=10
            )
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than one message carries" in details
        assert meta["limit"] == "max_message_bytes"
        _create(stub)
        assert _append(stub, [_open(), _chunk(0, 50), _chunk(50, 100)])[1] is None
        # One window of 90 steps of one row is 90 x 20 = 1800 bytes: fits; 200 steps do not.
        request = vault_pb2.SampleRequest(vault_name="v", batch_size=2, sequence_length=90)
        assert sum(len(m.starts) for m in stub.Sample(request, timeout=10)) == 2
        assert _append(stub, [_open(), _chunk(100, 175), _chunk(175, 250)])[1] is None
        request.sequence_length = 200
        code, details, _ = _refusal(lambda: list(stub.Sample(request, timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "one window of 200 steps holds 4000 bytes" in details


def test_readers_hold_at_most_the_read_buffer_bound(
    make_server: Callable[..., ServerThread],
) -> None:
    # Tiny messages: a Read block (8 messages) is ~8 KiB; three streams followed at once and two
    # range reads would each hold a block and read the next ahead if nothing bounded them.
    limit = 12 * 1024
    server = make_server(message_bytes=1024, max_read_buffer_bytes=limit)
    uids = ["a", "b", "c"]
    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        _create(stub)
        for uid in uids:
            chunks = [_chunk(i, i + 100) for i in range(0, 1000, 100)]
            assert _append(stub, [_open(uid), *chunks])[1] is None
        follow = stub.Read(vault_pb2.ReadRequest(vault_name="v", follow=True), timeout=30)
        ranges = [
            stub.Read(vault_pb2.ReadRequest(vault_name="v", vault_uid=uid), timeout=30)
            for uid in ("a", "b")
        ]
        calls = [follow, *ranges]
        firsts = [next(call) for call in calls]  # the structure: every call is running
        budget = server.servicer._read_budget
        followed = [firsts[0]]
        reached = dict.fromkeys(uids, 0)
        while min(reached.values()) < 1000:  # following every stream never ends by itself
            message = next(follow)
            followed.append(message)
            reached[message.vault_uid] = message.start + message.num_steps
        follow.cancel()
        read = [[first, *call] for first, call in zip(firsts[1:], ranges, strict=True)]
    by_uid: dict[str, list[vault_pb2.ReadResponse]] = {uid: [] for uid in uids}
    for message in followed[1:]:
        by_uid[message.vault_uid].append(message)
    for uid in uids:
        assert_experience(_decode([followed[0], *by_uid[uid]]), 0, 1000)
    for messages in read:
        assert_experience(_decode(messages), 0, 1000)
    assert 0 < budget.peak_bytes <= limit
    deadline = time.monotonic() + 10
    while budget.used_bytes and time.monotonic() < deadline:  # the calls' ends give all back
        time.sleep(0.02)
    assert budget.used_bytes == 0


def test_a_reader_that_stops_reading_holds_only_its_share_of_the_read_buffer(
    make_server: Callable[..., ServerThread],
) -> None:
    # A follower of three streams whose client reads nothing: each stream's reader would hold a
    # block and read the next ahead; the call may hold two blocks (16 messages) at most.
    message_bytes = 1024
    share = 2 * 8 * message_bytes
    server = make_server(message_bytes=message_bytes, max_read_buffer_bytes=1 << 20)
    # Without BDP probing the client's window stays at 64 KiB: the server must hold the rest.
    with grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        _create(stub)
        for uid in ("a", "b", "c"):
            chunks = [_chunk(i, i + 100) for i in range(0, 4000, 100)]
            assert _append(stub, [_open(uid), *chunks])[1] is None
        stalled = stub.Read(vault_pb2.ReadRequest(vault_name="v", follow=True), timeout=30)
        next(stalled)  # the structure; then the client reads no more
        budget = server.servicer._read_budget
        deadline = time.monotonic() + 10
        while budget.used_bytes == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # let the stalled call take all it can
        assert 0 < budget.used_bytes <= share
        # Other readers go on meanwhile.
        read = list(stub.Read(vault_pb2.ReadRequest(vault_name="v", vault_uid="a"), timeout=30))
        assert_experience(_decode(read), 0, 4000)
        stalled.cancel()
    deadline = time.monotonic() + 10
    while budget.used_bytes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert budget.used_bytes == 0
