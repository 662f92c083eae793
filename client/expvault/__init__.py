"""expvault: durable, networked storage for JAX/flashbax replay experience."""

from expvault.counted import counted
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
from expvault.local import Vault
from expvault.remote import RemoteVault, VaultReader

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
    "RemoteVault",
    "ResourceExhaustedError",
    "SchemaMismatchError",
    "StorageError",
    "StreamBusyError",
    "UnauthenticatedError",
    "UnavailableError",
    "Vault",
    "VaultReader",
    "__version__",
    "counted",
]
