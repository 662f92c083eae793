"""The `expvault` command: `serve`, `ls`, `info`, `health` (and `demo`, `bench` as they land).

Every flag defaults to its `EXPVAULT_*` environment variable (`--root` / `EXPVAULT_ROOT`), so
containers configure the server with variables. This is the only module that configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expvault._rpc import channel_options, error_from_rpc, open_channel, tls_credentials
from expvault.errors import ExpvaultError, InvalidArgumentError
from expvault.v1 import vault_pb2, vault_pb2_grpc
from expvault_server.config import ServerConfig

__all__ = [
    "COMMANDS",
    "COMMAND_MODULES",
    "Command",
    "add_target_arguments",
    "client_channel",
    "env_default",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Command:
    """One subcommand of `expvault`.

    Attributes:
        help: one line for `expvault --help`.
        configure: adds the subcommand's arguments to its parser.
        run: runs it; returns the exit status.
    """

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def env_default(name: str, default: str) -> str:
    """The value of `EXPVAULT_<name>`, or `default` when unset or empty."""
    return os.environ.get(f"EXPVAULT_{name}") or default


def _flag(
    parser: argparse.ArgumentParser, flag: str, default: str, help_text: str, **kw: Any
) -> None:
    env = "EXPVAULT_" + flag.lstrip("-").replace("-", "_").upper()
    parser.add_argument(
        flag,
        default=env_default(env.removeprefix("EXPVAULT_"), default),
        help=f"{help_text} (env {env}; default {default})",
        **kw,
    )


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `--target`, `--timeout-s`, TLS and token flags, for subcommands that call a server.

    `client_channel(args)` opens the channel they describe.
    """
    _flag(parser, "--target", DEFAULT_TARGET, "server address HOST:PORT")
    _flag(parser, "--timeout-s", "10", "deadline of each call in seconds", type=float)
    _flag(parser, "--tls-ca", "", "PEM CA bundle that verifies the server; turns TLS on")
    _flag(parser, "--tls-client-cert", "", "PEM certificate of this client (mutual TLS)")
    _flag(parser, "--tls-client-key", "", "PEM private key of --tls-client-cert")
    _flag(
        parser,
        "--tls-server-name",
        "",
        "name to verify the server's certificate against, when --target is an address it "
        "does not name",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("EXPVAULT_TOKEN") or None,
        help="bearer token for servers started with --token-file (env EXPVAULT_TOKEN, which "
        "keeps it out of the process list)",
    )


def client_channel(
    args: argparse.Namespace, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """The channel `add_target_arguments`' flags describe: plaintext or TLS, with a token.

    Args:
        args: parsed flags (`target`, `tls_ca`, `tls_client_cert`, `tls_client_key`,
            `tls_server_name`, `token`).
        options: channel options; default `channel_options()`.

    Raises:
        InvalidArgumentError: several servers, a TLS file that cannot be read, or a client
            certificate without its key.
    """
    if "," in args.target:
        raise InvalidArgumentError(
            f"--target {args.target!r}: this command talks to one server; give one HOST:PORT "
            "(any server of a shared store answers for all of it)"
        )
    options = list(channel_options() if options is None else options)
    credentials = None
    if args.tls_ca or args.tls_client_cert or args.tls_client_key:
        credentials = tls_credentials(
            ca=args.tls_ca or None,
            cert=args.tls_client_cert or None,
            key=args.tls_client_key or None,
        )
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return open_channel(args.target, credentials=credentials, token=args.token, options=options)


# -- serve ------------------------------------------------------------------------------------


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()  # the defaults live in one place
    _flag(
        parser,
        "--root",
        f"./{d.root}",
        "where the vaults live: a directory, file://DIR, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
        "memory:// or a tensorstore kvstore spec (JSON)",
    )
    _flag(
        parser,
        "--s3-endpoint",
        "",
        "S3 endpoint URL (S3-compatible stores); default AWS_ENDPOINT_URL",
    )
    _flag(parser, "--s3-region", "", "S3 region; default AWS_REGION or AWS_DEFAULT_REGION")
    _flag(
        parser,
        "--lease-s",
        str(d.lease_s),
        "object stores: seconds a server's lease of a stream lasts unrenewed (failover time)",
        type=float,
    )
    _flag(
        parser,
        "--writer-idle-s",
        str(d.writer_idle_s),
        "seconds after its last writer detached that a stream is given up to other servers",
        type=float,
    )
    _flag(parser, "--listen", d.listen, "HOST:PORT to listen on; port 0 picks a free one")
    _flag(parser, "--max-message-bytes", str(d.max_message_bytes), "largest gRPC message", type=int)
    _flag(
        parser, "--message-bytes", str(d.message_bytes), "payload of sent data messages", type=int
    )
    _flag(
        parser,
        "--max-inflight-bytes-per-stream",
        str(d.max_inflight_bytes_per_stream),
        "bytes one writer may have received but not committed before the server stops reading",
        type=int,
    )
    _flag(
        parser,
        "--max-inflight-bytes",
        str(d.max_inflight_bytes),
        "bytes all writers together may have in flight",
        type=int,
    )
    _flag(
        parser,
        "--max-read-buffer-bytes",
        str(d.max_read_buffer_bytes),
        "bytes of data messages all readers together may have read ahead or queued; "
        "readers wait beyond it",
        type=int,
    )
    _flag(
        parser,
        "--max-log-bytes",
        str(d.max_log_bytes),
        "bytes of acknowledged steps held in memory until moved into the arrays; "
        "commits wait beyond it",
        type=int,
    )
    _flag(parser, "--cache-bytes", str(d.cache_bytes), "tensorstore's chunk cache", type=int)
    _flag(
        parser,
        "--small-chunk-cache-bytes",
        str(d.small_chunk_cache_bytes),
        "whole chunks of small leaves (<= 64 bytes per row and step) kept for sampling; 0: none",
        type=int,
    )
    _flag(parser, "--max-vaults", str(d.max_vaults), "vaults the root may hold", type=int)
    _flag(
        parser,
        "--max-streams-per-vault",
        str(d.max_streams_per_vault),
        "streams (writers) of one vault",
        type=int,
    )
    _flag(parser, "--max-leaves", str(d.max_leaves), "leaves of one experience structure", type=int)
    _flag(
        parser,
        "--max-step-bytes",
        str(d.max_step_bytes),
        "bytes of one time step of a vault, all leaves and batch rows",
        type=int,
    )
    _flag(
        parser,
        "--max-sample-batch",
        str(d.max_sample_batch),
        "windows one Sample call may ask for",
        type=int,
    )
    _flag(parser, "--tls-cert", "", "PEM certificate chain; with --tls-key, serve TLS only")
    _flag(parser, "--tls-key", "", "PEM private key of --tls-cert")
    _flag(
        parser,
        "--tls-client-ca",
        "",
        "PEM CA bundle; clients must present a certificate it signed (mutual TLS)",
    )
    _flag(
        parser,
        "--token-file",
        "",
        "bearer tokens with scopes, lines `NAME read|write|admin TOKEN`; unset: no tokens",
    )
    _flag(
        parser,
        "--shutdown-grace-s",
        str(d.shutdown_grace_s),
        "on SIGTERM/SIGINT, seconds in-flight calls may take",
        type=float,
    )
    _flag(parser, "--log-level", d.log_level, "DEBUG, INFO, WARNING or ERROR")


def _run_serve(args: argparse.Namespace) -> int:
    from expvault_server.app import serve

    try:
        config = ServerConfig(
            root=args.root,
            s3_endpoint=args.s3_endpoint or None,
            s3_region=args.s3_region or None,
            lease_s=args.lease_s,
            writer_idle_s=args.writer_idle_s,
            listen=args.listen,
            max_message_bytes=args.max_message_bytes,
            message_bytes=args.message_bytes,
            max_inflight_bytes_per_stream=args.max_inflight_bytes_per_stream,
            max_inflight_bytes=args.max_inflight_bytes,
            max_read_buffer_bytes=args.max_read_buffer_bytes,
            max_log_bytes=args.max_log_bytes,
            cache_bytes=args.cache_bytes,
            small_chunk_cache_bytes=args.small_chunk_cache_bytes,
            max_vaults=args.max_vaults,
            max_streams_per_vault=args.max_streams_per_vault,
            max_leaves=args.max_leaves,
            max_step_bytes=args.max_step_bytes,
            max_sample_batch=args.max_sample_batch,
            tls_cert=args.tls_cert or None,
            tls_key=args.tls_key or None,
            tls_client_ca=args.tls_client_ca or None,
            token_file=args.token_file or None,
            shutdown_grace_s=args.shutdown_grace_s,
            log_level=args.log_level,
        )
    except ExpvaultError as e:
        print(f"expvault serve: {e}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(config.log_level)
    config.log(logger)
    try:
        asyncio.run(serve(config))
    except ExpvaultError as e:
        logger.error("expvault serve failed: %s", e)
        return 1
    return 0


# -- client commands --------------------------------------------------------------------------


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, vault_pb2_grpc.VaultServiceStub]:
    channel = client_channel(args)
    return channel, vault_pb2_grpc.VaultServiceStub(channel)


def _configure_ls(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def _run_ls(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        names = list(
            stub.ListVaults(vault_pb2.ListVaultsRequest(), timeout=args.timeout_s).vault_names
        )
    print(json.dumps(names) if args.json else "\n".join(names))
    return 0


def _configure_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vault_name", metavar="VAULT", help="the vault to describe")
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def _info_dict(info: vault_pb2.VaultInfo) -> dict[str, Any]:
    return {
        "vault_name": info.vault_name,
        "batch_size": info.structure.batch_size,
        "buffer_length": info.structure.buffer_length,
        "leaves": [
            {"name": leaf.name, "dtype": leaf.dtype, "step_shape": list(leaf.step_shape)}
            for leaf in info.structure.leaves
        ],
        "metadata": json.loads(info.metadata_json or "{}"),
        "compression": json.loads(info.compression_json or "null"),
        "chunk_steps": info.chunk_steps,
        "streams": [
            {"vault_uid": s.vault_uid, "length": s.length, "bytes_on_disk": s.bytes_on_disk}
            for s in info.streams
        ],
    }


def _run_info(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        response = stub.GetVault(
            vault_pb2.GetVaultRequest(vault_name=args.vault_name), timeout=args.timeout_s
        )
    info = _info_dict(response.vault)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"vault {info['vault_name']}")
    print(f"  batch size B={info['batch_size']}  buffer length T={info['buffer_length']}")
    print(f"  compression {json.dumps(info['compression'])}  chunk steps {info['chunk_steps']}")
    if info["metadata"]:
        print(f"  metadata {json.dumps(info['metadata'])}")
    print("  leaves (B, T, ...):")
    for leaf in info["leaves"]:
        print(f"    {leaf['name']:<24} {leaf['dtype']:<10} {tuple(leaf['step_shape'])}")
    total_steps = sum(s["length"] for s in info["streams"])
    total_bytes = sum(s["bytes_on_disk"] for s in info["streams"])
    print(f"  streams: {len(info['streams'])}, {total_steps} steps, {total_bytes} bytes on disk")
    for s in info["streams"]:
        print(f"    {s['vault_uid']:<32} {s['length']:>12} steps {s['bytes_on_disk']:>14} bytes")
    return 0


def _configure_health(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.add_argument("--service", default="", help="service to check; default the whole server")


def _run_health(args: argparse.Namespace) -> int:
    channel = client_channel(args, options=[])
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
        )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


COMMANDS: dict[str, Command] = {
    "serve": Command("run the vault server", _configure_serve, _run_serve),
    "ls": Command("list the vaults of a server", _configure_ls, _run_ls),
    "info": Command(
        "describe a vault: structure, streams, lengths, bytes on disk", _configure_info, _run_info
    ),
    "health": Command(
        "exit 0 when the server is serving (a container health check)",
        _configure_health,
        _run_health,
    ),
}
# Subcommands in their own modules, each exposing `COMMAND: Command` (e.g. "demo", "bench").
COMMAND_MODULES: dict[str, str] = {
    "demo": "expvault_server.demo",
    "bench": "expvault_server.bench",
}


def _commands() -> dict[str, Command]:
    commands = dict(COMMANDS)
    for name, module in COMMAND_MODULES.items():
        commands[name] = importlib.import_module(module).COMMAND
    return commands


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `expvault` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="expvault",
        description="expvault: a networked vault for JAX/flashbax replay experience. Every flag "
        "also reads an EXPVAULT_* environment variable.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in _commands().items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `expvault` with `argv` (default `sys.argv[1:]`); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT, stream=sys.stderr)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except grpc.RpcError as rpc_error:
        error = error_from_rpc(rpc_error)
        print(f"expvault {args.command}: {error.code.name}: {error.message}", file=sys.stderr)
        return 1
    except ExpvaultError as error:
        print(f"expvault {args.command}: {error.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
