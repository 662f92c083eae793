"""`ServerConfig`: every setting of the vault server, checked in one place."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from expvault.errors import InvalidArgumentError

__all__ = ["ServerConfig", "parse_listen"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_listen(listen: str) -> tuple[str, int]:
    """Splits `HOST:PORT` (IPv6 hosts in brackets: `[::1]:50051`).

    Raises:
        InvalidArgumentError: no port, or a port outside [0, 65535].
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidArgumentError(
            f"listen address {listen!r} must be HOST:PORT, e.g. 0.0.0.0:50051"
        )
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"listen port {port} must be in [0, 65535] (0: pick a free one)")
    return host, port


@dataclass(frozen=True)
class ServerConfig:
    """Settings of `expvault serve`; each has a flag and an `EXPVAULT_*` environment variable.

    Attributes:
        root: where the vaults live (`--root`, `EXPVAULT_ROOT`): a directory, `file://DIR`,
            `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`, `memory://` or a tensorstore kvstore
            spec (JSON). Several servers may share an object store (see `lease_s`).
        s3_endpoint: S3 endpoint URL for S3-compatible stores; default `AWS_ENDPOINT_URL`.
        s3_region: S3 region; default `AWS_REGION` / `AWS_DEFAULT_REGION`.
        lease_s: on an object store, how long a server's lease of a stream it writes lasts
            without renewal (renewed every quarter of it): another server takes over a dead
            server's streams after at most this long.
        writer_idle_s: a stream no writer has been attached to for this long is given up (its
            lock or lease released), so another server may write it while this one lives.
        listen: `HOST:PORT` to bind; port 0 picks a free port (`--listen`, `EXPVAULT_LISTEN`).
        max_message_bytes: largest gRPC message accepted or sent, raised on purpose from
            gRPC's 4 MiB default.
        message_bytes: target payload of the messages the server sends (reads, samples).
        max_inflight_bytes_per_stream: bytes one Append call may have received but not yet
            committed before the server stops reading from it.
        max_inflight_bytes: the same bound over all Append calls of the server.
        max_read_buffer_bytes: bytes of data messages the server may hold for readers: read from
            storage (a Read call reads ahead) or queued, and not yet handed to gRPC, over all
            Read calls. A reader that would pass it waits (it is slowed, never failed). One
            message larger than the whole bound is still sent when nothing else is held. One
            call holds at most two blocks of 8 messages, so a stalled reader keeps only that.
        max_log_bytes: bytes of acknowledged steps all streams together keep in memory until
            they are moved from the write-ahead log into the arrays. When that falls behind,
            group commits wait (acks slow down, then the in-flight bounds stop reading); a
            stream holding less than one time chunk always commits, so the memory is at most
            this plus one chunk and one group commit per writing stream.
        cache_bytes: tensorstore's chunk cache (decoded chunks, shared by all streams).
        small_chunk_cache_bytes: whole decoded chunks of small leaves (at most 64 bytes per
            batch row and step) that Sample cuts windows out of, shared by all streams; 0
            gathers them with tensorstore's indexed read (~0.2 µs per element) instead.
        max_vaults: vaults the root may hold; CreateVault of one more is RESOURCE_EXHAUSTED.
        max_streams_per_vault: streams (writers' vault_uids) one vault may hold; an Append that
            would create one more is RESOURCE_EXHAUSTED.
        max_leaves: leaves an experience structure may have (CreateVault).
        max_step_bytes: bytes of one time step of a vault: every leaf, every batch row
            (`B * sum(prod(step_shape) * itemsize)`). CreateVault refuses larger structures,
            Append refuses to open streams of larger (older) vaults. A step must also fit in one
            message with its framing (`max_message_bytes` less 512 + 16 bytes per leaf).
        max_sample_batch: windows one Sample call may ask for (`batch_size`).
        tls_cert: PEM certificate chain; with `tls_key`, the server speaks TLS only.
        tls_key: PEM private key of `tls_cert`.
        tls_client_ca: PEM CA bundle; clients must present a certificate it signed (mTLS).
        token_file: bearer tokens with scopes (format in `expvault_server.auth`); None: no
            token is asked for.
        shutdown_grace_s: on SIGTERM/SIGINT, how long in-flight work may take to finish.
        log_level: `DEBUG`, `INFO`, `WARNING`, `ERROR`.
    """

    root: Path | str = Path("vaults")
    s3_endpoint: str | None = None
    s3_region: str | None = None
    lease_s: float = 10.0
    writer_idle_s: float = 5.0
    listen: str = "127.0.0.1:50051"
    max_message_bytes: int = 64 << 20
    message_bytes: int = 1 << 20
    max_inflight_bytes_per_stream: int = 16 << 20
    max_inflight_bytes: int = 128 << 20
    max_read_buffer_bytes: int = 128 << 20
    max_log_bytes: int = 64 << 20
    cache_bytes: int = 128 << 20
    small_chunk_cache_bytes: int = 32 << 20
    max_vaults: int = 1000
    max_streams_per_vault: int = 10000
    max_leaves: int = 1024
    max_step_bytes: int = 16 << 20
    max_sample_batch: int = 65536
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token_file: Path | None = None
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        root = str(self.root)
        is_url = "://" in root or root.lstrip().startswith("{")
        object.__setattr__(self, "root", root if is_url else Path(root))
        if not self.lease_s > 0:
            raise InvalidArgumentError(f"lease_s must be > 0, got {self.lease_s}")
        if not self.writer_idle_s >= 0:
            raise InvalidArgumentError(f"writer_idle_s must be >= 0, got {self.writer_idle_s}")
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
            value = getattr(self, name)
            object.__setattr__(self, name, Path(value) if value else None)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgumentError("TLS needs both --tls-cert and --tls-key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgumentError(
                "--tls-client-ca (mutual TLS) needs TLS: give --tls-cert and --tls-key too"
            )
        parse_listen(self.listen)
        for name in (
            "max_message_bytes",
            "message_bytes",
            "max_inflight_bytes_per_stream",
            "max_inflight_bytes",
            "max_read_buffer_bytes",
            "max_log_bytes",
            "cache_bytes",
            "max_vaults",
            "max_streams_per_vault",
            "max_leaves",
            "max_step_bytes",
            "max_sample_batch",
        ):
            if int(getattr(self, name)) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.small_chunk_cache_bytes < 0:
            raise InvalidArgumentError(
                f"small_chunk_cache_bytes must be >= 0, got {self.small_chunk_cache_bytes}"
            )
        if self.message_bytes > self.max_message_bytes // 2:
            raise InvalidArgumentError(
                f"message_bytes ({self.message_bytes}) must be at most half of max_message_bytes "
                f"({self.max_message_bytes}) to leave room for framing"
            )
        if self.max_inflight_bytes < self.max_inflight_bytes_per_stream:
            raise InvalidArgumentError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be >= "
                f"max_inflight_bytes_per_stream ({self.max_inflight_bytes_per_stream})"
            )
        if self.shutdown_grace_s < 0:
            raise InvalidArgumentError(
                f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}"
            )
        if self.log_level not in _LOG_LEVELS:
            raise InvalidArgumentError(
                f"log_level must be one of {_LOG_LEVELS}, got {self.log_level}"
            )

    def log(self, logger: logging.Logger) -> None:
        """Logs every setting once, at INFO."""
        logger.info("config %s", " ".join(f"{key}={value}" for key, value in asdict(self).items()))
