"""The storage benchmark runs and prints one JSON object per case (shape, not speed)."""

import json
import subprocess
import sys


def test_storage_benchmark_prints_a_json_line_per_case() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "expvault_server.bench",
            "--storage-only",
            "--repeats",
            "1",
            "--writes",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    cases = [json.loads(line) for line in result.stdout.splitlines()]
    assert [c["case"].split(" ")[0] for c in cases] == [
        "flashbax.Vault",
        "expvault.Vault",
        "expvault.Vault",
    ]
    for case in cases:
        assert case["runs"] == 1
        for metric in ("write_steps_per_s", "write_mb_per_s", "disk_per_byte", "read_mb_per_s"):
            assert case[metric] > 0
            assert case[f"{metric}_min"] <= case[metric] <= case[f"{metric}_max"]
    assert cases[1]["write_steps_per_s_vs_flashbax"] > 0
