"""What every gRPC client of expvault shares: channel options, error mapping, retry policy."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from expvault.errors import ExpvaultError, InvalidArgumentError, error_class_for
from expvault.v1 import vault_pb2

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ERROR_DOMAIN",
    "Backoff",
    "BearerToken",
    "channel_options",
    "error_from_rpc",
    "is_retryable",
    "method_path",
    "open_channel",
    "tls_credentials",
]

_SERVICE = vault_pb2.DESCRIPTOR.services_by_name["VaultService"].full_name


def method_path(name: str) -> str:
    """The full gRPC path of a VaultService method, e.g. `/expvault.v1.VaultService/Read`."""
    return f"/{_SERVICE}/{name}"


ERROR_DOMAIN = "expvault"
# gRPC's 4 MiB default is too small for leaf payloads; the server raises its limit to match.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20

# A broken connection surfaces as UNAVAILABLE, or as UNKNOWN/INTERNAL without an ErrorInfo
# ("Stream removed", RST_STREAM); statuses our server sends with a reason are not retried.
_TRANSPORT_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of a channel that sends and receives messages up to `max_message_bytes`."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Let a dead peer be noticed on an idle stream (a follower waiting for new steps).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a follower's idle stream
        # gRPC's own reconnect backoff grows to 120 s; after a long outage a restarted server
        # would wait that long for its clients. Match `Backoff`'s largest delay instead.
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def _read_pem(source: str | os.PathLike[str] | bytes | None, what: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the {what} {source}: {e}") from e


def tls_credentials(
    ca: str | os.PathLike[str] | bytes | None = None,
    cert: str | os.PathLike[str] | bytes | None = None,
    key: str | os.PathLike[str] | bytes | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials for `RemoteVault` / `VaultReader` (`credentials=`).

    Args:
        ca: PEM CA bundle that verifies the server (a path, or the PEM bytes); None trusts the
            system's roots.
        cert: this client's PEM certificate chain, for servers that require client
            certificates (`--tls-client-ca`, mutual TLS).
        key: the private key of `cert`.

    Returns:
        Channel credentials.

    Raises:
        InvalidArgumentError: a file cannot be read, or only one of `cert` and `key` is given.
    """
    if (cert is None) != (key is None):
        raise InvalidArgumentError("a client certificate needs both cert and key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca, "CA bundle"),
        private_key=_read_pem(key, "client key"),
        certificate_chain=_read_pem(cert, "client certificate"),
    )


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    """`grpc.ClientCallDetails` with fields (grpc's own class is private)."""


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call of a channel (plaintext or TLS).

    Args:
        token: the token the server's `--token-file` lists.

    Raises:
        InvalidArgumentError: the token is empty or has characters metadata cannot carry.
    """

    def __init__(self, token: str) -> None:
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise InvalidArgumentError(
                "token must be non-empty printable ASCII without spaces (as in the token file)"
            )
        self._entry = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerToken(***)"  # never the token, e.g. in a traceback's locals

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        """Adds the token."""
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        """Adds the token."""
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Adds the token."""
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Adds the token."""
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A channel to an expvault server: TLS when `credentials` are given, with a bearer token.

    Args:
        target: `HOST:PORT`.
        credentials: e.g. `tls_credentials(ca=...)`; None for plaintext.
        token: sent as `authorization: Bearer TOKEN` on every call; None for none.
        options: channel options; default `channel_options()`.
    """
    options = channel_options() if options is None else options
    channel = (
        grpc.insecure_channel(target, options=options)
        if credentials is None
        else grpc.secure_channel(target, credentials, options=options)
    )
    if token is None:
        return channel
    return grpc.intercept_channel(channel, BearerToken(token))


def _error_info(error: grpc.RpcError) -> tuple[str, Mapping[str, str]]:
    """Returns the `ErrorInfo` reason and metadata of a failed call ("" and {} when absent)."""
    if not isinstance(error, grpc.Call):
        return "", {}
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # the trailer does not match the status: ignore it
        return "", {}
    if status is None:
        return "", {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                return info.reason, dict(info.metadata)
    return "", {}


def error_from_rpc(error: grpc.RpcError) -> ExpvaultError:
    """Maps a failed call to the expvault exception the server raised (raise it `from error`).

    The class is chosen by the `ErrorInfo` reason, then by the status code; the server's message
    is kept as it is. Message text is never interpreted.
    """
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    reason, metadata = _error_info(error)
    cls = error_class_for(reason, code)
    result = cls.from_status(details, metadata)
    result.metadata.update(metadata)
    return result


def is_retryable(error: grpc.RpcError) -> bool:
    """Whether a failed call may succeed when retried (server unreachable or restarting)."""
    if not isinstance(error, grpc.Call):
        return False
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code in _TRANSPORT_CODES and not _error_info(error)[0]


class Backoff:
    """Exponential backoff with jitter, bounded by a total deadline.

    Args:
        timeout_s: give up once this many seconds passed since the last `reset`.
        initial_s: first delay.
        max_s: largest delay.
    """

    def __init__(self, timeout_s: float, initial_s: float = 0.05, max_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self._initial_s = initial_s
        self._max_s = max_s
        self.reset()

    def reset(self) -> None:
        """Starts a new retry period (after a success)."""
        self._delay_s = self._initial_s
        self._deadline = time.monotonic() + self.timeout_s

    def next_delay(self) -> float | None:
        """Returns how long to sleep before the next try, or None when the deadline passed."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return None
        delay = min(self._delay_s * random.uniform(0.5, 1.0), remaining)
        self._delay_s = min(self._max_s, self._delay_s * 2)
        return delay
