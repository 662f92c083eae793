"""expvault: durable, networked storage for JAX/flashbax replay experience."""

from expvault._rpc import tls_credentials
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
from expvault.remote import Follow, Followed, RemoteVault, SampleIterator, VaultReader

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "DataLossError",
    "ExpvaultError",
    "Follow",
    "Followed",
    "InvalidArgumentError",
    "InvalidNameError",
    "NotFoundError",
    "OffsetGapError",
    "PermissionDeniedError",
    "RemoteVault",
    "ResourceExhaustedError",
    "SampleIterator",
    "SchemaMismatchError",
    "StorageError",
    "StreamBusyError",
    "UnauthenticatedError",
    "UnavailableError",
    "Vault",
    "VaultReader",
    "__version__",
    "counted",
    "tls_credentials",
]
