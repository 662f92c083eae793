"""The cases of `expvault bench`, each measured with its reference in the same repetition.

Order of a run: the ceilings (disk, raw gRPC), in-process writes (expvault.Vault against
flashbax's Vault), then one `expvault serve` subprocess for the remote cases (4 actor processes,
one actor, write latency, full read against flashbax and the raw server stream, sampling), and
last the append cost as a stream grows (storage API, in process).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from expvault_server._bench_actors import ActorPool, actors_case
from expvault_server._bench_grpc import RawClient, raw_server
from expvault_server._served import ServeProcess
from expvault_server.bench import (
    BenchSettings,
    Payload,
    Progress,
    Result,
    paired_ratio,
    spread,
    summarise,
)

__all__ = ["run_all", "total_steps", "write_latency"]

_MB = 1e6
_DISK_BLOCK = 1 << 20
_DISK_FSYNC_EVERY = 16  # blocks between fsyncs: a group commit's worth of log
_READ_VAULT = "read"
_READ_UID = "s"
_GROWTH_CHUNK_STEPS = 256  # what the default payload gets (1 MiB of obs per chunk)
_GROWTH_BIG_APPEND = 1 << 20  # steps per append while growing the long stream


def total_steps(settings: BenchSettings) -> int:
    """Progress steps of a run: one per repetition of each case, plus set-up steps."""
    runs = settings.repeats + 1
    growth = -(-settings.growth_large_steps // _GROWTH_BIG_APPEND)
    # disk, grpc, 3 local writers, actors, 1 actor, latency (shared and pinned server), read,
    # sample, growth (both streams); the read vault's set-up; growing the long stream
    return runs * 12 + 1 + growth


def run_all(settings: BenchSettings, work: Path, progress: Progress) -> list[Result]:
    """Runs every case with its data under `work`; returns the results, ceilings first."""
    disk = _disk_ceiling(settings, work, progress)
    send, receive = _grpc_ceilings(settings, progress)
    local = _local_writes(settings, work, progress)
    remote = _remote_cases(settings, work, progress, disk, send, receive, local)
    growth = _append_growth(settings, work, progress)
    ceilings = [
        Result(
            "ceiling.grpc_client_stream",
            "ceiling: raw gRPC client stream, 1 MiB bytes messages to a discarding server",
            settings.repeats,
            summarise([{"mb_per_s": v} for v in send]),
            info={"mb": settings.ceiling_mb},
        ),
        Result(
            "ceiling.disk_fsync",
            "ceiling: the disk's sequential write with fsync, in --root",
            settings.repeats,
            summarise([{"mb_per_s": v} for v in disk]),
            info={
                "mb": settings.ceiling_mb,
                "fsync_every_mib": _DISK_FSYNC_EVERY * _DISK_BLOCK >> 20,
            },
        ),
        Result(
            "ceiling.grpc_server_stream",
            "ceiling: raw gRPC server stream, 1 MiB bytes messages to a counting client",
            settings.repeats,
            summarise([{"mb_per_s": v} for v in receive]),
            info={"mb": settings.ceiling_mb},
        ),
    ]
    return [*ceilings, *local["results"], *remote, growth]


# -- ceilings -------------------------------------------------------------------------------------


def _disk_ceiling(settings: BenchSettings, work: Path, progress: Progress) -> list[float]:
    """Sequential 1 MiB writes, fsync every 16 MiB and at the end; MB/s per measured run."""
    blocks = max(1, settings.ceiling_mb * 1_000_000 // _DISK_BLOCK)
    block = os.urandom(_DISK_BLOCK)
    out = []
    for run in range(settings.repeats + 1):
        path = work / f"disk-{run}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            t0 = time.perf_counter()
            for i in range(blocks):
                os.write(fd, block)
                if (i + 1) % _DISK_FSYNC_EVERY == 0:
                    os.fsync(fd)
            os.fsync(fd)
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
            path.unlink()
        if run:
            out.append(blocks * _DISK_BLOCK / elapsed / _MB)
        progress.step(f"disk ceiling, run {run}/{settings.repeats}")
    return out


def _grpc_ceilings(settings: BenchSettings, progress: Progress) -> tuple[list[float], list[float]]:
    """Raw gRPC client and server streams of 1 MiB messages; MB/s per measured run each."""
    total = settings.ceiling_mb * 1_000_000
    send, receive = [], []
    with raw_server() as (target, _), RawClient(target) as client:
        for run in range(settings.repeats + 1):
            nbytes = max(1, total // _DISK_BLOCK) * _DISK_BLOCK
            s = nbytes / client.send(_DISK_BLOCK, nbytes) / _MB
            r = nbytes / client.receive(_DISK_BLOCK, nbytes) / _MB
            if run:
                send.append(s)
                receive.append(r)
            progress.step(f"raw gRPC ceilings, run {run}/{settings.repeats}")
    return send, receive


# -- in-process writes ----------------------------------------------------------------------------


def _flashbax_vault(experience: Any, root: Path) -> Any:
    from flashbax.vault import Vault as FlashbaxVault

    with contextlib.redirect_stdout(io.StringIO()):  # flashbax prints on open
        return FlashbaxVault(
            "bench", experience_structure=experience, rel_dir=str(root), vault_uid="run"
        )


def _expvault_vault(compression: str | None) -> Callable[[Any, Path], Any]:
    def make(experience: Any, root: Path) -> Any:
        from expvault import Vault

        return Vault(
            "bench",
            experience_structure=experience,
            rel_dir=str(root),
            vault_uid="run",
            compression=compression,
        )

    return make


def _write_run(
    payload: Payload, make_vault: Callable[[Any, Path], Any], root: Path
) -> dict[str, float]:
    """Adds the payload's deltas to a flashbax buffer, writing after each; times the writes."""
    import jax

    from expvault.storage import files

    buffer = payload.buffer()
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(payload.example())
    vault = make_vault(state.experience, root)
    write_s = 0.0
    for delta in payload.deltas(seed=0):
        state = add(state, delta)
        jax.block_until_ready(state)  # type: ignore[no-untyped-call]
        t0 = time.perf_counter()
        vault.write(state)
        write_s += time.perf_counter() - t0
    if hasattr(vault, "close"):
        t0 = time.perf_counter()
        vault.close()  # writes the partial last chunk: part of the cost
        write_s += time.perf_counter() - t0
    steps = payload.writes * payload.delta_steps
    return {
        "steps_per_s": steps / write_s,
        "mb_per_s": steps * payload.step_bytes / write_s / _MB,
        "disk_bytes_per_byte": files.bytes_on_disk(root) / (steps * payload.step_bytes),
    }


def _local_writes(settings: BenchSettings, work: Path, progress: Progress) -> dict[str, Any]:
    """expvault.Vault (lz4, and no compression) against flashbax's Vault, same deltas."""
    writers: list[tuple[str, Callable[[Any, Path], Any]]] = [
        ("flashbax", _flashbax_vault),
        ("lz4", _expvault_vault(None)),
        ("none", _expvault_vault("none")),
    ]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _ in writers}
    for run in range(settings.repeats + 1):
        for name, make in writers:
            root = work / f"local-{name}-{run}"
            sample = _write_run(settings.payload, make, root)
            _remove(root)
            if run:
                samples[name].append(sample)
            progress.step(f"in-process writes ({name}), run {run}/{settings.repeats}")
    flashbax = [s["steps_per_s"] for s in samples["flashbax"]]
    info = {"steps_per_run": settings.payload.writes * settings.payload.delta_steps}
    vs = paired_ratio([s["steps_per_s"] for s in samples["lz4"]], flashbax)
    local = Result(
        "write.local",
        "in-process write, expvault.Vault (lz4, default), durable on return",
        settings.repeats,
        {
            **summarise([{k: s[k] for k in ("steps_per_s", "mb_per_s")} for s in samples["lz4"]]),
            "vs_flashbax": spread(vs),
        },
        target=">= 20x flashbax.vault.Vault.write steps/s",
        ok=spread(vs)[0] >= 20,
        info=info,
    )
    reference = Result(
        "ref.flashbax_write",
        "reference: flashbax.vault.Vault.write (gzip 5, its default)",
        settings.repeats,
        summarise(samples["flashbax"]),
        info=info,
    )
    disk = [s["disk_bytes_per_byte"] for s in samples["none"]]
    usage = Result(
        "disk.bytes_per_byte",
        "bytes on disk per byte appended, expvault.Vault without compression",
        settings.repeats,
        {
            "bytes_per_byte": spread(disk),
            "flashbax_bytes_per_byte": spread(
                [s["disk_bytes_per_byte"] for s in samples["flashbax"]]
            ),
        },
        target="<= 1.2 (no compression)",
        ok=spread(disk)[0] <= 1.2,
        info=info,
    )
    return {"results": [reference, local, usage], "flashbax_steps_per_s": flashbax}


# -- remote cases ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(root: Path, cpu: int | None = None) -> Iterator[tuple[str, int]]:
    """`expvault serve` as a subprocess on a free loopback port; yields `(target, pid)`.

    With `cpu`, every thread of the server is confined to that CPU once it listens (threads it
    starts later inherit it), as `taskset -c CPU expvault serve` would.
    """
    server = ServeProcess(root)
    try:
        if cpu is not None:
            pid = server.process.pid
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                    os.sched_setaffinity(int(tid), {cpu})
        yield server.target, server.process.pid
    finally:
        server.stop()


def _make_read_vault(settings: BenchSettings, root: Path) -> int:
    """Writes the vault the read and sample cases use, through the storage API; returns steps."""
    from expvault.schema import Schema
    from expvault.storage import Store

    payload = settings.payload
    block_steps = max(1, (64 << 20) // payload.step_bytes)  # 64 MiB of random steps, reused
    steps = max(block_steps, int(settings.read_mb * _MB // payload.step_bytes))
    state = payload.buffer().init(payload.example())
    schema = Schema.from_experience(state.experience)
    block = payload.arrays(np.random.default_rng(1), block_steps)
    store = Store(root)
    try:
        store.create_vault(_READ_VAULT, schema)
        stream = store.open_stream(_READ_VAULT, _READ_UID, create=True)
        arrays = stream.schema.flatten(block)  # the stored leaf order
        for lo in range(0, steps, block_steps):
            n = min(block_steps, steps - lo)
            stream.append(lo, [a[:, :n] for a in arrays])
    finally:
        store.close()  # materializes everything: flashbax reads it all
    return steps


def _remote_cases(
    settings: BenchSettings,
    work: Path,
    progress: Progress,
    disk: list[float],
    send: list[float],
    receive: list[float],
    local: dict[str, Any],
) -> list[Result]:
    root = work / "served"
    # The actor processes import JAX and compile while the read vault is written (not timed).
    with ActorPool(settings) as actors:
        read_steps = _make_read_vault(settings, root)
        progress.step(f"wrote the {read_steps * settings.payload.step_bytes / _MB:.0f} MB vault")
        with _server(root) as (target, pid):
            many = actors_case(settings, actors, target, pid, progress, disk, send)
            one = _one_actor_case(settings, target, progress, local["flashbax_steps_per_s"])
            latency = _latency_case(settings, target, progress)
            read = _read_case(settings, target, root, read_steps, progress, receive)
            sample = _sample_case(settings, target, read_steps, progress)
        # The same latency with the server on a core of its own, as on a host of its own.
        cpu = max(os.sched_getaffinity(0))
        with _server(work / "pinned", cpu=cpu) as (target, _):
            pinned = _latency_case(settings, target, progress, server_cpu=cpu)
    return [one, *many, latency, pinned, read, sample]


def _one_actor_case(
    settings: BenchSettings, target: str, progress: Progress, flashbax: list[float]
) -> Result:
    """One RemoteVault, `write()` waiting for each durable ack, against flashbax's write."""
    import jax

    from expvault import RemoteVault

    payload = settings.payload
    buffer = payload.buffer()
    add = jax.jit(buffer.add, donate_argnums=0)
    deltas = payload.deltas(seed=7)
    samples = []
    for run in range(settings.repeats + 1):
        state = add(buffer.init(payload.example()), deltas[0])  # a new stream: a new ring
        with RemoteVault(target, "one", state.experience, vault_uid=f"run-{run}") as vault:
            vault.write(state)  # the ring's current content: not timed
            write_s = 0.0
            for delta in deltas:
                state = add(state, delta)
                jax.block_until_ready(state)  # type: ignore[no-untyped-call]
                t0 = time.perf_counter()
                vault.write(state)
                write_s += time.perf_counter() - t0
        steps = payload.writes * payload.delta_steps
        if run:
            samples.append(
                {
                    "steps_per_s": steps / write_s,
                    "mb_per_s": steps * payload.step_bytes / write_s / _MB,
                }
            )
        progress.step(f"1 remote actor, durable writes, run {run}/{settings.repeats}")
    vs = paired_ratio([s["steps_per_s"] for s in samples], flashbax)
    return Result(
        "write.remote_1actor",
        "1 remote actor (RemoteVault), write() returns on the durable ack",
        settings.repeats,
        {**summarise(samples), "vs_flashbax": spread(vs)},
        target=">= 20x flashbax.vault.Vault.write steps/s",
        ok=spread(vs)[0] >= 20,
        info={"steps_per_run": payload.writes * payload.delta_steps},
    )


def write_latency(
    target: str,
    payload: Payload,
    writes: int,
    interval_s: float,
    *,
    vault_name: str = "latency",
    vault_uid: str = "a",
    warmup: int = 20,
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int]:
    """Times `writes` calls of `write(state, wait=False)`, one every `interval_s`, after a warm-up.

    The actor adds a delta with a jitted `buffer.add` (donating the state), waits for it, then
    times the write; the sender must keep up (`block_when_full=False`: a full queue raises).

    Returns:
        Wall seconds and the calling thread's CPU seconds per timed write, and the committed
        length after the final flush.
    """
    import jax

    from expvault import RemoteVault

    buffer = payload.buffer()
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(payload.example())
    deltas = payload.deltas(seed=3, count=8)
    wall, cpu = [], []
    with RemoteVault(
        target, vault_name, state.experience, vault_uid=vault_uid, block_when_full=False
    ) as vault:
        tick = time.perf_counter()
        for i in range(warmup + writes):
            state = add(state, deltas[i % len(deltas)])
            jax.block_until_ready(state)  # type: ignore[no-untyped-call]
            c0, t0 = time.thread_time(), time.perf_counter()
            vault.write(state, wait=False)
            elapsed, on_cpu = time.perf_counter() - t0, time.thread_time() - c0
            if i >= warmup:
                wall.append(elapsed)
                cpu.append(on_cpu)
            tick += interval_s
            time.sleep(max(0.0, tick - time.perf_counter()))
        committed = vault.flush()
    return np.asarray(wall), np.asarray(cpu), committed


def _latency_case(
    settings: BenchSettings, target: str, progress: Progress, server_cpu: int | None = None
) -> Result:
    """`write(wait=False)` latency; `server_cpu`: the server was confined to that CPU."""
    where = "" if server_cpu is None else f", server pinned to CPU {server_cpu}"
    title = "RemoteVault.write(state, wait=False) latency (wall; cpu_ = the caller's CPU time)"
    samples = []
    for run in range(settings.repeats + 1):
        wall, cpu, _ = write_latency(
            target,
            settings.payload,
            settings.latency_writes,
            settings.latency_interval_s,
            vault_uid=f"run-{run}",
        )
        if run:
            p50, p99 = np.percentile(wall, [50, 99]) * 1e3
            cpu50, cpu99 = np.percentile(cpu, [50, 99]) * 1e3
            samples.append(
                {
                    "p50_ms": float(p50),
                    "p99_ms": float(p99),
                    "max_ms": float(wall.max() * 1e3),
                    "cpu_p50_ms": float(cpu50),
                    "cpu_p99_ms": float(cpu99),
                }
            )
        progress.step(f"write(wait=False) latency{where}, run {run}/{settings.repeats}")
    metrics = summarise(samples)
    info: dict[str, Any] = {
        "writes_per_run": settings.latency_writes,
        "interval_ms": settings.latency_interval_s * 1e3,
    }
    if server_cpu is not None:
        info |= {"server_cpu": server_cpu, "cpus": len(os.sched_getaffinity(0))}
    return Result(
        "write.nowait_latency" + ("" if server_cpu is None else "_server_pinned"),
        title + where,
        settings.repeats,
        metrics,
        target="p99 < 1 ms",
        ok=metrics["p99_ms"][0] < 1,
        info=info,
    )


def _read_case(
    settings: BenchSettings,
    target: str,
    root: Path,
    steps: int,
    progress: Progress,
    ceiling: list[float],
) -> Result:
    """VaultReader.read of the whole read vault against flashbax's Vault.read of the same files."""
    import jax

    from expvault import VaultReader

    nbytes = steps * settings.payload.step_bytes
    samples = []
    with VaultReader(target, _READ_VAULT) as reader:
        for run in range(settings.repeats + 1):
            t0 = time.perf_counter()
            tree = reader.read(0, None, vault_uid=_READ_UID)
            remote_s = time.perf_counter() - t0
            got = int(jax.tree_util.tree_leaves(tree)[0].shape[1])
            del tree
            if got != steps:
                raise RuntimeError(f"VaultReader.read returned {got} steps, expected {steps}")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                from flashbax.vault import Vault as FlashbaxVault

                state = FlashbaxVault(_READ_VAULT, rel_dir=str(root), vault_uid=_READ_UID).read()
                jax.block_until_ready(state.experience)  # type: ignore[no-untyped-call]
            flashbax_s = time.perf_counter() - t0
            got = int(jax.tree_util.tree_leaves(state.experience)[0].shape[1])
            del state
            if got != steps:
                raise RuntimeError(f"flashbax read {got} steps, expected {steps}")
            if run:
                samples.append(
                    {
                        "mb_per_s": nbytes / remote_s / _MB,
                        "flashbax_mb_per_s": nbytes / flashbax_s / _MB,
                    }
                )
            progress.step(f"remote full read, run {run}/{settings.repeats}")
    remote = [s["mb_per_s"] for s in samples]
    vs_flashbax = paired_ratio(remote, [s["flashbax_mb_per_s"] for s in samples])
    vs_ceiling = paired_ratio(remote, ceiling)
    return Result(
        "read.remote_full",
        f"remote full read of a {nbytes / _MB:.0f} MB vault (VaultReader.read)",
        settings.repeats,
        {
            **summarise(samples),
            "vs_flashbax": spread(vs_flashbax),
            "ceiling_mb_per_s": spread(ceiling),
            "vs_ceiling": spread(vs_ceiling),
        },
        target=">= 2x flashbax.vault.Vault.read, >= 40% of the raw gRPC server stream",
        ok=spread(vs_flashbax)[0] >= 2 and spread(vs_ceiling)[0] >= 0.4,
        info={"vault_mb": round(nbytes / _MB, 1), "steps": steps},
    )


def _sample_case(settings: BenchSettings, target: str, steps: int, progress: Progress) -> Result:
    """`VaultReader.sample(32, 64)` on the read vault: calls one after another, then `sample_iter`.

    The iterator (its default prefetch and workers) is timed as a learner's loop takes batches.
    """
    from expvault import VaultReader

    samples = []
    with VaultReader(target, _READ_VAULT) as reader:
        for run in range(settings.repeats + 1):
            times = []
            for i in range(settings.sample_batches):
                t0 = time.perf_counter()
                reader.sample(32, 64, seed=run * 100_000 + i)
                times.append(time.perf_counter() - t0)
            with reader.sample_iter(32, 64, seed=run) as batches:
                next(batches)  # the first batch waits for a whole call: not timed
                t0 = time.perf_counter()
                for _ in range(settings.sample_batches):
                    next(batches)
                iter_s = time.perf_counter() - t0
            if run:
                p50, p99 = np.percentile(times, [50, 99]) * 1e3
                samples.append(
                    {
                        "batches_per_s": len(times) / sum(times),
                        "p50_ms": float(p50),
                        "p99_ms": float(p99),
                        "iter_batches_per_s": settings.sample_batches / iter_s,
                    }
                )
            progress.step(f"sample 32 x 64, run {run}/{settings.repeats}")
    metrics = summarise(samples)
    return Result(
        "sample.32x64",
        "VaultReader.sample(batch_size=32, sequence_length=64), one call after another "
        "(iter_: through sample_iter)",
        settings.repeats,
        metrics,
        target=">= 200 batches/s",
        ok=metrics["batches_per_s"][0] >= 200,
        info={
            "vault_mb": round(steps * settings.payload.step_bytes / _MB, 1),
            "batches_per_run": settings.sample_batches,
        },
    )


# -- append cost as the stream grows --------------------------------------------------------------


def _append_growth(settings: BenchSettings, work: Path, progress: Progress) -> Result:
    """Per-step cost of small appends to a short stream and to a long one, storage API.

    The long stream would take 11.7 GB at 10 M steps of the default payload; so this case keeps
    the leaves and the default payload's chunking (256 steps per time chunk) with B=1 and obs
    (1,), 13 bytes per step: 10 M steps make the same number of chunks (and OCDBT entries) as
    the default payload would, in 130 MB. Each run times `growth_appends` appends of
    `delta_steps` steps, each waiting for its durable ack, and the materialization of the chunks
    they fill (`flush`).
    """
    from expvault.schema import Schema
    from expvault.storage import Store

    tiny = Payload(envs=1, obs_dim=1, delta_steps=settings.payload.delta_steps)
    schema = Schema.from_experience(tiny.arrays(np.random.default_rng(0), 1))
    rng = np.random.default_rng(5)
    big_steps = _GROWTH_BIG_APPEND
    root = work / "growth"
    store = Store(root)
    try:
        info, _ = store.create_vault(
            "growth", schema, compression="none", chunk_steps=_GROWTH_CHUNK_STEPS
        )
        delta = info.schema.flatten(tiny.arrays(rng, tiny.delta_steps))  # the stored leaf order
        big = info.schema.flatten(tiny.arrays(rng, big_steps))
        stream = store.open_stream("growth", "long", create=True)
        length = 0
        while length < settings.growth_large_steps:
            length = _grow(
                stream, length, min(settings.growth_large_steps, length + big_steps), big
            )
            stream.flush()
            progress.step(f"grew a stream to {length:,} steps")
        # Each run times the short stream, then the long one: a pair under the same conditions
        # (the machine's load drifts over a run; the ratio is taken per pair).
        short: list[float] = []
        long: list[float] = []
        for run in range(settings.repeats + 1):
            fresh = store.open_stream("growth", f"short-{run}", create=True)
            start = _grow(fresh, 0, settings.growth_small_steps, big)
            short_s = _time_appends(fresh, start, delta, settings.growth_appends)
            long_s = _time_appends(stream, stream.length, delta, settings.growth_appends)
            if run:
                short.append(short_s)
                long.append(long_s)
            progress.step(
                f"append cost at {settings.growth_small_steps:,} and "
                f"{settings.growth_large_steps:,} steps, run {run}"
            )
    finally:
        store.close()
    ratio = paired_ratio(long, short)
    return Result(
        "append.growth",
        f"append cost per step at {settings.growth_small_steps:,} vs "
        f"{settings.growth_large_steps:,} steps of one stream (storage API)",
        settings.repeats,
        {
            "short_us_per_step": spread([s * 1e6 for s in short]),
            "long_us_per_step": spread([s * 1e6 for s in long]),
            "long_vs_short": spread(ratio),
        },
        target="long within 15% of short (long_vs_short <= 1.15)",
        ok=spread(ratio)[0] <= 1.15,
        info={
            "step_bytes": tiny.step_bytes,
            "chunk_steps": _GROWTH_CHUNK_STEPS,
            "appends_per_run": settings.growth_appends,
            "long_chunks_per_leaf": settings.growth_large_steps // _GROWTH_CHUNK_STEPS,
        },
    )


def _grow(stream: Any, start: int, stop: int, big: list[np.ndarray[Any, Any]]) -> int:
    """Appends steps `[start, stop)` in big appends (values from `big`, repeated)."""
    position = start
    while position < stop:
        n = min(stop - position, int(big[0].shape[1]))
        stream.append(position, [a[:, :n] for a in big])
        position += n
    return position


def _time_appends(stream: Any, start: int, delta: list[np.ndarray[Any, Any]], count: int) -> float:
    """Seconds per step of `count` durable appends of `delta` and their materialization."""
    steps = int(delta[0].shape[1])
    stream.flush()
    t0 = time.perf_counter()
    for i in range(count):
        stream.append(start + i * steps, delta)
    stream.flush()
    return (time.perf_counter() - t0) / (count * steps)


# -- helpers --------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
