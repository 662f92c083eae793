"""`RemoteVault.write(state, wait=False)` latency on the benchmark payload, `expvault serve`.

A slow benchmark (`pytest -m slow -s tests/client/test_write_latency.py`): an actor adds 128-step
deltas (B=16; per step obs float32 (64,), int32 action, float32 reward, bool done) to a flashbax
trajectory buffer of 1024 steps with `jax.jit(buffer.add, donate_argnums=0)`, one every
`INTERVAL_S`, and times `write(state, wait=False)` after `block_until_ready` of the state. The
server is a subprocess; the sender must keep up (a write raises if `max_pending_bytes` fill).

It prints p50/p99/max of the wall time, and of the writing thread's CPU time (what the client
spends; the rest is waiting for a CPU). The target is a p99 under 1 ms; the test asserts only a
p50 under `P50_LIMIT_S`, as the p99 on a small shared machine measures its other tenants.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flashbax as fbx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ServerProcess
from expvault import RemoteVault, VaultReader

ENVS, OBS_DIM, DELTA, RING = 16, 64, 128, 1024
WRITES, WARMUP = 600, 50
INTERVAL_S = 0.004
P50_LIMIT_S = 0.001


class Transition(NamedTuple):
    obs: Any
    action: Any
    reward: Any
    done: Any


def _deltas(count: int) -> list[Transition]:
    rng = np.random.default_rng(0)
    shape = (ENVS, DELTA)
    return [
        Transition(
            obs=jnp.asarray(rng.standard_normal((*shape, OBS_DIM), np.float32)),
            action=jnp.asarray(rng.integers(0, 16, shape, np.int32)),
            reward=jnp.asarray(rng.standard_normal(shape, np.float32)),
            done=jnp.asarray(rng.random(shape) < 0.01),
        )
        for _ in range(count)
    ]


def measure(
    target: str, writes: int = WRITES, interval_s: float = INTERVAL_S
) -> tuple[np.ndarray, np.ndarray]:
    """Times `writes` non-blocking writes (after a warm-up).

    Returns:
        Wall seconds and the writing thread's CPU seconds, per write.
    """
    buffer = fbx.make_trajectory_buffer(
        add_batch_size=ENVS,
        max_length_time_axis=RING,
        min_length_time_axis=1,
        sample_batch_size=1,
        sample_sequence_length=1,
        period=1,
    )
    add = jax.jit(buffer.add, donate_argnums=0)
    example = Transition(
        obs=jnp.zeros((OBS_DIM,), jnp.float32),
        action=jnp.zeros((), jnp.int32),
        reward=jnp.zeros((), jnp.float32),
        done=jnp.zeros((), jnp.bool_),
    )
    state = buffer.init(example)
    deltas = _deltas(8)
    times: list[float] = []
    cpu_times: list[float] = []
    with RemoteVault(
        target, "latency", state.experience, vault_uid="a", block_when_full=False
    ) as vault:
        tick = time.perf_counter()
        for i in range(WARMUP + writes):
            state = add(state, deltas[i % len(deltas)])
            jax.block_until_ready(state)
            c0, t0 = time.thread_time(), time.perf_counter()
            vault.write(state, wait=False)  # raises ResourceExhaustedError if the sender lags
            elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if i >= WARMUP:
                times.append(elapsed)
                cpu_times.append(cpu)
            tick += interval_s
            time.sleep(max(0.0, tick - time.perf_counter()))
        total = vault.flush()
    assert total == (WARMUP + writes) * DELTA
    return np.asarray(times), np.asarray(cpu_times)


@pytest.mark.slow
def test_write_wait_false_p99(spawn_server: Callable[..., ServerProcess]) -> None:
    server = spawn_server()
    times, cpu_times = measure(server.target)
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    cpu50, cpu99 = np.percentile(cpu_times, [50, 99]) * 1e3
    print(
        f"\nwrite(wait=False), {DELTA} steps x {ENVS} envs every {INTERVAL_S * 1e3:.0f} ms, "
        f"{len(times)} writes: p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {times.max() * 1e3:.3f} ms;"
        f" on-CPU p50 {cpu50:.3f} ms, p99 {cpu99:.3f} ms"
    )
    with VaultReader(server.target, "latency") as reader:
        assert reader.streams() == {"a": (WARMUP + WRITES) * DELTA}
    assert p50 < P50_LIMIT_S * 1e3
