"""`expvault demo` end to end: embedded server, actor processes, a learner, the final check.

Also its roles alone (`expvault demo actor|learner`, as the compose stack runs them) against an
`expvault serve` subprocess that is killed and restarted mid-stream.
"""

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import ServerProcess
from expvault import NotFoundError, VaultReader


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end_and_checks_every_step(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "expvault_server.cli",
            "demo",
            "--actors",
            "2",
            "--envs",
            "4",
            "--steps",
            "2048",
            "--buffer-length",
            "256",
            "--write-interval",
            "64",
            "--root",
            str(tmp_path / "vaults"),
            "--vault-name",
            "demo-test",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "summary: OK: learner received 4096 of 4096 steps" in out
    for actor in ("actor-0", "actor-1"):
        line = f"{actor}: produced 2048, committed 2048, learner received 2048, checksum match ok"
        assert line in out
    # The vault is where the summary says, in flashbax's format.
    from flashbax.vault import Vault

    read = Vault("demo-test", rel_dir=str(tmp_path / "vaults"), vault_uid="actor-1").read()
    assert read.experience["step"].shape == (4, 2048)
    import numpy as np

    assert np.array_equal(np.asarray(read.experience["step"][0]), np.arange(2048))


def test_demo_rejects_bad_options(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "expvault_server.cli", "demo", "--actors", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--actors must be >= 1" in result.stderr


def _role(role: str, target: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "expvault_server.cli",
            "demo",
            role,
            "--target",
            target,
            "--vault-name",
            "roles",
            "--envs",
            "4",
            "--steps",
            "2048",
            "--buffer-length",
            "256",
            "--write-interval",
            "64",
            "--reconnect-timeout-s",
            "60",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 0, out
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _streams(target: str) -> dict[str, int]:
    try:
        with VaultReader(target, "roles") as reader:
            return reader.streams()
    except NotFoundError:
        return {}


@pytest.mark.timeout(300)
def test_demo_roles_survive_a_server_kill_mid_stream(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = spawn_server()
    target = server.target
    # 2048 steps at 512 steps/s: each actor streams for about 4 s after its JAX start-up.
    actors = [_role("actor", target, "--actor-id", str(a), "--steps-per-s", "512") for a in (0, 1)]
    learner = _role("learner", target, "--actors", "2")
    try:
        # Kill as soon as one actor is streaming: it has 1792 steps (3.5 s) to go. The other
        # may start later (JAX start-up on a busy machine) and then meets the outage earlier.
        deadline = time.monotonic() + 120
        while not (lengths := _streams(target)) or max(lengths.values()) < 256:
            assert time.monotonic() < deadline, f"actors did not stream: {lengths}"
            assert all(p.poll() is None for p in (*actors, learner)), "a role exited early"
            time.sleep(0.05)
        server.kill()  # kill -9 mid-stream
        assert min(lengths.get(f"actor-{a}", 0) for a in (0, 1)) < 2048, f"too late: {lengths}"
        restarted = spawn_server(server.root, server.port)  # same data, same address
        kept = _streams(target)
        assert all(kept[uid] >= n for uid, n in lengths.items()), f"acked {lengths}, kept {kept}"
        results = [_result(p) for p in actors]
        learned = _result(learner)
    finally:
        for p in (*actors, learner):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert learned["problems"] == []
    assert _streams(restarted.target) == {"actor-0": 2048, "actor-1": 2048}
    for result in results:
        uid = result["vault_uid"]
        assert result["produced"] == result["committed"] == learned["received"][uid] == 2048
        assert result["checksum"] == learned["checksums"][uid]


def test_demo_roles_need_a_target_and_a_vault_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "expvault_server.cli", "demo", "learner", "--vault-name", "v"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "expvault demo learner: give --target HOST:PORT" in result.stderr
