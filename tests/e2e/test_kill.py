"""kill -9 of the server, again and again, while four actor processes stream and a learner follows.

Every acknowledged step must survive each kill; at the end every stream holds exactly the steps
its actor produced (per-step CRC32s computed by the actor), once each and in order, and the
learner saw each of them exactly once, in order. Actors and learner are never told about the
outages: `RemoteVault` and `VaultReader.follow` reconnect and resume by themselves.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fault_procs import assert_stored

from conftest import ServerProcess
from expvault import VaultReader
from expvault.storage import Store

PROCS = Path(__file__).with_name("fault_procs.py")
ACTORS = 4


class _Proc:
    """A `fault_procs.py` process; a thread collects its stdout and remembers the last values."""

    def __init__(self, log: Path, *args: str) -> None:
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(PROCS), *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.ack = -1  # actor: the last committed offset it printed
        self.positions: dict[str, int] = {}  # learner: per stream, where it got to
        self.errors: list[str] = []
        self.done: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            words = line.split()
            with self._lock:
                if words[:1] == ["ack"]:
                    self.ack = max(self.ack, int(words[1]))
                elif words[:1] == ["pos"]:
                    self.positions[words[1]] = int(words[2])
                elif words[:1] == ["done"]:
                    self.done = (int(words[1]), int(words[2]))
                elif words[:1] == ["error"]:
                    self.errors.append(line)
            self.lines.put(line)

    def last_ack(self) -> int:
        with self._lock:
            return self.ack

    def stderr(self) -> str:
        return self.log.read_text()[-4000:]

    def close(self, wait_s: float = 0) -> int:
        """Waits up to `wait_s` for the process to exit, kills it if not, returns its status."""
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        status = self.proc.wait(30)
        self._thread.join(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log.close()
        return status


def _wait_for(
    what: str, predicate: Callable[[], bool], timeout_s: float, procs: list[_Proc]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for p in procs:
            if p.proc.poll() not in (None, 0):
                raise AssertionError(f"{p.log.name} exited {p.proc.poll()}: {p.stderr()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def _lengths(root: Path) -> dict[str, int]:
    """Committed lengths on disk (the server is dead: what survived)."""
    store = Store(root)
    try:
        return {uid: store.open_stream("v", uid).length for uid in store.list_streams("v")}
    finally:
        store.close()


def test_server_kill_9_ten_times_loses_and_repeats_nothing(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    report = _kill_run(spawn_server, tmp_path, kills=10, seed=20261125, budget_s=100)
    print(f"kills survived: {report[0]}, steps verified: {report[1]}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_kill_9_soak(spawn_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    report = _kill_run(spawn_server, tmp_path, kills=60, seed=int(time.time()), budget_s=850)
    print(f"kills survived: {report[0]}, steps verified: {report[1]}")


def _kill_run(
    spawn_server: Callable[..., ServerProcess],
    tmp_path: Path,
    *,
    kills: int,
    seed: int,
    budget_s: float,
) -> tuple[int, int]:
    started = time.monotonic()
    phases: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    root = tmp_path / "vaults"
    out = tmp_path / "out"
    out.mkdir()
    server: ServerProcess = spawn_server(root)
    port = server.port
    actors = [
        _Proc(
            tmp_path / f"actor-{i}.log",
            "actor",
            server.target,
            "v",
            f"actor-{i}",
            str(out),
            "--seed",
            str(seed + i),
            "--sleep-s",
            "0.02",
        )
        for i in range(ACTORS)
    ]
    learner: _Proc | None = None
    try:
        _wait_for(
            "every actor's first ack", lambda: all(a.last_ack() > 0 for a in actors), 60, actors
        )
        learner = _Proc(tmp_path / "learner.log", "learner", server.target, "v", str(out))
        phases["started"] = time.monotonic() - started
        procs = [*actors, learner]
        for kill in range(kills):
            # Kill at a random moment: sometimes while the clients are still reconnecting.
            time.sleep(float(rng.uniform(0.05, 1.0)))
            acked = {f"actor-{i}": a.last_ack() for i, a in enumerate(actors)}
            server.kill()
            survived = _lengths(root)
            for uid, ack in acked.items():
                assert survived.get(uid, 0) >= ack, (
                    f"kill {kill}: {uid} acked {ack} steps, {survived.get(uid, 0)} survived"
                )
            server = spawn_server(root, port)
            if kill % 3 == 2:
                # The actors resume by themselves: each gets acks past what survived.
                _wait_for(
                    f"actors to resume after kill {kill}",
                    lambda s=survived: all(
                        a.last_ack() > s.get(f"actor-{i}", 0) for i, a in enumerate(actors)
                    ),
                    60,
                    procs,
                )
        before = [a.last_ack() for a in actors]
        _wait_for(
            "acks after the last restart",
            lambda: all(a.last_ack() > before[i] for i, a in enumerate(actors)),
            60,
            procs,
        )
        phases["killed"] = time.monotonic() - started
        (out / "stop").touch()
        _wait_for("actors to finish", lambda: all(a.done is not None for a in actors), 120, procs)
        totals: dict[str, int] = {}
        for i, a in enumerate(actors):
            assert a.close(wait_s=60) == 0, a.stderr()
            assert a.done is not None
            produced, committed = a.done
            assert committed == produced, f"actor-{i}: produced {produced}, committed {committed}"
            totals[f"actor-{i}"] = produced
        _wait_for(
            "the learner to catch up",
            lambda: all(learner.positions.get(u, 0) >= n for u, n in totals.items()),
            120,
            [learner],
        )
        assert not learner.errors, learner.errors
        assert learner.positions == totals  # nothing past what the actors produced
        learner.close()
        learner = None
        phases["caught up"] = time.monotonic() - started
        verified = 0
        with VaultReader(server.target, "v") as reader:
            assert_stored(reader, totals, out)
        for uid, total in totals.items():
            want = np.load(out / f"steps-{uid}.npy")
            seen = np.fromfile(out / f"learner-{uid}.crc", np.uint32)
            np.testing.assert_array_equal(seen, want, err_msg=f"{uid}: learner's steps")
            verified += total
        assert server.terminate() == 0
        phases["verified"] = time.monotonic() - started
        print("phases (s since start):", {k: round(v, 1) for k, v in phases.items()})
        assert time.monotonic() - started < budget_s
        return kills, verified
    finally:
        (out / "stop").touch()
        for p in [*actors, *([learner] if learner else [])]:
            p.close()
