"""expvault: durable, networked storage for JAX/flashbax replay experience."""

from expvault.errors import (
    AlreadyExistsError,
    DataLossError,
    ExpvaultError,
    InvalidArgumentError,
    InvalidNameError,
    NotFoundError,
    OffsetGapError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SchemaMismatchError,
    StorageError,
    StreamBusyError,
    UnauthenticatedError,
    UnavailableError,
)

__version__ = "0.1.0"

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
    "__version__",
]
