"""Errors -> gRPC statuses: `rpc_errors` wraps every handler body of the servicer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from expvault._rpc import ERROR_DOMAIN
from expvault.errors import ExpvaultError

logger = logging.getLogger(__name__)

__all__ = ["MAX_MESSAGE_CHARS", "ErrorScope", "clip", "rpc_errors", "status_of"]

_INTERNAL_MESSAGE = "internal server error; the server log has the details"
# Messages quote what the client sent (names, leaves); a quote of a huge request must neither
# flood the log nor push the trailers past the client's 8 KiB metadata limit, which would turn
# the status into a RESOURCE_EXHAUSTED of gRPC's own.
MAX_MESSAGE_CHARS = 1000


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text`, cut to about `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text)} characters, clipped)"


@dataclass
class ErrorScope:
    """What a handler knows that an error should carry back.

    Attributes:
        committed: returns the committed offset of the stream the call works on, so that every
            error of a stream call says where to resume (`committed_offset` in ErrorInfo).
        peer: the client, for the log.
    """

    committed: Callable[[], int] | None = None
    peer: str = ""


def status_of(error: ExpvaultError, extra: dict[str, str] | None = None) -> grpc.Status:
    """The gRPC status of an error: code, message, and a `google.rpc.ErrorInfo` detail."""
    metadata = {key: clip(value, 200) for key, value in {**(extra or {}), **error.metadata}.items()}
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code = error.code.value[0] if error.code != grpc.StatusCode.OK else code_pb2.UNKNOWN
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code, message=clip(error.message), details=[detail])
    )
    return status


class rpc_errors:  # lower case: used like a function, `async with rpc_errors(context, rpc)`
    """Turns what a handler body raises into the call's status.

    An `ExpvaultError` aborts with its code, message and ErrorInfo (logged at WARNING, one line);
    anything else is logged with its traceback and aborts with INTERNAL, sending no internals.
    Cancellation and aborts pass through. `async with` yields an `ErrorScope` the handler fills
    in as it learns more (e.g. its stream).

    Args:
        context: the call's context.
        rpc: the method name, for the log.
    """

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> None:
        self._context = context
        self._rpc = rpc
        self.scope = ErrorScope(peer=context.peer())

    async def __aenter__(self) -> ErrorScope:
        return self.scope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None or isinstance(error, asyncio.CancelledError | grpc.aio.AbortError):
            return
        if isinstance(error, ExpvaultError):
            extra: dict[str, str] = {}
            if self.scope.committed is not None:
                try:
                    extra["committed_offset"] = str(self.scope.committed())
                except Exception:  # the stream may be gone; the error matters more
                    logger.debug("no committed offset for the %s error", self._rpc, exc_info=True)
            logger.warning(
                "%s from %s refused: %s %s: %s",
                self._rpc,
                self.scope.peer,
                error.code.name,
                error.reason,
                clip(error.message),
            )
            await self._context.abort_with_status(status_of(error, extra))
        elif isinstance(error, Exception):
            logger.error("%s from %s failed", self._rpc, self.scope.peer, exc_info=error)
            # With an ErrorInfo, so clients tell a server fault from a broken connection.
            internal = ExpvaultError(_INTERNAL_MESSAGE)
            internal.code, internal.reason = grpc.StatusCode.INTERNAL, "INTERNAL"
            await self._context.abort_with_status(status_of(internal))
