"""TLS, mutual TLS and bearer tokens, against real servers with certificates made at test time."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

import expvault
from conftest import ServerThread, assert_experience, experience, structure
from expvault import codec
from expvault.schema import Schema
from expvault.v1 import vault_pb2, vault_pb2_grpc
from expvault_server import cli
from expvault_server.app import exposure_warning
from expvault_server.auth import METHOD_SCOPES, load_tokens
from expvault_server.config import ServerConfig

STRUCTURE = codec.schema_to_proto(Schema.from_experience(structure()))
TOKENS = {
    "read": "read-token-0123456789abcdef",
    "write": "write-token-0123456789abcdef",
    "admin": "admin-token-0123456789abcdef",
}

# -- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            True,
        )  # fmt: skip
        return builder.sign(key, hashes.SHA256())
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
    return builder.sign(issuer[1], hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, rogue_key = key(), key()
    ca = _certificate("expvault test CA", ca_key, None)
    rogue = _certificate("rogue CA", rogue_key, None)
    server_key, client_key, rogue_client_key = key(), key(), key()
    return Pki(
        ca=_write_cert(ca, d / "ca.pem"),
        server_cert=_write_cert(
            _certificate("vault server", server_key, (ca, ca_key), server=True), d / "server.pem"
        ),
        server_key=_write_key(server_key, d / "server.key"),
        client_cert=_write_cert(_certificate("actor", client_key, (ca, ca_key)), d / "client.pem"),
        client_key=_write_key(client_key, d / "client.key"),
        rogue_ca=_write_cert(rogue, d / "rogue-ca.pem"),
        rogue_client_cert=_write_cert(
            _certificate("intruder", rogue_client_key, (rogue, rogue_key)), d / "rogue.pem"
        ),
        rogue_client_key=_write_key(rogue_client_key, d / "rogue.key"),
    )


def _token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(
        "# name scopes token\n"
        f"learner read {TOKENS['read']}\n"
        f"actor-1 write {TOKENS['write']}\n"
        "\n"
        f"ops admin {TOKENS['admin']}\n"
    )
    path.chmod(0o600)
    return path


def _health(channel: grpc.Channel) -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(response.status)


# -- TLS ------------------------------------------------------------------------------------------


def test_tls_clients_verify_the_server(
    make_server: Callable[..., ServerThread], pki: Pki, tmp_path: Path
) -> None:
    server = make_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    credentials = expvault.tls_credentials(ca=pki.ca)
    with expvault.RemoteVault(
        server.target, "v", structure(), vault_uid="a", credentials=credentials,
        reconnect_timeout_s=0,
    ) as vault:  # fmt: skip
        actor_state = _state(0, 5)
        assert vault.write(actor_state) == 5
    reader = expvault.VaultReader(server.target, "v", credentials=expvault.tls_credentials(pki.ca))
    with reader:
        assert_experience(reader.read(vault_uid="a"), 0, 5)
    # PEM bytes work as well as paths; so does the name in the certificate.
    localhost = f"localhost:{server.port}"
    with grpc.secure_channel(localhost, expvault.tls_credentials(pki.ca.read_bytes())) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    # Plaintext, or a CA that did not sign the server's certificate: no connection.
    for channel in (
        grpc.insecure_channel(server.target),
        grpc.secure_channel(server.target, expvault.tls_credentials(pki.rogue_ca)),
    ):
        with channel, pytest.raises(grpc.RpcError) as info:
            _health(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(expvault.UnavailableError):
        expvault.VaultReader(
            server.target, "v", credentials=expvault.tls_credentials(pki.rogue_ca),
            reconnect_timeout_s=0,
        )  # fmt: skip


def _state(start: int, stop: int) -> Any:
    """A full flashbax-like state holding steps `[start, stop)` of the test experience."""
    from conftest import Actor

    actor = Actor(start)
    return actor.add(stop - start)


def test_mutual_tls_requires_a_client_certificate_the_ca_signed(
    make_server: Callable[..., ServerThread], pki: Pki
) -> None:
    server = make_server(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    good = expvault.tls_credentials(pki.ca, cert=pki.client_cert, key=pki.client_key)
    with grpc.secure_channel(server.target, good) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        stub.CreateVault(vault_pb2.CreateVaultRequest(vault_name="v", structure=STRUCTURE))
    refused = [
        expvault.tls_credentials(pki.ca),  # no client certificate
        expvault.tls_credentials(pki.ca, cert=pki.rogue_client_cert, key=pki.rogue_client_key),
    ]
    for credentials in refused:
        with grpc.secure_channel(server.target, credentials) as channel:
            with pytest.raises(grpc.RpcError) as info:
                _health(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(expvault.InvalidArgumentError, match="both cert and key"):
        expvault.tls_credentials(pki.ca, cert=pki.client_cert)
    with pytest.raises(expvault.InvalidArgumentError, match="cannot read the CA bundle"):
        expvault.tls_credentials(pki.ca.parent / "missing.pem")


def test_tls_settings_are_checked(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(expvault.InvalidArgumentError, match="both --tls-cert and --tls-key"):
        ServerConfig(tls_cert=pki.server_cert)
    with pytest.raises(expvault.InvalidArgumentError, match=r"\(mutual TLS\) needs TLS"):
        ServerConfig(tls_client_ca=pki.ca)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for cert, key, message in [
        (tmp_path / "missing.pem", pki.server_key, "cannot read the TLS certificate"),
        (pki.server_cert, not_pem, "is not PEM"),
    ]:
        config = ServerConfig(root=tmp_path / "v", listen="127.0.0.1:0", tls_cert=cert, tls_key=key)
        with pytest.raises(expvault.InvalidArgumentError, match=message):
            ServerThread(config)


# -- tokens ---------------------------------------------------------------------------------------


def _call(stub: vault_pb2_grpc.VaultServiceStub, method: str, metadata: Any) -> None:
    """Calls `method` with a request that succeeds (or fails on its own) once authorized."""
    kw: dict[str, Any] = {"metadata": metadata, "timeout": 10}
    if method == "ListVaults":
        stub.ListVaults(vault_pb2.ListVaultsRequest(), **kw)
    elif method == "GetVault":
        stub.GetVault(vault_pb2.GetVaultRequest(vault_name="v"), **kw)
    elif method == "CreateVault":
        stub.CreateVault(vault_pb2.CreateVaultRequest(vault_name="v", structure=STRUCTURE), **kw)
    elif method == "DeleteVault":
        stub.DeleteVault(vault_pb2.DeleteVaultRequest(vault_name="gone"), **kw)
    elif method == "Read":
        list(stub.Read(vault_pb2.ReadRequest(vault_name="v", vault_uid="a"), **kw))
    elif method == "Sample":
        request = vault_pb2.SampleRequest(vault_name="v", batch_size=2, sequence_length=2)
        list(stub.Sample(request, **kw))
    elif method == "Append":
        open_ = vault_pb2.AppendRequest(open=vault_pb2.AppendOpen(vault_name="v", vault_uid="b"))
        list(stub.Append(iter([open_]), **kw))  # the stream does not exist: NOT_FOUND
    else:
        raise AssertionError(method)


_HOLDS = {"read": {"read"}, "write": {"read", "write"}, "admin": {"read", "write", "admin"}}


def _outcome(call: Callable[[], None]) -> tuple[grpc.StatusCode, str, str | None]:
    """The code, details and ErrorInfo reason a call ends with (OK, "", None on success)."""
    try:
        call()
    except grpc.RpcError as error:
        reason = _reason(error) if error.code() != grpc.StatusCode.NOT_FOUND else None
        return error.code(), error.details() or "", reason
    return grpc.StatusCode.OK, "", None


def _reason(error: Any) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return str(info.reason)


def test_every_method_needs_its_scope(
    make_server: Callable[..., ServerThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_server(token_file=_token_file(tmp_path))
    admin = [("authorization", f"Bearer {TOKENS['admin']}")]
    with grpc.insecure_channel(server.target) as channel:
        stub = vault_pb2_grpc.VaultServiceStub(channel)
        stub.CreateVault(
            vault_pb2.CreateVaultRequest(vault_name="v", structure=STRUCTURE), metadata=admin
        )
        stub.CreateVault(
            vault_pb2.CreateVaultRequest(vault_name="gone", structure=STRUCTURE), metadata=admin
        )
        opened = vault_pb2.AppendRequest(
            open=vault_pb2.AppendOpen(vault_name="v", vault_uid="a", create=True)
        )
        chunk = vault_pb2.AppendRequest(
            chunk=vault_pb2.AppendChunk(
                num_steps=4,
                leaves=codec.encode_arrays(
                    [np.asarray(getattr(experience(0, 4), k)) for k in ("action", "obs", "reward")]
                ),
            )
        )
        assert list(stub.Append(iter([opened, chunk]), metadata=admin))[-1].committed_offset == 4
        assert set(METHOD_SCOPES) == {m.name for m in vault_pb2.DESCRIPTOR.services_by_name[
            "VaultService"].methods}  # fmt: skip
        for method, scope in METHOD_SCOPES.items():
            cases: list[tuple[Any, grpc.StatusCode | None, str]] = [
                (None, grpc.StatusCode.UNAUTHENTICATED, "needs a token"),
                ([("authorization", "Bearer not-a-token-0123456789")],
                 grpc.StatusCode.UNAUTHENTICATED, "not valid"),
                ([("authorization", TOKENS["admin"])],  # no scheme
                 grpc.StatusCode.UNAUTHENTICATED, "needs a token"),
            ]  # fmt: skip
            for held, token in TOKENS.items():
                allowed = scope in _HOLDS[held]
                cases.append(
                    (
                        [("authorization", f"bearer  {token}")],  # the scheme's case is free
                        None if allowed else grpc.StatusCode.PERMISSION_DENIED,
                        f"needs scope {scope!r}",
                    )
                )
            for metadata, code, message in cases:
                got, details, reason = _outcome(functools.partial(_call, stub, method, metadata))
                if code is None:  # allowed: any status but the two auth ones
                    assert got not in (
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    ), (method, metadata, details)
                else:
                    assert got == code, (method, metadata, got)
                    assert message in details, (method, details)
                    assert reason == code.name
        # Health and reflection stay open.
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        assert answers[0].list_services_response.service
    # DeleteVault with the admin token did delete; with others it did not run.
    assert list(server.servicer._store.list_vaults()) == ["v"]
    for token in TOKENS.values():
        assert token not in caplog.text
    assert "actor-1" in caplog.text  # refusals name the holder


def test_remote_clients_send_their_token(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = make_server(token_file=_token_file(tmp_path))
    with pytest.raises(expvault.UnauthenticatedError, match="needs a token"):
        expvault.RemoteVault(server.target, "v", structure(), reconnect_timeout_s=0)
    with pytest.raises(expvault.PermissionDeniedError, match="needs scope 'write'"):
        expvault.RemoteVault(server.target, "v", structure(), token=TOKENS["read"])
    with expvault.RemoteVault(
        server.target, "v", structure(), vault_uid="a", token=TOKENS["write"]
    ) as vault:
        vault.write(_state(0, 6))
        assert_experience(vault.read().experience, 0, 6)  # write includes read
    with expvault.VaultReader(server.target, "v", token=TOKENS["read"]) as reader:
        assert_experience(reader.read(vault_uid="a"), 0, 6)
        assert reader.sample(2, 3).experience is not None
    with pytest.raises(expvault.UnauthenticatedError, match="not valid"):
        expvault.VaultReader(server.target, "v", token="x" * 20)
    with pytest.raises(expvault.InvalidArgumentError, match="printable ASCII"):
        expvault.VaultReader(server.target, "v", token="has space")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no token"),
        ("# only a comment\n", "holds no token"),
        ("a read\n", "line 1: expected `NAME SCOPES TOKEN`"),
        ("a read,fly 0123456789abcdef0\n", "line 1: scopes 'read,fly' are not"),
        ("a read, 0123456789abcdef0\n", "line 1: scopes 'read,' are not"),
        ("a read , 0123456789abcdef0\n", "line 1: expected `NAME SCOPES TOKEN`"),
        ("a read,,write 0123456789abcdef0\n", "scopes 'read,,write' are not"),
        ("a read short\n", "at least 16 printable ASCII"),
        ("a/b read 0123456789abcdef0\n", "name 'a/b' must be"),
        ("a read 0123456789abcdef0\na write 0123456789abcdef1\n", "line 2: name 'a' appears"),
        ("a read 0123456789abcdef0\nb write 0123456789abcdef0\n", "'b' has the same token"),
    ],
)
def test_bad_token_files_are_refused_at_startup(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(expvault.InvalidArgumentError) as info:
        load_tokens(path)
    assert message in str(info.value)
    assert "0123456789abcdef" not in str(info.value)  # never the token


def test_serve_refuses_a_missing_token_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = cli.main(
        [
            "serve", "--root", str(tmp_path / "v"), "--listen", "127.0.0.1:0",
            "--token-file", str(tmp_path / "missing"),
        ]
    )  # fmt: skip
    assert status == 1
    assert "cannot read the token file" in caplog.text
    assert not (tmp_path / "v").exists()  # refused before anything was created


def test_token_files_readable_by_others_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _token_file(tmp_path)
    path.chmod(0o644)
    assert len(load_tokens(path)) == 3
    assert "can be read by other users" in caplog.text


@pytest.mark.parametrize(
    ("listen", "tls", "tokens", "warning"),
    [
        ("127.0.0.1:0", False, False, None),
        ("localhost:0", False, False, None),
        ("[::1]:0", False, False, None),
        ("0.0.0.0:0", False, False, "plaintext without tokens"),
        ("[::]:0", False, False, "plaintext without tokens"),
        ("vault.example:0", False, False, "plaintext without tokens"),
        ("0.0.0.0:0", False, True, "tokens and data cross the network unencrypted"),
        ("0.0.0.0:0", True, False, None),
        ("0.0.0.0:0", True, True, None),
    ],
)
def test_exposed_plaintext_listeners_are_warned_about(
    tmp_path: Path, pki: Pki, listen: str, tls: bool, tokens: bool, warning: str | None
) -> None:
    config = ServerConfig(
        listen=listen,
        tls_cert=pki.server_cert if tls else None,
        tls_key=pki.server_key if tls else None,
        token_file=_token_file(tmp_path) if tokens else None,
    )
    got = exposure_warning(config)
    if warning is None:
        assert got is None
    else:
        assert got is not None
        assert warning in got


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture
def secure_server(
    make_server: Callable[..., ServerThread], pki: Pki, tmp_path: Path
) -> ServerThread:
    server = make_server(
        tls_cert=pki.server_cert, tls_key=pki.server_key, token_file=_token_file(tmp_path)
    )
    with grpc.secure_channel(server.target, expvault.tls_credentials(pki.ca)) as channel:
        vault_pb2_grpc.VaultServiceStub(channel).CreateVault(
            vault_pb2.CreateVaultRequest(vault_name="v", structure=STRUCTURE),
            metadata=[("authorization", f"Bearer {TOKENS['write']}")],
        )
    return server


def test_cli_clients_speak_tls_and_send_tokens(
    secure_server: ServerThread,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = ["--target", secure_server.target, "--timeout-s", "5"]
    assert cli.main(["health", *target, "--tls-ca", str(pki.ca)]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli.main(["ls", *target, "--tls-ca", str(pki.ca), "--token", TOKENS["read"]]) == 0
    assert capsys.readouterr().out.strip() == "v"
    monkeypatch.setenv("EXPVAULT_TOKEN", TOKENS["read"])
    monkeypatch.setenv("EXPVAULT_TLS_CA", str(pki.ca))
    assert cli.main(["info", "v", *target, "--json"]) == 0
    assert '"vault_name": "v"' in capsys.readouterr().out
    # The certificate names localhost and 127.0.0.1; another name is refused unless overridden.
    assert cli.main(["ls", *target, "--tls-server-name", "vault.example"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    monkeypatch.delenv("EXPVAULT_TOKEN")
    assert cli.main(["ls", *target]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err
    assert "needs a token" in err


def test_serve_command_with_tls_and_tokens(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`expvault serve` as a process: the flags reach the server; the log holds no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPVAULT_")}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "expvault_server.cli", "serve",
            "--root", str(tmp_path / "vaults"), "--listen", "127.0.0.1:0",
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca), "--token-file", str(_token_file(tmp_path)),
            "--log-level", "DEBUG",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[str] = []
    try:
        for line in process.stderr:
            lines.append(line)
            if match := re.search(r"serving on 127\.0\.0\.1:(\d+) .* tls=mutual", line):
                port = match.group(1)
                break
        else:
            raise AssertionError("".join(lines))
        flags = [
            "--target", f"127.0.0.1:{port}", "--tls-ca", str(pki.ca),
            "--tls-client-cert", str(pki.client_cert), "--tls-client-key", str(pki.client_key),
        ]  # fmt: skip
        assert cli.main(["health", *flags]) == 0
        assert cli.main(["ls", *flags, "--token", TOKENS["read"]]) == 0
        assert cli.main(["ls", *flags, "--token", "z" * 24]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    assert process.returncode == 0
    log = "".join(lines) + rest
    assert "bearer tokens required: 3 tokens" in log
    for token in TOKENS.values():
        assert token not in log
