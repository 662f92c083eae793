"""A stream's writer lease on a shared object store, and the fences that stop a stale writer.

Several servers may serve one store; each stream has one writing server at a time. On a local
directory the kernel's `flock` enforces that. On an object store the writer holds a lease: the
object `<stream>/lease.json`, replaced only by conditional writes (the store's compare-and-swap on
its generation), renewed every quarter of its duration.

Taking over needs no clocks in common: a server that finds the lease held watches its generation;
if it has not changed for the whole duration (measured on the watcher's own monotonic clock), the
holder stopped renewing and the lease is taken with a conditional write on that generation. The
holder acknowledges appends only while its lease is surely valid: until `duration * SAFE_FRACTION`
after it *sent* its last successful renewal, which is before any watcher started counting.

A writer that loses its lease (a pause longer than the lease, a partition) may still have writes
in flight. Two fences make them harmless:
- each takeover records `[epoch, base]` in the lease: the new writer's epoch and the committed
  length it found. Log segments carry their writer's epoch in their name; a segment of an older
  epoch that reaches past the base of a newer one was never acknowledged and is ignored;
- the OCDBT database holds the key `FENCE_KEY` = the writer's epoch; the writer's commits of
  whole chunks carry a conditional write of it, so a stale writer's commit fails atomically.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from expvault.errors import StorageError, StreamBusyError
from expvault.storage.location import NO_VALUE, KvLocation

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
FENCE_KEY = "expvault.fence"
# The holder counts its lease valid for this part of its duration after sending a renewal.
SAFE_FRACTION = 0.75
DEFAULT_LEASE_S = 10.0
# Fences older than this many takeovers are dropped once the arrays hold their data.
_KEEP_FENCES = 8

# The default name in leases: unique per process.
PROCESS_OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

Fences = tuple[tuple[int, int], ...]


def segment_valid(epoch: int, stop: int, fences: Fences) -> bool:
    """Whether a log segment of `epoch` ending at `stop` may be part of the stream.

    It is, unless a later writer's takeover found fewer committed steps than it reaches: then its
    writer had lost the lease before writing it, and never acknowledged it.
    """
    return all(stop <= base for e, base in fences if e > epoch)


def parse_fences(document: Any) -> Fences:
    """The fences of a lease document (empty for none or a malformed one)."""
    try:
        return tuple((int(e), int(b)) for e, b in document.get("fences", ()))
    except (AttributeError, TypeError, ValueError):
        return ()


class Lease:
    """The right to write one stream of a shared store, renewed in the background.

    Args:
        location: the store.
        stream: the stream's key (`vault/uid`).
        duration_s: how long the lease lasts without renewal.
        owner: the writer's name in the lease (default `PROCESS_OWNER`); a lease held under this
            name is free for it (it does not write the stream in memory, or it would not ask).
        on_lost: called (from the renewal thread) when the lease is lost.
    """

    def __init__(
        self,
        location: KvLocation,
        stream: str,
        *,
        duration_s: float = DEFAULT_LEASE_S,
        owner: str | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        if duration_s <= 0:
            raise ValueError(f"lease duration must be > 0, got {duration_s}")
        self._location = location
        self._key = f"{stream}/{LEASE_FILE}"
        self._stream = stream
        self.duration_s = duration_s
        self.owner = owner or PROCESS_OWNER
        self._on_lost = on_lost
        self.epoch = 0
        self.fences: Fences = ()
        self._document: dict[str, Any] = {}
        self._generation = b""
        self._valid_until = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def read_fences(location: KvLocation, stream: str) -> Fences:
        """The fences readers apply to the stream's log (no lease needed)."""
        data, _ = location.read_with_generation(f"{stream}/{LEASE_FILE}")
        if data is None:
            return ()
        try:
            return parse_fences(json.loads(data))
        except ValueError:
            return ()

    # -- taking --------------------------------------------------------------------------------

    def acquire(
        self, committed_length: Callable[[Fences], int], wait_s: float | None = None
    ) -> None:
        """Takes the lease: at once when free, after it expired when its holder stopped renewing.

        Args:
            committed_length: given the fences so far, the stream's committed length as stored
                now; recorded as this epoch's base.
            wait_s: how long to watch a held lease for expiry; default its duration plus a second.

        Raises:
            StreamBusyError: another live server holds it (it renewed while we watched).
        """
        seen: dict[bytes, float] = {}  # generation -> when first seen, on our clock
        while True:
            data, generation = self._location.read_with_generation(self._key)
            document = _parse(data)
            holder = document.get("owner") if document else None
            held_for = max(float(document.get("duration_s", 0)) if document else 0, self.duration_s)
            now = time.monotonic()
            first = seen.setdefault(generation, now)
            free = document is None or holder in (None, self.owner)  # missing or malformed: free
            if not free and now - first < held_for:
                budget = held_for + 1.0 if wait_s is None else wait_s
                if len(seen) > 1 or now - min(seen.values()) > budget:
                    raise StreamBusyError(
                        f"stream {self._stream} is being written by server {holder!r} (its lease "
                        f"on {self._location.url} was renewed while this server waited); a stream "
                        "has one writer at a time: write it through that server, or wait until it "
                        f"stops (its lease then expires within {held_for:g} s)"
                    )
                time.sleep(min(0.25, held_for / 8))
                continue
            fences = parse_fences(document) if document else ()
            epoch = int(document.get("epoch", 0)) + 1 if document else 1
            base = committed_length(fences)
            kept = tuple(f for f in fences if f[1] >= base)[-_KEEP_FENCES:]
            new = {
                "owner": self.owner,
                "epoch": epoch,
                "duration_s": self.duration_s,
                "fences": [list(f) for f in (*kept, (epoch, base))],
                "renewals": 0,
            }
            sent = time.monotonic()
            got = self._location.write_if(
                self._key, _encode(new), generation if data is not None else NO_VALUE
            )
            if got is None:
                continue  # changed under us: look again
            if holder not in (None, self.owner):
                logger.warning(
                    "stream %s: took over the lease of server %r, which stopped renewing it",
                    self._stream,
                    holder,
                )
            self.epoch, self.fences = epoch, (*kept, (epoch, base))
            self._document, self._generation = new, got
            self._valid_until = sent + self.duration_s * SAFE_FRACTION
            self._lost = None
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._renew_loop, name=f"expvault-lease-{self._stream}", daemon=True
            )
            self._thread.start()
            return

    # -- holding -------------------------------------------------------------------------------

    def check(self) -> None:
        """Raises StreamBusyError unless the lease is surely still ours now."""
        if self._lost is not None:
            raise StreamBusyError(self._lost)
        if time.monotonic() > self._valid_until:
            raise StreamBusyError(
                f"this server could not renew its lease of stream {self._stream} in time "
                f"(store {self._location.url} unreachable or slow); the append was not "
                "acknowledged: reconnect and resend from the committed offset"
            )

    def _renew_loop(self) -> None:
        period = self.duration_s / 4
        while not self._stop.wait(period):
            document = {**self._document, "renewals": int(self._document["renewals"]) + 1}
            sent = time.monotonic()
            try:
                got = self._location.write_if(self._key, _encode(document), self._generation)
            except StorageError as e:
                if time.monotonic() <= self._valid_until:
                    logger.warning("stream %s: lease renewal failed: %s", self._stream, e)
                    continue
                self._lose(f"lease of stream {self._stream} could not be renewed in time: {e}")
                return
            if got is None:
                self._lose(
                    f"this server lost its lease of stream {self._stream} to another server; "
                    "reconnect (a client with several targets moves on by itself)"
                )
                return
            self._document, self._generation = document, got
            self._valid_until = sent + self.duration_s * SAFE_FRACTION

    def _lose(self, why: str) -> None:
        self._lost = why
        logger.error("%s", why)
        if self._on_lost is not None:
            self._on_lost(why)

    def release(self) -> None:
        """Stops renewing and hands the lease back: the next writer need not wait (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self._lost is None and self._generation:
            document = {**self._document, "owner": None}
            try:
                self._location.write_if(self._key, _encode(document), self._generation)
            except StorageError as e:  # it expires by itself
                logger.warning("stream %s: cannot hand the lease back: %s", self._stream, e)
        self._generation = b""
        self._lost = self._lost or f"the lease of stream {self._stream} was released"


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True).encode()


def _parse(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


__all__: Sequence[str] = [
    "DEFAULT_LEASE_S",
    "FENCE_KEY",
    "LEASE_FILE",
    "PROCESS_OWNER",
    "Lease",
    "parse_fences",
    "segment_valid",
]
