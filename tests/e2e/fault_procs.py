"""Actor and learner processes for the server-kill test, with per-step content checksums.

    python fault_procs.py actor TARGET VAULT UID OUT_DIR [--seed S] [--sleep-s X] [--exact]
    python fault_procs.py learner TARGET VAULT OUT_DIR

The actor steps random experience into a counted flashbax trajectory buffer and writes every
delta with `RemoteVault.write(state, wait=False)`, printing `ack <committed_index>` after each
write. It computes a CRC32 of every step it produced (all leaves, all batch rows) and, once
`OUT_DIR/stop` exists, flushes, closes, saves the checksums as `OUT_DIR/steps-UID.npy` and prints
`done <produced> <committed>`. With `--exact` every value is a function of the step's stream
offset (`exact_experience`), so a reader can check any range without the actor's checksums.

The learner follows every stream of the vault (`VaultReader.follow`), checks that each item
starts where the previous one of its stream stopped, appends each step's CRC32 to
`OUT_DIR/learner-UID.crc` (uint32, flushed) and prints `pos <uid> <offset>`; it runs until
killed. Neither handles a server outage itself: `RemoteVault` and `follow` reconnect on their own.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 4
OBS = 8
RING = 64


def exact_experience(start: int, stop: int) -> dict[str, np.ndarray[Any, Any]]:
    """Steps `[start, stop)` of an `--exact` stream: leaves `(BATCH, stop - start, ...)`."""
    t = np.arange(start, stop, dtype=np.int64)[None, :]
    code = t * BATCH + np.arange(BATCH, dtype=np.int64)[:, None]
    return {
        "obs": ((code[..., None] * OBS + np.arange(OBS)) % (1 << 24)).astype(np.float32),
        "action": (code % (1 << 30)).astype(np.int32),
        "step": np.broadcast_to(t, code.shape).astype(np.int32),
    }


def step_checksums(experience: dict[str, Any]) -> list[int]:
    """CRC32 of each time step: leaves in sorted name order, each `(B, T, ...)` sliced at t."""
    leaves = [np.ascontiguousarray(np.asarray(experience[k])) for k in sorted(experience)]
    steps = leaves[0].shape[1]
    out = []
    for t in range(steps):
        crc = 0
        for leaf in leaves:
            crc = zlib.crc32(np.ascontiguousarray(leaf[:, t]).tobytes(), crc)
        out.append(crc)
    return out


def assert_stored(reader: Any, totals: dict[str, int], out: Path) -> None:
    """`reader` serves exactly the streams in `totals`, each holding the steps its actor logged.

    Args:
        reader: a `VaultReader` of vault "v".
        totals: steps produced per stream (vault_uid).
        out: the actors' output directory (`steps-UID.npy`: one CRC32 per acknowledged step).
    """
    assert reader.streams() == totals
    for uid, total in totals.items():
        want = np.load(out / f"steps-{uid}.npy")
        assert len(want) == total
        stored = np.array(step_checksums(reader.read(vault_uid=uid)), np.uint32)
        np.testing.assert_array_equal(stored, want, err_msg=f"{uid}: stored steps")


def _actor(args: argparse.Namespace) -> int:
    import flashbax as fbx
    import jax
    import jax.numpy as jnp

    import expvault

    out = Path(args.out_dir)
    buffer = expvault.counted(
        fbx.make_trajectory_buffer(
            add_batch_size=BATCH,
            max_length_time_axis=RING,
            min_length_time_axis=1,
            sample_batch_size=1,
            sample_sequence_length=1,
            period=1,
        )
    )
    example = {
        "obs": jnp.zeros((OBS,), jnp.float32),
        "action": jnp.zeros((), jnp.int32),
        "step": jnp.zeros((), jnp.int32),
    }
    state = buffer.init(example)
    add = jax.jit(buffer.add, donate_argnums=0)
    rng = np.random.default_rng(args.seed)
    checksums: list[int] = []
    produced = 0
    with expvault.RemoteVault(
        args.target,
        args.vault_name,
        state.experience,
        vault_uid=args.vault_uid,
        reconnect_timeout_s=120,
    ) as vault:
        print(f"start {vault.vault_index}", flush=True)
        produced = vault.vault_index
        while not (out / "stop").exists():
            n = int(rng.integers(1, 17))
            batch = (
                exact_experience(produced, produced + n)
                if args.exact
                else {
                    "obs": rng.standard_normal((BATCH, n, OBS)).astype(np.float32),
                    "action": rng.integers(0, 1 << 30, (BATCH, n)).astype(np.int32),
                    "step": np.broadcast_to(np.arange(produced, produced + n), (BATCH, n)).astype(
                        np.int32
                    ),
                }
            )
            state = add(state, jax.tree_util.tree_map(jnp.asarray, batch))
            vault.write(state, wait=False)
            checksums += step_checksums(batch)
            produced += n
            print(f"ack {vault.committed_index}", flush=True)
            time.sleep(args.sleep_s)
        committed = vault.flush()
    np.save(out / f"steps-{args.vault_uid}.npy", np.array(checksums, np.uint32))
    print(f"done {produced} {committed}", flush=True)
    return 0


def _learner(args: argparse.Namespace) -> int:
    import expvault

    out = Path(args.out_dir)
    files: dict[str, Any] = {}
    positions: dict[str, int] = {}
    with expvault.VaultReader(args.target, args.vault_name, reconnect_timeout_s=120) as reader:
        print("following", flush=True)
        for uid, start, experience in reader.follow(all_streams=True):
            if start != positions.get(uid, 0):
                print(f"error {uid} item starts at {start}, expected {positions.get(uid, 0)}")
                return 1
            crcs = step_checksums(experience)
            if uid not in files:
                files[uid] = open(out / f"learner-{uid}.crc", "ab")  # noqa: SIM115
            files[uid].write(np.array(crcs, np.uint32).tobytes())
            files[uid].flush()
            positions[uid] = start + len(crcs)
            print(f"pos {uid} {positions[uid]}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    actor = sub.add_parser("actor")
    actor.add_argument("target")
    actor.add_argument("vault_name")
    actor.add_argument("vault_uid")
    actor.add_argument("out_dir")
    actor.add_argument("--seed", type=int, default=0)
    actor.add_argument("--sleep-s", type=float, default=0.005)
    actor.add_argument("--exact", action="store_true")
    learner = sub.add_parser("learner")
    learner.add_argument("target")
    learner.add_argument("vault_name")
    learner.add_argument("out_dir")
    args = parser.parse_args()
    return _actor(args) if args.mode == "actor" else _learner(args)


if __name__ == "__main__":
    sys.exit(main())
