"""Benchmarks measured side by side with their references, in one run, on this machine.

Payload (defaults): B=16 envs; per step obs float32 (64,), int32 action, float32 reward, bool done;
deltas of 128 steps written from a flashbax trajectory buffer of 1024 steps. Every case runs
`--repeats` times after a warm-up and reports the median and the spread (min..max).

Run: `python -m expvault_server.bench` (add `--json` for one JSON object per line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from expvault.storage import files


class Transition(NamedTuple):
    """The benchmark payload's step."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    done: jax.Array


@dataclass(frozen=True)
class Payload:
    """What is written: `writes` deltas of `delta_steps` steps from a ring of `buffer_steps`."""

    envs: int = 16
    obs_dim: int = 64
    delta_steps: int = 128
    buffer_steps: int = 1024
    writes: int = 48

    @property
    def step_bytes(self) -> int:
        """Bytes of one time step across the batch."""
        return self.envs * (4 * self.obs_dim + 4 + 4 + 1)

    def example(self) -> Transition:
        """One step of one env, for `buffer.init`."""
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

    def deltas(self, seed: int) -> list[Transition]:
        """Random deltas `(B, delta_steps, ...)` on the device (random: no codec flatters it)."""
        rng = np.random.default_rng(seed)
        shape = (self.envs, self.delta_steps)
        return [
            Transition(
                obs=jnp.asarray(rng.standard_normal((*shape, self.obs_dim), np.float32)),
                action=jnp.asarray(rng.integers(0, 16, shape, np.int32)),
                reward=jnp.asarray(rng.standard_normal(shape, np.float32)),
                done=jnp.asarray(rng.random(shape) < 0.01),
            )
            for _ in range(self.writes)
        ]


@dataclass(frozen=True)
class Result:
    """One case's medians and spreads."""

    case: str
    runs: int
    metrics: dict[str, tuple[float, float, float]]  # name -> (median, min, max)

    def as_json(self) -> dict[str, Any]:
        """The case as one JSON object: `{"case", "runs", "<metric>": median, ...}`."""
        out: dict[str, Any] = {"case": self.case, "runs": self.runs}
        for name, (median, lo, hi) in self.metrics.items():
            out[name] = median
            out[f"{name}_min"] = lo
            out[f"{name}_max"] = hi
        return out


def _summarise(case: str, samples: Sequence[dict[str, float]]) -> Result:
    metrics = {
        name: (
            statistics.median(s[name] for s in samples),
            min(s[name] for s in samples),
            max(s[name] for s in samples),
        )
        for name in samples[0]
    }
    return Result(case, len(samples), metrics)


def _write_run(
    payload: Payload, make_vault: Callable[[Any, str], Any], root: str, seed: int
) -> dict[str, float]:
    """Writes the payload through `make_vault(experience, root)`; times writes and a full read."""
    buffer = payload.buffer()
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init(payload.example())
    vault = make_vault(state.experience, root)
    deltas = payload.deltas(seed)
    write_s = 0.0
    for delta in deltas:
        state = add(state, delta)
        jax.block_until_ready(state)  # type: ignore[no-untyped-call]
        t0 = time.perf_counter()
        vault.write(state)
        write_s += time.perf_counter() - t0
    if hasattr(vault, "close"):
        vault.close()
    steps = payload.writes * payload.delta_steps
    nbytes = steps * payload.step_bytes
    disk = files.bytes_on_disk(Path(root))
    reader = make_vault(None, root)
    t0 = time.perf_counter()
    read = reader.read()
    jax.block_until_ready(read.experience)  # type: ignore[no-untyped-call]
    read_s = time.perf_counter() - t0
    read_steps = int(jax.tree_util.tree_leaves(read.experience)[0].shape[1])
    if read_steps != steps:
        raise RuntimeError(f"read {read_steps} steps, wrote {steps}")
    if hasattr(reader, "close"):
        reader.close()
    return {
        "write_steps_per_s": steps / write_s,
        "write_mb_per_s": nbytes / write_s / 1e6,
        "disk_per_byte": disk / nbytes,
        "read_mb_per_s": nbytes / read_s / 1e6,
    }


def _flashbax_vault(experience: Any, root: str) -> Any:
    import contextlib
    import io

    from flashbax.vault import Vault as FlashbaxVault

    with contextlib.redirect_stdout(io.StringIO()):  # flashbax prints on open
        if experience is None:
            return FlashbaxVault("bench", rel_dir=root, vault_uid="run")
        return FlashbaxVault(
            "bench", experience_structure=experience, rel_dir=root, vault_uid="run"
        )


def _expvault_vault(compression: str | None) -> Callable[[Any, str], Any]:
    def make(experience: Any, root: str) -> Any:
        from expvault import Vault

        if experience is None:
            return Vault("bench", rel_dir=root, vault_uid="run")
        return Vault(
            "bench",
            experience_structure=experience,
            rel_dir=root,
            vault_uid="run",
            compression=compression,
        )

    return make


def storage_cases(payload: Payload, repeats: int) -> list[Result]:
    """In-process writes and full reads: expvault.Vault against flashbax.vault.Vault."""
    cases: list[tuple[str, Callable[[Any, str], Any]]] = [
        ("flashbax.Vault (gzip 5, its default)", _flashbax_vault),
        ("expvault.Vault (lz4, default)", _expvault_vault(None)),
        ("expvault.Vault (no compression)", _expvault_vault("none")),
    ]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _ in cases}
    for run in range(repeats + 1):  # run 0 warms up (jit, imports, page cache)
        for name, make in cases:
            with tempfile.TemporaryDirectory(prefix="expvault-bench-") as root:
                sample = _write_run(payload, make, root, seed=run)
            if run:
                samples[name].append(sample)
            _progress(f"{name}: run {run}/{repeats}")
    results = [_summarise(name, s) for name, s in samples.items()]
    reference = results[0].metrics
    for result in results[1:]:
        for metric in ("write_steps_per_s", "read_mb_per_s"):
            result.metrics[f"{metric}_vs_flashbax"] = _ratio(
                result.metrics[metric], reference[metric]
            )
    return results


# -- remote cases --------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(root: str) -> Iterator[str]:
    """`expvault serve` as a subprocess on a free loopback port; yields its address."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "expvault_server.cli",
            "serve",
            "--root",
            root,
            "--listen",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if match := re.search(r"serving on (\S+)", line):
                break
        else:
            raise RuntimeError("expvault serve exited before listening")
        threading.Thread(target=process.stderr.read, daemon=True).start()  # drain its log
        yield match.group(1)
    finally:
        process.terminate()
        process.wait(timeout=60)


class _RemoteActor:
    """An actor writing the payload through `RemoteVault`; set up (jit, data) before timing."""

    def __init__(self, target: str, uid: str, payload: Payload, seed: int) -> None:
        from expvault import RemoteVault

        buffer = payload.buffer()
        self.payload = payload
        self.add = jax.jit(buffer.add, donate_argnums=0)
        self.state = buffer.init(payload.example())
        self.deltas = payload.deltas(seed)
        self.state = self.add(self.state, self.deltas[0])  # compile before the clock starts
        self.vault = RemoteVault(target, "bench", self.state.experience, vault_uid=uid)
        self.vault.write(self.state)

    def run(self, wait: bool) -> dict[str, float]:
        """Adds and writes every delta; returns timings (the last flush included)."""
        write_s = 0.0
        latencies = []
        for delta in self.deltas:
            self.state = self.add(self.state, delta)
            jax.block_until_ready(self.state)  # type: ignore[no-untyped-call]
            t0 = time.perf_counter()
            self.vault.write(self.state, wait=wait)
            latencies.append(time.perf_counter() - t0)
            write_s += latencies[-1]
        t0 = time.perf_counter()
        self.vault.flush()
        write_s += time.perf_counter() - t0
        self.vault.close()
        steps = self.payload.writes * self.payload.delta_steps
        return {
            "steps": steps,
            "bytes": steps * self.payload.step_bytes,
            "write_s": write_s,
            "latency_p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "latency_p99_ms": float(np.percentile(latencies, 99) * 1e3),
        }


def _actor_process(args: tuple[str, str, Payload, int, Any, Any]) -> None:
    target, uid, payload, seed, ready, results = args
    actor = _RemoteActor(target, uid, payload, seed)
    ready.wait()
    started = time.perf_counter()
    sample = actor.run(wait=False)
    results.put((started, time.perf_counter(), sample["bytes"]))


def _wait_for_streams(target: str, count: int) -> None:
    """Waits until `count` actors opened their streams (set-up done), with a deadline."""
    from expvault import VaultReader

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception), VaultReader(target, "bench") as reader:
            if sum(uid.startswith("actor-") for uid in reader.streams()) >= count:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{count} actors did not start within 300 s")


def remote_cases(payload: Payload, repeats: int, actors: int = 4) -> list[Result]:
    """Measures RemoteVault and VaultReader: one actor, `actors` at once, reads, samples."""
    import multiprocessing as mp

    from expvault import VaultReader

    one: list[dict[str, float]] = []
    many: list[dict[str, float]] = []
    reads: list[dict[str, float]] = []
    samples: list[dict[str, float]] = []
    ctx = mp.get_context("spawn")
    for run in range(repeats + 1):
        with tempfile.TemporaryDirectory(prefix="expvault-bench-") as root, _server(root) as target:
            sample = _RemoteActor(target, "single", payload, seed=run).run(wait=True)
            steps = sample["steps"]
            one.append(
                {
                    "write_steps_per_s": steps / sample["write_s"],
                    "write_mb_per_s": sample["bytes"] / sample["write_s"] / 1e6,
                }
            )
            ready, results = ctx.Event(), ctx.Queue()
            processes = [
                ctx.Process(
                    target=_actor_process,
                    args=((target, f"actor-{a}", payload, run * 10 + a, ready, results),),
                )
                for a in range(actors)
            ]
            for process in processes:
                process.start()
            _wait_for_streams(target, actors)
            ready.set()
            spans = [results.get(timeout=600) for _ in processes]
            for process in processes:
                process.join()
            elapsed = max(s[1] for s in spans) - min(s[0] for s in spans)
            many.append({"aggregate_mb_per_s": sum(s[2] for s in spans) / elapsed / 1e6})
            with VaultReader(target, "bench") as reader:
                t0 = time.perf_counter()
                tree = reader.read(0, None, vault_uid="actor-0")
                read_s = time.perf_counter() - t0
                n = int(jax.tree_util.tree_leaves(tree)[0].shape[1])
                reads.append({"read_mb_per_s": n * payload.step_bytes / read_s / 1e6})
                reader.sample(32, 64, seed=0)
                times = []
                for i in range(40):
                    t0 = time.perf_counter()
                    reader.sample(32, 64, seed=i)
                    times.append(time.perf_counter() - t0)
                samples.append(
                    {
                        "batches_per_s": len(times) / sum(times),
                        "latency_p99_ms": float(np.percentile(times, 99) * 1e3),
                    }
                )
        _progress(f"remote: run {run}/{repeats}")
    return [
        _summarise("RemoteVault, 1 actor, write() waits for durable ack", one[1:]),
        _summarise(f"RemoteVault, {actors} actor processes, aggregate, durable", many[1:]),
        _summarise("VaultReader.read, full stream", reads[1:]),
        _summarise("VaultReader.sample, batch 32 x 64 steps", samples[1:]),
    ]


def _ratio(
    a: tuple[float, float, float], b: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Median ratio, and the ratios of the spreads' ends (worst and best case)."""
    return (a[0] / b[0], a[1] / b[2], a[2] / b[1])


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def print_table(results: Sequence[Result]) -> None:
    """Prints results as an aligned table of `median (min..max)`."""
    for result in results:
        print(f"{result.case}  [{result.runs} runs]")
        for name, (median, lo, hi) in result.metrics.items():
            print(f"    {name:32s} {median:12.3f}   ({lo:.3f} .. {hi:.3f})")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the storage benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m expvault_server.bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per case (>= 1)")
    parser.add_argument("--writes", type=int, default=Payload.writes, help="deltas per run")
    parser.add_argument("--envs", type=int, default=Payload.envs, help="B, envs per buffer")
    parser.add_argument("--delta-steps", type=int, default=Payload.delta_steps)
    parser.add_argument("--json", action="store_true", help="one JSON object per case per line")
    parser.add_argument("--storage-only", action="store_true", help="skip the gRPC cases")
    args = parser.parse_args(argv)
    payload = Payload(envs=args.envs, delta_steps=args.delta_steps, writes=args.writes)
    results = storage_cases(payload, max(1, args.repeats))
    if not args.storage_only:
        remote = remote_cases(payload, max(1, args.repeats))
        flashbax = results[0].metrics["write_steps_per_s"]
        remote[0].metrics["write_steps_per_s_vs_flashbax"] = _ratio(
            remote[0].metrics["write_steps_per_s"], flashbax
        )
        results += remote
    if args.json:
        for result in results:
            print(json.dumps(result.as_json()))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
