"""A stream writer process for the crash and writer-lock tests, and the data it writes.

    python stream_writer.py ROOT VAULT UID [--seed S] [--chunk-steps N] [--inflight K] [--stop N]
        [--log-file-bytes N]

It opens (creating when missing) stream VAULT/UID under ROOT, prints `start <committed length>`,
then appends deterministic steps (`expected(start, stop)`) in pieces of random sizes, keeping up
to K appends in flight, and prints `ack <committed offset>` (flushed) after each acknowledged
append. With `--stop N` it stops after N steps, closes the stream and prints `closed <length>`;
without, it runs until killed. `--log-file-bytes` sets the size at which the write-ahead log moves
on to its next file, and materializes every 8 chunks (small: many files, each emptied and used
again many times).
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np

BATCH = 2
OBS_SHAPE = (5,)


def experience_structure() -> dict[str, Any]:
    """The stream's experience structure: leaves `(B, 1, ...)`."""
    return {
        "obs": np.zeros((BATCH, 1, *OBS_SHAPE), np.float32),
        "step": np.zeros((BATCH, 1), np.int64),
        "done": np.zeros((BATCH, 1), np.bool_),
    }


def expected(start: int, stop: int) -> list[np.ndarray[Any, Any]]:
    """Steps `[start, stop)` in schema order (`done.`, `obs.`, `step.`), a function of the offset.

    Every value is exact in its dtype, so a wrong, torn or zero-filled step never matches.
    """
    t = np.arange(start, stop, dtype=np.int64)[None, :]
    row = np.arange(BATCH, dtype=np.int64)[:, None]
    step = t * BATCH + row
    j = np.arange(OBS_SHAPE[0], dtype=np.int64)
    obs = ((step[..., None] * 7919 + j * 104729 + 1) % 65521).astype(np.float32)
    done = (t % 7 == 3) | (row == 1) & (t % 5 == 0)
    return [np.broadcast_to(done, step.shape).copy(), obs, step]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("vault_name")
    parser.add_argument("vault_uid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-steps", type=int, default=16)
    parser.add_argument("--inflight", type=int, default=3)
    parser.add_argument("--stop", type=int, default=None)
    parser.add_argument("--log-file-bytes", type=int, default=None)
    args = parser.parse_args()

    from expvault.schema import Schema
    from expvault.storage import Store, logfiles
    from expvault.storage import stream as stream_module

    if args.log_file_bytes is not None:
        logfiles.LOG_FILE_MIN_BYTES = args.log_file_bytes
        logfiles.RECORDS_PER_FILE = 1
        stream_module.MATERIALIZE_MIN_BYTES = 0  # chunks move every 8: files are emptied often

    store = Store(args.root)
    schema = Schema.from_experience(experience_structure())
    store.create_vault(args.vault_name, schema, compression="none", chunk_steps=args.chunk_steps)
    stream = store.open_stream(args.vault_name, args.vault_uid, create=True)
    offset = stream.length
    print(f"start {offset}", flush=True)
    rng = np.random.default_rng(args.seed)
    inflight: deque[Future[int]] = deque()
    while args.stop is None or offset < args.stop:
        n = int(rng.integers(1, 40))
        if args.stop is not None:
            n = min(n, args.stop - offset)
        inflight.append(stream.submit(offset, expected(offset, offset + n)))
        offset += n
        while len(inflight) >= args.inflight:
            print(f"ack {inflight.popleft().result()}", flush=True)
    while inflight:
        print(f"ack {inflight.popleft().result()}", flush=True)
    store.close()
    print(f"closed {stream.length}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
