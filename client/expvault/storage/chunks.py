"""Whole stored chunks of small leaves, kept decoded, for gathering sample windows with numpy.

Sampling reads windows of single batch rows: `(row, [start, start + L))` for many rows and starts.
tensorstore's indexed read (`vindex`) costs about 0.2 µs per element it gathers, whatever the
element's size: for a leaf of a few bytes per step (reward, done, action) that is nearly all of
its cost, ~0.5 ms per leaf for a 32 x 64 batch here, while the same windows cut out of decoded
chunks with numpy take a few microseconds. A leaf's whole stored data is small too (9 bytes per
row and step for those three), so a modest cache holds much of it.

Only complete chunks (every step of them materialized) are kept: steps once materialized never
change, so an entry never goes stale. Entries are keyed by a token unique to each `Stream`
object, so a stream deleted and created again never sees the old one's chunks.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, Final

import numpy as np

__all__ = [
    "MAX_CHUNK_BYTES",
    "SMALL_LEAF_BYTES",
    "ChunkCache",
    "WindowGather",
    "small_leaf_chunks",
]

# Leaves of at most this many bytes per batch row and step are gathered from cached chunks;
# larger ones are read with tensorstore's indexed read, whose per-element cost they amortize.
SMALL_LEAF_BYTES: Final = 64
# Chunks larger than this are not read whole for a window (e.g. a vault flashbax wrote with
# another chunking).
MAX_CHUNK_BYTES: Final = 1 << 20

_tokens = itertools.count()


class ChunkCache:
    """A least-recently-used set of decoded chunks, bounded in bytes, shared by threads.

    Args:
        max_bytes: the most the chunks kept may hold; 0 keeps none.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[Hashable, np.ndarray[Any, Any]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def token() -> int:
        """A key prefix unique to the caller (one per `Stream` object)."""
        return next(_tokens)

    @property
    def nbytes(self) -> int:
        """Bytes of the chunks kept."""
        with self._lock:
            return self._bytes

    def get(self, key: Hashable) -> np.ndarray[Any, Any] | None:
        """The chunk kept under `key` (now the most recently used), or None."""
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._chunks.move_to_end(key)
            return chunk

    def put(self, key: Hashable, chunk: np.ndarray[Any, Any]) -> None:
        """Keeps `chunk` (read-only from now on); the least recently used go beyond the bound."""
        if chunk.nbytes > self.max_bytes:
            return
        chunk.flags.writeable = False
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._chunks[key] = chunk
            self._bytes += chunk.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._chunks.popitem(last=False)
                self._bytes -= dropped.nbytes


def small_leaf_chunks(
    row_step_bytes: int, chunk_shape: Sequence[int | None]
) -> tuple[int, int] | None:
    """`(rows, steps)` per stored chunk of a leaf to gather from cached chunks, else None.

    Args:
        row_step_bytes: the leaf's bytes per batch row and step.
        chunk_shape: its stored chunk shape, `(rows, steps, ...)` (tensorstore's read chunk).
    """
    rows, steps = int(chunk_shape[0] or 1), int(chunk_shape[1] or 1)
    if row_step_bytes > SMALL_LEAF_BYTES or rows * steps * row_step_bytes > MAX_CHUNK_BYTES:
        return None
    return rows, steps


class WindowGather:
    """Windows of one small leaf cut out of whole chunks: those cached, the others read at once.

    Args:
        cache: where complete chunks are kept, and looked up first.
        prefix: the key prefix of this leaf's chunks in `cache` (stream token, leaf).
        chunk_shape: `(rows, steps)` per stored chunk.
        windows: `(row, start)` pairs, steps `[start, start + length)` of row `row`, each wholly
            materialized.
        length: steps per window.
        batch_size: `B`, the rows of the leaf.
        materialized: the stream's materialized steps: chunks ending at or before are complete.
        array: the leaf's tensorstore array, read a whole chunk at a time.
    """

    def __init__(
        self,
        cache: ChunkCache,
        prefix: tuple[Hashable, ...],
        chunk_shape: tuple[int, int],
        windows: Sequence[tuple[int, int]],
        length: int,
        batch_size: int,
        materialized: int,
        array: Any,
    ) -> None:
        self._cache = cache
        self._prefix = prefix
        self._shape = chunk_shape
        self._windows = windows
        self._length = length
        self._materialized = materialized
        rows_per, steps_per = chunk_shape
        self._chunks: dict[tuple[int, int], np.ndarray[Any, Any]] = {}
        self._reading: dict[tuple[int, int], Any] = {}
        for row, start in windows:
            r = row // rows_per
            for c in range(start // steps_per, (start + length - 1) // steps_per + 1):
                if (r, c) in self._chunks or (r, c) in self._reading:
                    continue
                chunk = cache.get((*prefix, r, c))
                if chunk is not None:
                    self._chunks[r, c] = chunk
                else:
                    rows = slice(r * rows_per, min(batch_size, (r + 1) * rows_per))
                    self._reading[r, c] = array[rows, c * steps_per : (c + 1) * steps_per].read()

    def into(self, out: np.ndarray[Any, Any]) -> None:
        """Waits for the chunks read, keeps the complete ones, copies window `w` to `out[w]`."""
        steps_per = self._shape[1]
        for (r, c), future in self._reading.items():
            chunk = self._chunks[r, c] = future.result()
            if (c + 1) * steps_per <= self._materialized:
                self._cache.put((*self._prefix, r, c), chunk)
        self._reading.clear()
        rows_per = self._shape[0]
        for w, (row, start) in enumerate(self._windows):
            r, within = divmod(row, rows_per)
            step = start
            while step < start + self._length:
                c, offset = divmod(step, steps_per)
                n = min(start + self._length - step, steps_per - offset)
                chunk = self._chunks[r, c]
                out[w, step - start : step - start + n] = chunk[within, offset : offset + n]
                step += n
