"""The chunk cache that sampling cuts small leaves' windows out of."""

from __future__ import annotations

import numpy as np
import pytest

from expvault.storage.chunks import ChunkCache, small_leaf_chunks


def test_the_cache_keeps_the_most_recently_used_chunks_within_its_bound() -> None:
    cache = ChunkCache(max_bytes=3 * 800)
    for c in range(3):
        cache.put(("s", c), np.full(100, c, np.int64))  # 800 bytes each
    assert cache.nbytes == 2400
    assert cache.get(("s", 0)) is not None  # 0 is now the most recently used
    cache.put(("s", 3), np.full(100, 3, np.int64))
    assert cache.get(("s", 1)) is None  # the least recently used went
    kept = cache.get(("s", 0))
    assert kept is not None
    assert int(kept[0]) == 0
    assert cache.nbytes == 2400
    with pytest.raises(ValueError, match="read-only"):
        kept[0] = 7  # shared by every reader
    cache.put(("s", 9), np.zeros(1000, np.int64))  # larger than the bound: not kept
    assert cache.get(("s", 9)) is None
    assert cache.nbytes == 2400
    assert ChunkCache.token() != ChunkCache.token()


def test_only_small_leaves_with_small_chunks_are_cut_from_cached_chunks() -> None:
    assert small_leaf_chunks(4, (16, 256)) == (16, 256)  # a reward: 16 KiB chunks
    assert small_leaf_chunks(256, (1, 256, 64)) is None  # obs: indexed reads
    assert small_leaf_chunks(4, (16, 1 << 20)) is None  # a chunk of 64 MiB
