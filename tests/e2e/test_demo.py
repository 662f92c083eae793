"""`expvault demo` end to end: embedded server, actor processes, a learner, the final check."""

import subprocess
import sys
from pathlib import Path

import pytest


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
