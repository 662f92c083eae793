"""`RemoteVault.write(state, wait=False)` latency on the benchmark payload, `expvault serve`.

A slow benchmark (`pytest -m slow -s tests/client/test_write_latency.py`), the measurement of
`expvault bench`'s `write.nowait_latency` case: an actor adds 128-step deltas (B=16; per step obs
float32 (64,), int32 action, float32 reward, bool done) to a flashbax trajectory buffer of 1024
steps with `jax.jit(buffer.add, donate_argnums=0)`, one every `INTERVAL_S`, and times
`write(state, wait=False)` after `block_until_ready` of the state. The server is a subprocess;
the sender must keep up (a write raises if `max_pending_bytes` fill).

It prints p50/p99/max of the wall time, and of the writing thread's CPU time (what the client
spends; the rest is waiting for a CPU). The target is a p99 under 1 ms; the test asserts only a
p50 under `P50_LIMIT_S`, as the p99 on a small shared machine measures its other tenants.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from conftest import ServerProcess
from expvault import VaultReader
from expvault_server._bench_cases import write_latency
from expvault_server.bench import Payload

WRITES, WARMUP = 600, 50
INTERVAL_S = 0.004
P50_LIMIT_S = 0.001


@pytest.mark.slow
def test_write_wait_false_p99(spawn_server: Callable[..., ServerProcess]) -> None:
    server = spawn_server()
    payload = Payload()
    times, cpu_times, committed = write_latency(
        server.target, payload, WRITES, INTERVAL_S, warmup=WARMUP
    )
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    cpu50, cpu99 = np.percentile(cpu_times, [50, 99]) * 1e3
    print(
        f"\nwrite(wait=False), {payload.delta_steps} steps x {payload.envs} envs every "
        f"{INTERVAL_S * 1e3:.0f} ms, {len(times)} writes: p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
        f"max {times.max() * 1e3:.3f} ms; on-CPU p50 {cpu50:.3f} ms, p99 {cpu99:.3f} ms"
    )
    assert len(times) == WRITES
    assert committed == (WARMUP + WRITES) * payload.delta_steps
    with VaultReader(server.target, "latency") as reader:
        assert reader.streams() == {"a": committed}
    assert p50 < P50_LIMIT_S * 1e3
