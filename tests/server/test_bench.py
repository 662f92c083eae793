"""`expvault bench --quick --json` runs every case and prints one JSON object per case (shape,
not speed: a shared 2-core machine measures its other tenants)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from expvault_server._bench_cases import _server
from expvault_server.bench import BenchSettings, Progress, Result, summarise

CASES = {
    "ceiling.grpc_client_stream": ["mb_per_s"],
    "ceiling.disk_fsync": ["mb_per_s"],
    "ceiling.grpc_server_stream": ["mb_per_s"],
    "ref.flashbax_write": ["steps_per_s", "mb_per_s", "disk_bytes_per_byte"],
    "write.local": ["steps_per_s", "mb_per_s", "vs_flashbax"],
    "disk.bytes_per_byte": ["bytes_per_byte", "flashbax_bytes_per_byte"],
    "write.remote_1actor": ["steps_per_s", "mb_per_s", "vs_flashbax"],
    "write.remote_actors": ["mb_per_s", "ceiling_mb_per_s", "vs_ceiling"],
    "server.rss": ["rss_peak_mb", "rss_before_mb", "streamed_mb"],
    "write.nowait_latency": ["p50_ms", "p99_ms", "max_ms", "cpu_p50_ms", "cpu_p99_ms"],
    "write.nowait_latency_server_pinned": [
        "p50_ms",
        "p99_ms",
        "max_ms",
        "cpu_p50_ms",
        "cpu_p99_ms",
    ],
    "read.remote_full": [
        "mb_per_s",
        "flashbax_mb_per_s",
        "vs_flashbax",
        "ceiling_mb_per_s",
        "vs_ceiling",
    ],
    "sample.32x64": ["batches_per_s", "p50_ms", "p99_ms", "iter_batches_per_s"],
    "append.growth": ["short_us_per_step", "long_us_per_step", "long_vs_short"],
}
# The quick run, smaller still: each case once after its warm-up, on a few MB.
FLAGS = [
    "--quick",
    "--json",
    "--repeats=1",
    "--writes=2",
    "--actors=2",
    "--actors-mb=8",
    "--read-mb=8",
    "--ceiling-mb=8",
    "--growth-steps=20000",
    "--latency-writes=10",
    "--sample-batches=5",
]


def test_quick_json_prints_every_case_with_its_metrics(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "expvault_server.cli", "bench", *FLAGS, "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    cases = [json.loads(line) for line in lines]
    assert [c["case"] for c in cases] == list(CASES)  # ceilings first, every case once
    for case in cases:
        assert case["runs"] == 1
        assert isinstance(case["title"], str)
        assert case["title"]
        assert case["target"] is None or isinstance(case["target"], str)
        assert case["ok"] in (True, False, None)
        assert (case["ok"] is None) == (case["target"] is None), case
        for metric in CASES[case["case"]]:
            value = case[metric]
            assert isinstance(value, float), (case["case"], metric)
            assert math.isfinite(value), (case["case"], metric)
            assert value >= 0, (case["case"], metric)
            assert case[f"{metric}_min"] <= value <= case[f"{metric}_max"]
    by_case = {c["case"]: c for c in cases}
    assert by_case["write.remote_actors"]["actors"] == 2
    assert by_case["append.growth"]["long_us_per_step"] > 0
    assert by_case["read.remote_full"]["vault_mb"] > 0
    pinned = by_case["write.nowait_latency_server_pinned"]
    assert pinned["server_cpu"] in os.sched_getaffinity(0)
    # Progress goes to stderr, one line per step when it is not a terminal.
    assert "expvault bench [" in result.stderr
    assert list(tmp_path.iterdir()) == []  # the run removed its data


def test_summarise_takes_median_min_max_of_each_metric() -> None:
    metrics = summarise([{"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 9.0}])
    assert metrics == {"a": (2.0, 1.0, 3.0), "b": (2.0, 1.0, 9.0)}
    result = Result("x.y", "title", 3, metrics, target="a >= 2", ok=True, info={"n": 4})
    assert result.as_json() == {
        "case": "x.y",
        "title": "title",
        "runs": 3,
        "a": 2.0,
        "a_min": 1.0,
        "a_max": 3.0,
        "b": 2.0,
        "b_min": 1.0,
        "b_max": 9.0,
        "target": "a >= 2",
        "ok": True,
        "n": 4,
    }


def test_progress_prints_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(2, sys.stderr)
    progress.step("first")
    progress.step("second")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("]")[0] for line in lines] == [
        "expvault bench [  1/2",
        "expvault bench [  2/2",
    ]
    assert lines[1].endswith("second")


def test_bench_flags_are_checked() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "expvault_server.cli", "bench", "--repeats", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--repeats must be >= 1" in result.stderr
    assert BenchSettings.quick().read_mb < BenchSettings().read_mb


def test_a_pinned_bench_server_runs_every_thread_on_its_cpu(tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    with _server(tmp_path, cpu=cpu) as (_, pid):
        threads = os.listdir(f"/proc/{pid}/task")
        assert len(threads) > 1
        assert all(os.sched_getaffinity(int(tid)) == {cpu} for tid in threads)
