"""`expvault` command line and `ServerConfig`: flags, their EXPVAULT_* variables, validation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from expvault.errors import InvalidArgumentError
from expvault_server import cli
from expvault_server.config import ServerConfig, parse_listen

SERVE_FLAGS = {
    "--root": "EXPVAULT_ROOT",
    "--listen": "EXPVAULT_LISTEN",
    "--max-message-bytes": "EXPVAULT_MAX_MESSAGE_BYTES",
    "--message-bytes": "EXPVAULT_MESSAGE_BYTES",
    "--max-inflight-bytes-per-stream": "EXPVAULT_MAX_INFLIGHT_BYTES_PER_STREAM",
    "--max-inflight-bytes": "EXPVAULT_MAX_INFLIGHT_BYTES",
    "--max-read-buffer-bytes": "EXPVAULT_MAX_READ_BUFFER_BYTES",
    "--max-log-bytes": "EXPVAULT_MAX_LOG_BYTES",
    "--cache-bytes": "EXPVAULT_CACHE_BYTES",
    "--small-chunk-cache-bytes": "EXPVAULT_SMALL_CHUNK_CACHE_BYTES",
    "--max-vaults": "EXPVAULT_MAX_VAULTS",
    "--max-streams-per-vault": "EXPVAULT_MAX_STREAMS_PER_VAULT",
    "--max-leaves": "EXPVAULT_MAX_LEAVES",
    "--max-step-bytes": "EXPVAULT_MAX_STEP_BYTES",
    "--max-sample-batch": "EXPVAULT_MAX_SAMPLE_BATCH",
    "--tls-cert": "EXPVAULT_TLS_CERT",
    "--tls-key": "EXPVAULT_TLS_KEY",
    "--tls-client-ca": "EXPVAULT_TLS_CLIENT_CA",
    "--token-file": "EXPVAULT_TOKEN_FILE",
    "--shutdown-grace-s": "EXPVAULT_SHUTDOWN_GRACE_S",
    "--log-level": "EXPVAULT_LOG_LEVEL",
}
CLIENT_FLAGS = {
    "--target": "EXPVAULT_TARGET",
    "--timeout-s": "EXPVAULT_TIMEOUT_S",
    "--tls-ca": "EXPVAULT_TLS_CA",
    "--tls-client-cert": "EXPVAULT_TLS_CLIENT_CERT",
    "--tls-client-key": "EXPVAULT_TLS_CLIENT_KEY",
    "--tls-server-name": "EXPVAULT_TLS_SERVER_NAME",
    "--token": "EXPVAULT_TOKEN",
}


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_help_documents_every_flag_and_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, env in SERVE_FLAGS.items():
        assert flag in text
        assert env in text
    assert "default ./vaults" in text
    assert "default 127.0.0.1:50051" in text
    for command in ("ls", "info", "health"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag, env in CLIENT_FLAGS.items():
            assert flag in text
            assert env in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    overview = capsys.readouterr().out
    for command in ("serve", "ls", "info", "health"):
        assert command in overview


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in [*SERVE_FLAGS.values(), "EXPVAULT_TARGET"]:
        monkeypatch.delenv(env, raising=False)
    args = _parse("serve")
    assert (args.root, args.listen) == ("./vaults", "127.0.0.1:50051")
    assert _parse("health").target == "127.0.0.1:50051"
    monkeypatch.setenv("EXPVAULT_ROOT", "/data/v")
    monkeypatch.setenv("EXPVAULT_LISTEN", "0.0.0.0:7000")
    monkeypatch.setenv("EXPVAULT_MAX_INFLIGHT_BYTES", "123456789")
    monkeypatch.setenv("EXPVAULT_TARGET", "vaults.internal:7000")
    args = _parse("serve")
    assert (args.root, args.listen, args.max_inflight_bytes) == (
        "/data/v",
        "0.0.0.0:7000",
        123456789,
    )
    assert _parse("ls").target == "vaults.internal:7000"
    assert _parse("serve", "--listen", "127.0.0.1:1").listen == "127.0.0.1:1"  # flags win


def test_subcommands_from_other_modules_are_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMAND_MODULES, "extra", __name__)
    assert _parse("extra", "--times", "3").run(_parse("extra", "--times", "3")) == 3


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--times", type=int, default=1)


COMMAND = cli.Command("a test subcommand", _configure, lambda args: int(args.times))


def test_config_is_checked(tmp_path: Path) -> None:
    config = ServerConfig(root=str(tmp_path), listen="[::1]:0", log_level="debug")  # type: ignore[arg-type]
    assert config.root == tmp_path
    assert config.log_level == "DEBUG"
    assert parse_listen("[::1]:50051") == ("[::1]", 50051)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"listen": "localhost"}, "HOST:PORT"),
        ({"listen": "h:70000"}, r"\[0, 65535\]"),
        ({"max_message_bytes": 0}, "max_message_bytes must be >= 1"),
        ({"message_bytes": 40 << 20}, "at most half of max_message_bytes"),
        ({"max_inflight_bytes": 1, "max_inflight_bytes_per_stream": 2}, "must be >="),
        ({"shutdown_grace_s": -1}, "shutdown_grace_s must be >= 0"),
        ({"log_level": "LOUD"}, "log_level must be one of"),
        ({"max_vaults": 0}, "max_vaults must be >= 1"),
        ({"max_streams_per_vault": 0}, "max_streams_per_vault must be >= 1"),
        ({"max_leaves": 0}, "max_leaves must be >= 1"),
        ({"max_step_bytes": -5}, "max_step_bytes must be >= 1"),
        ({"max_sample_batch": 0}, "max_sample_batch must be >= 1"),
        ({"small_chunk_cache_bytes": -1}, "small_chunk_cache_bytes must be >= 0"),
        ({"tls_key": "k.pem"}, "both --tls-cert and --tls-key"),
        ({"tls_client_ca": "ca.pem"}, "needs TLS"),
    ]
    for fields, message in bad:
        with pytest.raises(InvalidArgumentError, match=message):
            ServerConfig(**fields)


def test_serve_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--max-message-bytes", "0"]) == 2
    assert "max_message_bytes must be >= 1" in capsys.readouterr().err
    assert cli.main(["serve", "--max-vaults", "0"]) == 2
    assert "max_vaults must be >= 1" in capsys.readouterr().err


def test_client_commands_report_an_absent_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ls", "--target", "127.0.0.1:1", "--timeout-s", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_client_commands_take_one_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ls", "--target", "127.0.0.1:1,127.0.0.1:2"]) == 1
    assert "talks to one server" in capsys.readouterr().err
