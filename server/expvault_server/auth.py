"""Who may call what: the token file, scopes per RPC, the interceptor, and TLS credentials.

A token file holds one token per line, `NAME SCOPES TOKEN`, e.g.

    # name       scopes       token
    actor-1      write        6f1c0e3b0f1a4c9b8d2e7a5c3b1d9e8f
    learner      read         0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d
    ops          admin        d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9

`SCOPES` is a comma-separated subset of `read`, `write`, `admin`; `write` includes `read` (an
actor describes its vault and reads its stream back) and `admin` includes both. Blank lines and
lines starting with `#` are ignored. Clients send `authorization: Bearer TOKEN` metadata; a call
without a known token ends UNAUTHENTICATED, one whose token lacks the scope ends
PERMISSION_DENIED. The health and reflection services stay open. Tokens are never logged; they
are compared as SHA-256 digests with `hmac.compare_digest`, against every known token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from expvault.errors import (
    ExpvaultError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from expvault.v1 import vault_pb2
from expvault_server._status import status_of

logger = logging.getLogger(__name__)

__all__ = [
    "METHOD_SCOPES",
    "SCOPES",
    "TokenAuth",
    "TokenInfo",
    "is_loopback",
    "load_tokens",
    "server_credentials",
]

READ: Final = "read"
WRITE: Final = "write"
ADMIN: Final = "admin"
SCOPES: Final = (READ, WRITE, ADMIN)
# What each scope grants, besides itself.
_IMPLIES: Final[Mapping[str, frozenset[str]]] = {
    READ: frozenset({READ}),
    WRITE: frozenset({READ, WRITE}),
    ADMIN: frozenset({READ, WRITE, ADMIN}),
}
_SERVICE: Final = vault_pb2.DESCRIPTOR.services_by_name["VaultService"].full_name
# The scope each VaultService method needs; a method missing here needs `admin` (fail closed).
METHOD_SCOPES: Final[Mapping[str, str]] = {
    "ListVaults": READ,
    "GetVault": READ,
    "Read": READ,
    "Sample": READ,
    "CreateVault": WRITE,
    "Append": WRITE,
    "DeleteVault": ADMIN,
}
# Services any caller may use: liveness probes and tooling must work without a token.
_OPEN_SERVICES: Final = ("grpc.health.v1.Health", "grpc.reflection.")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Printable ASCII without spaces: what a gRPC metadata value carries unchanged.
_TOKEN = re.compile(r"[\x21-\x7e]+")
MIN_TOKEN_CHARS: Final = 16


@dataclass(frozen=True)
class TokenInfo:
    """A named token, without the token itself.

    Attributes:
        name: who holds it, for the log.
        scopes: what it grants, implied scopes included.
    """

    name: str
    scopes: frozenset[str]


def _digest(token: str | bytes) -> bytes:
    data = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


def load_tokens(path: str | Path) -> dict[bytes, TokenInfo]:
    """Reads a token file (format in this module's docstring).

    Args:
        path: the file.

    Returns:
        `TokenInfo` by SHA-256 digest of the token.

    Raises:
        InvalidArgumentError: the file cannot be read, is empty, or a line is malformed (the
            message names the file and line, never the token).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"cannot read the token file {path}: {e}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "token file %s can be read by other users (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    tokens: dict[bytes, TokenInfo] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"token file {path} line {number}"
        fields = line.split()
        if len(fields) != 3:
            raise InvalidArgumentError(
                f"{where}: expected `NAME SCOPES TOKEN` (3 fields separated by spaces), got "
                f"{len(fields)} fields"
            )
        name, scope_text, token = fields
        if not _NAME.fullmatch(name):
            raise InvalidArgumentError(
                f"{where}: name {name!r} must be 1-64 letters, digits, '.', '_', '@' or '-'"
            )
        if name in names:
            raise InvalidArgumentError(f"{where}: name {name!r} appears twice")
        scopes = scope_text.split(",")
        if not all(scope in SCOPES for scope in scopes):
            raise InvalidArgumentError(
                f"{where}: scopes {scope_text!r} are not a comma-separated subset of "
                f"{list(SCOPES)} (no spaces)"
            )
        if len(token) < MIN_TOKEN_CHARS or not _TOKEN.fullmatch(token):
            raise InvalidArgumentError(
                f"{where}: the token of {name!r} must be at least {MIN_TOKEN_CHARS} printable "
                "ASCII characters without spaces (e.g. `python -c 'import secrets; "
                "print(secrets.token_hex(32))'`)"
            )
        digest = _digest(token)
        if digest in tokens:
            raise InvalidArgumentError(
                f"{where}: {name!r} has the same token as {tokens[digest].name!r}; give each "
                "holder its own token"
            )
        granted = frozenset().union(*(_IMPLIES[s] for s in scopes))
        tokens[digest] = TokenInfo(name, granted)
        names.add(name)
    if not tokens:
        raise InvalidArgumentError(
            f"token file {path} holds no token; add lines `NAME SCOPES TOKEN`"
        )
    return tokens


def required_scope(method: str) -> str | None:
    """The scope a full method name (`/package.Service/Method`) needs; None for open ones."""
    service, _, name = method.lstrip("/").partition("/")
    if service.startswith(_OPEN_SERVICES):
        return None
    if service == _SERVICE:
        return METHOD_SCOPES.get(name, ADMIN)
    return ADMIN


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | bytes | None:
    """The token of the `authorization: Bearer TOKEN` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value if isinstance(value, str) else value.decode("latin-1")
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class TokenAuth(grpc.aio.ServerInterceptor):
    """Checks every call's bearer token against the token file's scopes.

    Args:
        tokens: what `load_tokens` returned.
    """

    def __init__(self, tokens: Mapping[bytes, TokenInfo]) -> None:
        self._tokens = dict(tokens)

    def identify(self, token: str | bytes | None) -> TokenInfo | None:
        """The holder of `token`; every known token is compared, in constant time each."""
        if token is None:
            return None
        presented = _digest(token)
        found: TokenInfo | None = None
        for digest, info in self._tokens.items():
            if hmac.compare_digest(presented, digest):
                found = info
        return found

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        """Raises the error a call to `method` with `metadata` ends with; None when allowed.

        Raises:
            UnauthenticatedError: no token, or an unknown one.
            PermissionDeniedError: the token lacks the method's scope.
        """
        scope = required_scope(method)
        if scope is None:
            return
        token = _bearer(metadata)
        holder = self.identify(token)
        if holder is None:
            raise UnauthenticatedError(
                f"{method} needs a token: send metadata `authorization: Bearer <token>` "
                "(RemoteVault/VaultReader token=..., or EXPVAULT_TOKEN for the CLI)"
                if token is None
                else f"{method}: the token is not valid on this server; check it against the "
                "server's --token-file"
            )
        if scope not in holder.scopes:
            raise PermissionDeniedError(
                f"{method} needs scope {scope!r}; the token of {holder.name!r} has "
                f"{sorted(holder.scopes)}",
                metadata={"required_scope": scope, "token_name": holder.name},
            )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Lets allowed calls through; answers the others with their status."""
        method: str = handler_call_details.method
        metadata: Any = handler_call_details.invocation_metadata
        try:
            self.check(method, metadata)
        except ExpvaultError as error:
            logger.warning("%s refused: %s %s", method, error.code.name, error.message)
            handler = await continuation(handler_call_details)
            return _refusal(handler, error) if handler is not None else handler
        return await continuation(handler_call_details)


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], error: ExpvaultError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` that ends every call with `error`'s status.

    Requests are not deserialized: a refused caller's bytes are never parsed.
    """
    status = status_of(error)

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort_with_status(status)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def is_loopback(host: str) -> bool:
    """Whether a listen host only accepts local connections (`localhost`, 127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_pem(path: Path, what: str, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the {what} {path} ({flag}): {e}") from e
    if b"-----BEGIN " not in data:
        raise InvalidArgumentError(f"{what} {path} ({flag}) is not PEM (no -----BEGIN line)")
    return data


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials of the server; with `client_ca`, clients must show a certificate it signed.

    Args:
        cert: PEM certificate chain of the server (`--tls-cert`).
        key: PEM private key (`--tls-key`).
        client_ca: PEM CA bundle that verifies client certificates (`--tls-client-ca`), for
            mutual TLS.

    Raises:
        InvalidArgumentError: a file cannot be read or is not PEM.
    """
    chain = _read_pem(cert, "TLS certificate", "--tls-cert")
    private_key = _read_pem(key, "TLS key", "--tls-key")
    roots = None if client_ca is None else _read_pem(client_ca, "client CA", "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )
