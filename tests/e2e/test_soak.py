"""The soak (`python -m expvault_server.soak`): writers and readers on one server, no errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expvault_server.soak import SoakSettings, rss_bound_bytes, run_soak, summary


def _check(settings: SoakSettings) -> None:
    result = run_soak(settings)
    print(summary(result))
    assert result.errors == ()
    assert result.writes > 0
    assert result.steps_acked == result.writes * settings.delta_steps
    assert result.ack_p50_ms <= result.ack_p99_ms <= result.ack_max_ms
    assert result.followed_steps > 0  # reader 0 follows
    assert 0 < result.baseline_rss_bytes < result.peak_rss_bytes <= result.rss_bound_bytes
    assert result.ok


def test_a_short_soak_has_no_errors_and_bounded_memory(tmp_path: Path) -> None:
    settings = SoakSettings(
        writers=4, readers=2, duration_s=6, envs=8, obs_dim=32, root=tmp_path / "vaults"
    )
    _check(settings)


def test_the_memory_bound_grows_with_the_limits() -> None:
    small = SoakSettings(max_inflight_bytes=64 << 20)
    large = SoakSettings(max_inflight_bytes=512 << 20)
    assert rss_bound_bytes(large, 100) - rss_bound_bytes(small, 100) == 2 * (448 << 20)
    # Readers' memory is bounded by the read buffer, not by the streams they follow.
    reads = SoakSettings(max_read_buffer_bytes=100 << 20)
    assert rss_bound_bytes(reads, 0) - rss_bound_bytes(SoakSettings(), 0) == 2 * (36 << 20)
    logs = SoakSettings(max_log_bytes=100 << 20)
    assert rss_bound_bytes(logs, 0) - rss_bound_bytes(SoakSettings(), 0) == 3 * (36 << 20)
    # Each writer may hold a chunk of log beyond max_log_bytes, and has a flow-control window.
    more = SoakSettings(writers=17)
    assert rss_bound_bytes(more, 0) - rss_bound_bytes(SoakSettings(), 0) == 3 * (8 << 20)


def test_the_command_refuses_bad_flags() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "expvault_server.soak", "--writers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "--writers must be >= 1" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_16_writers_4_readers(tmp_path: Path) -> None:
    settings = SoakSettings(writers=16, readers=4, duration_s=60, root=tmp_path / "vaults")
    _check(settings)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_command_prints_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "expvault_server.soak", "--writers", "2", "--readers", "1",
         "--duration-s", "5", "--json", "--root", str(tmp_path / "vaults")],
        capture_output=True,
        text=True,
        timeout=500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert result["errors"] == []
    assert result["settings"]["writers"] == 2
