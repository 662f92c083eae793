"""The exception tree: each class knows its gRPC status code and a stable reason string.

The server turns an `ExpvaultError` into a gRPC status carrying `reason` (and `metadata`) in a
`google.rpc.ErrorInfo`; the client turns such a status back into the same class by `reason`,
falling back to the status code. Messages say what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

__all__ = [
    "AlreadyExistsError",
    "DataLossError",
    "ExpvaultError",
    "InvalidArgumentError",
    "InvalidNameError",
    "NotFoundError",
    "OffsetGapError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SchemaMismatchError",
    "StorageError",
    "StreamBusyError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_class_for",
]


class ExpvaultError(Exception):
    """Base class of every error expvault raises on purpose.

    Attributes:
        code: the gRPC status code this error travels as.
        reason: a stable, machine-readable identifier (UPPER_SNAKE_CASE).
        metadata: string facts a caller can act on, e.g. `{"expected_offset": "128"}`.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "EXPVAULT_ERROR"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})

    @classmethod
    def from_status(cls, message: str, metadata: Mapping[str, str]) -> ExpvaultError:
        """Rebuilds the error on the client from a status message and `ErrorInfo.metadata`."""
        return cls(message, metadata=metadata)


class InvalidArgumentError(ExpvaultError, ValueError):
    """A request that can never succeed as written: fix the argument named in the message."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class InvalidNameError(InvalidArgumentError):
    """A vault name or uid that is empty, too long, or could escape the storage root."""

    reason = "INVALID_NAME"


class SchemaMismatchError(InvalidArgumentError):
    """Data whose leaves, dtypes or shapes differ from the vault's experience structure."""

    reason = "SCHEMA_MISMATCH"


class NotFoundError(ExpvaultError, LookupError):
    """The named vault or stream does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExistsError(ExpvaultError):
    """A vault of that name exists with a different experience structure."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class OffsetGapError(ExpvaultError):
    """An append starting after the committed end of its stream; resend from `expected_offset`."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "OFFSET_GAP"

    def __init__(self, message: str, *, expected_offset: int) -> None:
        super().__init__(message, metadata={"expected_offset": str(expected_offset)})
        self.expected_offset = expected_offset

    @classmethod
    def from_status(cls, message: str, metadata: Mapping[str, str]) -> ExpvaultError:
        """Rebuilds the error, keeping `expected_offset` as an int."""
        return cls(message, expected_offset=int(metadata.get("expected_offset", "-1")))


class StreamBusyError(ExpvaultError):
    """Another writer holds the stream; a stream has one writer at a time."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "STREAM_BUSY"


class ResourceExhaustedError(ExpvaultError):
    """A size or capacity limit was hit: message too large, disk full, too many streams."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(ExpvaultError):
    """No valid credentials were presented."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDeniedError(ExpvaultError):
    """The credentials lack the scope the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class UnavailableError(ExpvaultError):
    """The server cannot be reached or is shutting down; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class StorageError(ExpvaultError):
    """The stored data of a vault could not be read or written (corrupt, missing, I/O error)."""

    code = grpc.StatusCode.INTERNAL
    reason = "STORAGE_ERROR"


class DataLossError(ExpvaultError):
    """Raised on the actor when the ring buffer overwrote steps before they were written.

    `lost_start` and `lost_stop` name the lost range `[lost_start, lost_stop)` in steps the buffer
    received since the writer started (the stream offsets those steps would have had).
    """

    code = grpc.StatusCode.DATA_LOSS
    reason = "DATA_LOSS"

    def __init__(self, message: str, *, lost_start: int, lost_stop: int) -> None:
        super().__init__(
            message, metadata={"lost_start": str(lost_start), "lost_stop": str(lost_stop)}
        )
        self.lost_start = lost_start
        self.lost_stop = lost_stop

    @classmethod
    def from_status(cls, message: str, metadata: Mapping[str, str]) -> ExpvaultError:
        """Rebuilds the error, keeping the lost range as ints."""
        return cls(
            message,
            lost_start=int(metadata.get("lost_start", "-1")),
            lost_stop=int(metadata.get("lost_stop", "-1")),
        )


def _all_subclasses(cls: type[ExpvaultError]) -> list[type[ExpvaultError]]:
    found: list[type[ExpvaultError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def error_class_for(reason: str, code: grpc.StatusCode) -> type[ExpvaultError]:
    """Returns the class to raise for a status: by `reason` first, then by `code`.

    Args:
        reason: the `ErrorInfo.reason` the server sent, or "" when it sent none.
        code: the status code of the call.

    Returns:
        The most specific `ExpvaultError` subclass; `ExpvaultError` when nothing matches.
    """
    classes = _all_subclasses(ExpvaultError)
    for cls in classes:
        if reason and cls.reason == reason:
            return cls
    # The first class declared for a code is its general one (InvalidArgumentError before
    # SchemaMismatchError), and `__subclasses__` walks in declaration order.
    for cls in classes:
        if cls.code == code:
            return cls
    return ExpvaultError
