"""Faults below and around the server: a full disk, damaged files, dropped and dead connections.

Each test checks that what was committed stays intact and readable, that the error says what is
wrong (the right `expvault` class, the path, the space left), and that work resumes once the
fault is gone.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import BATCH, OBS, Actor, ServerThread, assert_experience, experience, structure
from expvault import (
    RemoteVault,
    ResourceExhaustedError,
    StorageError,
    StreamBusyError,
    UnavailableError,
    VaultReader,
)
from expvault._rpc import channel_options, error_from_rpc
from expvault.schema import Schema
from expvault.storage import Store
from expvault.v1 import vault_pb2, vault_pb2_grpc
from expvault_server import app
from expvault_server.cli import main as cli

PROCS = Path(__file__).parents[1] / "e2e" / "fault_procs.py"
PAGE = 4096
STEP_BYTES = BATCH * (OBS[0] * 4 + 4 + 4)  # obs float32, action int32, reward float32


# -- a small disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted under `tmp_path` (skips where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_pages: int = 0) -> Path:
    """Fills the file system of `disk` with a filler file, leaving `leave_pages` pages free."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    size = 0
    block = b"\0" * (64 * PAGE)
    try:
        while True:
            size += os.write(fd, block if size % len(block) == 0 else block[:PAGE])
    except OSError as e:
        full = e
    finally:
        os.close(fd)
    assert full.errno == errno.ENOSPC, full
    os.truncate(filler, max(0, size - size % PAGE - leave_pages * PAGE))
    return filler


def _exact(start: int, stop: int) -> list[np.ndarray[Any, Any]]:
    """`experience(start, stop)` as arrays in schema order (`action.`, `obs.`, `reward.`)."""
    step = experience(start, stop)
    return [step.action, step.obs, step.reward]


def test_disk_full_fails_only_what_is_not_durable_and_recovers(small_disk: Path) -> None:
    root = small_disk / "root"
    store = Store(root)
    store.create_vault("v", Schema.from_experience(structure()), compression="none", chunk_steps=8)
    stream = store.open_stream("v", "a", create=True)
    assert stream.append(0, _exact(0, 7)) == 7  # in the log: the chunk is not full yet
    filler = _fill(small_disk, leave_pages=1)
    # The log takes the next append (within its file's last page and the page left); moving the
    # full chunk into the arrays needs more and fails in the background, where it is retried.
    assert stream.append(7, _exact(7, 9)) == 9
    stop = 9 + 3 * PAGE // STEP_BYTES  # three pages of steps: more than the disk has left
    with pytest.raises(ResourceExhaustedError) as full:
        stream.append(9, _exact(9, stop))
    message = str(full.value)
    assert str(root) in message
    assert "full" in message
    assert "free: 0 bytes" in message
    with pytest.raises(ResourceExhaustedError, match="arrays"):
        stream.flush()
    assert (stream.length, stream.materialized) == (9, 0)
    # Committed steps stay readable, from the log and (below) from a fresh process's view.
    assert_experience(dict(zip(["action", "obs", "reward"], stream.read(0, 9), strict=True)), 0, 9)
    filler.unlink()
    # The materializer catches up by itself; the failed append succeeds when retried.
    deadline = time.monotonic() + 10
    while stream.materialized < 8:
        assert time.monotonic() < deadline, "the materializer did not retry"
        time.sleep(0.05)
    assert stream.append(9, _exact(9, stop)) == stop
    store.close()
    reopened = Store(root)
    try:
        again = reopened.open_stream("v", "a")
        assert (again.length, again.materialized) == (stop, stop)
        assert_experience(
            dict(zip(["action", "obs", "reward"], again.read(0, stop), strict=True)), 0, stop
        )
    finally:
        reopened.close()


def test_disk_full_over_grpc_raises_resource_exhausted_and_loses_nothing(
    small_disk: Path, make_server: Callable[..., ServerThread]
) -> None:
    server = make_server(root=small_disk / "root")
    actor = Actor()
    vault = RemoteVault(server.target, "v", structure(), vault_uid="a", compression="none")
    assert vault.write(actor.add(16)) == 16
    filler = _fill(small_disk)
    # Writes go on while they fit in the last page of the log's file, then fail.
    acked = 16
    full: ResourceExhaustedError | None = None
    for _ in range(PAGE // (8 * STEP_BYTES) + 2):
        try:
            assert vault.write(actor.add(8)) == 8
        except ResourceExhaustedError as e:
            full = e
            break
        acked += 8
    assert full is not None, "no write failed on the full disk"
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "full" in str(full)
    assert str(small_disk / "root") in str(full)
    # Committed steps stay readable; other readers see only them.
    with VaultReader(server.target, "v", structure()) as reader:
        assert reader.streams() == {"a": acked}
        assert_experience(reader.read(vault_uid="a"), 0, acked)
    filler.unlink()
    # The queued steps were kept: the next call sends them, once each.
    assert vault.write(actor.add(8)) == 8
    assert vault.flush() == acked + 16
    vault.close()
    with VaultReader(server.target, "v", structure()) as reader:
        assert_experience(reader.read(vault_uid="a"), 0, acked + 16)


# -- damaged files --------------------------------------------------------------------------------


def _two_vaults(server: ServerThread) -> None:
    for name, uids in (("v", ("a", "b")), ("w", ("c",))):
        for uid in uids:
            with RemoteVault(server.target, name, structure(), vault_uid=uid) as vault:
                vault.write(Actor().add(16))


def _info(target: str, vault_name: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = cli(["info", vault_name, "--target", target])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize("damage", ["chunks", "metadata", "vault_json"])
def test_damaged_files_fail_their_vault_only_and_say_what_is_wrong(
    damage: str,
    make_server: Callable[..., ServerThread],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "vaults"
    first = make_server()
    _two_vaults(first)
    first.stop()
    stream_dir = root / "v" / "a"
    if damage == "chunks":  # every data file of stream a: chunks, index and b-tree nodes
        for f in (stream_dir / "d").iterdir():
            data = bytearray(f.read_bytes())
            data[len(data) // 2 :] = b"\xff" * (len(data) - len(data) // 2)
            f.write_bytes(bytes(data))
        broken, expect = "v", ["stream 'a'", str(stream_dir)]
    elif damage == "metadata":
        (stream_dir / "metadata.json").unlink()
        broken, expect = "v", ["stream 'a'", "metadata.json", "missing"]
    else:
        (root / "w" / "vault.json").write_text('{"format": 1}')
        broken, expect = "w", [str(root / "w" / "vault.json"), "malformed"]
    server = make_server()
    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        assert list(stub.ListVaults(vault_pb2.ListVaultsRequest()).vault_names) == ["v", "w"]
        with pytest.raises(grpc.RpcError) as failed:
            stub.GetVault(vault_pb2.GetVaultRequest(vault_name=broken))
    error = error_from_rpc(failed.value)
    assert isinstance(error, StorageError), error
    for text in expect:
        assert text in error.message, (text, error.message)
    status, out = _info(server.target, broken, capsys)
    assert status == 1
    assert expect[0] in out
    # The other vault is served as before.
    other = "w" if broken == "v" else "v"
    with VaultReader(server.target, other, structure()) as reader:
        for uid in reader.streams():
            assert_experience(reader.read(vault_uid=uid), 0, 16)
    if broken == "v":
        # The healthy stream of the damaged vault takes appends; the damaged one says why not.
        with RemoteVault(server.target, "v", structure(), vault_uid="b") as vault:
            assert vault.write(Actor(steps=16).add(8)) == 8
            assert vault.flush() == 24
        with (
            RemoteVault(server.target, "v", structure(), vault_uid="a") as vault,
            pytest.raises(StorageError, match="v/a"),
        ):
            vault.write(Actor().add(8))


# -- dropped and dead connections -----------------------------------------------------------------


class _RawWriter:
    """An Append call on a raw stub: opens the stream, sends chunks on demand, then hangs."""

    def __init__(self, target: str, uid: str, *, timeout_s: float | None = None) -> None:
        self.channel = grpc.insecure_channel(target, options=channel_options())
        self._sends: list[vault_pb2.AppendRequest | None] = []
        self._cond = threading.Condition()
        stub = vault_pb2_grpc.VaultServiceStub(self.channel)
        self.call = stub.Append(self._requests(uid), timeout=timeout_s)
        self.opened: vault_pb2.AppendResponse = next(self.call)

    def _requests(self, uid: str) -> Iterator[vault_pb2.AppendRequest]:
        yield vault_pb2.AppendRequest(
            open=vault_pb2.AppendOpen(vault_name="v", vault_uid=uid, create=True)
        )
        while True:
            with self._cond:
                while not self._sends:
                    self._cond.wait()
                item = self._sends.pop(0)
            if item is None:
                return
            yield item

    def send(self, start: int, stop: int) -> int:
        """Sends steps `[start, stop)`; returns the acknowledged committed offset."""
        from expvault import codec

        chunk = vault_pb2.AppendChunk(
            start=start, num_steps=stop - start, leaves=codec.encode_arrays(_exact(start, stop))
        )
        with self._cond:
            self._sends.append(vault_pb2.AppendRequest(chunk=chunk))
            self._cond.notify()
        return int(next(self.call).committed_offset)

    def close(self) -> None:
        with self._cond:
            self._sends.append(None)
            self._cond.notify()
        self.call.cancel()
        self.channel.close()


def _claim(target: str, uid: str, timeout_s: float) -> tuple[int, float]:
    """Opens the stream as a new writer as soon as it is free: (committed offset, seconds)."""
    started = time.monotonic()
    while True:
        try:
            writer = _RawWriter(target, uid)
        except grpc.RpcError as e:
            if not isinstance(error_from_rpc(e), StreamBusyError):
                raise
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"stream {uid} still busy after {timeout_s} s") from e
            time.sleep(0.02)
            continue
        offset = int(writer.opened.committed_offset)
        writer.close()
        return offset, time.monotonic() - started


@pytest.fixture
def stream_a(server: ServerThread) -> ServerThread:
    RemoteVault(server.target, "v", structure(), vault_uid="a").close()
    return server


def test_a_writer_that_cancels_mid_stream_frees_the_stream(stream_a: ServerThread) -> None:
    writer = _RawWriter(stream_a.target, "a")
    assert writer.send(0, 5) == 5
    with pytest.raises(grpc.RpcError) as busy:
        _RawWriter(stream_a.target, "a")
    assert isinstance(error_from_rpc(busy.value), StreamBusyError)
    writer.call.cancel()  # the client goes away mid-stream
    offset, _ = _claim(stream_a.target, "a", timeout_s=5)
    assert offset == 5
    writer.close()


def test_a_writer_past_its_deadline_frees_the_stream(stream_a: ServerThread) -> None:
    writer = _RawWriter(stream_a.target, "a", timeout_s=1.0)
    assert writer.send(0, 3) == 3
    with pytest.raises(grpc.RpcError) as expired:
        next(writer.call)  # nothing more is sent: the deadline passes
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    offset, _ = _claim(stream_a.target, "a", timeout_s=5)
    assert offset == 3
    writer.close()


def _actor_process(target: str, uid: str, out: Path) -> subprocess.Popen[str]:
    out.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(PROCS), "actor", target, "v", uid, str(out), "--exact"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def _acks(process: subprocess.Popen[str], at_least: int) -> int:
    """Reads the actor's `ack N` lines until N >= at_least; returns N."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("ack ") and int(line.split()[1]) >= at_least:
            return int(line.split()[1])
    raise AssertionError(f"the actor exited with {process.wait()} before {at_least} acks")


def test_an_actor_killed_mid_append_leaves_whole_steps_and_frees_its_stream(
    server: ServerThread, tmp_path: Path
) -> None:
    actor = _actor_process(server.target, "a", tmp_path / "out")
    try:
        acked = _acks(actor, at_least=200)
    finally:
        actor.kill()  # SIGKILL, mid-append: it writes without pause
        actor.wait(30)
        assert actor.stdout is not None
        actor.stdout.close()
    # The server drops the dead client's lease as soon as the connection closes.
    offset, waited_s = _claim(server.target, "a", timeout_s=10)
    assert offset >= acked
    with VaultReader(server.target, "v") as reader:
        assert reader.streams() == {"a": offset}
        got = reader.read(vault_uid="a")  # only whole, committed steps, each what was sent
    want = _exact_pytree(0, offset)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # A new actor resumes at the committed offset.
    with RemoteVault(server.target, "v", vault_uid="a") as vault:
        assert vault.vault_index == offset
    print(f"stream free {waited_s:.2f} s after the kill; {offset} whole steps")


def _exact_pytree(start: int, stop: int) -> dict[str, np.ndarray[Any, Any]]:
    sys.path.insert(0, str(PROCS.parent))
    try:
        from fault_procs import exact_experience
    finally:
        sys.path.remove(str(PROCS.parent))
    return exact_experience(start, stop)


def test_keepalive_frees_the_stream_of_a_peer_that_stopped_answering(
    monkeypatch: pytest.MonkeyPatch, make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    monkeypatch.setattr(app, "KEEPALIVE_TIME_MS", 500)
    monkeypatch.setattr(app, "KEEPALIVE_TIMEOUT_MS", 1000)
    server = make_server()
    actor = _actor_process(server.target, "a", tmp_path / "out")
    try:
        _acks(actor, at_least=50)
        actor.send_signal(signal.SIGSTOP)  # a hung host: the connection stays open, silent
        offset, waited_s = _claim(server.target, "a", timeout_s=15)
    finally:
        actor.kill()
        actor.wait(30)
        assert actor.stdout is not None
        actor.stdout.close()
    assert offset >= 50
    # Detected by the server's pings (0.5 s, answered within 1 s), not by a closed socket.
    assert waited_s >= 0.5
    print(f"stream of a silent peer free after {waited_s:.2f} s")


def test_a_server_away_past_the_reconnect_timeout_fails_once_and_loses_nothing(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server()
    actor = Actor()
    vault = RemoteVault(server.target, "v", structure(), vault_uid="a", reconnect_timeout_s=1)
    assert vault.write(actor.add(8)) == 8
    server.stop()
    vault.write(actor.add(8), wait=False)  # queued while the server is away
    with pytest.raises(UnavailableError, match="cannot reach the server"):
        vault.flush()  # after reconnect_timeout_s
    restarted = make_server(listen=server.target)
    # The queued steps were kept: a later call sends them. (Until gRPC's own reconnect backoff
    # lets the channel try again, a call may still fail the same way; nothing is lost by that.)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert vault.flush() == 16
            break
        except UnavailableError:
            assert time.monotonic() < deadline, "the writer did not resume"
    assert vault.write(actor.add(8)) == 8
    assert vault.flush() == 24
    vault.close()
    with VaultReader(restarted.target, "v", structure()) as reader:
        assert_experience(reader.read(vault_uid="a"), 0, 24)
