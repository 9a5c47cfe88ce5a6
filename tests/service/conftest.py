"""Start the real BentoML server as a subprocess on a free port and speak HTTP to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `bentoml serve` process with its own settings."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        target: str = "service.service:DeepServe",
        cwd: Path = REPO,
        wait: bool = True,
        pythonpath: bool = True,
        host: str = "127.0.0.1",
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"deepserve-test-{self.port}.log"
        full_env = {**os.environ, **(env or {})}
        # BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir when a server starts: servers
        # that share a BENTOML_HOME erase each other's metrics (docs/operations.md)
        full_env.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix=f"bentoml-{self.port}-"))
        full_env.pop("PYTHONPATH", None)
        if pythonpath:
            full_env["PYTHONPATH"] = str(REPO)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--host", host, "--port", str(self.port)],
            cwd=cwd,
            env=full_env,
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    """deepserve with default settings and the committed models."""
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
