"""`expvault serve` as a subprocess: restarts, kill -9, SIGTERM, and the CLI against it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Actor, ServerProcess, assert_experience, structure
from expvault import RemoteVault, VaultReader
from expvault.storage import Store
from expvault_server.cli import main


class _Writer(threading.Thread):
    """An actor stepping a flashbax buffer and writing each delta until told to stop."""

    def __init__(self, vault: RemoteVault, delta: int = 4) -> None:
        super().__init__(daemon=True)
        self.vault = vault
        self.delta = delta
        self.written = 0
        self.stop_at: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        actor = Actor()
        try:
            while self.stop_at is None or self.written < self.stop_at:
                self.written += self.vault.write(actor.add(self.delta))
        except BaseException as e:
            self.error = e


class _Follower(threading.Thread):
    """A learner following stream `a`, checking every delta against `experience`."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.position = 0
        self.starts: list[int] = []
        self.stopping = False
        self.error: BaseException | None = None

    def run(self) -> None:
        self.reader = VaultReader(self.target, "v", structure(), vault_uid="a")
        try:
            for uid, start, exp in self.reader.follow():
                assert uid == "a"
                assert start == self.position, (start, self.position)
                n = exp.obs.shape[1]
                assert_experience(exp, start, start + n)
                self.starts.append(start)
                self.position = start + n
        except BaseException as e:
            if not self.stopping:
                self.error = e

    def stop(self) -> None:
        self.stopping = True
        self.reader.close()  # cancels the follow call
        self.join(30)


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def _stream_length(root: Path, uid: str = "a") -> tuple[int, int]:
    store = Store(root)
    try:
        stream = store.open_stream("v", uid)
        return stream.length, stream.materialized
    finally:
        store.close()


def test_kill_9_mid_stream_then_restart_resumes_exactly_once(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    root = tmp_path / "vaults"
    server = spawn_server(root)
    vault = RemoteVault(server.target, "v", structure(), vault_uid="a", reconnect_timeout_s=60)
    writer = _Writer(vault)
    writer.start()
    follower = _Follower(server.target)
    follower.start()
    _wait_for(lambda: vault.committed_index >= 200 and follower.position >= 100)
    server.kill()
    acked = vault.committed_index
    assert _stream_length(root)[0] >= acked  # every ack was durable
    time.sleep(0.2)  # the actor keeps writing into its queue meanwhile
    restarted = spawn_server(root, server.port)
    _wait_for(lambda: vault.committed_index >= acked + 200)
    writer.stop_at = writer.written
    writer.join(60)
    assert writer.error is None, writer.error
    total = writer.written
    assert vault.flush() == total
    vault.close()
    with VaultReader(restarted.target, "v", structure()) as reader:
        assert reader.streams() == {"a": total}
        assert_experience(reader.read(vault_uid="a"), 0, total)  # nothing lost, nothing twice
    # The follower resumed across the restart too: every step once, in order.
    _wait_for(lambda: follower.position >= total or follower.error is not None)
    follower.stop()
    assert follower.error is None, follower.error
    assert follower.starts == sorted(set(follower.starts))
    assert follower.position == total


def test_sigterm_commits_in_flight_appends_and_exits_0(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    root = tmp_path / "vaults"
    server = spawn_server(root)
    vault = RemoteVault(server.target, "v", structure(), vault_uid="a")
    writer = _Writer(vault, delta=8)
    writer.start()
    _wait_for(lambda: vault.committed_index >= 100)
    assert server.terminate() == 0
    log = server.log
    assert "expvault shutting down" in log
    assert "expvault stopped" in log
    acked = vault.committed_index
    length, materialized = _stream_length(root)
    assert length >= acked
    assert materialized == length  # flushed: flashbax reads it all
    restarted = spawn_server(root, server.port)
    _wait_for(lambda: vault.committed_index >= length + 50)
    writer.stop_at = writer.written
    writer.join(60)
    assert writer.error is None, writer.error
    assert vault.flush() == writer.written
    vault.close()
    with VaultReader(restarted.target, "v", structure()) as reader:
        assert_experience(reader.read(vault_uid="a"), 0, writer.written)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "expvault_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_health_ls_info(
    spawn_server: Callable[..., ServerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    server = spawn_server()
    with RemoteVault(server.target, "v", structure(), vault_uid="a", metadata={"k": 1}) as vault:
        vault.write(Actor().add(16))
    health = _cli("health", "--target", server.target)  # as a container health check runs it
    assert health.returncode == 0
    assert health.stdout.strip() == "SERVING"
    assert main(["ls", "--target", server.target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ["v"]
    assert main(["info", "v", "--target", server.target]) == 0
    out = capsys.readouterr().out
    for text in ("vault v", "B=2", "obs.", "float32", "(3,)", "a ", "16 steps", '{"k": 1}'):
        assert text in out
    assert main(["info", "v", "--target", server.target, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["streams"][0]["length"] == 16
    assert as_json["streams"][0]["bytes_on_disk"] > 0
    assert main(["info", "nope", "--target", server.target]) == 1
    err = capsys.readouterr().err
    assert "NOT_FOUND" in err
    assert "'nope' not found" in err
    assert server.terminate() == 0
    down = _cli("health", "--target", server.target, "--timeout-s", "2")
    assert down.returncode != 0


@pytest.mark.parametrize("listen", ["nohost", "127.0.0.1:99999"])
def test_serve_refuses_a_bad_listen_address(listen: str, tmp_path: Path) -> None:
    result = _cli("serve", "--listen", listen, "--root", str(tmp_path))
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr or "[0, 65535]" in result.stderr
