"""A real `mlflow server` for tests: sqlite backend, local artifact folder, 127.0.0.1 on a free port.

It runs in its own session / process group (``start_new_session``): MLflow spawns helper processes, and stopping
the whole group leaves no orphans. ``stop()`` then ``start()`` brings it back on the same port with the same store
(what the outage tests need). Use it directly or through the fixtures in ``tests/conftest_tracking.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_binary() -> str:
    """The venv's `mlflow` (next to the running interpreter), else the one on PATH."""
    cand = Path(sys.executable).with_name("mlflow")
    return str(cand) if cand.exists() else "mlflow"


class MlflowServer:
    def __init__(self, root: str | os.PathLike, port: int | None = None, start_timeout: float = 90.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [mlflow_binary(), "server", "--backend-store-uri", f"sqlite:///{self.db}",
                "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self) -> MlflowServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=self.root)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {self.start_timeout:.0f} s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server's whole process group (SIGKILL by default: an abrupt outage) and wait for the port."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)
        # helpers of the group may outlive the leader for a moment: wait until nothing answers on the port
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._port_open():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.1)

    def restart(self) -> MlflowServer:
        self.stop()
        return self.start()

    def _port_open(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
