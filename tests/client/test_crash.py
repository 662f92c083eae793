"""Ack means durable: a writer process killed with SIGKILL at random moments loses no acked step."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from stream_writer import expected, experience_structure

from expvault.schema import Schema
from expvault.storage import Store

WRITER = Path(__file__).with_name("stream_writer.py")
ROUNDS = 10
DEADLINE_S = 30.0


class _Writer:
    """A `stream_writer.py` process whose stdout lines are collected by a thread."""

    def __init__(self, root: Path, log: Path, *args: str) -> None:
        self._log = open(log, "w")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(root), "v", "u", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.log = log
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.acks: list[int] = []
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self) -> str:
        try:
            line = self.lines.get(timeout=DEADLINE_S)
        except queue.Empty:
            raise AssertionError(f"the writer printed nothing for {DEADLINE_S} s") from None
        if line is None:
            raise AssertionError(f"the writer exited early: {self.log.read_text()[-3000:]}")
        if line.startswith("ack "):
            self.acks.append(int(line.split()[1]))
        return line

    def wait_for_acks(self, count: int) -> None:
        while len(self.acks) < count:
            self.next_line()

    def finish(self) -> list[str]:
        """Waits for the process and returns the lines it printed that were not read yet."""
        self.proc.wait(DEADLINE_S)
        self._thread.join(DEADLINE_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log.close()
        rest = []
        while (line := self.lines.get_nowait()) is not None:
            rest.append(line)
            if line.startswith("ack "):
                self.acks.append(int(line.split()[1]))
        return rest


def _check_stream(root: Path, at_least: int) -> int:
    """Reopens the stream, checks every step against the writer's data, returns its length."""
    store = Store(root)
    try:
        stream = store.open_stream("v", "u")
        length = stream.length
        assert length >= at_least, f"acked {at_least} steps but only {length} survived"
        got = stream.read(0, length)
        for g, w in zip(got, expected(0, length), strict=True):
            if not np.array_equal(g, w):
                bad = np.flatnonzero((g != w).reshape(g.shape[0], length, -1).any(axis=(0, 2)))
                raise AssertionError(f"steps {bad[:10]}... of {length} differ from what was acked")
        return length
    finally:
        store.close()


def test_kill_9_at_random_moments_loses_no_acked_step(tmp_path: Path) -> None:
    _kill_rounds(tmp_path, ROUNDS, seed=20250923, budget_s=100)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_soak(tmp_path: Path) -> None:
    _kill_rounds(tmp_path, 400, seed=int(time.time()), budget_s=880)


def _kill_rounds(tmp_path: Path, rounds: int, *, seed: int, budget_s: float) -> None:
    root = tmp_path / "root"
    Store(root).create_vault(
        "v", Schema.from_experience(experience_structure()), compression="none", chunk_steps=16
    )
    rng = np.random.default_rng(seed)
    length = 0
    started = time.monotonic()
    for round_ in range(rounds):
        # Every other round, log files of ~2 KiB: rotated and used again every few appends.
        small = ["--log-file-bytes", "2048"] if round_ % 2 == 0 else []
        writer = _Writer(root, tmp_path / f"writer-{round_}.log", "--seed", str(round_), *small)
        try:
            # A new writer resumes at the committed offset.
            assert writer.next_line() == f"start {length}"
            # Kill right after an ack, or a little later (mid-append, mid-commit), or before
            # anything was acked.
            if round_ % 4 != 3:
                writer.wait_for_acks(int(rng.integers(1, 60)))
            time.sleep(float(rng.uniform(0, 0.03)))
        finally:
            writer.proc.kill()
            writer.finish()
        last_ack = max(writer.acks, default=length)
        assert writer.acks == sorted(writer.acks)
        length = _check_stream(root, last_ack)
        assert length >= last_ack, f"seed {seed} round {round_}"
    # The stream is still writable to the end, from where it stopped.
    final = _Writer(root, tmp_path / "writer-final.log", "--stop", str(length + 100))
    assert final.next_line() == f"start {length}"
    rest = final.finish()
    assert final.proc.returncode == 0, final.log.read_text()[-3000:]
    assert rest[-1] == f"closed {length + 100}"
    assert _check_stream(root, length + 100) == length + 100
    assert length > 0
    assert time.monotonic() - started < budget_s
    # Closing moved everything into the arrays: the write-ahead log holds no file.
    wal = root / "v" / "u" / "wal"
    assert not os.listdir(wal) if wal.exists() else True
