"""Server fixtures: a real grpc.aio server in a thread, and `expvault serve` as a subprocess.

Both bind port 0 and report the port the OS chose (no pick-then-bind races). Data lives under
`tmp_path`. Also the experience the service tests write: every value a function of its stream
offset, so a lost, repeated or torn step never compares equal.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import flashbax as fbx
import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expvault.storage import Store
from expvault_server.app import VaultServer
from expvault_server.config import ServerConfig

BATCH = 2
OBS = (3,)


class Step(NamedTuple):
    """The test experience: leaves `(B, T, ...)`."""

    obs: Any
    action: Any
    reward: Any


def experience(start: int, stop: int) -> Step:
    """Steps `[start, stop)` of a stream: numpy leaves `(BATCH, stop - start, ...)`."""
    t = np.arange(start, stop, dtype=np.int64)[None, :]
    row = np.arange(BATCH, dtype=np.int64)[:, None]
    code = t * BATCH + row
    obs = (code[..., None] * 10 + np.arange(OBS[0])).astype(np.float32)
    return Step(obs=obs, action=(code % 7).astype(np.int32), reward=(code * 0.5).astype(np.float32))


RING = 16


class Actor:
    """A flashbax trajectory buffer (ring of `RING` steps) stepping `experience` into its ring."""

    def __init__(self, steps: int = 0) -> None:
        self.buffer = fbx.make_trajectory_buffer(
            add_batch_size=BATCH,
            max_length_time_axis=RING,
            min_length_time_axis=1,
            sample_batch_size=1,
            sample_sequence_length=1,
            period=1,
        )
        first = jax.tree_util.tree_map(lambda x: jnp.asarray(x[0, 0]), experience(0, 1))
        self.state = self.buffer.init(first)
        self.steps = steps
        self._add = jax.jit(self.buffer.add)

    def add(self, n: int) -> Any:
        """Adds the next `n` steps; returns the new buffer state."""
        batch = jax.tree_util.tree_map(jnp.asarray, experience(self.steps, self.steps + n))
        self.state = self._add(self.state, batch)
        self.steps += n
        return self.state


def structure() -> Step:
    """An experience structure with a ring of 16 steps."""
    return experience(0, 16)


def full_buffer(experience: Any) -> Any:
    """A flashbax state whose full ring holds `experience` (leaves `(B, T, ...)`), on the device."""
    from flashbax.buffers.trajectory_buffer import TrajectoryBufferState

    return TrajectoryBufferState(
        experience=jax.tree.map(jnp.asarray, experience),
        current_index=jnp.array(0),
        is_full=jnp.array(True),
    )


def concat_time(*trees: Any) -> Any:
    """Experience pytrees joined along the time axis (axis 1)."""
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *trees)


def assert_experience(got: Any, start: int, stop: int) -> None:
    """Checks a pytree (NamedTuple or dict, numpy or jax leaves) against `experience`."""
    want = experience(start, stop)
    get = (lambda k: got[k]) if isinstance(got, dict) else (lambda k: getattr(got, k))
    for key in Step._fields:
        np.testing.assert_array_equal(np.asarray(get(key)), getattr(want, key), err_msg=key)


# -- in-process server ---------------------------------------------------------------------------


class ServerThread:
    """A `VaultServer` on its own event loop in a thread, so tests can use blocking clients."""

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server = VaultServer(config, store)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self.run(self.server.start())

    def run(self, coro: Any, timeout_s: float = 30) -> Any:
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def servicer(self) -> Any:
        return self.server._servicer

    def stop(self, grace_s: float = 5) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.server.stop(grace_s), timeout_s=grace_s + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Starts in-process servers on free loopback ports; `make_server(**config)`."""
    servers: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        settings: dict[str, Any] = {
            "root": tmp_path / "vaults",
            "listen": "127.0.0.1:0",
            "shutdown_grace_s": 5.0,
        }
        settings.update(overrides)
        server = ServerThread(ServerConfig(**settings))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    """One in-process server with data under `tmp_path / "vaults"`."""
    return make_server()


# -- subprocess server ---------------------------------------------------------------------------

_SERVING = re.compile(r"expvault serving on (\S+):(\d+) root=")


def wait_healthy(target: str, timeout_s: float = 30) -> None:
    """Polls the health service until SERVING or the deadline."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not serving after {timeout_s} s")
            time.sleep(0.05)


class ServerProcess:
    """`expvault serve --listen 127.0.0.1:PORT --root ROOT` in a subprocess; its log is kept."""

    def __init__(self, root: Path, port: int = 0, *extra: str) -> None:
        self.root = root
        self.lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("EXPVAULT_ROOT", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "expvault_server.cli",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--root",
                str(root),
                "--shutdown-grace-s",
                "10",
                *extra,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        self.port = self._wait_for_port(timeout_s=60)
        self.target = f"127.0.0.1:{self.port}"
        wait_healthy(self.target)

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_port(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"no 'serving on' line after {timeout_s} s: {self.log}"
                ) from None
            if line is None:
                raise RuntimeError(f"server exited with {self.process.wait()}: {self.log}")
            self.lines.append(line)
            if m := _SERVING.search(line):
                return int(m.group(2))

    @property
    def log(self) -> str:
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)

    def kill(self) -> None:
        """kill -9."""
        self.process.kill()
        self._reap(10)

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self._reap(timeout_s)

    def _reap(self, timeout_s: float) -> int:
        status = self.process.wait(timeout_s)
        self._pump_thread.join(10)
        _ = self.log
        if self.process.stderr is not None:
            self.process.stderr.close()
        return status


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts `expvault serve` subprocesses (`spawn_server(root, port)`); kills leftovers."""
    processes: list[ServerProcess] = []

    def spawn(root: Path | None = None, port: int = 0, *extra: str) -> ServerProcess:
        process = ServerProcess(root or tmp_path / "vaults", port, *extra)
        processes.append(process)
        return process

    yield spawn
    for p in processes:
        if p.process.poll() is None:
            p.kill()
