"""`expvault serve` in a subprocess for the benchmark and the soak: address, memory, stop."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["ServeProcess", "process_memory"]

_SERVING = re.compile(r"expvault serving on (\S+):(\d+) ")


def process_memory(pid: int) -> tuple[int, int]:
    """`(VmRSS, VmHWM)` of a process in bytes, from /proc/PID/status; (0, 0) once it exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE))
    return int(values.get("VmRSS", 0)) * 1024, int(values.get("VmHWM", 0)) * 1024


class ServeProcess:
    """`expvault serve --listen 127.0.0.1:0 --root ROOT FLAGS...`; its log is pumped into `lines`.

    Args:
        root: the server's root: a directory or a URL (`s3://...`).
        flags: more flags of `expvault serve`.
        startup_timeout_s: how long to wait for the server to listen.

    Raises:
        RuntimeError: the server exited or did not listen in time (its last log lines attached).
    """

    def __init__(self, root: Path | str, *flags: str, startup_timeout_s: float = 180.0) -> None:
        self.lines: list[str] = []
        self._port: queue.Queue[int | None] = queue.Queue()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "expvault_server.cli", "serve"),
                *("--listen", "127.0.0.1:0", "--root", str(root), *flags),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        try:
            port = self._port.get(timeout=startup_timeout_s)
        except queue.Empty:
            port = None
        if port is None:
            self.stop()
            raise RuntimeError(f"the server did not start: {''.join(self.lines[-20:])}")
        self.target = f"127.0.0.1:{port}"

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if m := _SERVING.search(line):
                self._port.put(int(m.group(2)))
        self._port.put(None)

    def memory(self) -> tuple[int, int]:
        """`(VmRSS, VmHWM)` of the server process in bytes (0, 0 once it exited)."""
        return process_memory(self.process.pid)

    def stop(self) -> int:
        """SIGTERM (graceful), then kill after 60 s; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        status = self.process.wait()
        self._pump_thread.join(10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return status
