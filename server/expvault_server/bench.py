"""Benchmarks measured side by side with their references, in one run, on this machine.

Payload (defaults): B=16 envs; per step obs float32 (64,), int32 action, float32 reward, bool done;
deltas of 128 steps written from a flashbax trajectory buffer of 1024 steps. Every case runs
`--repeats` times after a warm-up and reports the median and the spread (min..max).

Run: `python -m expvault_server.bench` (add `--json` for one JSON object per line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
    import flashbax as fbx

    buffer = fbx.make_trajectory_buffer(
        add_batch_size=payload.envs,
        max_length_time_axis=payload.buffer_steps,
        min_length_time_axis=1,
        sample_batch_size=1,
        sample_sequence_length=1,
        period=1,
    )
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
    args = parser.parse_args(argv)
    payload = Payload(envs=args.envs, delta_steps=args.delta_steps, writes=args.writes)
    results = storage_cases(payload, max(1, args.repeats))
    if args.json:
        for result in results:
            print(json.dumps(result.as_json()))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
