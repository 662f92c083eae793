"""The storage's log budget: acknowledged steps waiting to be materialized stay bounded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from expvault.schema import Schema
from expvault.storage import Store, Stream

B = 2
SCHEMA = Schema.from_experience({"obs": np.zeros((B, 1, 8), np.float32)})


def _steps(start: int, stop: int) -> list[np.ndarray[Any, Any]]:
    t = np.arange(start, stop, dtype=np.float32)[None, :, None]
    return [
        np.broadcast_to(t, (B, stop - start, 8)) + np.arange(B, dtype=np.float32)[:, None, None]
    ]


def test_the_log_budget_bounds_what_waits_for_materialization(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = Stream._materialize_locked

    def slowly(self: Stream, stop: int) -> Any:
        time.sleep(0.05)  # a disk slower than the log: without the bound, the log piles up
        return slow(self, stop)

    monkeypatch.setattr(Stream, "_materialize_locked", slowly)
    chunk_bytes = 16 * SCHEMA.step_bytes
    limit = 4 * chunk_bytes
    store = Store(tmp_path, max_log_bytes=limit)
    try:
        store.create_vault("v", SCHEMA, compression="none", chunk_steps=16)
        stream = store.open_stream("v", "u", create=True)
        for start in range(0, 640, 16):  # one chunk per append: 40 chunks
            assert stream.append(start, _steps(start, start + 16)) == start + 16
        budget = store.log_budget
        # The bound, plus what a stream holding less than one chunk may always commit.
        assert 0 < budget.peak_bytes <= limit + 2 * chunk_bytes
        np.testing.assert_array_equal(stream.read(0, 640)[0], _steps(0, 640)[0])
    finally:
        store.close()
    assert budget.used_bytes == 0
    reopened = Store(tmp_path)
    try:
        np.testing.assert_array_equal(
            reopened.open_stream("v", "u").read(0, 640)[0], _steps(0, 640)[0]
        )
    finally:
        reopened.close()
