"""`expvault bench`: expvault measured against flashbax, raw gRPC and the disk, in one run.

Every case runs `--repeats` times after a warm-up and reports the median and the spread
(min..max) of each metric. Ratios are taken between figures measured in the same repetition of
the same run (repetition `i` of a case against repetition `i` of its reference), never against a
remembered number. The payload (defaults): B=16 envs; per step obs float32 (64,), int32 action,
float32 reward, bool done; deltas of 128 steps written from a flashbax trajectory buffer of 1024
steps; random values, so that no codec flatters the numbers.

The cases live in `expvault_server._bench_cases` (the actor processes in `_bench_actors`, the
raw gRPC ceilings in `_bench_grpc`); this module holds the command, the settings, the results
and their output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np

from expvault_server.cli import Command

__all__ = [
    "COMMAND",
    "BenchSettings",
    "Payload",
    "Progress",
    "Result",
    "main",
    "run_bench",
    "spread",
    "summarise",
]


class Transition(NamedTuple):
    """The benchmark payload's step."""

    obs: Any
    action: Any
    reward: Any
    done: Any


@dataclass(frozen=True)
class Payload:
    """What actors write: deltas of `delta_steps` steps from a flashbax ring of `buffer_steps`.

    Attributes:
        envs: `B`, the buffer's batch size.
        obs_dim: length of the float32 observation of one env and step.
        delta_steps: steps added to the buffer between two writes.
        buffer_steps: the ring's length.
        writes: deltas written per run by the in-process and single-actor cases.
    """

    envs: int = 16
    obs_dim: int = 64
    delta_steps: int = 128
    buffer_steps: int = 1024
    writes: int = 48

    @property
    def step_bytes(self) -> int:
        """Bytes of one time step across the batch (all leaves)."""
        return self.envs * (4 * self.obs_dim + 4 + 4 + 1)

    @property
    def delta_bytes(self) -> int:
        """Bytes of one delta."""
        return self.delta_steps * self.step_bytes

    def example(self) -> Transition:
        """One step of one env, for `buffer.init`."""
        import jax.numpy as jnp

        return Transition(
            obs=jnp.zeros((self.obs_dim,), jnp.float32),
            action=jnp.zeros((), jnp.int32),
            reward=jnp.zeros((), jnp.float32),
            done=jnp.zeros((), jnp.bool_),
        )

    def buffer(self) -> Any:
        """The flashbax trajectory buffer the actors add to: B envs, a ring of `buffer_steps`."""
        import flashbax as fbx

        return fbx.make_trajectory_buffer(
            add_batch_size=self.envs,
            max_length_time_axis=self.buffer_steps,
            min_length_time_axis=1,
            sample_batch_size=1,
            sample_sequence_length=1,
            period=1,
        )

    def arrays(self, rng: np.random.Generator, steps: int) -> Transition:
        """Random numpy leaves `(B, steps, ...)`."""
        shape = (self.envs, steps)
        return Transition(
            obs=rng.standard_normal((*shape, self.obs_dim), np.float32),
            action=rng.integers(0, 16, shape, np.int32),
            reward=rng.standard_normal(shape, np.float32),
            done=rng.random(shape) < 0.01,
        )

    def deltas(self, seed: int, count: int | None = None) -> list[Transition]:
        """`count` (default `writes`) random deltas `(B, delta_steps, ...)` on the device."""
        import jax.numpy as jnp

        rng = np.random.default_rng(seed)
        return [
            Transition(*(jnp.asarray(a) for a in self.arrays(rng, self.delta_steps)))
            for _ in range(self.writes if count is None else count)
        ]


@dataclass(frozen=True)
class BenchSettings:
    """What one `expvault bench` run measures, and how much of it.

    Attributes:
        payload: the experience actors write.
        repeats: measured runs of every case, after one warm-up run.
        root: directory under which the run creates (and then removes) its data; the disk
            ceiling is measured there too.
        actors: actor processes of the aggregate case.
        actors_mb: megabytes (1e6 bytes) all actors stream together, per run.
        read_mb: size of the vault read remotely and by flashbax, and sampled from.
        ceiling_mb: megabytes moved per run by the raw gRPC and disk ceilings.
        growth_small_steps: the short stream of the append-growth case.
        growth_large_steps: the long stream of the append-growth case.
        growth_appends: appends of `delta_steps` timed per run of the append-growth case.
        latency_writes: `write(wait=False)` calls timed per run.
        latency_interval_s: time between two of those writes (an actor's pace).
        sample_batches: `sample` calls timed per run.
    """

    payload: Payload = field(default_factory=Payload)
    repeats: int = 3
    root: str = "."
    actors: int = 4
    actors_mb: int = 2000
    read_mb: int = 1000
    ceiling_mb: int = 512
    growth_small_steps: int = 10_000
    growth_large_steps: int = 10_000_000
    growth_appends: int = 1024
    latency_writes: int = 600
    latency_interval_s: float = 0.004
    sample_batches: int = 200

    @classmethod
    def quick(cls, **changes: Any) -> BenchSettings:
        """Smaller sizes, the same code paths: under a minute on a 2-core machine."""
        base = cls(
            payload=Payload(writes=8),
            actors_mb=64,
            read_mb=64,
            ceiling_mb=64,
            growth_large_steps=1_000_000,
            growth_appends=64,
            latency_writes=100,
            sample_batches=40,
        )
        return dataclasses.replace(base, **changes)


Metric = tuple[float, float, float]  # median, min, max


@dataclass(frozen=True)
class Result:
    """One case: the medians and spreads of its metrics over its measured runs.

    Attributes:
        case: stable identifier, e.g. `"write.remote_1actor"`.
        title: what was measured, for people.
        runs: measured runs (the warm-up excluded).
        metrics: name -> (median, min, max); names carry their unit (`mb_per_s`, `p99_ms`).
        target: the goal, in words ("" when the case has none).
        ok: whether the median meets the target (None without a target).
        info: settings of the case (sizes, counts), reported as they are.
    """

    case: str
    title: str
    runs: int
    metrics: dict[str, Metric]
    target: str = ""
    ok: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The case as one JSON object (the keys are documented in the README)."""
        out: dict[str, Any] = {"case": self.case, "title": self.title, "runs": self.runs}
        for name, (median, lo, hi) in self.metrics.items():
            out[name] = median
            out[f"{name}_min"] = lo
            out[f"{name}_max"] = hi
        out["target"] = self.target or None
        out["ok"] = self.ok
        out.update(self.info)
        return out


def summarise(samples: Sequence[dict[str, float]]) -> dict[str, Metric]:
    """Median, min and max of each metric over the runs' samples (every sample has every key)."""
    return {
        name: (
            float(statistics.median(s[name] for s in samples)),
            float(min(s[name] for s in samples)),
            float(max(s[name] for s in samples)),
        )
        for name in samples[0]
    }


def spread(values: Sequence[float]) -> Metric:
    """Median, min and max of one metric's values (one per run)."""
    return (float(statistics.median(values)), float(min(values)), float(max(values)))


def paired_ratio(cases: Sequence[float], references: Sequence[float]) -> list[float]:
    """`case[i] / reference[i]`: each ratio between figures of the same repetition."""
    return [c / r if r else math.inf for c, r in zip(cases, references, strict=True)]


class Progress:
    """A progress bar on `stream` when it is a terminal; one line per step otherwise.

    Args:
        total: steps the run will take.
        stream: where to draw (stderr).
        name: the command, at the start of each line when not a terminal.
    """

    WIDTH = 30

    def __init__(
        self, total: int, stream: TextIO = sys.stderr, name: str = "expvault bench"
    ) -> None:
        self.name = name
        self.total = max(1, total)
        self.done = 0
        self._stream = stream
        self._live = hasattr(stream, "isatty") and stream.isatty()
        self._started = time.perf_counter()
        self._last_width = 0

    def step(self, label: str, count: int = 1) -> None:
        """Marks `count` steps done; `label` says what just finished."""
        self.done = min(self.total, self.done + count)
        elapsed = time.perf_counter() - self._started
        head = f"[{self.done:3d}/{self.total}] {elapsed:6.1f} s  {label}"
        if self._live:
            filled = self.WIDTH * self.done // self.total
            line = f"\r{'#' * filled}{'.' * (self.WIDTH - filled)} {head}"
            pad = max(0, self._last_width - len(line))
            self._stream.write(line + " " * pad)
            self._last_width = len(line)
            if self.done == self.total:
                self._stream.write("\n")
        else:
            self._stream.write(f"{self.name} {head}\n")
        self._stream.flush()

    def note(self, text: str) -> None:
        """Prints a line of its own (above the bar)."""
        if self._live and self._last_width:
            self._stream.write("\r" + " " * self._last_width + "\r")
            self._last_width = 0
        self._stream.write(f"{self.name}: {text}\n")
        self._stream.flush()


def run_bench(settings: BenchSettings, progress: Progress | None = None) -> list[Result]:
    """Runs every case; returns the results (ceilings first).

    Raises:
        RuntimeError: a case could not run (a subprocess failed, data did not round-trip).
    """
    from expvault_server._bench_cases import run_all, total_steps  # imports this module

    progress = progress or Progress(total_steps(settings))
    Path(settings.root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".expvault-bench-", dir=settings.root) as work:
        return run_all(settings, Path(work), progress)


def print_table(results: Sequence[Result], out: TextIO = sys.stdout) -> None:
    """Prints the results: one block per case, each metric as `median (min .. max)`."""
    for result in results:
        status = {True: "meets target", False: "MISSES target", None: ""}[result.ok]
        target = f"  target: {result.target}" if result.target else ""
        print(f"{result.title}  [{result.case}, {result.runs} runs]{target}  {status}", file=out)
        for name, (median, lo, hi) in result.metrics.items():
            print(f"    {name:28s} {_fmt(median):>12}   ({_fmt(lo)} .. {_fmt(hi)})", file=out)
        if result.info:
            details = ", ".join(f"{k}={v}" for k, v in result.info.items())
            print(f"    ({details})", file=out)


def _fmt(value: float) -> str:
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


# -- the command ---------------------------------------------------------------------------------


def _configure(parser: argparse.ArgumentParser) -> None:
    defaults = BenchSettings()
    payload = defaults.payload
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, the same cases (< 60 s)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per case")
    parser.add_argument(
        "--root",
        default=".",
        help="directory for the run's data (removed afterwards); put it on the disk vaults "
        "will live on (default: the current directory)",
    )
    parser.add_argument(
        "--repeats", type=int, help=f"measured runs per case (default {defaults.repeats})"
    )
    parser.add_argument("--envs", type=int, help=f"B, envs per buffer (default {payload.envs})")
    parser.add_argument("--obs-dim", type=int, help=f"obs length (default {payload.obs_dim})")
    parser.add_argument(
        "--delta-steps", type=int, help=f"steps per write (default {payload.delta_steps})"
    )
    parser.add_argument(
        "--buffer-steps", type=int, help=f"flashbax ring length (default {payload.buffer_steps})"
    )
    parser.add_argument(
        "--writes", type=int, help=f"deltas per in-process run (default {payload.writes})"
    )
    parser.add_argument("--actors", type=int, help=f"actor processes (default {defaults.actors})")
    parser.add_argument(
        "--actors-mb", type=int, help=f"MB the actors stream per run (default {defaults.actors_mb})"
    )
    parser.add_argument(
        "--read-mb", type=int, help=f"size of the vault read (default {defaults.read_mb})"
    )
    parser.add_argument(
        "--ceiling-mb", type=int, help=f"MB per ceiling run (default {defaults.ceiling_mb})"
    )
    parser.add_argument(
        "--growth-steps",
        type=int,
        dest="growth_large_steps",
        help=f"long stream of the append-growth case (default {defaults.growth_large_steps})",
    )
    parser.add_argument(
        "--latency-writes",
        type=int,
        help=f"write(wait=False) calls per run (default {defaults.latency_writes})",
    )
    parser.add_argument(
        "--sample-batches",
        type=int,
        help=f"sample calls per run (default {defaults.sample_batches})",
    )


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The settings `expvault bench` flags select (`--quick` first, then each flag given).

    Raises:
        ValueError: a size below its minimum.
    """
    base = BenchSettings.quick() if args.quick else BenchSettings()
    payload_changes = {
        name: getattr(args, name)
        for name in ("envs", "obs_dim", "delta_steps", "buffer_steps", "writes")
        if getattr(args, name) is not None
    }
    changes: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "repeats",
            "actors",
            "actors_mb",
            "read_mb",
            "ceiling_mb",
            "growth_large_steps",
            "latency_writes",
            "sample_batches",
        )
        if getattr(args, name) is not None
    }
    settings = dataclasses.replace(
        base,
        payload=dataclasses.replace(base.payload, **payload_changes),
        root=args.root,
        **changes,
    )
    for name in ("repeats", "actors", "actors_mb", "read_mb", "ceiling_mb"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    p = settings.payload
    if min(p.envs, p.obs_dim, p.delta_steps, p.writes) < 1 or p.buffer_steps < p.delta_steps:
        raise ValueError("payload sizes must be >= 1, and --buffer-steps >= --delta-steps")
    if settings.growth_large_steps <= settings.growth_small_steps:
        raise ValueError(f"--growth-steps must be > {settings.growth_small_steps}")
    return settings


def _run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"expvault bench: {e}", file=sys.stderr)
        return 2
    results = run_bench(settings)
    if args.json:
        for result in results:
            print(json.dumps(result.as_json()), flush=True)
    else:
        print_table(results)
    return 0


COMMAND = Command(
    "measure expvault against flashbax, raw gRPC and the disk (--quick: < 60 s)",
    _configure,
    _run,
)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m expvault_server.bench`: the same as `expvault bench`."""
    parser = argparse.ArgumentParser(prog="expvault bench", description=COMMAND.help)
    _configure(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
