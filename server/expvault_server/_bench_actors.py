"""The aggregate case of `expvault bench`: actor processes streaming to one server at once.

Each actor is its own process (spawned: JAX does not fork), with a flashbax buffer, a compiled
`buffer.add` and a `RemoteVault` writing with `wait=False`. The processes start early, so that
importing JAX and compiling overlap the benchmark's set-up rather than its measurements.
"""

from __future__ import annotations

import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

from expvault_server._served import process_memory
from expvault_server.bench import (
    BenchSettings,
    Payload,
    Progress,
    Result,
    paired_ratio,
    spread,
    summarise,
)

__all__ = ["ActorPool", "actors_case"]

_MB = 1e6


def _actor_main(index: int, payload: Payload, deltas: int, commands: Any, results: Any) -> None:
    """An actor process, streaming `deltas` deltas to each vault named on `commands`.

    Sets up (JAX, a compiled `buffer.add`, the deltas), then takes the server's address from
    `commands`. Per vault: a fresh buffer and its first write (untimed), `("ready", index)` on
    `results`; then on "go", `deltas` writes with `wait=False` and a flush, and `("done", index,
    t0, t1, bytes)`. Errors go to `results` as `("error", index, traceback)`.
    """
    try:
        import jax

        from expvault import RemoteVault

        buffer = payload.buffer()
        add = jax.jit(buffer.add, donate_argnums=0)
        distinct = payload.deltas(seed=100 + index, count=min(deltas, 8))  # cycled: small memory
        jax.block_until_ready(add(buffer.init(payload.example()), distinct[0]))  # type: ignore[no-untyped-call]
        target = commands.get()
        if target is None:  # the run ended before it started (its error is raised there)
            return
        while (vault_name := commands.get()) is not None:
            state = add(buffer.init(payload.example()), distinct[0])  # a new stream: a new ring
            uid = f"actor-{index}"
            with RemoteVault(target, vault_name, state.experience, vault_uid=uid) as vault:
                vault.write(state)
                primed = vault.flush()
                results.put(("ready", index))
                if commands.get() != "go":
                    return
                t0 = time.perf_counter()
                for i in range(deltas):
                    state = add(state, distinct[i % len(distinct)])
                    vault.write(state, wait=False)
                committed = vault.flush()
                t1 = time.perf_counter()
            results.put(("done", index, t0, t1, (committed - primed) * payload.step_bytes))
    except BaseException:
        results.put(("error", index, traceback.format_exc()))


def _collect(
    results: Any, kind: str, count: int, processes: list[Any], on_wait: Callable[[], None]
) -> list[tuple[Any, ...]]:
    """Gets `count` messages of `kind` from the actors, calling `on_wait` while waiting.

    Raises:
        RuntimeError: an actor failed (its traceback), died, or took over 600 s.
    """
    got: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + 600
    while len(got) < count:
        on_wait()
        try:
            message = results.get(timeout=0.05)
        except queue.Empty:
            if not all(p.is_alive() for p in processes):
                raise RuntimeError("an actor process died") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the actors did not finish within 600 s ({kind})") from None
            continue
        if message[0] == "error":
            raise RuntimeError(f"actor {message[1]} failed:\n{message[2]}")
        if message[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the actors, got {message!r}")
        got.append(message)
    return got


class ActorPool:
    """The actor processes of the aggregate case, spawned early (JAX takes seconds to start)."""

    def __init__(self, settings: BenchSettings) -> None:
        import multiprocessing as mp

        payload = settings.payload
        self.count = settings.actors
        self.deltas = max(1, round(settings.actors_mb * _MB / self.count / payload.delta_bytes))
        ctx = mp.get_context("spawn")
        self.commands = [ctx.Queue() for _ in range(self.count)]
        self.results = ctx.Queue()
        self.processes = [
            ctx.Process(
                target=_actor_main,
                args=(a, payload, self.deltas, self.commands[a], self.results),
                daemon=True,
            )
            for a in range(self.count)
        ]
        for process in self.processes:
            process.start()

    def send(self, command: str | None) -> None:
        """Puts `command` on every actor's queue."""
        for commands in self.commands:
            commands.put(command)

    def collect(self, kind: str, on_wait: Callable[[], None] = lambda: None) -> list[Any]:
        """One message of `kind` from each actor (see `_collect`)."""
        return _collect(self.results, kind, self.count, self.processes, on_wait)

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.send(None)
        for process in self.processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


def actors_case(
    settings: BenchSettings,
    actors: ActorPool,
    target: str,
    pid: int,
    progress: Progress,
    disk: list[float],
    send: list[float],
) -> list[Result]:
    """`actors` processes stream `actors_mb` together, durable; aggregate MB/s and server RSS."""
    actors.send(target)
    samples = []
    for run in range(settings.repeats + 1):
        vault_name = f"actors-{run}"
        actors.send(vault_name)
        actors.collect("ready")
        rss_before = peak = _rss_mb(pid)
        actors.send("go")

        def watch_rss() -> None:
            nonlocal peak
            peak = max(peak, _rss_mb(pid))

        spans = actors.collect("done", watch_rss)
        elapsed = max(s[3] for s in spans) - min(s[2] for s in spans)
        nbytes = sum(s[4] for s in spans)
        if run:
            samples.append(
                {
                    "mb_per_s": nbytes / elapsed / _MB,
                    "rss_peak_mb": peak,
                    "rss_before_mb": rss_before,
                    "streamed_mb": nbytes / _MB,
                }
            )
        _delete_vault(target, vault_name)  # frees the disk for the next run
        progress.step(f"{settings.actors} remote actors, run {run}/{settings.repeats}")
    ceiling = [min(d, s) for d, s in zip(disk, send, strict=True)]
    vs = paired_ratio([s["mb_per_s"] for s in samples], ceiling)
    aggregate = Result(
        "write.remote_actors",
        f"{settings.actors} remote actor processes (RemoteVault), aggregate, durable acks",
        settings.repeats,
        {
            "mb_per_s": spread([s["mb_per_s"] for s in samples]),
            "ceiling_mb_per_s": spread(ceiling),
            "vs_ceiling": spread(vs),
        },
        target=">= 50% of the lower ceiling (raw gRPC client stream, disk with fsync)",
        ok=spread(vs)[0] >= 0.5,
        info={"actors": settings.actors, "deltas_per_actor": actors.deltas},
    )
    rss = Result(
        "server.rss",
        f"server RSS while {settings.actors} actors stream {settings.actors_mb} MB",
        settings.repeats,
        summarise(
            [{k: s[k] for k in ("rss_peak_mb", "rss_before_mb", "streamed_mb")} for s in samples]
        ),
        target="peak < 1000 MB",
        ok=max(s["rss_peak_mb"] for s in samples) < 1000,
        info={"actors": settings.actors},
    )
    return [aggregate, rss]


def _rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (`VmRSS`); 0 when unreadable."""
    return process_memory(pid)[0] / _MB


def _delete_vault(target: str, vault_name: str) -> None:
    """Deletes a vault (frees the disk between runs), retrying while its writers detach."""
    import grpc

    from expvault._rpc import channel_options
    from expvault.v1 import vault_pb2, vault_pb2_grpc

    deadline = time.monotonic() + 30
    with grpc.insecure_channel(target, options=channel_options()) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        while True:
            try:
                stub.DeleteVault(vault_pb2.DeleteVaultRequest(vault_name=vault_name), timeout=60)
                return
            except grpc.RpcError as e:  # the writers' calls may still be ending
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
