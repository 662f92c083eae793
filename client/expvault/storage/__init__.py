"""The tensorstore storage engine: vaults of append-only streams in flashbax's on-disk format.

`expvault.Vault` runs it in-process; the server runs it behind gRPC.
"""

from expvault.storage.store import (
    COMPRESSION_PRESETS,
    Store,
    StreamInfo,
    VaultInfo,
    default_chunk_steps,
    resolve_compression,
)
from expvault.storage.stream import Stream

__all__ = [
    "COMPRESSION_PRESETS",
    "Store",
    "Stream",
    "StreamInfo",
    "VaultInfo",
    "default_chunk_steps",
    "resolve_compression",
]
