"""Issue 8's scenario on a real S3 store: two servers over one bucket, kill -9 of one mid-stream.

SeaweedFS runs the bucket; two `expvault serve` processes share `s3://BUCKET/vaults` with 2 s
leases; four actor processes (the kill test's `fault_procs.py actor`, per-step CRC32s) write
through `RemoteVault("A,B")`, which spreads their streams over both servers. One server that
writes streams is killed with SIGKILL; its actors fail over to the other server, which takes the
streams' leases once they expire and resumes from the committed offsets. At the end every
acknowledged step is stored exactly once and in order (read back through the surviving server,
compared with the actors' checksums). Also the smoke run of the scale-out benchmark.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tensorstore as ts

from conftest import ServerProcess
from expvault import VaultReader
from expvault_server._seaweed import SeaweedFS
from expvault_server.bench import BenchSettings, Payload, Progress
from expvault_server.scaleout import CASES, run_scaleout, total_steps

pytestmark = pytest.mark.s3
pytest_plugins = ["s3_support"]

# The kill test's actor processes and helpers (tests/e2e, which imports its siblings by name).
_E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)
assert_stored = importlib.import_module("fault_procs").assert_stored
_kill_test = importlib.import_module("test_kill")
_Proc, _wait_for = _kill_test._Proc, _kill_test._wait_for

ACTORS = 4
LEASE_S = 2


def _lease_holders(seaweed: SeaweedFS, bucket: str, uids: list[str]) -> dict[str, int]:
    """Per stream of vault `v`, the pid of the server holding its lease (from its lease.json)."""
    kv = ts.KvStore.open(seaweed.kvstore_spec(bucket, "vaults/v/"), context=ts.Context()).result()
    holders = {}
    for uid in uids:
        found = kv.read(f"{uid}/lease.json").result()
        owner = json.loads(found.value).get("owner") if found.state == "value" else None
        if owner:  # "host:pid:nonce"
            holders[uid] = int(owner.split(":")[1])
    return holders


def _streams(target: str) -> dict[str, int]:
    with VaultReader(target, "v") as reader:
        return reader.streams()


def _start_actors(target: str, tmp_path: Path, seed: int) -> tuple[list[str], list[Any], Path]:
    """The actor processes, one stream each, writing through `target` until `out/stop` exists.

    Returns:
        The streams' uids, the processes (after each one's first ack), their output directory.
    """
    out = tmp_path / "out"
    out.mkdir()
    uids = [f"actor-{i}" for i in range(ACTORS)]
    actors = [
        _Proc(
            tmp_path / f"{uid}.log",
            *("actor", target, "v", uid, str(out)),
            *("--seed", str(seed + i), "--sleep-s", "0.02"),
        )
        for i, uid in enumerate(uids)
    ]
    try:
        _wait_for(
            "every actor's first ack", lambda: all(a.last_ack() > 0 for a in actors), 90, actors
        )
    except BaseException:
        for a in actors:
            a.close()
        raise
    return uids, actors, out


def _finish(uids: list[str], actors: list[Any], out: Path) -> dict[str, int]:
    """Stops the actors; returns the steps each produced, all of which it had acknowledged."""
    (out / "stop").touch()
    _wait_for("actors to finish", lambda: all(a.done is not None for a in actors), 60, actors)
    totals = {}
    for uid, a in zip(uids, actors, strict=True):
        assert a.close(wait_s=30) == 0, a.stderr()
        assert a.done is not None
        produced, committed = a.done
        assert committed == produced, f"{uid}: produced {produced}, committed {committed}"
        totals[uid] = produced
    return totals


def test_two_servers_on_one_bucket_fail_over_and_lose_nothing(
    seaweed: SeaweedFS,
    bucket: str,
    spawn_server: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    root = f"s3://{bucket}/vaults"
    servers = [spawn_server(root, 0, "--lease-s", str(LEASE_S)) for _ in range(2)]
    uids, actors, out = _start_actors(",".join(s.target for s in servers), tmp_path, 20261125)
    try:
        holders = _lease_holders(seaweed, bucket, uids)
        assert sorted(holders) == uids, f"streams without a lease holder: {holders}"
        by_server = {
            s.process.pid: [u for u, pid in holders.items() if pid == s.process.pid]
            for s in servers
        }
        print("streams per server before the kill:", list(by_server.values()))
        assert sum(map(len, by_server.values())) == ACTORS, f"leases held by strangers: {holders}"
        victim = max(servers, key=lambda s: len(by_server[s.process.pid]))
        survivor = next(s for s in servers if s is not victim)

        time.sleep(0.5)  # mid-stream
        acked = {uid: a.last_ack() for uid, a in zip(uids, actors, strict=True)}
        victim.kill()
        killed_at = time.monotonic()

        # The survivor serves what the victim acknowledged (it polls the store for new commits).
        _wait_for(
            "the survivor to see every acknowledged step",
            lambda: all(_streams(survivor.target).get(u, 0) >= n for u, n in acked.items()),
            30,
            actors,
        )
        # Every actor goes on: the victim's through the survivor once their leases expire.
        _wait_for(
            "acks after the kill from every actor",
            lambda: all(a.last_ack() > acked[u] + 50 for u, a in zip(uids, actors, strict=True)),
            60,
            actors,
        )
        failover_s = time.monotonic() - killed_at
        assert _lease_holders(seaweed, bucket, uids) == dict.fromkeys(uids, survivor.process.pid)

        totals = _finish(uids, actors, out)
        assert all(totals[uid] >= n for uid, n in acked.items())

        with VaultReader(survivor.target, "v") as reader:
            assert_stored(reader, totals, out)
        assert survivor.terminate() == 0
        print(
            f"failover: every actor acked again {failover_s:.1f} s after the kill; "
            f"{sum(totals.values())} steps verified; {time.monotonic() - started:.0f} s in all"
        )
    finally:
        (out / "stop").touch()
        for a in actors:
            a.close()


def test_the_scale_out_benchmark_reports_every_case(seaweed: SeaweedFS, tmp_path: Path) -> None:
    settings = BenchSettings(
        payload=Payload(envs=4, obs_dim=16, delta_steps=64, buffer_steps=256),
        repeats=1,
        root=str(tmp_path),
        actors=2,
        actors_mb=4,
    )
    lines: list[str] = []

    class Lines:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    progress = Progress(total_steps(settings), stream=Lines())  # type: ignore[arg-type]
    results = run_scaleout(settings, store=seaweed, progress=progress)
    assert [r.case for r in results] == list(CASES)
    for result in results:
        record: dict[str, Any] = result.as_json()
        assert record["runs"] == 1
        assert record["mb_per_s"] > 0
        assert record["mb_per_s_min"] <= record["mb_per_s"] <= record["mb_per_s_max"]
        assert record["vs_local"] > 0
        assert record["server_cpu_ms_per_mb"] > 0
        assert 0.5 <= record["busiest_server_cpu_share"] <= 1
        assert ("store_cpu_ms_per_mb" in record) == (result.case != "scaleout.local_1")
        assert record["servers"] == (2 if result.case == "scaleout.s3_2" else 1)
    assert results[0].metrics["vs_local"] == (1.0, 1.0, 1.0)
    assert any("run 1/1" in line for line in lines)
    assert not list(tmp_path.iterdir())  # the run's data is gone


@pytest.mark.slow
def test_repeated_server_kills_on_s3_lose_nothing(
    seaweed: SeaweedFS,
    bucket: str,
    spawn_server: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    """The soak of the scenario above: 8 rounds, each killing the server that holds the most
    leases and restarting it on its port (so the actors' target list stays valid)."""
    root = f"s3://{bucket}/vaults"
    flags = ("--lease-s", str(LEASE_S))
    servers = [spawn_server(root, 0, *flags) for _ in range(2)]
    uids, actors, out = _start_actors(",".join(s.target for s in servers), tmp_path, 20261126)
    try:
        for _ in range(8):
            holders = _lease_holders(seaweed, bucket, uids)
            index = max(
                range(2),
                key=lambda i: sum(pid == servers[i].process.pid for pid in holders.values()),
            )
            acked = {uid: a.last_ack() for uid, a in zip(uids, actors, strict=True)}
            port = servers[index].target.rsplit(":", 1)[1]
            servers[index].kill()
            servers[index] = spawn_server(root, int(port), *flags)
            _wait_for(
                "acks after the kill from every actor",
                lambda acked=acked: all(
                    a.last_ack() > acked[u] + 50 for u, a in zip(uids, actors, strict=True)
                ),
                60,
                actors,
            )
        totals = _finish(uids, actors, out)
        for server in servers:  # every server serves every stream, whoever wrote it
            with VaultReader(server.target, "v") as reader:
                assert_stored(reader, totals, out)
        print(f"8 kills survived; {sum(totals.values())} steps verified on both servers")
    finally:
        (out / "stop").touch()
        for a in actors:
            a.close()
