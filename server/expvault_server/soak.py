"""The soak test: many actor processes and learners against one `expvault serve`, for a set time.

    python -m expvault_server.soak --writers 16 --readers 4 --duration-s 60

It starts `expvault serve` on a free loopback port over a temporary root (or `--root`), with the
in-flight limits given, then `--writers` actor processes, each stepping a flashbax trajectory
buffer and writing every delta with `RemoteVault.write` (which returns once the server
acknowledged the steps as durable: that wait is the ack latency), and `--readers` learner
processes, alternately following every stream (`VaultReader.follow`, checking that each stream's
steps arrive once and in order) and drawing samples. It samples the server's resident memory from
`/proc/PID/status` throughout. It reports throughput (steps/s, MB/s of payload acknowledged while
every process ran), p50/p99 ack latency, errors, and peak server RSS against a bound derived from
the limits; it exits 1 on any error or an RSS above the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from expvault_server._served import ServeProcess

__all__ = ["SoakResult", "SoakSettings", "main", "rss_bound_bytes", "run_soak", "summary"]

_MIB = 1 << 20
# Memory not tied to a limit: gRPC's transport buffers, thread stacks, allocator slack.
_SLACK_BYTES = 256 * _MIB
# Per stream written: the time chunk a stream may always hold in the log beyond `max_log_bytes`
# (about 1 MiB here) and its gRPC flow-control window.
_PER_STREAM_BYTES = 8 * _MIB


@dataclass(frozen=True)
class SoakSettings:
    """What the soak runs (see `python -m expvault_server.soak --help`)."""

    writers: int = 16
    readers: int = 4
    duration_s: float = 60.0
    envs: int = 16
    obs_dim: int = 64
    delta_steps: int = 128
    buffer_steps: int = 1024
    max_inflight_bytes: int = 64 * _MIB
    max_inflight_bytes_per_stream: int = 8 * _MIB
    max_read_buffer_bytes: int = 64 * _MIB
    max_log_bytes: int = 64 * _MIB
    cache_bytes: int = 256 * _MIB
    small_chunk_cache_bytes: int = 32 * _MIB
    message_bytes: int = 1 * _MIB
    root: Path | None = None
    startup_timeout_s: float = 180.0

    @property
    def followers(self) -> int:
        """Readers that follow every stream (the others draw samples)."""
        return (self.readers + 1) // 2

    @property
    def step_bytes(self) -> int:
        """Payload bytes of one time step across the batch (obs float32, action, reward, done)."""
        return self.envs * (4 * self.obs_dim + 4 + 4 + 1)


@dataclass(frozen=True)
class SoakResult:
    """What a soak measured. Rates count steps acknowledged while every process ran."""

    settings: SoakSettings
    measured_s: float
    steps_acked: int
    steps_per_s: float
    mb_per_s: float
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    writes: int
    followed_steps: int
    samples: int
    baseline_rss_bytes: int
    peak_rss_bytes: int
    rss_bound_bytes: int
    rss_by_quarter_bytes: tuple[int, ...] = ()
    errors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """No error, and the server's memory stayed within its bound."""
        return not self.errors and self.peak_rss_bytes <= self.rss_bound_bytes

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        out = dataclasses.asdict(self)
        out["settings"] = {
            k: str(v) if isinstance(v, Path) else v for k, v in out["settings"].items()
        }
        out["errors"] = list(self.errors)
        out["ok"] = self.ok
        return out


def rss_bound_bytes(settings: SoakSettings, baseline_rss_bytes: int) -> int:
    """The most resident memory a healthy server may use under the soak.

    The idle server's memory, plus, each from a server setting: twice `max_inflight_bytes`
    (chunks as received, and merged into a group commit); three times the log held in memory,
    `max_log_bytes` plus a chunk per stream (the log's arrays, and tensorstore's chunk buffers
    and their encoded form while a transaction moves them into the arrays); twice
    `max_read_buffer_bytes` (steps read as arrays, then encoded into messages); `cache_bytes`
    and `small_chunk_cache_bytes`;
    per stream written, its flow-control window; per sampler, a few messages; and a fixed slack.
    Nothing here grows with time, with the data stored, or with the number of readers' streams.
    """
    samplers = settings.readers - settings.followers
    return (
        baseline_rss_bytes
        + 2 * settings.max_inflight_bytes
        + 3 * (settings.max_log_bytes + settings.writers * _PER_STREAM_BYTES)
        + 2 * settings.max_read_buffer_bytes
        + settings.cache_bytes
        + settings.small_chunk_cache_bytes
        + samplers * 4 * settings.message_bytes
        + _SLACK_BYTES
    )


# -- processes ------------------------------------------------------------------------------------


def _writer(index: int, settings: SoakSettings, target: str, vault: str, events: Any) -> None:
    """An actor: steps random deltas into a flashbax buffer and writes each, waiting for acks."""
    try:
        import flashbax as fbx
        import jax
        import jax.numpy as jnp

        import expvault

        envs, steps = settings.envs, settings.delta_steps
        buffer = fbx.make_trajectory_buffer(
            add_batch_size=envs,
            max_length_time_axis=settings.buffer_steps,
            min_length_time_axis=1,
            sample_batch_size=1,
            sample_sequence_length=1,
            period=1,
        )
        example = {
            "obs": jnp.zeros((settings.obs_dim,), jnp.float32),
            "action": jnp.zeros((), jnp.int32),
            "reward": jnp.zeros((), jnp.float32),
            "done": jnp.zeros((), jnp.bool_),
        }
        add = jax.jit(buffer.add, donate_argnums=0)
        rng = np.random.default_rng(index)
        deltas = [  # a few random deltas, reused: the server cannot tell
            {
                "obs": jnp.asarray(
                    rng.standard_normal((envs, steps, settings.obs_dim), np.float32)
                ),
                "action": jnp.asarray(rng.integers(0, 16, (envs, steps), np.int32)),
                "reward": jnp.asarray(rng.standard_normal((envs, steps), np.float32)),
                "done": jnp.asarray(rng.random((envs, steps)) < 0.01),
            }
            for _ in range(4)
        ]
        state = buffer.init(example)
        latencies: list[float] = []
        acked = 0
        with expvault.RemoteVault(
            target, vault, state.experience, vault_uid=f"writer-{index}", compression="lz4"
        ) as remote:
            state = add(state, deltas[0])
            remote.write(state)  # warm: compiled, connected
            events.put(("ready", "writer", index))
            while not _flag("go"):
                time.sleep(0.01)
            n = 0
            while not _flag("stop"):
                n += 1
                state = add(state, deltas[n % len(deltas)])
                started = time.perf_counter()
                acked += remote.write(state)
                latencies.append(time.perf_counter() - started)
            committed = remote.flush()
        events.put(("writer", index, acked, latencies, committed))
    except BaseException as error:  # reported, never silent
        events.put(("error", f"writer-{index}: {type(error).__name__}: {error}"))


def _reader(index: int, settings: SoakSettings, target: str, vault: str, events: Any) -> None:
    """A learner: follows every stream (even index) or draws samples (odd index) until stopped."""
    try:
        import expvault

        count = 0
        positions: dict[str, int] = {}
        with expvault.VaultReader(target, vault) as reader:
            events.put(("ready", "reader", index))
            if index % 2 == 0:
                follow = reader.follow(all_streams=True)
                stopper = threading.Thread(
                    target=_close_when_stopped, args=(events, reader), daemon=True
                )
                stopper.start()
                try:
                    for uid, start, _experience in follow:
                        if start != positions.get(uid, 0):
                            events.put(
                                ("error", f"follower-{index}: {uid} resumed at {start}, expected "
                                 f"{positions.get(uid, 0)}")
                            )  # fmt: skip
                            return
                        steps = _steps_of(_experience)
                        positions[uid] = start + steps
                        count += steps
                except Exception:  # closing the reader ends the follow call with an error
                    if not _flag("stop"):
                        raise
            else:
                while not _flag("stop"):
                    batch = reader.sample(32, 16)
                    obs = batch.experience["obs"]
                    if obs.shape[:2] != (32, 16):
                        events.put(("error", f"sampler-{index}: sample of shape {obs.shape}"))
                        return
                    count += 1
        events.put(("reader", index, count, positions))
    except BaseException as error:
        events.put(("error", f"reader-{index}: {type(error).__name__}: {error}"))


def _steps_of(experience: Any) -> int:
    """Time steps in a followed item: axis 1 of any leaf."""
    import jax

    return int(jax.tree_util.tree_leaves(experience)[0].shape[1])


def _close_when_stopped(events: Any, reader: Any) -> None:
    while not _flag("stop"):
        time.sleep(0.05)
    reader.close()  # ends the follow call


_FLAGS: dict[str, Any] = {}


def _flag(name: str) -> bool:
    """Whether the parent set flag `name` (`go`, `stop`: events handed to `_child`)."""
    flag = _FLAGS.get(name)
    return bool(flag is not None and flag.is_set())


def _child(
    role: str, index: int, settings: SoakSettings, target: str, vault: str, events: Any, flags: Any
) -> None:
    _FLAGS.update(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    (_writer if role == "writer" else _reader)(index, settings, target, vault, events)


# -- the server -----------------------------------------------------------------------------------


# -- orchestration --------------------------------------------------------------------------------


def run_soak(settings: SoakSettings, *, out: TextIO | None = None) -> SoakResult:
    """Runs the soak; prints progress lines to `out` (None: quiet).

    Returns:
        The measurements; `result.ok` says whether it passed.
    """

    def say(text: str) -> None:
        if out is not None:
            print(text, file=out, flush=True)

    with contextlib.ExitStack() as stack:
        root = settings.root
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="expvault-soak-")))
        server = ServeProcess(
            root,
            *("--max-inflight-bytes", str(settings.max_inflight_bytes)),
            *("--max-inflight-bytes-per-stream", str(settings.max_inflight_bytes_per_stream)),
            *("--message-bytes", str(settings.message_bytes)),
            *("--max-read-buffer-bytes", str(settings.max_read_buffer_bytes)),
            *("--max-log-bytes", str(settings.max_log_bytes)),
            *("--cache-bytes", str(settings.cache_bytes)),
            *("--small-chunk-cache-bytes", str(settings.small_chunk_cache_bytes)),
            startup_timeout_s=settings.startup_timeout_s,
        )
        stack.callback(server.stop)
        baseline = server.memory()[0]
        say(f"server on {server.target}, root {root}, idle RSS {baseline / _MIB:.0f} MiB")
        result = _drive(settings, server, baseline, say)
    return result


def _drive(
    settings: SoakSettings, server: ServeProcess, baseline: int, say: Callable[[str], None]
) -> SoakResult:
    ctx = mp.get_context("spawn")  # JAX and gRPC do not survive fork
    events: Any = ctx.Queue()
    flags = {"go": ctx.Event(), "stop": ctx.Event()}
    vault = "soak"
    roles = [("writer", i) for i in range(settings.writers)]
    roles += [("reader", i) for i in range(settings.readers)]
    errors: list[str] = []
    peak = 0
    stop_sampling = threading.Event()
    timeline: list[tuple[float, int]] = []  # (seconds since go, RSS) while soaking
    began = 0.0

    def sample_memory() -> None:
        nonlocal peak
        while not stop_sampling.wait(0.1):
            rss = server.memory()[0]
            peak = max(peak, rss)
            if flags["go"].is_set():
                timeline.append((time.perf_counter() - began, rss))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    processes: list[Any] = []
    results: list[tuple[Any, ...]] = []

    def start(role: str, index: int) -> None:
        p = ctx.Process(
            target=_child,
            args=(role, index, settings, server.target, vault, events, flags),
            name=f"soak-{role}-{index}",
        )
        p.start()
        processes.append(p)

    def drain(timeout_s: float) -> tuple[Any, ...] | None:
        try:
            event: tuple[Any, ...] = events.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if event[0] == "error":
            errors.append(event[1])
        return event

    try:
        # Writers first: the first one creates the vault the readers open.
        ready = 0
        deadline = time.monotonic() + settings.startup_timeout_s
        for role, index in roles:
            if role == "reader" and ready == 0:
                while ready == 0 and not errors and time.monotonic() < deadline:
                    event = drain(1.0)
                    ready += event is not None and event[0] == "ready"
            start(role, index)
        while ready < len(roles) and not errors and time.monotonic() < deadline:
            event = drain(1.0)
            ready += event is not None and event[0] == "ready"
        if ready < len(roles) and not errors:
            errors.append(f"only {ready} of {len(roles)} processes started in time")
        say(f"{settings.writers} writers and {settings.readers} readers ready; soaking "
            f"{settings.duration_s:.0f} s")  # fmt: skip
        began = time.perf_counter()
        flags["go"].set()
        while time.perf_counter() - began < settings.duration_s and not errors:
            event = drain(1.0)
            if event is not None and event[0] in ("writer", "reader"):
                results.append(event)
            if any(p.exitcode not in (None, 0) for p in processes):
                errors.append("a process died: " + ", ".join(
                    f"{p.name} exit {p.exitcode}" for p in processes if p.exitcode not in (None, 0)
                ))  # fmt: skip
        flags["stop"].set()
        measured = time.perf_counter() - began
        reports = sum(1 for r in results if r[0] in ("writer", "reader"))
        deadline = time.monotonic() + 120
        while reports < len(roles) and time.monotonic() < deadline:
            event = drain(1.0)
            if event is None:
                if all(p.exitcode is not None for p in processes):
                    break
                continue
            if event[0] in ("writer", "reader"):
                results.append(event)
                reports += 1
            elif event[0] == "error":
                reports += 1
        if reports < len(roles):
            errors.append(f"only {reports} of {len(roles)} processes reported")
    finally:
        flags["stop"].set()
        for p in processes:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        stop_sampling.set()
        sampler.join()
    committed = {f"writer-{r[1]}": int(r[4]) for r in results if r[0] == "writer"}
    for r in results:
        if r[0] == "reader":
            for uid, position in r[3].items():
                if position > committed.get(uid, 0):
                    errors.append(
                        f"reader-{r[1]} followed {uid} to {position}, past its "
                        f"{committed.get(uid)} committed steps"
                    )
    rss, hwm = server.memory()
    peak = max(peak, rss, hwm)
    status = server.stop()
    if status != 0:
        errors.append(f"the server exited with {status} on SIGTERM")
    latencies = np.array(
        [x for r in results if r[0] == "writer" for x in r[3]] or [0.0], np.float64
    )
    steps = sum(int(r[2]) for r in results if r[0] == "writer")
    return SoakResult(
        settings=settings,
        measured_s=measured,
        steps_acked=steps,
        steps_per_s=steps / measured,
        mb_per_s=steps * settings.step_bytes / measured / 1e6,
        ack_p50_ms=float(np.percentile(latencies, 50) * 1e3),
        ack_p99_ms=float(np.percentile(latencies, 99) * 1e3),
        ack_max_ms=float(latencies.max() * 1e3),
        writes=sum(len(r[3]) for r in results if r[0] == "writer"),
        followed_steps=sum(int(r[2]) for r in results if r[0] == "reader" and r[1] % 2 == 0),
        samples=sum(int(r[2]) for r in results if r[0] == "reader" and r[1] % 2 == 1),
        baseline_rss_bytes=baseline,
        peak_rss_bytes=peak,
        rss_bound_bytes=rss_bound_bytes(settings, baseline),
        rss_by_quarter_bytes=_quarter_peaks(timeline, measured),
        errors=tuple(errors),
    )


def _quarter_peaks(timeline: Sequence[tuple[float, int]], duration_s: float) -> tuple[int, ...]:
    """The peak RSS of each quarter of the soak: a plateau, or growth (a leak)."""
    peaks = [0, 0, 0, 0]
    for t, rss in timeline:
        quarter = min(3, max(0, int(4 * t / max(duration_s, 1e-9))))
        peaks[quarter] = max(peaks[quarter], rss)
    return tuple(peaks)


def summary(result: SoakResult) -> str:
    """A few lines a person reads."""
    s = result.settings
    return "\n".join(
        [
            f"soak: {s.writers} writers x {s.envs} envs, {s.delta_steps}-step deltas "
            f"({s.delta_steps * s.step_bytes / 1e6:.2f} MB), {s.readers} readers, "
            f"{result.measured_s:.1f} s",
            f"  throughput  {result.steps_per_s:,.0f} steps/s, {result.mb_per_s:.1f} MB/s "
            f"({result.steps_acked:,} steps in {result.writes:,} acknowledged writes)",
            f"  ack latency p50 {result.ack_p50_ms:.1f} ms, p99 {result.ack_p99_ms:.1f} ms, "
            f"max {result.ack_max_ms:.1f} ms",
            f"  readers     {result.followed_steps:,} steps followed, {result.samples:,} samples",
            f"  server RSS  peak {result.peak_rss_bytes / _MIB:.0f} MiB (idle "
            f"{result.baseline_rss_bytes / _MIB:.0f} MiB), bound "
            f"{result.rss_bound_bytes / _MIB:.0f} MiB (max_inflight_bytes "
            f"{s.max_inflight_bytes / _MIB:.0f} MiB, {s.max_inflight_bytes_per_stream / _MIB:.0f} "
            f"MiB per stream; max_log_bytes {s.max_log_bytes / _MIB:.0f} MiB; "
            f"max_read_buffer_bytes {s.max_read_buffer_bytes / _MIB:.0f} MiB; cache_bytes "
            f"{s.cache_bytes / _MIB:.0f} + {s.small_chunk_cache_bytes / _MIB:.0f} MiB; "
            f"message_bytes {s.message_bytes / _MIB:.0f} MiB)",
            "  RSS peak by quarter of the soak: "
            + " / ".join(f"{b / _MIB:.0f}" for b in result.rss_by_quarter_bytes)
            + " MiB",
            f"  errors      {len(result.errors)}" + "".join(f"\n    {e}" for e in result.errors),
            f"  {'OK' if result.ok else 'FAILED'}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m expvault_server.soak`; returns the exit status (0: passed)."""
    d = SoakSettings()
    parser = argparse.ArgumentParser(prog="python -m expvault_server.soak", description=__doc__)
    parser.add_argument("--writers", type=int, default=d.writers, help="actor processes")
    parser.add_argument("--readers", type=int, default=d.readers, help="learner processes")
    parser.add_argument("--duration-s", type=float, default=d.duration_s, help="soak time")
    parser.add_argument("--envs", type=int, default=d.envs, help="B of each actor's buffer")
    parser.add_argument("--obs-dim", type=int, default=d.obs_dim, help="float32 obs per step")
    parser.add_argument("--delta-steps", type=int, default=d.delta_steps, help="steps per write")
    parser.add_argument(
        "--max-inflight-bytes", type=int, default=d.max_inflight_bytes, help="server limit"
    )
    parser.add_argument(
        "--max-inflight-bytes-per-stream",
        type=int,
        default=d.max_inflight_bytes_per_stream,
        help="server limit per writer",
    )
    parser.add_argument(
        "--max-read-buffer-bytes",
        type=int,
        default=d.max_read_buffer_bytes,
        help="server limit on data read ahead or queued for readers",
    )
    parser.add_argument(
        "--max-log-bytes",
        type=int,
        default=d.max_log_bytes,
        help="server limit on acknowledged steps held in memory",
    )
    parser.add_argument("--cache-bytes", type=int, default=d.cache_bytes, help="server chunk cache")
    parser.add_argument(
        "--small-chunk-cache-bytes",
        type=int,
        default=d.small_chunk_cache_bytes,
        help="server cache of small leaves' chunks for sampling",
    )
    parser.add_argument("--root", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    for name in ("writers", "envs", "obs_dim", "delta_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.readers < 0 or args.duration_s <= 0:
        parser.error("--readers must be >= 0 and --duration-s > 0")
    settings = SoakSettings(
        writers=args.writers,
        readers=args.readers,
        duration_s=args.duration_s,
        envs=args.envs,
        obs_dim=args.obs_dim,
        delta_steps=args.delta_steps,
        buffer_steps=max(1024, 2 * args.delta_steps),
        max_inflight_bytes=args.max_inflight_bytes,
        max_inflight_bytes_per_stream=args.max_inflight_bytes_per_stream,
        max_read_buffer_bytes=args.max_read_buffer_bytes,
        max_log_bytes=args.max_log_bytes,
        cache_bytes=args.cache_bytes,
        small_chunk_cache_bytes=args.small_chunk_cache_bytes,
        root=args.root,
    )
    result = run_soak(settings, out=None if args.json else sys.stdout)
    print(json.dumps(result.to_json()) if args.json else summary(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
