"""What the storage engine does to the local file system, and the write-ahead log's format.

tensorstore owns the zarr arrays; this module owns the rest of a stream's directory on a local
disk: names that cannot escape the root, atomic and durable files, the writer lock, bytes on disk,
and the byte format of a write-ahead log segment (the same on every location). `location.py`
decides where those bytes go.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from expvault.errors import (
    InvalidNameError,
    ResourceExhaustedError,
    StorageError,
    StreamBusyError,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
WAL_DIR = "wal"
_WAL_MAGIC = b"EXVW"
_WAL_VERSION = 1
_WAL_HEADER = struct.Struct("<4sIQQI")  # magic, version, start, num_steps, num_leaves
_SEGMENT_NAME = re.compile(r"(\d{20})-(\d{20})(?:-(\d{1,19}))?\.seg")
LOCK_FILE = "expvault.lock"


def check_name(kind: str, name: str) -> str:
    """Returns `name` if it is a safe vault name or uid.

    Raises:
        InvalidNameError: it is empty, too long, has a path separator, `..`, or other characters
            than letters, digits, `.`, `_` and `-`.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"{kind} {name!r} is not valid: use 1-200 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, without '/' or '..'"
        )
    return name


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# tensorstore reports an OSError as a ValueError whose text ends with the errno.
_TS_OS_ERROR = re.compile(r"\[os_error_code='?(\d+)'?\]")


def is_storage_full(error: BaseException) -> bool:
    """Whether an error of the file system or of tensorstore means "no space left" (or quota)."""
    if isinstance(error, OSError):
        return error.errno in _FULL_ERRNOS
    match = _TS_OS_ERROR.search(str(error))
    return match is not None and int(match.group(1)) in _FULL_ERRNOS


def free_bytes(path: Path) -> int | None:
    """Bytes a process may still write on the file system of `path` (None: unknown)."""
    for candidate in (path, *path.parents):
        try:
            stat = os.statvfs(candidate)
        except OSError:
            continue
        return stat.f_bavail * stat.f_frsize
    return None


def storage_error(
    action: str, error: BaseException, path: Path
) -> StorageError | ResourceExhaustedError:
    """Turns a failure of the file system or of tensorstore into the error a client should see.

    A full disk (or quota) is a capacity limit, `ResourceExhaustedError`, naming `path` and the
    space left so an operator knows what to free; anything else is a `StorageError`.

    Args:
        action: what failed, e.g. "cannot write to /root/v/u".
        error: the `OSError`, or tensorstore's `ValueError`.
        path: the storage root (or the directory written), whose free space is reported.
    """
    if is_storage_full(error):
        free = free_bytes(path)
        left = "unknown" if free is None else f"{free} bytes"
        return ResourceExhaustedError(
            f"{action}: the storage under {path} is full (free: {left}); free space or move the "
            "root to a larger disk, then retry (committed data is intact)"
        )
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return StorageError(f"{action}: {text}")


def os_error(
    action: str, error: OSError, path: Path | None = None
) -> StorageError | ResourceExhaustedError:
    """Turns an OSError into the error a client should see (disk full is a capacity limit)."""
    where = path if path is not None else Path(error.filename or ".")
    return storage_error(action, error, where)


def fsync_dir(path: Path) -> None:
    """Makes the directory entries under `path` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_IOV_MAX = 512  # buffers per pwritev (Linux takes up to 1024)


def write_all(fd: int, chunks: Sequence[bytes | memoryview], offset: int) -> int:
    """Writes every byte of `chunks` at `offset` of `fd`, however the kernel splits the writes.

    Returns:
        The number of bytes written.
    """
    views = [memoryview(c).cast("B") for c in chunks]
    start = offset
    while views:
        written = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += written
        while written and views:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0
    return offset - start


def write_durably(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
    """Writes `chunks` to `path` atomically (temp file, fsync, rename, fsync of the directory)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, chunks, 0)
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, value: Any) -> None:
    """Writes `value` as JSON to `path`, atomically and durably."""
    write_durably(path, [json.dumps(value, indent=1, sort_keys=True).encode()])


def read_json(path: Path) -> Any:
    """Reads a JSON file.

    Raises:
        StorageError: it cannot be read or parsed.
    """
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read {path.name} of {path.parent}: {e}") from e


@dataclass(frozen=True)
class Segment:
    """Steps `[start, start + num_steps)` of a stream, held in the write-ahead log.

    Attributes:
        start: stream offset of the first step.
        arrays: one array per leaf, `(B, num_steps, ...)`, in schema order.
    """

    start: int
    arrays: tuple[np.ndarray[Any, Any], ...]

    @property
    def num_steps(self) -> int:
        """Number of time steps in the segment."""
        return int(self.arrays[0].shape[1])

    @property
    def stop(self) -> int:
        """Stream offset one past the last step."""
        return self.start + self.num_steps


@dataclass(frozen=True)
class SegmentName:
    """A write-ahead log segment: steps `[start, stop)` written by the writer of `epoch`."""

    start: int
    stop: int
    epoch: int

    @property
    def name(self) -> str:
        """The segment's name: its object's, or its file's in a directory of earlier versions."""
        suffix = f"-{self.epoch}" if self.epoch else ""
        return f"{self.start:020d}-{self.stop:020d}{suffix}.seg"

    @staticmethod
    def parse(name: str) -> SegmentName | None:
        """The segment a name stands for; None for anything else (temporary files)."""
        m = _SEGMENT_NAME.fullmatch(name)
        if m is None:
            return None
        return SegmentName(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def encode_segment(segment: Segment) -> list[bytes | memoryview]:
    """A log segment as the byte chunks of its file: header, each leaf's bytes, CRC32."""
    views = [np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in segment.arrays]
    header = _WAL_HEADER.pack(
        _WAL_MAGIC, _WAL_VERSION, segment.start, segment.num_steps, len(views)
    ) + struct.pack(f"<{len(views)}Q", *(len(v) for v in views))
    crc = zlib.crc32(header)
    for v in views:
        crc = zlib.crc32(v, crc)
    return [header, *views, struct.pack("<I", crc)]


def decode_segment(
    data: bytes, where: str, dtypes: Sequence[np.dtype[Any]], shapes: Sequence[tuple[int, ...]]
) -> Segment:
    """Reads one log segment back from its bytes (its arrays are views of `data`).

    Args:
        data: the segment file's bytes.
        where: the segment's path or URL, for the error.
        dtypes: each leaf's dtype, in schema order.
        shapes: each leaf's `(B, ...)` shape without the time axis, in schema order.

    Raises:
        StorageError: the segment is damaged (bad magic, sizes or checksum).
    """
    try:
        magic, version, start, steps, nleaves = _WAL_HEADER.unpack_from(data)
        if magic != _WAL_MAGIC or version != _WAL_VERSION or nleaves != len(dtypes):
            raise ValueError("bad header")
        offset = _WAL_HEADER.size
        sizes = struct.unpack_from(f"<{nleaves}Q", data, offset)
        offset += 8 * nleaves
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(memoryview(data)[: len(data) - 4]) != crc:
            raise ValueError("checksum mismatch")
        arrays = []
        for size, dtype, shape in zip(sizes, dtypes, shapes, strict=True):
            full = (shape[0], steps, *shape[1:])
            arrays.append(np.frombuffer(data, dtype, int(np.prod(full)), offset).reshape(full))
            offset += size
        if offset != len(data) - 4:
            raise ValueError("sizes do not add up")
    except (ValueError, struct.error) as e:
        raise StorageError(f"write-ahead log segment {where} is damaged: {e}") from e
    return Segment(start, tuple(arrays))


SEGMENT_HEAD_BYTES = _WAL_HEADER.size  # enough to tell a segment's header size


def segment_header_size(head: bytes) -> int | None:
    """Bytes of the header of the segment whose first `SEGMENT_HEAD_BYTES` are `head`.

    Returns:
        The header's size (leaf sizes included), or None when `head` does not begin a segment.
    """
    if len(head) < _WAL_HEADER.size:
        return None
    magic, version, _, _, nleaves = _WAL_HEADER.unpack_from(head)
    if magic != _WAL_MAGIC or version != _WAL_VERSION:
        return None
    return int(_WAL_HEADER.size + 8 * nleaves)


def segment_extent(header: bytes) -> tuple[int, int, int]:
    """`(start, num_steps, size in bytes)` of a segment, from its whole header.

    Args:
        header: the segment's first `segment_header_size` bytes (or more).
    """
    _, _, start, steps, nleaves = _WAL_HEADER.unpack_from(header)
    sizes = struct.unpack_from(f"<{nleaves}Q", header, _WAL_HEADER.size)
    return start, steps, _WAL_HEADER.size + 8 * nleaves + sum(sizes) + 4


def segment_intact(data: bytes) -> bool:
    """Whether `data`, one whole segment, holds its checksum (a torn write does not)."""
    if len(data) < _WAL_HEADER.size + 4:
        return False
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    return bool(zlib.crc32(memoryview(data)[: len(data) - 4]) == crc)


def remove_temporary(stream_dir: Path) -> None:
    """Deletes files a crash left half-written (never renamed, so never acknowledged).

    Only the stream's writer may call this: another process's write in progress looks the same.
    """
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(stream_dir / WAL_DIR):
            if name.endswith(".tmp"):
                remove_quietly(stream_dir / WAL_DIR / name)
    # tensorstore writes OCDBT files through `<name>.__lock` temporaries; one a kill left behind
    # is reused without truncation by the next writer, corrupting the manifest.
    for stale in [stream_dir / "manifest.ocdbt.__lock", *(stream_dir / "d").glob("*.__lock")]:
        remove_quietly(stale)


def remove_quietly(path: Path) -> None:
    """Deletes a file, ignoring one that is already gone."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class WriterLock:
    """An exclusive advisory lock on a stream directory: one writing process per stream.

    The kernel releases it when the process dies, so it needs no epoch or fences (see `Lease`
    for shared stores).
    """

    epoch = 0
    fences: tuple[tuple[int, int], ...] = ()

    def __init__(self, stream_dir: Path) -> None:
        self._fd = os.open(stream_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._fd)
            raise StreamBusyError(
                f"stream {stream_dir.parent.name}/{stream_dir.name} is being written by another "
                "process; a stream has one writer at a time (use another vault_uid)"
            ) from e

    def check(self) -> None:
        """Held until released: nothing to check."""

    def release(self) -> None:
        """Releases the lock (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def bytes_on_disk(path: Path) -> int:
    """Total size of the files under `path` in bytes (allocated blocks, as `du` counts)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
    return total
