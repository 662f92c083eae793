"""The container image and the compose stack on a real Docker engine (`pytest -m docker`).

Builds the image with docker/build.sh (a local Debian base image where no registry answers),
then: the server alone (non-root, health check, settings from EXPVAULT_* variables, exit 0 on
`docker stop`); the server with TLS and tokens from read-only mounted files; and the compose
stack of a server, two actors and a learner, with the server container SIGKILLed mid-stream and
started again on its volume. Skipped, with the reason, where no Docker engine answers
(`bash docker/engine.sh` starts one where it can).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

import expvault
from conftest import Actor, assert_experience, structure
from expvault import NotFoundError, VaultReader

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
IMAGE = os.environ.get("EXPVAULT_TEST_IMAGE", "expvault:test")

# The compose run: actors paced so that the kill lands mid-stream (4096 steps at 256 steps/s
# take 16 s of each actor's life; the kill comes once a stream has 1024 steps).
STEPS = 4096
KILL_AFTER = 1024
DEMO_ENV = {
    "EXPVAULT_DEMO_VAULT": "e2e",
    "EXPVAULT_DEMO_STEPS": str(STEPS),
    "EXPVAULT_DEMO_ENVS": "4",
    "EXPVAULT_DEMO_WRITE_INTERVAL": "64",
    "EXPVAULT_DEMO_STEPS_PER_S": "256",
    "EXPVAULT_DEMO_RECONNECT_TIMEOUT_S": "180",
    "EXPVAULT_PORT": "0",  # a free port on 127.0.0.1
}

T = TypeVar("T")


def _run(
    *args: str, timeout_s: float = 120, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}"
            f"\n{result.stderr[-4000:]}"
        )
    return result


def _eventually(what: str, probe: Callable[[], T | None], timeout_s: float = 120) -> T:
    """Polls `probe` until it returns something other than None; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def _checksum(experience: dict[str, Any]) -> int:
    """The demo's checksum, computed independently: uint32 sum of every leaf's 32-bit words."""
    total = 0
    for leaf in experience.values():
        leaf = np.ascontiguousarray(leaf)
        words = leaf.astype(np.uint32) if leaf.dtype == np.bool_ else leaf.view(np.uint32)
        total += int(words.sum(dtype=np.uint64))
    return total % (1 << 32)


def _result_line(logs: str) -> dict[str, Any]:
    """The JSON result a demo role prints last."""
    for line in reversed(logs.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    pytest.fail(f"no JSON result line in the logs:\n{logs[-4000:]}")


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> str:
    """The image built from this checkout (tag `IMAGE`); skips where Docker cannot run."""
    if shutil.which("docker") is None:
        pytest.skip("no docker command; `bash docker/engine.sh` installs and starts an engine")
    try:
        info = subprocess.run(
            ["docker", "info"], capture_output=True, text=True, timeout=60, check=False
        )
        error = info.stderr.strip().splitlines()[-1:] if info.returncode else None
    except subprocess.TimeoutExpired:
        error = ["`docker info` did not answer in 60 s"]
    if error is not None:
        pytest.skip(
            f"no Docker engine answers `docker info` ({' '.join(error)}); "
            "`bash docker/engine.sh` starts one where it can"
        )
    base = subprocess.run(
        ["bash", "docker/base-image.sh"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=REPO,
    )
    if base.returncode != 0:
        pytest.skip(f"no base image for docker/Dockerfile: {base.stderr.strip()[-1000:]}")
    started = time.monotonic()
    _run(
        "bash",
        "docker/build.sh",
        IMAGE,
        timeout_s=900,
        env={"BASE_IMAGE": base.stdout.strip()},
    )
    size = int(_run("docker", "image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(
        f"\nimage {IMAGE} on {base.stdout.strip()}: {size / 1e6:.0f} MB, "
        f"built in {time.monotonic() - started:.0f} s"
    )
    return IMAGE


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """The compose command: `docker compose` (v2) or `docker-compose` (v1)."""
    if _run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed (docker/engine.sh)")


class Stack:
    """One compose project of docker/compose.yaml."""

    def __init__(self, compose: list[str], image: str, project: str) -> None:
        self.base = [*compose, "--project-name", project, "--file", str(COMPOSE_FILE)]
        self.env = {**DEMO_ENV, "EXPVAULT_IMAGE": image}

    def __call__(self, *args: str, timeout_s: float = 180, check: bool = True) -> str:
        return _run(*self.base, *args, timeout_s=timeout_s, check=check, env=self.env).stdout

    def container(self, service: str) -> str:
        container_id = self("ps", "-q", service).strip()
        assert container_id, f"no container for service {service}"
        return container_id

    def target(self) -> str | None:
        """The published 127.0.0.1 address of the server, None while it has none."""
        address = self("port", "vault", "50051", check=False).strip()
        if not address or address.endswith(":0"):
            return None
        assert address.rpartition(":")[0] == "127.0.0.1", f"published on {address}, not loopback"
        return address

    def logs(self) -> str:
        return self("logs", "--no-color", check=False)


@pytest.fixture
def stack(compose: list[str], image: str) -> Iterator[Stack]:
    stack = Stack(compose, image, f"expvault-e2e-{os.getpid()}")
    stack("down", "--volumes", "--timeout", "5", check=False)  # leftovers of an aborted run
    try:
        yield stack
    finally:
        stack("down", "--volumes", "--timeout", "5", check=False)


def _reader(stack: Stack) -> VaultReader | None:
    """A reader of the demo vault through the published port, None until an actor created it."""
    target = stack.target()
    if target is None:
        return None
    try:
        return VaultReader(target, DEMO_ENV["EXPVAULT_DEMO_VAULT"], reconnect_timeout_s=60)
    except NotFoundError:
        return None


def _state(container: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(
        _run("docker", "inspect", "--format", "{{json .State}}", container).stdout
    )
    return state


def _healthy(container: str) -> bool | None:
    """True once the container's health check passed; fails with its log if it stopped."""
    state = _state(container)
    if not state["Running"]:
        logs = _run("docker", "logs", container, check=False)
        pytest.fail(f"container exited {state['ExitCode']}:\n{logs.stdout}{logs.stderr}")
    return state["Health"]["Status"] == "healthy" or None


def _pki(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate (for vault, localhost and 127.0.0.1) as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("expvault docker test CA"))
        .issuer_name(name("expvault docker test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    alt_names: list[x509.GeneralName] = [
        x509.DNSName("vault"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = (
        x509.CertificateBuilder()
        .subject_name(name("vault"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca": directory / "ca.pem",
        "cert": directory / "server.pem",
        "key": directory / "server.key",
    }
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


# -- tests --------------------------------------------------------------------------------------


def test_server_container_runs_unprivileged_reads_env_and_stops_cleanly(image: str) -> None:
    # A non-default port through EXPVAULT_LISTEN: the server and its health check follow it.
    container = _run(
        "docker",
        "run",
        "--detach",
        "--publish",
        "127.0.0.1:0:6000",
        "--env",
        "EXPVAULT_LISTEN=0.0.0.0:6000",
        "--env",
        "EXPVAULT_LOG_LEVEL=DEBUG",
        image,
    ).stdout.strip()
    try:
        _eventually("the health check to pass", lambda: _healthy(container))
        assert _run("docker", "exec", container, "id", "-u").stdout.strip() != "0"
        address = _run("docker", "port", container, "6000").stdout.splitlines()[0]
        assert address.startswith("127.0.0.1:")
        health = _run(sys.executable, "-m", "expvault_server.cli", "health", "--target", address)
        assert health.stdout.strip() == "SERVING"
        _run("docker", "stop", "--time", "60", container)
        state = _state(container)
        assert state["ExitCode"] == 0, state  # SIGTERM reached PID 1: a clean exit, no SIGKILL
        logs = _run("docker", "logs", container).stderr
        assert "listen=0.0.0.0:6000" in logs, logs
        assert "expvault stopped" in logs, logs
    finally:
        _run("docker", "rm", "--force", "--volumes", container, check=False)


def test_compose_stack_loses_no_acknowledged_step_when_the_server_is_killed(
    stack: Stack,
) -> None:
    stack("up", "--detach", timeout_s=300)  # returns once the server is healthy
    try:
        vault = stack.container("vault")
        reader = _eventually("the actors to create the vault", lambda: _reader(stack))

        def streamed() -> dict[str, int] | None:
            lengths = reader.streams()
            return lengths if lengths and max(lengths.values()) >= KILL_AFTER else None

        with reader:
            before = _eventually(f"{KILL_AFTER} steps in a stream", streamed)
        _run("docker", "kill", vault)  # SIGKILL: no flush, no goodbye
        # Mid-stream: `before` are acknowledged steps, and an actor had more to write.
        assert min(before.get(uid, 0) for uid in ("actor-0", "actor-1")) < STEPS, before
        _run("docker", "wait", vault)
        _run("docker", "start", vault)  # the same container on the same volume
        target = _eventually("the restarted server's published port", stack.target)
        with VaultReader(target, DEMO_ENV["EXPVAULT_DEMO_VAULT"], reconnect_timeout_s=60) as r:
            after = r.streams()
        for uid, acknowledged in before.items():
            assert after[uid] >= acknowledged, (
                f"{uid}: {acknowledged} acknowledged, {after[uid]} kept"
            )

        # Actors and learner ride out the restart and finish.
        roles = ("actor-0", "actor-1", "learner")
        for service in roles:
            code = _run("docker", "wait", stack.container(service), timeout_s=300).stdout.strip()
            assert code == "0", f"{service} exited {code}"
        results = {
            service: _result_line(_run("docker", "logs", stack.container(service)).stdout)
            for service in roles
        }
    except BaseException:
        print(stack.logs()[-20000:])
        raise

    learner = results["learner"]
    assert learner["problems"] == []
    target = _eventually("the server's published port", stack.target)
    with VaultReader(target, DEMO_ENV["EXPVAULT_DEMO_VAULT"]) as reader:
        lengths = reader.streams()
        assert sorted(lengths) == ["actor-0", "actor-1"]
        for service in ("actor-0", "actor-1"):
            actor = results[service]
            uid = actor["vault_uid"]
            assert actor["produced"] == actor["committed"] == lengths[uid] == STEPS, actor
            assert learner["received"][uid] == STEPS
            # Every step once, in order: the step ids of each env row are 0..STEPS-1.
            experience = reader.read(0, STEPS, vault_uid=uid)
            steps = experience["step"]
            assert np.array_equal(steps, np.broadcast_to(np.arange(STEPS), steps.shape))
            # Bit for bit what the actor produced, and what the learner saw.
            assert _checksum(experience) == actor["checksum"] == learner["checksums"][uid]

    # docker stop (SIGTERM) of the server: a clean exit.
    stack("stop", "--timeout", "60", "vault")
    assert _state(stack.container("vault"))["ExitCode"] == 0


def test_server_container_serves_tls_and_tokens_from_read_only_mounts(
    image: str, tmp_path: Path
) -> None:
    pytest.importorskip("cryptography", reason="makes the test certificates (a dev dependency)")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    pki = _pki(secrets)
    (secrets / "tokens").write_text(
        "actor write actor-token-0123456789abcdef\nlearner read learner-token-0123456789abcdef\n"
    )
    # The server runs as uid 10001: the files must be its own (or readable by others).
    for path in (secrets, *secrets.iterdir()):
        if os.geteuid() == 0:
            os.chown(path, 10001, 10001)
        else:
            path.chmod(0o755 if path.is_dir() else 0o644)
    container = _run(
        "docker",
        "run",
        "--detach",
        "--publish",
        "127.0.0.1:0:50051",
        "--volume",
        f"{secrets}:/run/expvault:ro",
        "--env",
        "EXPVAULT_TLS_CERT=/run/expvault/server.pem",
        "--env",
        "EXPVAULT_TLS_KEY=/run/expvault/server.key",
        "--env",
        "EXPVAULT_TOKEN_FILE=/run/expvault/tokens",
        "--env",
        "EXPVAULT_TLS_CA=/run/expvault/ca.pem",  # for the health check, a client
        image,
    ).stdout.strip()
    try:
        # The health check passes only if it speaks TLS to the server and trusts its certificate.
        _eventually("the health check to pass over TLS", lambda: _healthy(container))
        target = _run("docker", "port", container, "50051").stdout.splitlines()[0]
        credentials = expvault.tls_credentials(ca=pki["ca"])
        with pytest.raises(expvault.UnauthenticatedError):
            VaultReader(target, "v", credentials=credentials, token="not-a-token")
        with expvault.RemoteVault(
            target,
            "v",
            structure(),
            vault_uid="a",
            credentials=credentials,
            token="actor-token-0123456789abcdef",
        ) as vault:
            assert vault.write(Actor().add(4)) == 4
        with VaultReader(
            target, "v", credentials=credentials, token="learner-token-0123456789abcdef"
        ) as reader:
            assert reader.streams() == {"a": 4}
            assert_experience(reader.read(0, 4, vault_uid="a"), 0, 4)
        # A plaintext client does not get through (the server speaks TLS only).
        with pytest.raises(expvault.UnavailableError):
            VaultReader(target, "v", token="learner-token-0123456789abcdef", reconnect_timeout_s=1)
        logs = _run("docker", "logs", container).stderr
        assert "tls=on" in logs, logs
    finally:
        _run("docker", "rm", "--force", "--volumes", container, check=False)
