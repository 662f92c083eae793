"""The server's lifecycle: VaultService, health and reflection on one grpc.aio server; signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from expvault.errors import UnavailableError
from expvault.storage import Store
from expvault_server._malloc import bound_malloc
from expvault_server.auth import TokenAuth, is_loopback, load_tokens, server_credentials
from expvault_server.config import ServerConfig, parse_listen
from expvault_server.service import SERVICE, VaultServicer, add_servicer

logger = logging.getLogger(__name__)

STORAGE_WORKERS = 32  # threads for blocking storage calls (asyncio's default: CPUs + 4)

__all__ = ["SERVICE_NAME", "VaultServer", "exposure_warning", "serve"]

SERVICE_NAME = SERVICE.full_name
# A peer that does not answer a ping within KEEPALIVE_TIMEOUT_MS is dropped: with these, a dead
# actor's stream is free again within about 40 s.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def exposure_warning(config: ServerConfig) -> str | None:
    """What to warn about when a server is reachable from other hosts without protection.

    Returns:
        None on a loopback address, or with both TLS and tokens; else the warning.
    """
    host, _ = parse_listen(config.listen)
    if is_loopback(host):
        return None
    if config.tls_cert is None and config.token_file is None:
        return (
            f"listening on {config.listen} in plaintext without tokens: anyone who reaches it "
            "can read, write and delete vaults; give --token-file (and --tls-cert/--tls-key)"
        )
    if config.tls_cert is None:
        return (
            f"listening on {config.listen} in plaintext: tokens and data cross the network "
            "unencrypted; give --tls-cert and --tls-key"
        )
    return None


class VaultServer:
    """One vault server: `start`, then `stop` (graceful) or `wait`.

    Args:
        config: the settings.
        store: the storage engine to serve; default a `Store` of `config.root` with the
            config's cache and log bounds, opened on `start` and closed (flushed) on `stop`. A
            store passed in is left open.
    """

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self._store = store
        self._owns_store = store is None
        self._server: grpc.aio.Server | None = None
        self._servicer: VaultServicer | None = None
        self._health = health_aio.HealthServicer()
        self._stopped = asyncio.Event()
        self.port = 0

    @property
    def address(self) -> str:
        """`HOST:PORT` the server listens on (the real port once started)."""
        host, _ = parse_listen(self.config.listen)
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Opens the store, binds, and starts serving.

        Returns:
            The bound port (useful with `--listen HOST:0`).

        Raises:
            UnavailableError: the address cannot be bound.
            InvalidArgumentError: the token file or a TLS file cannot be read or is malformed.
        """
        config = self.config
        # Storage calls run in worker threads and block: fsync, object-store round trips, and
        # taking over a stream's lease (up to --lease-s). Enough workers that slow ones (a
        # failover of many streams) do not hold up every read and append behind them.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=STORAGE_WORKERS, thread_name_prefix="expvault-storage")
        )
        # Settings that read files fail here, before anything listens.
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.token_file is not None:
            tokens = await asyncio.to_thread(load_tokens, config.token_file)
            interceptors.append(TokenAuth(tokens))
            logger.info("bearer tokens required: %d tokens from %s", len(tokens), config.token_file)
        credentials = None
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        warning = exposure_warning(config)
        if warning:
            logger.warning("%s", warning)
        if self._store is None:
            self._store = await asyncio.to_thread(
                Store,
                config.root,
                cache_bytes=config.cache_bytes,
                small_chunk_cache_bytes=config.small_chunk_cache_bytes,
                max_log_bytes=config.max_log_bytes,
                lease_s=config.lease_s,
                s3_endpoint=config.s3_endpoint,
                s3_region=config.s3_region,
            )
        limit = config.max_message_bytes
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                # Accept the clients' keepalive pings on idle streams (followers).
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # Ping the clients too: a dead actor's half-open connection (host gone, cable
                # pulled) is closed, which ends its Append call and frees its writer lease.
                ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.max_pings_without_data", 0),
                # Else a ping waits 5 minutes after the last one (flow-control pings count), and
                # an unanswered one of those waits 60 s before the connection is dropped.
                ("grpc.http2.min_time_between_pings_ms", KEEPALIVE_TIME_MS),
                ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ],
        )
        self._servicer = VaultServicer(self._store, config)
        add_servicer(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            if credentials is None:
                self.port = server.add_insecure_port(config.listen)
            else:
                self.port = server.add_secure_port(config.listen, credentials)
        except RuntimeError as e:
            raise UnavailableError(f"cannot listen on {config.listen}: {e}") from e
        await server.start()
        self._server = server
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "expvault serving on %s root=%s tls=%s",
            self.address,
            self._store.url,
            "mutual" if config.tls_client_ca else "on" if credentials else "off",
        )
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops gracefully: refuse new calls, acknowledge what was read, flush, close.

        Args:
            grace_s: how long running calls may take; default `config.shutdown_grace_s`.
        """
        if self._server is None or self._stopped.is_set():
            return
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        logger.info("expvault shutting down (grace %.1f s)", grace)
        await self._health.enter_graceful_shutdown()
        if self._servicer is not None:
            self._servicer.begin_shutdown()
        await self._server.stop(grace)
        if self._owns_store and self._store is not None:
            await asyncio.to_thread(self._store.close)
        self._stopped.set()
        logger.info("expvault stopped")

    async def wait(self) -> None:
        """Waits until `stop` completed."""
        await self._stopped.wait()


async def serve(config: ServerConfig) -> None:
    """Runs a server until SIGTERM or SIGINT, then stops it gracefully.

    Args:
        config: the settings.
    """
    bound_malloc()  # before the store and the server allocate
    server = VaultServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("expvault received a stop signal")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
