"""What every gRPC client of expvault shares: channel options, error mapping, retry policy."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
    "ChannelPool",
    "Failover",
    "channel_options",
    "error_from_rpc",
    "is_retryable",
    "method_path",
    "open_channel",
    "parse_targets",
    "preference",
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
    return _open(
        target,
        credentials,
        None if token is None else BearerToken(token),
        channel_options() if options is None else options,
    )


def _open(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    token: BearerToken | None,
    options: list[tuple[str, Any]],
) -> grpc.Channel:
    channel = (
        grpc.insecure_channel(target, options=options)
        if credentials is None
        else grpc.secure_channel(target, credentials, options=options)
    )
    if token is None:
        return channel
    return grpc.intercept_channel(channel, token)


def parse_targets(target: str) -> tuple[str, ...]:
    """The servers of a target: `"HOST:PORT"`, or several as `"host1:50051,host2:50051"`.

    Returns:
        The servers, in the order given (the order does not matter to `preference`).

    Raises:
        InvalidArgumentError: an empty target or entry, or a server listed twice.
    """
    if not isinstance(target, str):
        raise InvalidArgumentError(
            f"target must be a string HOST:PORT[,HOST:PORT...], got {target!r}"
        )
    targets = tuple(t.strip() for t in target.split(","))
    if not all(targets):
        raise InvalidArgumentError(
            f"target {target!r} must be HOST:PORT or a comma-separated list of them, "
            "without empty entries"
        )
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise InvalidArgumentError(f"target {target!r} lists {repeated} more than once")
    return targets


def _weight(target: str, vault_name: str, vault_uid: str) -> bytes:
    # A hash every process computes alike (Python's hash() of a str is salted per process).
    key = "\0".join((vault_name, vault_uid, target)).encode()
    return hashlib.blake2b(key, digest_size=8).digest()


def preference(targets: Sequence[str], vault_name: str, vault_uid: str = "") -> list[str]:
    """The servers a stream prefers, best first: rendezvous (highest random weight) hashing.

    Every client that lists the same servers (spelled alike, in any order) computes the same
    order, so a stream goes to the same server from every client, streams spread evenly over
    the servers, and removing one server moves only the streams it had.

    Args:
        targets: the servers (`parse_targets`).
        vault_name: the vault.
        vault_uid: the stream; "" for calls about the whole vault.

    Returns:
        `targets` sorted by `blake2b(vault_name, vault_uid, target)`, highest first.
    """
    return sorted(targets, key=lambda t: (_weight(t, vault_name, vault_uid), t), reverse=True)


class ChannelPool:
    """One channel per server of a target list, each opened on first use, all configured alike.

    Args:
        target: `HOST:PORT`, or several servers as `"host1:50051,host2:50051"`.
        credentials: TLS credentials for every server; None for plaintext.
        token: bearer token sent on every call to every server; None for none.
        options: channel options; default `channel_options()`.

    Raises:
        InvalidArgumentError: a bad target list or token.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.targets = parse_targets(target)
        self._credentials = credentials
        self._token = None if token is None else BearerToken(token)
        self._options = channel_options() if options is None else options
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._closed = False

    def channel(self, target: str) -> grpc.Channel:
        """The channel to `target` (one of `targets`), opened on first use.

        Raises:
            InvalidArgumentError: the pool is closed.
        """
        with self._lock:
            if self._closed:
                raise InvalidArgumentError(f"the channels to {','.join(self.targets)} are closed")
            channel = self._channels.get(target)
            if channel is None:
                channel = _open(target, self._credentials, self._token, self._options)
                self._channels[target] = channel
            return channel

    def preference(self, vault_name: str, vault_uid: str = "") -> list[str]:
        """`preference(self.targets, vault_name, vault_uid)`."""
        return preference(self.targets, vault_name, vault_uid)

    def close(self) -> None:
        """Closes every channel opened (idempotent); calls in flight end with CANCELLED."""
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


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

    def expired(self) -> bool:
        """Whether the deadline passed."""
        return time.monotonic() >= self._deadline

    def next_delay(self) -> float | None:
        """Returns how long to sleep before the next try, or None when the deadline passed."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return None
        delay = min(self._delay_s * random.uniform(0.5, 1.0), remaining)
        self._delay_s = min(self._max_s, self._delay_s * 2)
        return delay


class Failover:
    """Which server a call or stream tries next, and when, while servers are unreachable.

    A round walks the servers in the stream's preference order (`preference`): a failure that
    may pass moves on to the next server at once; after the last one fails, the next round
    starts from the first after a backoff delay. When a server that answered fails later (its
    stream broke), the next round also starts from the first server after a delay: a stream
    returns to its recovered preferred server then, never while another server serves it. With
    one server this is `Backoff` alone.

    Args:
        order: the servers, best first.
        timeout_s: give up once no server answered for this many seconds.
    """

    def __init__(self, order: Sequence[str], timeout_s: float) -> None:
        self.order = list(order)
        self.index = 0
        self._backoff = Backoff(timeout_s)
        self._answered = False

    @property
    def target(self) -> str:
        """The server to try now."""
        return self.order[self.index]

    def answered(self) -> None:
        """Records that `target` answered: the deadline starts again."""
        self._backoff.reset()
        self._answered = True

    def restart(self) -> None:
        """Starts over from the first server with a fresh deadline (after a raised failure)."""
        self._backoff.reset()
        self._answered = False
        self.index = 0

    def next_delay(self) -> float | None:
        """Moves on after a failure of `target` that may pass.

        Returns:
            Seconds to wait before trying the new `target` (0 to try at once), or None when
            no server answered for `timeout_s`.
        """
        if not self._answered and self.index + 1 < len(self.order):
            if self._backoff.expired():
                return None
            self.index += 1
            return 0.0
        self._answered = False
        self.index = 0
        return self._backoff.next_delay()
