"""glibc malloc settings of the server process, so that memory it frees goes back to the system.

glibc adapts its mmap threshold: once a block larger than the threshold is freed (a group
commit's merged arrays, a read block's messages), the threshold rises to that block's size, up to
32 MiB, and from then on such blocks come from the heaps of up to 8 arenas per core (one per
thread that allocates: gRPC's, tensorstore's, the worker threads). Memory freed inside those
heaps stays resident: with the server's ~30 threads, 4 writers streaming 2 GB left it at 1.6-2.1
GB after they finished. The server fixes the threshold (larger blocks get their own mappings,
unmapped when freed), bounds the arenas, and gives free pages inside the heaps back every second
(`malloc_trim`).

The threshold stays above 1 MiB on purpose: tensorstore decodes 1 MiB chunks for every read that
misses its cache, and mapping (and zero-filling) each one anew halved the sample rate at 256 KiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
import time
from typing import Final

logger = logging.getLogger(__name__)

__all__ = ["ARENA_MAX", "MMAP_THRESHOLD_BYTES", "TRIM_INTERVAL_S", "bound_malloc"]

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8

# Blocks of this size or more get their own mapping (group commits, read blocks, log segments).
MMAP_THRESHOLD_BYTES: Final = 2 << 20
# Free memory at the top of a heap beyond this is given back at once.
TRIM_THRESHOLD_BYTES: Final = 1 << 20
# Arenas for the blocks below the threshold, over all threads.
ARENA_MAX: Final = 4
# Seconds between two `malloc_trim` calls (free pages inside the heaps back to the system).
TRIM_INTERVAL_S: Final = 1.0


def bound_malloc() -> bool:
    """Sets the thresholds and the arena count above and starts the trimming thread (once).

    Call it early in the server process, before the store and the server allocate.

    Returns:
        Whether they were set: False outside Linux or without glibc's `mallopt` (e.g. musl),
        where the allocator's defaults stay.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_ARENA_MAX, ARENA_MAX),
    )
    done = all(mallopt(param, value) == 1 for param, value in settings)

    def trim() -> None:
        while True:
            time.sleep(TRIM_INTERVAL_S)
            malloc_trim(0)

    threading.Thread(target=trim, name="expvault-malloc-trim", daemon=True).start()
    logger.debug(
        "malloc: thresholds and arena count set: %s; trimming every %ss", done, TRIM_INTERVAL_S
    )
    return done
