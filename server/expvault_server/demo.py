"""`expvault demo`: actors stream experience to a vault server while a learner follows and samples.

With no arguments it starts a server on a free loopback port over a local directory, spawns actor
processes that step a small jitted JAX environment into flashbax buffers (wrapped with
`expvault.counted`) and stream them with `RemoteVault`, and a learner process that follows every
stream with `VaultReader.follow` and draws samples. It prints live progress, then checks that the
learner received every step each actor produced, exactly once and in order, with matching
checksums.

`expvault demo actor` and `expvault demo learner` run one role alone against a running server
(`--target`), e.g. one container each: an actor writes stream `actor-<id>`, the learner follows
`--actors` streams; each prints progress, then its result as one JSON line (steps, checksums),
and exits 1 when its part of the check failed. Both ride out a server restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing as mp
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from expvault_server.cli import Command, env_default

__all__ = ["COMMAND", "DemoSettings", "run_demo", "run_role"]

_OBS_DIM = 8
_MOD = 1 << 32


class Transition(NamedTuple):
    """One step of the demo environment, per env."""

    obs: Any  # float32 (8,)
    action: Any  # int32
    reward: Any  # float32
    done: Any  # bool
    step: Any  # int32: the actor's step index, for the exactly-once check


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs (see `expvault demo --help`)."""

    actors: int = 2
    envs: int = 8
    steps: int = 65_536
    buffer_length: int = 1024
    write_interval: int = 128
    root: Path = Path("vaults")
    vault_name: str = ""
    target: str = ""
    sample_batch: int = 32
    sample_length: int = 16
    reconnect_timeout_s: float = 60.0
    steps_per_s: float = 0.0

    @property
    def steps_per_actor(self) -> int:
        """Steps each actor produces: `steps` rounded up to whole write intervals."""
        return -(-self.steps // self.write_interval) * self.write_interval


def _checksum(leaves: list[np.ndarray[Any, Any]]) -> int:
    """Order-independent checksum: the uint32 sum (mod 2**32) of every leaf's 32-bit words."""
    total = 0
    for leaf in leaves:
        words = leaf.astype(np.uint32) if leaf.dtype == np.bool_ else leaf.view(np.uint32)
        total += int(np.sum(words, dtype=np.uint32))
    return total % _MOD


# -- actor --------------------------------------------------------------------------------------


def _actor(actor: int, settings: DemoSettings, target: str, events: Any) -> None:
    """One actor process: steps `envs` environments, writes every `write_interval` steps."""
    import flashbax as fbx
    import jax
    import jax.numpy as jnp

    import expvault

    envs, interval = settings.envs, settings.write_interval
    buffer = expvault.counted(
        fbx.make_trajectory_buffer(
            add_batch_size=envs,
            max_length_time_axis=settings.buffer_length,
            min_length_time_axis=1,
            sample_batch_size=1,
            sample_sequence_length=1,
            period=1,
        )
    )
    example = Transition(
        obs=jnp.zeros((_OBS_DIM,), jnp.float32),
        action=jnp.zeros((), jnp.int32),
        reward=jnp.zeros((), jnp.float32),
        done=jnp.zeros((), jnp.bool_),
        step=jnp.zeros((), jnp.int32),
    )

    def env_step(carry: Any, key: Any) -> tuple[Any, Transition]:
        """A random walk in 8-D: reward is minus the distance to the origin; done beyond 4."""
        position, t = carry
        action = jax.random.randint(key, (envs,), 0, 2 * _OBS_DIM)
        move = (
            jax.nn.one_hot(action % _OBS_DIM, _OBS_DIM)
            * jnp.where(action < _OBS_DIM, 1, -1)[:, None]
        )
        position = position + 0.25 * move
        distance = jnp.linalg.norm(position, axis=-1)
        done = distance > 4.0
        step = Transition(
            obs=position,
            action=action.astype(jnp.int32),
            reward=-distance,
            done=done,
            step=jnp.full((envs,), t, jnp.int32),
        )
        position = jnp.where(done[:, None], 0.0, position)
        return (position, t + 1), step

    def rollout(state: Any, carry: Any, key: Any) -> tuple[Any, Any, Any, Any]:
        key, sub = jax.random.split(key)
        carry, steps = jax.lax.scan(env_step, carry, jax.random.split(sub, interval))
        trajectory = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), steps)  # (envs, interval, ...)
        words = [
            jnp.sum(
                x.astype(jnp.uint32)
                if x.dtype == jnp.bool_
                else jax.lax.bitcast_convert_type(x, jnp.uint32),
                dtype=jnp.uint32,
            )
            for x in jax.tree.leaves(trajectory)
        ]
        return buffer.add(state, trajectory), carry, key, sum(words[1:], words[0])

    step_fn = jax.jit(rollout, donate_argnums=0)
    state = buffer.init(example)
    carry = (jnp.zeros((envs, _OBS_DIM), jnp.float32), jnp.int32(0))
    key = jax.random.PRNGKey(actor)
    checksum = 0
    produced = 0
    with expvault.RemoteVault(
        target,
        settings.vault_name,
        state.experience,
        vault_uid=f"actor-{actor}",
        reconnect_timeout_s=settings.reconnect_timeout_s,
    ) as vault:
        started = time.perf_counter()
        while produced < settings.steps_per_actor:
            state, carry, key, words = step_fn(state, carry, key)
            vault.write(state)
            produced += interval
            checksum = (checksum + int(words)) % _MOD
            events.put(
                ("actor", actor, produced, vault.committed_index, time.perf_counter() - started)
            )
            if settings.steps_per_s:  # pace like an environment of that speed
                ahead_s = started + produced / settings.steps_per_s - time.perf_counter()
                if ahead_s > 0:
                    time.sleep(ahead_s)
        vault.flush()
        events.put(("actor_done", actor, produced, vault.committed_index, checksum))


# -- learner ------------------------------------------------------------------------------------


def _learner(settings: DemoSettings, target: str, events: Any) -> None:
    """The learner process: follows every stream, checks each step arrives once, samples."""
    expected = settings.steps_per_actor
    received: dict[str, int] = {}
    checksums: dict[str, int] = {}
    problems: list[str] = []
    samples = 0
    last_sample = 0.0
    with _open_reader(settings, target) as reader:
        for uid, start, experience in reader.follow(all_streams=True):
            n = int(experience["step"].shape[1])
            if start != received.get(uid, 0):
                problems.append(f"{uid}: got steps from {start}, expected {received.get(uid, 0)}")
            steps = experience["step"]
            if not np.array_equal(steps, np.broadcast_to(np.arange(start, start + n), steps.shape)):
                problems.append(f"{uid}: step ids of [{start}, {start + n}) are not in order")
            leaves = [experience[k] for k in ("obs", "action", "reward", "done", "step")]
            checksums[uid] = (checksums.get(uid, 0) + _checksum(leaves)) % _MOD
            received[uid] = start + n
            now = time.perf_counter()
            if now - last_sample > 0.2 and min(received.values()) >= settings.sample_length:
                batch = reader.sample(settings.sample_batch, settings.sample_length)
                obs = batch.experience["obs"]
                if obs.shape[:2] != (settings.sample_batch, settings.sample_length):
                    problems.append(f"sample has shape {obs.shape}")
                samples += 1
                last_sample = now
            events.put(("learner", dict(received), samples))
            if len(received) == settings.actors and all(v >= expected for v in received.values()):
                break
    events.put(("learner_done", dict(received), dict(checksums), samples, problems))


def _open_reader(settings: DemoSettings, target: str) -> Any:
    """A `VaultReader` of the demo's vault; waits (up to the reconnect timeout) for its creation."""
    import expvault

    deadline = time.monotonic() + settings.reconnect_timeout_s
    while True:
        try:
            return expvault.VaultReader(
                target, settings.vault_name, reconnect_timeout_s=settings.reconnect_timeout_s
            )
        except expvault.NotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# -- orchestration ------------------------------------------------------------------------------


@dataclass
class _Progress:
    produced: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    rate: dict[int, float] = field(default_factory=dict)
    actor_checksums: dict[int, int] = field(default_factory=dict)
    learner_received: dict[str, int] = field(default_factory=dict)
    learner_checksums: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    learner_done: bool = False

    def line(self, settings: DemoSettings) -> str:
        actors = "  ".join(
            f"actor-{a} {self.produced.get(a, 0):>6}/{settings.steps_per_actor} "
            f"({self.rate.get(a, 0.0) * settings.envs / 1e3:5.1f}k env-steps/s)"
            for a in range(settings.actors)
        )
        committed = sum(self.committed.values())
        lag = committed - sum(self.learner_received.values())
        return f"{actors}  | committed {committed}  learner lag {lag} steps  samples {self.samples}"


@contextlib.contextmanager
def _embedded_server(root: Path) -> Iterator[str]:
    """Runs a vault server on a free loopback port in a background thread."""
    from expvault_server.app import VaultServer
    from expvault_server.config import ServerConfig

    loop = asyncio.new_event_loop()
    server = VaultServer(ServerConfig(root=root, listen="127.0.0.1:0"))
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as e:
            failure.append(e)
            started.set()
            return
        started.set()
        loop.run_until_complete(server.wait())

    thread = threading.Thread(target=run, name="expvault-demo-server", daemon=True)
    thread.start()
    started.wait()
    if failure:
        raise failure[0]
    try:
        yield server.address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=10.0), loop).result()
        thread.join()
        loop.close()


def run_demo(settings: DemoSettings, *, out: Any = sys.stdout) -> bool:
    """Runs the demo; prints progress and a summary to `out`.

    Returns:
        True when the learner received every step of every actor, exactly once, in order, with
        matching checksums.
    """
    if not settings.vault_name:
        name = datetime.now().strftime("demo-%Y%m%d-%H%M%S")
        settings = dataclasses.replace(settings, vault_name=name)
    live = hasattr(out, "isatty") and out.isatty()
    with contextlib.ExitStack() as stack:
        target = settings.target or stack.enter_context(_embedded_server(settings.root))
        where = "embedded server" if not settings.target else "server"
        print(
            f"expvault demo: {settings.actors} actors x {settings.envs} envs x "
            f"{settings.steps_per_actor} steps -> vault {settings.vault_name!r} on {where} "
            f"{target}" + (f" (root {settings.root.absolute()})" if not settings.target else ""),
            file=out,
            flush=True,
        )
        progress = _run_processes(settings, target, out, live)
    return _summary(settings, progress, out)


def _run_processes(settings: DemoSettings, target: str, out: Any, live: bool) -> _Progress:
    ctx = mp.get_context("spawn")  # JAX and gRPC do not survive fork
    events: Any = ctx.Queue()
    # The vault must exist before the learner follows it: the first actor creates it.
    actors = [
        ctx.Process(target=_actor, args=(a, settings, target, events), name=f"actor-{a}")
        for a in range(settings.actors)
    ]
    for p in actors:
        p.start()
    learner = ctx.Process(target=_learner, args=(settings, target, events), name="learner")
    progress = _Progress()
    started = time.perf_counter()
    deadline = started + 600.0
    last_print = 0.0
    learner_started = False
    try:
        while not progress.learner_done and time.perf_counter() < deadline:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                event = None
            if event is not None:
                _apply(progress, event)
            if not learner_started and progress.produced:
                learner.start()
                learner_started = True
            crashed = [p.name for p in (*actors, learner) if p.exitcode not in (None, 0)]
            if crashed:
                progress.problems.append(f"processes failed: {crashed}")
                break
            now = time.perf_counter()
            if now - last_print >= 1.0:
                line = progress.line(settings)
                print(
                    ("\r" + line) if live else line, end="" if live else "\n", file=out, flush=True
                )
                last_print = now
        else:
            if not progress.learner_done:
                progress.problems.append("timed out after 600 s")
    finally:
        for p in (*actors, learner) if learner_started else actors:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if live:
        print(file=out)
    print(f"finished in {time.perf_counter() - started:.1f} s", file=out)
    return progress


def _apply(progress: _Progress, event: tuple[Any, ...]) -> None:
    kind = event[0]
    if kind == "actor":
        _, actor, produced, committed, elapsed = event
        progress.produced[actor] = produced
        progress.committed[actor] = committed
        progress.rate[actor] = produced / max(elapsed, 1e-9)
    elif kind == "actor_done":
        _, actor, produced, committed, checksum = event
        progress.produced[actor] = produced
        progress.committed[actor] = committed
        progress.actor_checksums[actor] = checksum
    elif kind == "learner":
        progress.learner_received = event[1]
        progress.samples = event[2]
    elif kind == "learner_done":
        _, received, checksums, samples, problems = event
        progress.learner_received, progress.learner_checksums = received, checksums
        progress.samples = samples
        progress.problems.extend(problems)
        progress.learner_done = True


def _summary(settings: DemoSettings, progress: _Progress, out: Any) -> bool:
    ok = not progress.problems
    for a in range(settings.actors):
        uid = f"actor-{a}"
        produced = progress.produced.get(a, 0)
        committed = progress.committed.get(a, 0)
        received = progress.learner_received.get(uid, 0)
        same = progress.actor_checksums.get(a) == progress.learner_checksums.get(uid)
        good = produced == committed == received == settings.steps_per_actor and same
        ok &= good
        print(
            f"  {uid}: produced {produced}, committed {committed}, learner received {received}, "
            f"checksum {'match' if same else 'MISMATCH'} {'ok' if good else 'FAILED'}",
            file=out,
        )
    for problem in progress.problems:
        print(f"  problem: {problem}", file=out)
    total = sum(progress.learner_received.values())
    print(
        f"summary: {'OK' if ok else 'FAILED'}: learner received {total} of "
        f"{settings.actors * settings.steps_per_actor} steps "
        f"({settings.actors} actors x {settings.envs} envs), exactly once and in order; "
        f"{progress.samples} sample batches of {settings.sample_batch} x {settings.sample_length}",
        file=out,
    )
    if not settings.target:
        root = settings.root.absolute()
        print(
            f"the vault lives in {root / settings.vault_name}\n"
            f"  inspect it:  expvault serve --root {root}   (then, in another shell)  "
            f"expvault info {settings.vault_name}\n"
            f"  with flashbax: flashbax.vault.Vault({settings.vault_name!r}, rel_dir={str(root)!r},"
            f" vault_uid='actor-0').read()",
            file=out,
        )
    return ok


# -- one role alone (a container each) -----------------------------------------------------------


class _RoleReport:
    """Stands in for the event queue when a role runs alone: prints progress, keeps the result."""

    def __init__(self, settings: DemoSettings, out: Any) -> None:
        self._settings = settings
        self._out = out
        self._last_print = 0.0
        self.result: tuple[Any, ...] | None = None

    def put(self, event: tuple[Any, ...]) -> None:
        """Takes one event of `_actor` or `_learner`; prints a progress line at most each second."""
        kind = event[0]
        if kind in ("actor_done", "learner_done"):
            self.result = event
            return
        now = time.monotonic()
        if now - self._last_print < 1.0:
            return
        self._last_print = now
        if kind == "actor":
            _, actor, produced, committed, elapsed = event
            rate = produced * self._settings.envs / max(elapsed, 1e-9) / 1e3
            line = (
                f"actor-{actor}: produced {produced}/{self._settings.steps_per_actor}, "
                f"committed {committed} ({rate:.1f}k env-steps/s)"
            )
        else:
            _, received, samples = event
            line = f"learner: received {received}, samples {samples}"
        print(line, file=self._out, flush=True)


def run_role(
    role: str, settings: DemoSettings, actor_id: int = 0, *, out: Any = sys.stdout
) -> bool:
    """Runs one role of the demo in this process against the server `settings.target`.

    An actor writes stream `actor-<actor_id>`; the learner follows the vault until each of
    `settings.actors` streams has `settings.steps_per_actor` steps. Both keep going through a
    server restart shorter than `settings.reconnect_timeout_s`. The last line printed to `out`
    is the result as JSON: for an actor `{"role": "actor", "vault_name", "vault_uid",
    "produced", "committed", "checksum"}`, for the learner `{"role": "learner", "vault_name",
    "received": {uid: steps}, "checksums": {uid: checksum}, "samples", "problems": [...]}`.
    Checksums are `_checksum`'s (uint32 sums of every leaf's 32-bit words, mod 2**32).

    Args:
        role: `"actor"` or `"learner"`.
        settings: what to run; `target` and `vault_name` must be set.
        actor_id: the actor's number (its stream is `actor-<actor_id>`; it seeds the actor).
        out: where progress and the result go.

    Returns:
        True when the role's part of the check passed: the actor had every step acknowledged;
        the learner received every step of every actor once, in order.

    Raises:
        ValueError: `role` is neither `"actor"` nor `"learner"`.
        ExpvaultError: the server refused, or stayed away longer than the reconnect timeout.
    """
    if role not in ("actor", "learner"):
        raise ValueError(f"role must be 'actor' or 'learner', got {role!r}")
    report = _RoleReport(settings, out)
    if role == "actor":
        _actor(actor_id, settings, settings.target, report)
        assert report.result is not None  # _actor reports before returning
        _, _, produced, committed, checksum = report.result
        result: dict[str, Any] = {
            "role": "actor",
            "vault_name": settings.vault_name,
            "vault_uid": f"actor-{actor_id}",
            "produced": produced,
            "committed": committed,
            "checksum": checksum,
        }
        ok = bool(produced == committed == settings.steps_per_actor)
    else:
        _learner(settings, settings.target, report)
        assert report.result is not None  # _learner reports before returning
        _, received, checksums, samples, problems = report.result
        result = {
            "role": "learner",
            "vault_name": settings.vault_name,
            "received": received,
            "checksums": checksums,
            "samples": samples,
            "problems": problems,
        }
        counts: list[int] = list(received.values())
        ok = not problems and len(counts) == settings.actors
        ok &= all(n == settings.steps_per_actor for n in counts)
    print(json.dumps(result, sort_keys=True), file=out, flush=True)
    return ok


# -- command line -------------------------------------------------------------------------------


def _configure(parser: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    parser.add_argument(
        "role",
        nargs="?",
        choices=("all", "actor", "learner"),
        default="all",
        help="all (default): a server unless --target, actors and a learner in one run; "
        "actor or learner: that role alone against the server --target, printing its result "
        "as a final JSON line",
    )
    parser.add_argument("--actors", type=int, default=d.actors, help="actor processes")
    parser.add_argument("--envs", type=int, default=d.envs, help="environments per actor (B)")
    parser.add_argument("--steps", type=int, default=d.steps, help="time steps per actor")
    parser.add_argument(
        "--buffer-length", type=int, default=d.buffer_length, help="flashbax ring length T"
    )
    parser.add_argument(
        "--write-interval", type=int, default=d.write_interval, help="steps between writes"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(env_default("ROOT", str(d.root))),
        help="directory of the embedded server's vaults (env EXPVAULT_ROOT; default vaults)",
    )
    parser.add_argument(
        "--vault-name",
        default="",
        help="default: demo-<date>-<time>; required with a role (all of them name one vault)",
    )
    parser.add_argument(
        "--target",
        default="",
        help="use this running server HOST:PORT instead of an embedded one; required with a role",
    )
    parser.add_argument(
        "--actor-id", type=int, default=0, help="with role actor: writes stream actor-<ID>"
    )
    parser.add_argument(
        "--steps-per-s",
        type=float,
        default=d.steps_per_s,
        help="pace each actor to at most this many time steps per second (default 0: as fast "
        "as it can)",
    )
    parser.add_argument(
        "--reconnect-timeout-s",
        type=float,
        default=d.reconnect_timeout_s,
        help="how long actors and the learner wait for an absent server (and the learner for "
        "the vault to be created)",
    )


def _run(args: argparse.Namespace) -> int:
    for name in ("actors", "envs", "steps", "buffer_length", "write_interval"):
        if getattr(args, name) < 1:
            print(f"expvault demo: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.write_interval > args.buffer_length:
        print("expvault demo: --write-interval must be <= --buffer-length", file=sys.stderr)
        return 2
    if args.actor_id < 0 or args.steps_per_s < 0 or args.reconnect_timeout_s <= 0:
        print(
            "expvault demo: --actor-id and --steps-per-s must be >= 0, --reconnect-timeout-s > 0",
            file=sys.stderr,
        )
        return 2
    if args.role != "all" and not (args.target and args.vault_name):
        print(
            f"expvault demo {args.role}: give --target HOST:PORT of the server and --vault-name "
            "(the same for every actor and the learner)",
            file=sys.stderr,
        )
        return 2
    settings = DemoSettings(
        actors=args.actors,
        envs=args.envs,
        steps=args.steps,
        buffer_length=args.buffer_length,
        write_interval=args.write_interval,
        root=args.root,
        vault_name=args.vault_name,
        target=args.target,
        reconnect_timeout_s=args.reconnect_timeout_s,
        steps_per_s=args.steps_per_s,
    )
    if args.role != "all":
        return 0 if run_role(args.role, settings, args.actor_id) else 1
    return 0 if run_demo(settings) else 1


COMMAND = Command(
    "run actors and a learner against a vault server, with live progress and a check",
    _configure,
    _run,
)
