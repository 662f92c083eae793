"""The raw gRPC ceilings of `expvault bench`: `bytes` messages with no vault behind them.

A tiny generic-handler server (no proto: messages are raw `bytes`) with two methods:
- `/bench.Raw/Sink`, a client stream whose messages it discards, answering their total size;
- `/bench.Raw/Source`, a server stream sending `count` messages of `size` bytes (the request is
  `size` and `count` as two little-endian uint64).

It runs as its own process (`python -m expvault_server._bench_grpc`), on the same `grpc.aio` stack
and message limits as `expvault serve`, so what the client measures against it is the most gRPC
Python can move through one channel on this machine: the ceiling expvault's Append and Read are
held against.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from expvault._rpc import channel_options

__all__ = ["RawClient", "raw_server", "serve"]

_SERVICE = "bench.Raw"
_REQUEST = struct.Struct("<QQ")  # Source: message size, message count
_MAX_MESSAGE_BYTES = 64 << 20


def _identity(data: bytes) -> bytes:
    return data


async def _sink(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> bytes:
    total = 0
    async for message in requests:
        total += len(message)
    return struct.pack("<Q", total)


async def _source(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    size, count = _REQUEST.unpack(request)
    payload = bytes(size)
    for _ in range(count):
        yield payload


async def serve(listen: str = "127.0.0.1:0") -> None:
    """Serves the raw methods until cancelled; prints `raw gRPC serving on HOST:PORT` to stderr."""
    server = grpc.aio.server(options=channel_options(_MAX_MESSAGE_BYTES))
    handler = grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Sink": grpc.stream_unary_rpc_method_handler(
                _sink, request_deserializer=_identity, response_serializer=_identity
            ),
            "Source": grpc.unary_stream_rpc_method_handler(
                _source, request_deserializer=_identity, response_serializer=_identity
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rsplit(":", 1)[0]
    print(f"raw gRPC serving on {host}:{port}", file=sys.stderr, flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(None)


@contextlib.contextmanager
def raw_server() -> Iterator[tuple[str, int]]:
    """Runs the raw server as a subprocess on a free loopback port; yields `(target, pid)`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "expvault_server._bench_grpc"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if process.stderr is None:  # pragma: no cover - stderr is a pipe
            raise RuntimeError("no stderr pipe")
        for line in process.stderr:
            if match := re.search(r"raw gRPC serving on (\S+)", line):
                break
        else:
            raise RuntimeError("the raw gRPC server exited before listening")
        threading.Thread(target=process.stderr.read, daemon=True).start()
        yield match.group(1), process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


class RawClient:
    """A synchronous client of the raw server (the same channel options as expvault's)."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target, options=channel_options(_MAX_MESSAGE_BYTES))
        self._sink = self._channel.stream_unary(
            f"/{_SERVICE}/Sink", request_serializer=_identity, response_deserializer=_identity
        )
        self._source = self._channel.unary_stream(
            f"/{_SERVICE}/Source", request_serializer=_identity, response_deserializer=_identity
        )

    def send(self, message_bytes: int, total_bytes: int) -> float:
        """Streams `total_bytes` in messages of `message_bytes` to the sink; returns seconds.

        Raises:
            RuntimeError: the server counted another total.
        """
        count = max(1, total_bytes // message_bytes)
        payload = bytes(message_bytes)
        t0 = time.perf_counter()
        answer = self._sink(iter([payload] * count))
        elapsed = time.perf_counter() - t0
        (received,) = struct.unpack("<Q", answer)
        if received != count * message_bytes:
            raise RuntimeError(f"the sink received {received} bytes, sent {count * message_bytes}")
        return elapsed

    def receive(self, message_bytes: int, total_bytes: int) -> float:
        """Receives `total_bytes` from the source in messages of `message_bytes`; returns seconds.

        Raises:
            RuntimeError: fewer bytes arrived.
        """
        count = max(1, total_bytes // message_bytes)
        t0 = time.perf_counter()
        received = sum(len(m) for m in self._source(_REQUEST.pack(message_bytes, count)))
        elapsed = time.perf_counter() - t0
        if received != count * message_bytes:
            raise RuntimeError(f"received {received} bytes, expected {count * message_bytes}")
        return elapsed

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
